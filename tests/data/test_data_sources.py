"""Sources for make_dataset: image folders, TFDS (local builders), text."""

from __future__ import annotations

import collections
import hashlib
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jtl.data import dataset_info, make_dataset
from jtl.data.sources import resolve_source
from jtl.data.builders import lfw_subset, mnist5k
from jtl.errors import DataError


class JtlTestTinyText(tfds.core.GeneratorBasedBuilder):
  """Seven labelled sentences, to run the TFDS text path offline."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(7):
      yield i, {"text": f"sentence number {i} is {'good' if i % 2 else 'bad'}",
                "label": i % 2}


def _write_folder(root, per_class=3):
  rng = np.random.default_rng(0)
  for split, n in (("train", per_class), ("test", 2)):
    for c, name in enumerate(["cat", "dog"]):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        value = 100 * c + 10 * i + (50 if split == "test" else 0)
        image = np.full((6 + i, 5, 3), value, np.uint8)
        image[0, 0] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(root / split / name / f"{i:03d}.png")
  (root / "train" / "cat" / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  # make_dataset builds jtl's local builders by itself (no network).
  info = dataset_info("jtl_mnist5k", data_dir=data_dir)
  return data_dir, info


def test_folder_reads_images_with_labels_by_class(tmp_path):
  _write_folder(tmp_path)
  info = dataset_info(f"folder:{tmp_path}")
  assert info == (2, {"test": 4, "train": 6}, ["cat", "dog"])
  it = make_dataset(tmp_path, split="test", batch_size=3, train=False, image_size=4)
  batches = list(it)
  assert len(batches) == 2
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask]
  centre = np.concatenate([b["inputs"][:, 2, 2, 1] for b in batches])[mask]
  assert labels.tolist() == [0, 0, 1, 1]
  np.testing.assert_allclose(centre, [50, 60, 150, 160], atol=0.5)


def test_folder_unreadable_file_raises_or_is_skipped(tmp_path, caplog):
  _write_folder(tmp_path)
  bad = tmp_path / "train" / "dog" / "broken.jpg"
  bad.write_bytes(b"this is not a jpeg")
  with pytest.raises(DataError, match=r"(?s)1 file\(s\).*broken\.jpg.*on_bad_file='skip'"):
    dataset_info(f"folder:{tmp_path}")
  with caplog.at_level(logging.WARNING):
    info = dataset_info(f"folder:{tmp_path}", on_bad_file="skip")
  assert info.num_examples == {"test": 4, "train": 6}
  assert "Skipped 1 unreadable" in caplog.text and "broken.jpg" in caplog.text
  assert "notes.txt" in caplog.text  # files without an image extension are named too


def test_empty_class_folders_and_broken_links_are_named(tmp_path):
  _write_folder(tmp_path)
  (tmp_path / "train" / "bird").mkdir()  # a class no training image teaches
  with pytest.raises(DataError, match=r"without image files: \[.*bird"):
    dataset_info(f"folder:{tmp_path}")
  (tmp_path / "train" / "bird").rmdir()
  (tmp_path / "train" / "dog" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
  with pytest.raises(DataError, match=r"gone\.jpg: a symbolic link to a missing file"):
    dataset_info(f"folder:{tmp_path}")


def test_a_file_deleted_after_the_scan_is_named(tmp_path):
  _write_folder(tmp_path)
  batches = make_dataset(f"folder:{tmp_path}", split="train", batch_size=6, train=False,
                         image_size=8)
  (tmp_path / "train" / "dog" / "001.png").unlink()
  with pytest.raises(DataError, match=r"dog/001\.png: does not decode \(it cannot be read: .*"
                                      r"moved or deleted"):
    list(batches)


def test_a_path_given_as_a_tfds_name_points_to_folder(tmp_path):
  with pytest.raises(DataError, match=f"is a path, not a TFDS name: .*'folder:{tmp_path}'"):
    dataset_info(str(tmp_path))


def test_folder_damaged_image_body_is_named_before_reading(tmp_path):
  _write_folder(tmp_path)
  target = tmp_path / "test" / "dog" / "001.png"
  target.write_bytes(target.read_bytes()[:40])  # PNG signature, truncated body
  with pytest.raises(DataError, match=r"(?s)1 file\(s\).*test/dog/001\.png"):
    make_dataset(f"folder:{tmp_path}", split="test", batch_size=2, train=False, image_size=4)


def test_folder_truncated_jpeg_and_huge_png_are_found_at_scan(tmp_path):
  import io
  import zlib
  _write_folder(tmp_path)
  photo = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
      photo, format="JPEG")
  (tmp_path / "test" / "cat" / "cut.jpg").write_bytes(photo.getvalue()[:-200])
  # Harmless bytes after a complete JPEG are not an error (decoded in full to tell).
  (tmp_path / "test" / "cat" / "padded.jpg").write_bytes(photo.getvalue() + b"trailer")

  def chunk(kind, body):
    return (len(body).to_bytes(4, "big") + kind + body
            + zlib.crc32(kind + body).to_bytes(4, "big"))
  header = (10_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 10,000 x 10,000 RGB
  huge = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
  (tmp_path / "test" / "dog" / "huge.png").write_bytes(huge)
  with pytest.raises(DataError) as error:
    dataset_info(f"folder:{tmp_path}")
  message = str(error.value)
  assert "2 file(s)" in message and "padded.jpg" not in message
  assert "cut.jpg: a truncated or damaged JPEG" in message
  assert "huge.png: 10000 x 10000 = 100,000,000 pixels, above max_pixels" in message


def test_webp_photos_are_read_and_a_truncated_one_is_found_at_scan(tmp_path, caplog):
  _write_folder(tmp_path)
  image = np.zeros((6, 5, 3), np.uint8)
  image[..., 1] = 200
  for i in range(2):
    Image.fromarray(image).save(tmp_path / "train" / "dog" / f"photo{i}.webp", lossless=True)
  with caplog.at_level(logging.WARNING):
    for _ in range(2):  # scanned again for each split: warned once
      info = dataset_info(f"folder:{tmp_path}")
  assert info.num_examples == {"test": 4, "train": 8}
  assert caplog.text.count("Ignored 1 file(s) without an image extension") == 1
  batches = list(make_dataset(f"folder:{tmp_path}", split="train", batch_size=8, train=False,
                              image_size=4))
  green = [b["inputs"][i] for b in batches for i in range(len(b["mask"]))
           if b["mask"][i] and abs(b["inputs"][i][..., 1].mean() - 200) < 0.5]
  assert len(green) == 2 and all(abs(g[..., 0].mean()) < 0.5 for g in green)
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
  Image.fromarray(noise).save(tmp_path / "train" / "dog" / "photo1.webp", lossless=True)
  whole = (tmp_path / "train" / "dog" / "photo1.webp").read_bytes()
  (tmp_path / "train" / "dog" / "photo1.webp").write_bytes(whole[:-10])  # its end cut off
  # (PIL reads a WebP whole to open it: a cut one fails as its header.)
  with pytest.raises(DataError, match=r"not usable .*WebP images:\n  - .*photo1\.webp: "):
    dataset_info(f"folder:{tmp_path}")


def test_unknown_tfds_name_lists_close_names(tmp_path):
  with pytest.raises(DataError, match=r"(?s)'cifar_10'.*Close names: \[.*'cifar10'"):
    dataset_info("cifar_10", data_dir=tmp_path)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(DataError, match=rf"(?s)not prepared.*tfds build mnist --data_dir {tmp_path}"):
    make_dataset("mnist", split="train", batch_size=4, train=True, data_dir=tmp_path)
  assert not (tmp_path / "downloads").exists()


def test_mnist5k_builder_is_real_and_stratified(mnist_dir):
  data_dir, info = mnist_dir
  assert info == (10, {"train": 4000, "test": 1000}, [str(d) for d in range(10)])
  images, labels = mnist5k.load_arrays()
  assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
  split = mnist5k.split_indices(labels)
  assert not set(split["train"]) & set(split["test"])
  it = make_dataset("jtl_mnist5k", split="test", batch_size=384, train=False,
                    image_size=28, data_dir=data_dir)
  batches = list(it)
  assert len(batches) == 3
  mask = np.concatenate([b["mask"] for b in batches])
  got = np.concatenate([b["label"] for b in batches])[mask]
  assert mask.sum() == 1000 and np.bincount(got).tolist() == [100] * 10
  # The served pixels are the CSV's digits, gray repeated over 3 channels.
  pixels = np.concatenate([b["inputs"] for b in batches])[mask]
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2])
  want = collections.Counter(hashlib.md5(images[i].tobytes()).hexdigest()
                             for i in split["test"])
  have = collections.Counter(hashlib.md5(np.round(p[..., 0]).astype(np.uint8).tobytes())
                             .hexdigest() for p in pixels)
  assert have == want


def _fingerprints(batch):
  return [hashlib.md5(x.tobytes()).hexdigest()[:8] for x in batch["inputs"]]


def test_tfds_train_stream_is_deterministic_and_resumable(mnist_dir):
  data_dir, _ = mnist_dir
  make = lambda **kw: make_dataset("jtl_mnist5k", split="train[:100]", batch_size=20,
                                   train=True, image_size=16, data_dir=data_dir, seed=5,
                                   shuffle_buffer=32, augment=False, flip=False, **kw)
  a, b = make(), make()
  first = [next(a) for _ in range(10)]  # two epochs of 100 examples
  prints = [f for x in first for f in _fingerprints(x)]
  assert prints == [f for _ in range(10) for f in _fingerprints(next(b))]
  # Each epoch holds every example once, in a new order.
  assert sorted(prints[:100]) == sorted(prints[100:]) and prints[:100] != prints[100:]
  assert len(set(prints[:100])) == 100
  resumed = make(start_step=7)
  for want in first[7:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["label"], want["label"])
  other = next(make_dataset("jtl_mnist5k", split="train[:100]", batch_size=20, train=True,
                            image_size=16, data_dir=data_dir, seed=6, shuffle_buffer=32,
                            augment=False, flip=False))
  assert _fingerprints(other) != _fingerprints(first[0])


def test_tfds_process_shards_are_disjoint_and_complete(mnist_dir):
  data_dir, _ = mnist_dir
  shards = []
  for pi in range(2):
    batches = list(make_dataset("jtl_mnist5k", split="test[:45]", batch_size=8, train=False,
                                image_size=28, data_dir=data_dir, process_index=pi,
                                process_count=2))
    assert len(batches) == 6  # ceil(ceil(45 / 2) / 4) on both processes
    shards.append([f for b in batches for f, m in zip(_fingerprints(b), b["mask"]) if m])
  whole = list(make_dataset("jtl_mnist5k", split="test[:45]", batch_size=8, train=False,
                            image_size=28, data_dir=data_dir))
  everything = [f for b in whole for f, m in zip(_fingerprints(b), b["mask"]) if m]
  assert len(shards[0]) + len(shards[1]) == 45
  assert sorted(shards[0] + shards[1]) == sorted(everything)


def test_tfds_labels_outside_num_classes_raise(mnist_dir):
  data_dir, _ = mnist_dir
  it = make_dataset("jtl_mnist5k", split="test", batch_size=500, train=False,
                    image_size=8, data_dir=data_dir, num_classes=5)
  with pytest.raises(DataError, match=r"Label [5-9] lies outside \[0, 5\) in split 'test' of dataset 'jtl_mnist5k'"):
    list(it)


def test_tfds_text_dataset_is_tokenised(tmp_path):
  tfds.builder("jtl_test_tiny_text", data_dir=tmp_path).download_and_prepare()
  batches = list(make_dataset("jtl_test_tiny_text", split="train", batch_size=4,
                              train=False, data_dir=tmp_path, max_length=12))
  assert len(batches) == 2 and batches[1]["mask"].tolist() == [True] * 3 + [False]
  ids = batches[0]["inputs"]["input_ids"]
  assert ids.shape == (4, 12) and ids.dtype == np.int32
  assert (ids[:, 0] == 101).all()  # [CLS]
  assert batches[0]["inputs"]["attention_mask"][0].sum() == 7  # 5 words + CLS/SEP
  assert batches[1]["inputs"]["attention_mask"][3].sum() == 2  # padding row: ""


def test_rotten_tomatoes_split_and_batches():
  it = make_dataset("rotten_tomatoes", split="test[:150]", batch_size=64, train=False)
  info = it.info
  assert info.class_names == ["rotten", "fresh"]
  assert sum(info.num_examples.values()) == 7403 + 5405
  assert 0.15 < info.num_examples["test"] / 12808 < 0.25
  batches = list(it)
  assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == 150
  inputs = batches[0]["inputs"]
  assert {k: v.shape for k, v in inputs.items()} == {
      "input_ids": (64, 128), "attention_mask": (64, 128), "token_type_ids": (64, 128)}
  assert (inputs["input_ids"][:, 0] == 101).all()
  assert set(np.concatenate([b["label"] for b in batches]).tolist()) == {0, 1}
  train = lambda **kw: make_dataset("rotten_tomatoes", split="train[:300]", batch_size=32,
                                    train=True, seed=1, **kw)
  full = train()
  want = [next(full) for _ in range(12)][10]
  got = next(train(start_step=10))
  np.testing.assert_array_equal(got["inputs"]["input_ids"], want["inputs"]["input_ids"])
  np.testing.assert_array_equal(got["label"], want["label"])


def test_lfw_subset_builder_serves_the_skimage_crops(tmp_path):
  info = dataset_info("jtl_lfw_subset", data_dir=tmp_path)
  assert info == (2, {"train": 160, "test": 40}, ["non_face", "face"])
  images, labels = lfw_subset.load_arrays()
  batches = list(make_dataset("jtl_lfw_subset", split="test", batch_size=16, train=False,
                              image_size=25, data_dir=tmp_path))
  mask = np.concatenate([b["mask"] for b in batches])
  got = np.concatenate([b["inputs"][..., 1] for b in batches])[mask]
  got_labels = np.concatenate([b["label"] for b in batches])[mask]
  test = lfw_subset.split_indices(labels)["test"]
  assert np.bincount(got_labels).tolist() == [20, 20]
  # TFDS stores a split in the order of its hashed keys: compare as multisets.
  want = collections.Counter((images[i].tobytes(), int(labels[i])) for i in test)
  have = collections.Counter((np.round(g).astype(np.uint8).tobytes(), int(y))
                             for g, y in zip(got, got_labels))
  assert have == want


def test_pipelines_of_network_datasets_build_under_tfds_mock_data(tmp_path):
  # TPU configs (cifar10, oxford_flowers102, imdb_reviews) are checked offline
  # this way: TFDS serves random examples of the real features.
  with tfds.testing.mock_data(num_examples=10):
    it = make_dataset("oxford_flowers102", split="test", batch_size=4, train=False,
                      image_size=16, data_dir=tmp_path, normalize="imagenet")
    batches = list(it)
    text_batch = next(make_dataset("imdb_reviews", split="train", batch_size=2, train=True,
                                   data_dir=tmp_path))
  assert it.info.num_classes == 102 and len(batches) == it.num_batches == 3
  assert sum(int(b["mask"].sum()) for b in batches) == 10
  assert batches[0]["inputs"].shape == (4, 16, 16, 3)
  assert text_batch["inputs"]["input_ids"].shape == (2, 128)
  assert list(tmp_path.iterdir()) == []  # nothing was downloaded or written


def test_hidden_files_never_decide_the_folder_layout(tmp_path, caplog):
  """Issue 26: a .DS_Store in photos/train/ made train/ and test/ the classes."""
  _write_folder(tmp_path)
  for junk in (tmp_path / ".DS_Store", tmp_path / "train" / ".DS_Store",
               tmp_path / "test" / "._001.png", tmp_path / "train" / "cat" / "._000.png",
               tmp_path / "train" / "Thumbs.db"):
    junk.write_bytes(b"\0\x05\x16\x07 not an image")
  (tmp_path / "__MACOSX" / "train").mkdir(parents=True)
  with caplog.at_level(logging.WARNING):
    info = dataset_info(f"folder:{tmp_path}")
  assert info == (2, {"test": 4, "train": 6}, ["cat", "dog"])
  assert "._000.png" not in caplog.text  # hidden files are not even warned about


def rle8_bmp(pixels):
  """An 8-bit run-length encoded (BI_RLE8) BMP of grey palette indices:
  PIL reads it, TensorFlow's decoder does not."""
  import struct
  h, w = pixels.shape
  body = b"".join(b"".join(bytes([1, int(v)]) for v in row) + b"\0\0" for row in pixels[::-1])
  body += b"\0\1"
  palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
  offset = 14 + 40 + len(palette)
  header = b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset)
  info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(body), 2835, 2835, 256, 0)
  return header + info + palette + body


def _damaged_mid_file(image, fmt):
  """A PNG/JPEG whose header and end are intact, damaged in the middle."""
  import io
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt)
  data = buf.getvalue()
  n = len(data) // 2
  return data[:n] + b"\xff" * 50 + data[n + 50:]


def test_bmp_kinds_tensorflow_cannot_decode_are_read_as_the_check_reads_them(tmp_path):
  """Issue 26: 1-bit and RLE8 BMPs passed the check (PIL) and crashed the
  pipeline (TensorFlow's decoder) at the first evaluation."""
  _write_folder(tmp_path)
  grey = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
  (tmp_path / "test" / "cat" / "rle8.bmp").write_bytes(rle8_bmp(grey))
  bits = np.zeros((5, 6), bool)
  bits[:, 3:] = True
  Image.fromarray(bits).save(tmp_path / "test" / "dog" / "mono.bmp")
  batches = list(make_dataset(tmp_path, split="test", batch_size=8, train=False,
                              image_size=(5, 6)))
  assert len(batches) == 1 and batches[0]["mask"].sum() == 6
  by_label = batches[0]["inputs"][:6]
  np.testing.assert_allclose(by_label[2, ..., 0], grey, atol=1e-3)  # cat: 000, 001, rle8
  np.testing.assert_allclose(by_label[5, ..., 1], bits * 255.0, atol=1e-3)  # dog: ..., mono


def test_files_damaged_mid_file_are_named_before_training(tmp_path):
  """Issue 26: PNG/JPEG damaged in the middle passed the check, then stopped
  the run at its first evaluation with nothing saved."""
  from app_helpers import config_with

  from jtl.app import experiment
  from jtl.errors import ConfigError
  _write_folder(tmp_path / "photos")
  image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
  (tmp_path / "photos" / "test" / "cat" / "mid.png").write_bytes(_damaged_mid_file(image, "PNG"))
  (tmp_path / "photos" / "train" / "dog" / "mid.jpg").write_bytes(
      _damaged_mid_file(image, "JPEG"))
  dataset_info(tmp_path / "photos")  # the header check passes them: both end as they should
  config = config_with()
  config.dataset, config.num_classes = f"folder:{tmp_path / 'photos'}", 0
  with pytest.raises(ConfigError, match=r"(?s)2 file\(s\) of image folder .* do not decode.*"
                     r"test/cat/mid\.png: does not decode.*train/dog/mid\.jpg: does not decode"):
    experiment.finetune(config, tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()
  # Read without the check, the pipeline names the file.
  with pytest.raises(DataError, match=r"test/cat/mid\.png: does not decode"):
    list(make_dataset(tmp_path / "photos", split="test", batch_size=8, train=False,
                      image_size=4))


def test_file_names_that_are_not_utf8_are_read(tmp_path):
  """Issue 26: a non-UTF-8 file name passed the scan, then the first
  evaluation died with a ValueError naming no file."""
  import os
  _write_folder(tmp_path)
  name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old camera or zip writes them
  Image.fromarray(np.full((6, 5, 3), 200, np.uint8)).save(tmp_path / "test" / "dog" / name)
  assert dataset_info(tmp_path).num_examples == {"test": 5, "train": 6}
  batches = list(make_dataset(tmp_path, split="test", batch_size=5, train=False, image_size=4))
  assert batches[0]["mask"].sum() == 5 and batches[0]["label"].tolist() == [0, 0, 1, 1, 1]
  np.testing.assert_allclose(batches[0]["inputs"][4], 200.0, atol=1e-3)  # sorted after 001.png
  train = next(iter(make_dataset(tmp_path, split="train", batch_size=2, train=True,
                                 image_size=4)))
  assert train["inputs"].shape == (2, 4, 4, 3)
  from jtl.data import folder
  assert folder.shown(tmp_path / "test" / "dog" / name).endswith("caf\\xe9.png")
  (tmp_path / "train" / os.fsdecode(b"\xff\xfe")).mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
      tmp_path / "train" / os.fsdecode(b"\xff\xfe") / "0.png")
  with pytest.raises(DataError, match=r"(?s)Class folder names.*must be UTF-8.*\\xff\\xfe"):
    dataset_info(tmp_path)


def test_exif_orientation_is_applied_as_phones_show_photos(tmp_path):
  """Issue 26: phone photos with an EXIF orientation were used sideways."""
  from PIL import ImageOps
  _write_folder(tmp_path)
  stored = np.zeros((8, 16, 3), np.uint8)
  stored[:, 8:] = 255  # stored sideways: dark left half, bright right half
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  path = tmp_path / "test" / "dog" / "phone.jpg"
  Image.fromarray(stored).save(path, exif=exif, quality=100)
  upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
  assert upright.shape == (16, 8, 3) and upright[:8].mean() < 10 < 245 < upright[8:].mean()
  batch = next(iter(make_dataset(tmp_path, split="test", batch_size=8, train=False,
                                 image_size=(16, 8))))
  np.testing.assert_allclose(batch["inputs"][4], upright, atol=1e-3)  # dog: 000, 001, phone


def test_the_same_image_in_training_and_evaluation_splits_is_warned_with_the_count(
    tmp_path, caplog):
  """Issue 26: the same file content in train/ and test/ was accepted silently."""
  import shutil

  from app_helpers import config_with

  from jtl.app import preflight
  _write_folder(tmp_path)
  config = config_with()
  config.dataset, config.num_classes = f"folder:{tmp_path}", 0
  with caplog.at_level(logging.WARNING):
    preflight.preflight(config)
  assert "same content" not in caplog.text
  shutil.copy(tmp_path / "train" / "cat" / "001.png", tmp_path / "test" / "dog" / "copy1.png")
  shutil.copy(tmp_path / "train" / "dog" / "000.png", tmp_path / "test" / "dog" / "copy2.png")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    preflight.preflight(config)
  assert ("2 image(s) of eval_split='test' have the same content as a training image of "
          "'train' (e.g. test/dog/copy1.png = train/cat/001.png, test/dog/copy2.png = "
          "train/dog/000.png)") in caplog.text


def test_first_runs_building_a_local_dataset_at_once_all_succeed(tmp_path):
  """Issue 26: two of three first runs building the bundled dataset at once
  died with FileExistsError (each renamed its finished build into place)."""
  import threading
  barrier, results = threading.Barrier(3), []

  def first_run():
    barrier.wait()  # all three find the dataset unprepared
    try:
      results.append(dataset_info("jtl_lfw_subset", data_dir=tmp_path).num_examples)
    except Exception as e:  # noqa: BLE001 - the test reports any failure
      results.append(f"{type(e).__name__}: {e}")

  threads = [threading.Thread(target=first_run) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == [{"train": 160, "test": 40}] * 3
  assert sorted(p.name for p in (tmp_path / "jtl_lfw_subset").iterdir()) == [
      ".jtl-build.lock", "1.0.0"]  # one build, no incomplete.* folder left


def test_in_memory_texts_decode_utf8_and_refuse_what_is_not_text():
  labels = np.array([0, 1, 0])
  source = resolve_source({"train": {"text": [b"caf\xc3\xa9", "good", np.str_("bad")],
                                     "label": labels}})
  assert list(source.inputs["train"]) == ["café", "good", "bad"]
  cases = [([b"caf\xe9", "good", "bad"], r"texts \[0\] \(1 in all\) are bytes that are not UTF-8"),
           ([None, float("nan"), "bad"],
            r"texts \[0, 1\] \(2 in all\) are \['NoneType', 'float'\]"),
           (np.array([["a", "b"], ["c", "d"], ["e", "f"]]), r"texts must be 1-D .* shape \(3, 2\)")]
  for texts, problem in cases:
    with pytest.raises(DataError, match=problem):
      resolve_source({"train": {"text": texts, "label": labels}})
