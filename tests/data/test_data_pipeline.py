"""make_dataset on in-memory arrays: order, resume, padding, augmentation, sharding."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtl.data import dataset_info, get_normalizer, make_dataset, prefetch_to_device
from jtl.errors import DataError, DeviceError


def _arrays(n: int = 20, size: int = 8, classes: int = 4, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  # Pixel (0, 0, 0) encodes the example id so that order can be read back.
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  images[:, :, :, 0] = np.arange(n, dtype=np.uint8)[:, None, None]
  return {"train": {"image": images, "label": np.arange(n) % classes},
          "test": {"image": images[:10], "label": np.arange(min(n, 10)) % classes}}


def _ids(batch: dict) -> list[int]:
  # With "none" normalisation and no augmentation, red == example id.
  return [int(round(v)) for v in batch["inputs"][:, 0, 0, 0]]


def _train(data, **kw):
  args = dict(split="train", batch_size=4, train=True, image_size=8, seed=3)
  args.update(kw)
  return make_dataset(data, **args)


def test_train_order_is_a_function_of_the_seed():
  data = _arrays()
  take = lambda it, k: [next(it) for _ in range(k)]
  a = take(_train(data, augment=False, flip=False), 10)
  b = take(_train(data, augment=False, flip=False), 10)
  c = take(_train(data, augment=False, flip=False, seed=4), 10)
  ids_a = [i for x in a for i in _ids(x)]
  assert ids_a == [i for x in b for i in _ids(x)]
  assert ids_a != [i for x in c for i in _ids(x)]
  # Each epoch (5 batches of 4) is a permutation of the 20 examples, and the
  # two epochs are shuffled differently.
  assert sorted(ids_a[:20]) == list(range(20)) == sorted(ids_a[20:])
  assert ids_a[:20] != ids_a[20:]
  for x in a:
    np.testing.assert_array_equal(x["label"], np.array(_ids(x)) % 4)
    assert x["label"].dtype == np.int32 and x["mask"].all()


def test_start_step_resumes_exactly_with_augmentation():
  data = _arrays()
  full = _train(data, mixup_alpha=0.4)
  batches = [next(full) for _ in range(13)]
  for k in (0, 7, 12):
    resumed = _train(data, mixup_alpha=0.4, start_step=k)
    for want in batches[k:k + 1]:
      got = next(resumed)
      np.testing.assert_array_equal(got["inputs"], want["inputs"])
      np.testing.assert_array_equal(got["label"], want["label"])


def test_num_epochs_drops_the_remainder():
  it = _train(_arrays(n=18), num_epochs=2)
  batches = list(it)
  # 18 examples, batch 4: 4 full batches per epoch... over the 36-example stream
  # the pipeline batches across the epoch boundary: 36 // 4 = 9.
  assert len(batches) == it.num_batches == 9
  assert all(b["inputs"].shape == (4, 8, 8, 3) for b in batches)


def test_eval_pads_and_counts_every_example_once():
  data = _arrays()
  it = make_dataset(data, split="test", batch_size=4, train=False, image_size=8)
  batches = list(it)
  assert len(batches) == len(it) == 3
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == 10 and masks.tolist() == [True] * 10 + [False] * 2
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  ids = [i for b in batches for i, m in zip(_ids(b), b["mask"]) if m]
  assert collections.Counter(labels.tolist()) == collections.Counter(
      data["test"]["label"].tolist())
  assert ids == list(range(10))  # eval keeps the dataset order
  assert np.all(batches[-1]["inputs"][2:] == 0)


def test_multi_process_shards_are_disjoint_and_complete():
  data = _arrays(n=21)
  seen, counts = [], []
  for pi in range(2):
    it = make_dataset(data, split="train[:11]", batch_size=4, train=False, image_size=8,
                      process_index=pi, process_count=2)
    batches = list(it)
    counts.append(len(batches))
    assert all(b["inputs"].shape[0] == 2 for b in batches)  # 4 // 2 rows each
    seen.append([i for b in batches for i, m in zip(_ids(b), b["mask"]) if m])
  assert counts == [3, 3]  # same number of eval steps on every process
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(11))
  train = [set(i for _ in range(3) for i in _ids(next(it)))
           for it in (_train(data, augment=False, flip=False, process_index=p,
                             process_count=2) for p in range(2))]
  assert not train[0] & train[1]


def test_mixup_and_cutmix_mix_soft_labels_and_refuse_a_nan_alpha():
  data = _arrays(n=8, classes=2)
  for split in data.values():
    split["label"] = np.eye(2, dtype=np.float32)[split["label"]] * 0.8 + 0.1
  for kw in ({"mixup_alpha": 1.0}, {"cutmix_alpha": 1.0}):
    batch = next(_train(data, augment=False, flip=False, **kw))
    assert batch["label"].shape == (4, 2)
    np.testing.assert_allclose(batch["label"].sum(1), 1.0, rtol=1e-6)
    assert batch["label"].min() >= 0.1 - 1e-6  # mixes of rows whose entries are >= 0.1
  with pytest.raises(DataError, match="mixup_alpha=nan must be >= 0"):
    _train(data, mixup_alpha=float("nan"))
  with pytest.raises(DataError, match="positive int"):
    _train(_arrays(), image_size=-3)


def test_uneven_shards_give_every_process_the_same_batch_count():
  """10 examples over 3 processes (shards of 4, 3, 3): each yields len() batches,
  the same count, so no host runs a step the others wait for."""
  data = _arrays(n=10)
  for pc, bs in ((3, 3), (4, 4)):
    counts = []
    for pi in range(pc):
      it = make_dataset(data, split="train", batch_size=bs, train=True, num_epochs=1, seed=1,
                        image_size=8, augment=False, flip=False, process_index=pi,
                        process_count=pc)
      counts.append((len(it), len(list(it))))
    assert len(set(counts)) == 1 and counts[0][0] == counts[0][1], counts


def test_augmentation_shapes_ranges_and_normalisation():
  data = _arrays(n=8, size=16)
  aug = next(_train(data, image_size=(12, 10), normalize="efficientnet"))
  assert aug["inputs"].shape == (4, 12, 10, 3) and aug["inputs"].dtype == np.float32
  lo, hi = (0 - 127) / 128, (255 - 127) / 128
  assert aug["inputs"].min() >= lo - 1e-6 and aug["inputs"].max() <= hi + 1e-6
  plain = next(_train(data, image_size=16, augment=False, flip=False, normalize="vit"))
  ids = _ids(next(_train(data, image_size=16, augment=False, flip=False)))
  want = data["train"]["image"][ids].astype(np.float32) / 127.5 - 1
  np.testing.assert_allclose(plain["inputs"], want, atol=1e-5)
  imagenet = get_normalizer("imagenet")(np.full((1, 3), 255.0, np.float32))
  np.testing.assert_allclose(np.asarray(imagenet)[0],
                             (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225],
                             rtol=1e-5)
  flip = next(_train(data, image_size=16, augment=False, flip=True, seed=0,
                     start_step=0))
  # A flip keeps every row's pixels: compare sorted rows with the original.
  orig = data["train"]["image"][_ids(flip)].astype(np.float32)
  np.testing.assert_allclose(np.sort(flip["inputs"], axis=2), np.sort(orig, axis=2),
                             atol=1e-4)


def test_mixup_gives_soft_labels_that_sum_to_one():
  b = next(_train(_arrays(), mixup_alpha=0.5))
  assert b["label"].shape == (4, 4) and b["label"].dtype == np.float32
  np.testing.assert_allclose(b["label"].sum(1), 1.0, rtol=1e-6)
  assert (b["label"] > 0).sum() > 4  # at least one row is a real mixture


def test_grayscale_float_images_become_three_channels():
  data = {"train": {"image": np.full((4, 5, 5), 200.0, np.float32), "label": [0, 1, 0, 1]}}
  b = next(_train(data, augment=False, flip=False, image_size=3))
  assert b["inputs"].shape == (4, 3, 3, 3)
  np.testing.assert_allclose(b["inputs"], 200.0, atol=1e-3)


def test_labels_outside_num_classes_name_the_values():
  data = _arrays()
  data["test"]["label"] = np.array([0, 1, 7, -1, 2, 3, 0, 1, 2, 3])
  with pytest.raises(DataError, match=r"(?s)\[0, 4\).*split 'test'.*\[-1, 7\]") as e:
    dataset_info(data, num_classes=4)
  assert "in-memory arrays" in str(e.value)
  with pytest.raises(DataError, match=r"label value\(s\) \[4, 5\]"):
    make_dataset({"train": {"image": np.zeros((6, 2, 2, 3)), "label": np.arange(6)}},
                 split="train", batch_size=2, train=True, num_classes=4)


def test_bad_arguments_are_reported():
  data = _arrays()
  with pytest.raises(DataError, match="Unknown split 'valid'.*'test', 'train'"):
    make_dataset(data, split="valid", batch_size=4, train=False)
  with pytest.raises(DataError, match=r"(?s)multiple of process_count=2.*mixup_alpha=-1"
                                      r".*crop_fraction=0"):
    _train(data, batch_size=3, process_index=0, process_count=2, mixup_alpha=-1,
           crop_fraction=0)
  with pytest.raises(DataError, match="Unknown normalisation 'resnet'"):
    get_normalizer("resnet")
  with pytest.raises(DataError, match="12 images but 3 labels"):
    dataset_info({"train": {"image": np.zeros((12, 2, 2, 3)), "label": [0, 1, 2]}})
  assert dataset_info(data) == (4, {"train": 20, "test": 10}, ["0", "1", "2", "3"])


def test_prefetch_to_device_shards_over_the_mesh():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert len(jax.devices()) == 8
  sharding = NamedSharding(mesh, P("data"))
  it = _train(_arrays(), batch_size=8, augment=False, flip=False)
  host = [next(_train(_arrays(), batch_size=8, augment=False, flip=False))]
  first = next(prefetch_to_device(it, 2, sharding))
  assert first["inputs"].sharding == sharding
  assert len(first["inputs"].addressable_shards) == 8
  assert first["inputs"].addressable_shards[3].data.shape == (1, 8, 8, 3)
  np.testing.assert_array_equal(np.asarray(first["label"]), host[0]["label"])
  with pytest.raises(DeviceError, match="divisible"):
    next(prefetch_to_device(_train(_arrays(), batch_size=4), 1, sharding))


@pytest.mark.parametrize("preset, module", [
    ("efficientnet", "efficientnet"), ("imagenet", "resnet"), ("vit", "vit")])
def test_presets_match_the_zoo_models_own_preprocessing(preset, module):
  models = pytest.importorskip(f"jtl.models.{module}")
  x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
  want = np.asarray(models.preprocess(x, size=None))
  np.testing.assert_allclose(np.asarray(get_normalizer(preset)(x)), want, rtol=1e-5, atol=1e-5)
