"""Readers refuse files that ask for far more memory than they hold.

Stride-0 torch tensors over a tiny storage, zip members that inflate a
thousandfold, Orbax metadata declaring [10^6, 10^6] arrays: each is refused
with a CheckpointError *before* the memory is allocated (checked with
tracemalloc's peak, which is deterministic), and valid files are read with one
copy of their bytes at most.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from jtl.weights import read, readers
from jtl.errors import CheckpointError

MiB = 1 << 20


# ------------------------------------------------- hand-written torch pickles


def _str(text: str) -> bytes:
  data = text.encode()
  return b"X" + len(data).to_bytes(4, "little") + data


def _int(value: int) -> bytes:
  if 0 <= value < 2**31:
    return b"J" + value.to_bytes(4, "little", signed=True)
  data = value.to_bytes(8, "little", signed=True)
  return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _tuple(items) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor(key: str, numel: int, offset: int, size, stride,
            storage: str = "FloatStorage") -> bytes:
  pid = _tuple([_str("storage"), _global("torch", storage), _str(key),
                _str("cpu"), _int(numel)]) + b"Q"  # BINPERSID
  args = _tuple([pid, _int(offset), _tuple(map(_int, size)),
                 _tuple(map(_int, stride)), b"\x89",
                 _global("collections", "OrderedDict") + b")R"])
  return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def state_dict_pickle(tensors: dict, numels: dict) -> bytes:
  """A protocol-2 pickle of {name: tensor} as torch.save writes it.

  `tensors` maps a name to (storage key, offset, size, stride); `numels`
  maps a storage key to its element count.
  """
  body = b"".join(_str(name) + _tensor(key, numels[key], off, size, stride)
                  for name, (key, off, size, stride) in tensors.items())
  return b"\x80\x02}(" + body + b"u."


def torch_zip(path, tensors: dict, storages: dict, *,
              compression: int = zipfile.ZIP_STORED) -> None:
  """Writes a torch.save zip archive; `storages` maps key -> float32 array."""
  numels = {k: v.size for k, v in storages.items()}
  with zipfile.ZipFile(path, "w", compression) as zf:
    zf.writestr("archive/data.pkl", state_dict_pickle(tensors, numels))
    zf.writestr("archive/byteorder", "little")
    for key, arr in storages.items():
      with zf.open(f"archive/data/{key}", "w", force_zip64=True) as f:
        for i in range(0, arr.size, MiB):
          f.write(arr[i:i + MiB].tobytes())
    zf.writestr("archive/version", "3\n")


def torch_legacy(path, tensors: dict, storages: dict) -> None:
  """Writes a legacy (non-zip) torch.save stream."""
  out = io.BytesIO()
  for obj in (0x1950A86A20F9469CFC6C, 1001,
              {"protocol_version": 1001, "little_endian": True}):
    pickle.dump(obj, out, protocol=2)
  out.write(state_dict_pickle(tensors, {k: v.size for k, v in storages.items()}))
  pickle.dump(list(storages), out, protocol=2)
  for arr in storages.values():
    out.write(arr.size.to_bytes(8, "little") + arr.astype("<f4").tobytes())
  path.write_bytes(out.getvalue())


def peak_bytes(fn, *args, **kwargs):
  """Runs fn and returns (its result or exception, tracemalloc peak)."""
  tracemalloc.start()
  try:
    try:
      result = fn(*args, **kwargs)
    except CheckpointError as e:
      result = e
    return result, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


# ------------------------------------------------------ item 8: amplification


@pytest.mark.parametrize("writer", [torch_zip, torch_legacy])
def test_stride0_tensors_over_a_tiny_storage_are_refused(tmp_path, writer):
  # 1000 tensors of 200 x 1000 floats, all reading one element: 800 MB from
  # a ~160 KB file.
  tensors = {f"w{i}": ("0", 0, (200, 1000), (0, 0)) for i in range(1000)}
  path = tmp_path / "amplified.pt"
  writer(path, tensors, {"0": np.ones(1, np.float32)})
  assert path.stat().st_size < 200_000
  err, peak = peak_bytes(read, path)
  assert isinstance(err, CheckpointError), err
  assert str(path) in str(err) and "max_expansion" in str(err)
  assert "stride=(0, 0)" in str(err) and "'w" in str(err)
  assert peak < 80 * MiB  # the 64 MiB floor is spent, nothing beyond it


def test_one_tensor_asking_for_24_gib_is_refused_before_allocating(tmp_path):
  path = tmp_path / "huge.pt"
  torch_zip(path, {"w": ("0", 0, (2**31, 3), (0, 0))},
            {"0": np.ones(1, np.float32)})
  err, peak = peak_bytes(read, path)
  assert isinstance(err, CheckpointError)
  assert "tensor 'w' (25769803776 bytes" in str(err)
  assert peak < 4 * MiB


def test_tied_weights_count_once_and_share_memory(tmp_path, monkeypatch):
  monkeypatch.setattr(readers, "EXPANSION_FLOOR", 0)
  base = np.arange(MiB // 4, dtype=np.float32)  # a 1 MiB storage
  tensors = {f"tied{i}": ("0", 0, (512, 512), (512, 1)) for i in range(8)}
  tensors["transposed"] = ("0", 0, (512, 512), (1, 512))
  tensors["offset"] = ("0", 512, (2, 3), (512, 1))
  path = tmp_path / "tied.pt"
  torch_zip(path, tensors, {"0": base})
  flat = read(path, max_expansion=1.1)  # 9 views of one storage fit in 1.1x
  np.testing.assert_array_equal(flat["tied3"], base.reshape(512, 512))
  np.testing.assert_array_equal(flat["transposed"], base.reshape(512, 512).T)
  np.testing.assert_array_equal(flat["offset"], base[512:1536].reshape(2, 512)[:, :3])
  assert np.shares_memory(flat["tied0"], flat["tied7"])
  assert flat["transposed"].flags.writeable
  # A stride-0 view is expanded, so it is charged: 1 MiB more does not fit.
  tensors["expanded"] = ("0", 0, (512, 512), (0, 1))
  torch_zip(path, tensors, {"0": base})
  with pytest.raises(CheckpointError, match="tensor 'expanded'"):
    read(path, max_expansion=1.1)
  assert read(path, max_expansion=2.5)["expanded"].shape == (512, 512)
  assert read(path, max_expansion=None)["expanded"][3, 5] == 5.0


# ---------------------------------------------------------- item 9: zip bombs


def _npz_bomb(path, mib: int) -> None:
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {"descr": "<f4", "fortran_order": False, "shape": (mib * MiB // 4,)})
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    with zf.open("w.npy", "w", force_zip64=True) as f:
      f.write(header.getvalue())
      for _ in range(mib):
        f.write(bytes(MiB))


def test_npz_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
  monkeypatch.setattr(readers, "EXPANSION_FLOOR", MiB)
  path = tmp_path / "bomb.npz"
  _npz_bomb(path, 8)
  assert path.stat().st_size < 64_000
  err, peak = peak_bytes(read, path, max_expansion=4)
  assert isinstance(err, CheckpointError), err
  assert "'w.npy'" in str(err) and "zip bomb" in str(err)
  assert "max_expansion" in str(err)
  assert peak < MiB // 2  # nothing was inflated
  assert read(path, max_expansion=None)["w"].shape == (2 * MiB,)


def test_torch_deflated_storage_bomb_is_refused_before_inflating(
    tmp_path, monkeypatch):
  monkeypatch.setattr(readers, "EXPANSION_FLOOR", MiB)
  path = tmp_path / "bomb.pt"
  torch_zip(path, {"w": ("0", 0, (2 * MiB,), (1,))},
            {"0": np.zeros(2 * MiB, np.float32)}, compression=zipfile.ZIP_DEFLATED)
  assert path.stat().st_size < 64_000
  err, peak = peak_bytes(read, path)
  assert isinstance(err, CheckpointError), err
  assert "archive/data/0" in str(err) and "max_expansion" in str(err)
  assert peak < MiB // 2


def test_member_whose_declared_size_lies_is_capped(tmp_path):
  # The zip headers say 1000 bytes; the deflated stream holds 8 MiB.
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {"descr": "<f4", "fortran_order": False, "shape": (2 * MiB,)})
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("w.npy", header.getvalue() + bytes(8 * MiB))
  data = bytearray(buf.getvalue())
  for magic, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
    pos = data.index(magic) + at
    assert int.from_bytes(data[pos:pos + 4], "little") == 8 * MiB + 128
    data[pos:pos + 4] = (1000).to_bytes(4, "little")
  path = tmp_path / "liar.npz"
  path.write_bytes(bytes(data))
  err, peak = peak_bytes(read, path, max_expansion=None)
  assert isinstance(err, CheckpointError), err
  assert "liar.npz" in str(err)  # zipfile stops at 1000 bytes (bad CRC)
  assert peak < MiB // 2


@pytest.mark.parametrize("kind", ["npz", "torch_zip", "torch_legacy"])
def test_valid_files_are_copied_once(tmp_path, kind):
  arr = np.arange(2 * MiB, dtype=np.float32)  # 8 MiB
  path = tmp_path / f"w.{kind}"
  if kind == "npz":
    np.savez(path, w=arr)
  elif kind == "torch_zip":
    torch_zip(path, {"w": ("0", 0, (arr.size,), (1,))}, {"0": arr})
  else:
    torch_legacy(path, {"w": ("0", 0, (arr.size,), (1,))}, {"0": arr})
  flat, peak = peak_bytes(read, path)
  np.testing.assert_array_equal(flat["w"], arr)
  assert flat["w"].flags.writeable
  assert peak < arr.nbytes + 3 * MiB  # before: the bytes read, then a copy


# ------------------------------------------- item 12: paths, steps, float8


def safetensors_bytes(entries: dict, data: bytes) -> bytes:
  header = json.dumps(entries).encode()
  return len(header).to_bytes(8, "little") + header + data


def test_float8_safetensors_are_read(tmp_path):
  import ml_dtypes
  e4 = np.array([0.5, -1.75, 448.0], ml_dtypes.float8_e4m3fn)
  e5 = np.array([[1.0, -2.0], [0.25, 57344.0]], ml_dtypes.float8_e5m2)
  path = tmp_path / "fp8.safetensors"
  path.write_bytes(safetensors_bytes(
      {"a": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [0, 3]},
       "b": {"dtype": "F8_E5M2", "shape": [2, 2], "data_offsets": [3, 7]},
       "__metadata__": {"format": "pt"}}, e4.tobytes() + e5.tobytes()))
  flat = read(path)
  assert flat["a"].dtype == ml_dtypes.float8_e4m3fn
  assert flat["b"].dtype == ml_dtypes.float8_e5m2
  np.testing.assert_array_equal(flat["a"].astype(np.float32), [0.5, -1.75, 448])
  np.testing.assert_array_equal(flat["b"].astype(np.float32),
                                [[1, -2], [0.25, 57344]])
  path.write_bytes(safetensors_bytes(
      {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"))
  with pytest.raises(CheckpointError, match="tensor 'a': dtype 'F4' is not "
                     "supported") as e:
    read(path)
  assert "F8_E4M3" in str(e.value) and str(path) in str(e.value)


def test_safetensors_offsets_are_checked(tmp_path):
  path = tmp_path / "bad.safetensors"
  for entries, match in [
      ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
       "needs 16 bytes"),
      ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
       "overlap"),
      ({"a": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}},
       "data section of 16 bytes")]:
    path.write_bytes(safetensors_bytes(entries, bytes(16)))
    with pytest.raises(CheckpointError, match=match):
      read(path)


@pytest.fixture(scope="module")
def orbax_run(tmp_path_factory):
  """A CheckpointManager run with steps 1 and 2 of a tiny tree."""
  import orbax.checkpoint as ocp
  root = tmp_path_factory.mktemp("orbax") / "ckpts"
  tree = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                     "b": np.ones(3, np.int32)}}
  with ocp.CheckpointManager(root, item_names=("state",)) as mngr:
    for step in (1, 2):
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    mngr.wait_until_finished()
  return root


def test_relative_orbax_paths_are_read(orbax_run, monkeypatch):
  monkeypatch.chdir(orbax_run.parent)
  for rel in ("ckpts", "ckpts/2", os.path.join("ckpts", "1", "state")):
    flat = read(rel)
    key = "params/w" if rel.endswith("state") else "state/params/w"
    np.testing.assert_array_equal(flat[key], np.arange(6).reshape(2, 3))


def test_step_folder_without_a_checkpoint_is_an_error(orbax_run, tmp_path):
  import shutil
  root = tmp_path / "ckpts"
  shutil.copytree(orbax_run, root)
  (root / "50").mkdir()
  with pytest.raises(CheckpointError, match="numbered step folder without a "
                     "checkpoint") as e:
    read(root / "50")
  assert str(root / "50") in str(e.value)
  with pytest.raises(CheckpointError, match="latest step folder") as e:
    read(root)  # step 50 is the latest and holds nothing
  assert "earlier step" in str(e.value)
  (root / "50" / "junk").mkdir()
  (root / "50" / "junk" / "x.txt").write_text("junk")
  (root / "50" / "0").mkdir()
  for where in (root / "50", root):
    with pytest.raises(CheckpointError, match="holds no checkpoint|without a"):
      read(where)


# ------------------------------------------------ item 10: Orbax verification


def _kv(item):
  import tensorstore as ts
  return ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()


def _zarray_edit(**changes):
  def edit(raw: bytes) -> bytes:
    meta = json.loads(raw)
    meta.update(changes)
    return json.dumps(meta).encode()
  return edit


def _copy_item(orbax_run, tmp_path, name):
  import shutil
  shutil.copytree(orbax_run / "1" / "state", tmp_path / name)
  return tmp_path / name


_DAMAGE = {  # key in the OCDBT store -> edit (None: delete), expected message
    "shape_huge": ("params.w/.zarray", _zarray_edit(shape=[10**6, 10**6]),
                   "'params.w' declares shape \\[1000000, 1000000\\] in chunks of "
                   "\\[2, 3\\], that is 166667000000 chunks"),
    "chunks_huge": ("params.w/.zarray", _zarray_edit(
        shape=[10**6, 10**6], chunks=[10**6, 10**6]),
        "fewer than the 122070313 bytes it needs"),
    "chunks_blosc": ("params.w/.zarray", _zarray_edit(
        shape=[2, 3], chunks=[10**6, 10**6], compressor={"id": "blosc"}),
        "fewer than the 122070313 bytes it needs"),
    "dtype": ("params.w/.zarray", _zarray_edit(dtype="<f8"),
              "should hold 48 bytes"),
    "bad_dtype": ("params.w/.zarray", _zarray_edit(dtype="<q7"),
                  "a known dtype"),
    "unparsable": ("params.b/.zarray", lambda raw: raw[:-5],
                   "'params.b': unparsable"),
    "no_zarray": ("params.b/.zarray", None, "'params.b' .* has no '.zarray'"),
    "no_chunk": ("params.b/0", None, "'params.b' declares shape \\[3\\]"),
    "bad_chunk": ("params.w/0.0", lambda raw: b"\0" * len(raw),
                  "is not zstd data"),
}


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_verify_orbax_names_the_damaged_array(orbax_run, tmp_path, damage):
  import tensorstore as ts

  from jtl.weights.orbax_verify import verify_orbax
  item = _copy_item(orbax_run, tmp_path, damage)
  key, edit, match = _DAMAGE[damage]
  kv = _kv(item)
  if edit is None:
    kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()
  else:
    kv[key] = edit(kv[key])
  with pytest.raises(CheckpointError, match=match) as e:
    verify_orbax(item)
  assert str(item) in str(e.value) and "damaged" in str(e.value)
  with pytest.raises(CheckpointError, match=match):
    read(item)


def test_verify_orbax_files(orbax_run, tmp_path, monkeypatch):
  from jtl.weights.orbax_verify import verify_orbax
  monkeypatch.chdir(orbax_run.parent)
  assert verify_orbax(os.path.join("ckpts", "2", "state")) is None  # relative
  item = _copy_item(orbax_run, tmp_path, "stray")
  (item / "notes.txt").write_text("stray entries are fine")
  _kv(item)["extra/key"] = b"stray"
  verify_orbax(item)
  cases = {
      "_METADATA": (lambda p: p.write_text("{not json"), "_METADATA is unreadable"),
      "manifest.ocdbt": (lambda p: p.unlink(), "manifest.ocdbt is missing"),
      "d": (lambda p: [f.write_bytes(f.read_bytes()[:20]) for f in p.rglob("*")
                       if f.is_file()], "damaged Orbax checkpoint"),
  }
  for name, (damage, match) in cases.items():
    item = _copy_item(orbax_run, tmp_path, f"file_{name}")
    damage(item / name)
    if name == "d":  # the process-level store holds the data
      damage(item / "ocdbt.process_0" / "d")
    with pytest.raises(CheckpointError, match=match):
      verify_orbax(item)
  with pytest.raises(CheckpointError, match="no such checkpoint directory"):
    verify_orbax(tmp_path / "absent")


def test_huge_declared_orbax_shape_does_not_abort_the_interpreter(
    orbax_run, tmp_path):
  # Before: TensorStore allocated 8 TB for the restore: std::bad_alloc, 134.
  item = _copy_item(orbax_run, tmp_path, "huge")
  kv = _kv(item)
  kv["params.w/.zarray"] = _zarray_edit(
      shape=[10**6, 10**6], chunks=[10**6, 10**6])(kv["params.w/.zarray"])
  code = ("import sys; from jtl.weights import read; from jtl.errors "
          "import CheckpointError\ntry:\n  read(sys.argv[1])\nexcept "
          "CheckpointError as e:\n  print('REFUSED', e)\n")
  proc = subprocess.run([sys.executable, "-c", code, str(item)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "REFUSED" in proc.stdout and "'params.w'" in proc.stdout
