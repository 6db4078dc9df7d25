"""PyTorch `torch.save` files: the zip archive and the legacy stream.

The zip archive holds `<name>/data.pkl` plus one `<name>/data/<key>` member
per storage; the legacy stream holds the magic number, the protocol version,
system info, the object pickle, the storage keys, then the raw storages. Both
pickles go through the restricted unpickler of `jtl.weights.torch_pickle`;
every length read from the file is checked against the bytes actually there
before anything is allocated.
"""

from __future__ import annotations

import struct
import zipfile
from typing import Any

import numpy as np

from jtl.weights.torch_pickle import (
  Budget,
  PlainUnpickler,
  Storage,
  materialize,
  unpickle,
)
from jtl.errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_PICKLE_BYTES = 1 << 30
_CHUNK = 1 << 20


def read_exact(f: Any, nbytes: int, what: str) -> bytearray:
  """Reads exactly `nbytes` from the file object `f` into one new buffer.

  The read is streamed in chunks with `nbytes` as a hard cap, so a member
  whose declared size lies (a zip bomb) can never inflate past it, and the
  bytes are copied once (no intermediate `bytes` of the whole member).
  """
  buf = bytearray(nbytes)
  view, pos = memoryview(buf), 0
  while pos < nbytes:
    chunk = f.read(min(_CHUNK, nbytes - pos))
    if not chunk:
      raise CheckpointError(f"{what} is truncated: {pos} of {nbytes} bytes")
    view[pos:pos + len(chunk)] = chunk
    pos += len(chunk)
  return buf


def _member(zf: zipfile.ZipFile, name: str, nbytes: int, budget: Budget,
            path: str) -> bytearray:
  """Reads the first `nbytes` of a zip member, charged to `budget` first."""
  declared = zf.getinfo(name).file_size
  if declared < nbytes:
    raise CheckpointError(
        f"{path}: member {name!r} holds {declared} bytes, but {nbytes} are "
        "needed; the file is truncated or damaged.")
  budget.charge(nbytes, f"member {name!r} ({nbytes} bytes)")
  with zf.open(name) as f:
    return read_exact(f, nbytes, f"{path}: member {name!r}")


def read_zip(path: str, zf: zipfile.ZipFile, budget: Budget) -> Any:
  """Unpickles a torch zip archive; returns the saved object (numpy leaves).

  Every byte inflated or copied is charged to `budget` before it is read.
  """
  names = zf.namelist()
  pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
  if len(pkl) != 1:
    other = "TorchScript archive" if any(
        n.endswith("/constants.pkl") for n in names) else "zip file"
    raise CheckpointError(
        f"{path}: a {other} without exactly one '<name>/data.pkl' member "
        f"(found {len(pkl)}; members: {names[:8]}), so it is not a torch.save "
        "state dict. Save with torch.save(model.state_dict(), path).")
  prefix = pkl[0][:-len("data.pkl")]
  big_endian = False
  if prefix + "byteorder" in names:
    with zf.open(prefix + "byteorder") as f:
      big_endian = f.read(16).strip() == b"big"
  size = zf.getinfo(pkl[0]).file_size
  if size > _MAX_PICKLE_BYTES:
    raise CheckpointError(f"{path}: data.pkl declares {size} bytes")
  cache: dict[str, Storage] = {}

  def load_storage(key: str, dtype: np.dtype, numel: int) -> Storage:
    if key not in cache:
      member = f"{prefix}data/{key}"
      if member not in names:
        raise CheckpointError(f"{path}: storage member {member!r} is missing")
      raw = _member(zf, member, numel * dtype.itemsize, budget, path)
      cache[key] = Storage(_from_bytes(raw, dtype, numel, big_endian))
    return cache[key]

  data = _member(zf, pkl[0], size, budget, path)
  return materialize(unpickle(path, _Reader(data), load_storage), budget)


def _from_bytes(raw: Any, dtype: np.dtype, numel: int,
                big_endian: bool) -> np.ndarray:
  """A (writable when `raw` is) array over `raw`, in native byte order."""
  if len(raw) != numel * dtype.itemsize:
    raise ValueError(f"storage has {len(raw)} bytes, expected "
                     f"{numel * dtype.itemsize}")
  arr = np.frombuffer(raw, dtype.newbyteorder(">" if big_endian else "<")
                      if dtype.itemsize > 1 else dtype, count=numel)
  return arr.astype(dtype, copy=False)


class _Reader:
  """A read-only file over a bytes buffer.

  It has no `readinto`, so the unpickler asks for bytes with `read(n)` and
  never pre-allocates the (possibly absurd) length a damaged file declares.
  """

  def __init__(self, buf: bytes | bytearray):
    self._bytes, self._buf, self.pos = buf, memoryview(buf), 0

  def read(self, n: int = -1) -> bytes:
    end = len(self._buf) if n is None or n < 0 else min(
        self.pos + n, len(self._buf))
    out = self._buf[self.pos:end].tobytes()
    self.pos = end
    return out

  def view(self, n: int) -> memoryview:
    """The next `n` bytes without a copy (fewer at the end of the buffer)."""
    out = self._buf[self.pos:self.pos + n]
    self.pos += len(out)
    return out

  def readline(self, limit: int = -1) -> bytes:
    stop = len(self._buf) if limit < 0 else min(self.pos + limit, len(self._buf))
    i = self._bytes.find(b"\n", self.pos, stop)
    return self.read((stop if i < 0 else i + 1) - self.pos)


def read_legacy(path: str, buf: bytearray, budget: Budget) -> Any:
  """Unpickles a legacy (non-zip) torch.save stream held in `buf`.

  Storages are views into `buf` (no copy); their bytes and those of any
  expanded tensor are charged to `budget`.
  """
  f = _Reader(buf)
  try:
    magic = unpickle(path, f, None, unpickler=PlainUnpickler)
  except CheckpointError:
    raise
  except Exception:  # noqa: BLE001 - any failure here means "not torch"
    magic = None
  if magic != LEGACY_MAGIC:
    raise CheckpointError(
        f"{path}: not a PyTorch file (no zip archive and no legacy magic "
        "number at the start).")
  unpickle(path, f, None, unpickler=PlainUnpickler)  # protocol version
  sys_info = unpickle(path, f, None, unpickler=PlainUnpickler)
  big_endian = isinstance(sys_info, dict) and not sys_info.get(
      "little_endian", True)
  declared: dict[str, tuple[np.dtype, int]] = {}
  storages: dict[str, Storage] = {}

  def load_storage(key: str, dtype: np.dtype, numel: int) -> Storage:
    declared.setdefault(key, (dtype, numel))
    storages.setdefault(key, Storage(np.zeros(0, dtype)))
    return storages[key]

  obj = unpickle(path, f, load_storage)
  keys = unpickle(path, f, None, unpickler=PlainUnpickler)
  if not isinstance(keys, list) or set(map(str, keys)) != set(declared):
    raise CheckpointError(
        f"{path}: the storage key list does not match the storages the "
        "tensors use; the file is damaged.")
  for key in map(str, keys):
    dtype, numel = declared[key]
    header = f.read(8)
    if len(header) != 8:
      raise CheckpointError(f"{path}: truncated before storage {key}")
    (count,) = struct.unpack("<q" if not big_endian else ">q", header)
    nbytes = count * dtype.itemsize
    if count != numel or nbytes > len(buf) - f.pos:
      raise CheckpointError(
          f"{path}: storage {key} declares {count} elements ({numel} "
          f"expected, {len(buf) - f.pos} bytes left in the file)")
    budget.charge(nbytes, f"storage {key} ({count} x {dtype})")
    storages[key].data = _from_bytes(f.view(nbytes), dtype, count,
                                     big_endian)
  return materialize(obj, budget)
