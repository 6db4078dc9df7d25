"""Each file format's reader behind `jtl.weights.read`: npz, safetensors, msgpack, torch, ONNX.

Each reader takes a file's path and the `Budget` of the bytes it may
materialise and returns a flat {name: numpy array} dict: `to_flat_arrays`
flattens nested trees to "/"-joined names, `numeric_array` admits only numeric
dtypes. Every byte a reader inflates or copies is charged to the budget before
it is allocated; members are stream-read with their size as a hard cap and
copied once. `jtl.weights.readers` detects the format, sets the budget and
picks the reader from `READERS`.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
from etils import epath

from jtl.weights import onnx_file, torch_files
from jtl.weights.torch_pickle import Budget
from jtl.errors import CheckpointError

MAX_SAFETENSORS_HEADER = 100 << 20
_SAFETENSORS_HEADER_BYTES = 16 << 20  # headers above it: only in files over 1 GiB
# safetensors dtype names -> numpy (little-endian, as the format stores them).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t).newbyteorder("<") for name, t in {
        "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16,
        "I16": np.int16, "U32": np.uint32, "I32": np.int32, "U64": np.uint64,
        "I64": np.int64, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F32": np.float32, "F64": np.float64, "C64": np.complex64,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
        "F8_E8M0": ml_dtypes.float8_e8m0fnu}.items()}
_MAX_NODES = 1_000_000  # a state dict has thousands; guards shared-list bombs
_NODE_BYTES = 64  # what a msgpack map or list entry costs in memory, at least


def to_flat_arrays(tree: Any, path: Any, *, scalars: bool = True,
                   prefix: str = "") -> dict[str, np.ndarray]:
  """Flattens nested dicts/lists to {"a/b": array}; drops strings and None.

  With `scalars=False` plain Python numbers are dropped too (torch checkpoints
  keep e.g. "epoch" next to the tensors).
  """
  out: dict[str, np.ndarray] = {}
  on_path: set[int] = set()
  budget = [_MAX_NODES]

  def visit(node: Any, name: str) -> None:
    budget[0] -= 1
    if budget[0] < 0:
      raise CheckpointError(
          f"{path}: more than {_MAX_NODES} entries; the file is damaged or "
          "a structure is shared many times over.")
    if isinstance(node, Mapping):
      items = [(str(k), v) for k, v in node.items()]
    elif isinstance(node, (list, tuple)):
      items = [(str(i), v) for i, v in enumerate(node)]
    elif isinstance(node, (np.ndarray, np.generic)) or (
        scalars and isinstance(node, (bool, int, float, complex))):
      if isinstance(node, int) and not -2**63 <= node < 2**63:
        return
      if name in out:
        raise CheckpointError(f"{path}: the key {name!r} appears twice")
      out[name] = numeric_array(np.asarray(node), path, name)
      return
    else:
      return
    if id(node) in on_path:
      raise CheckpointError(f"{path}: {name!r} contains itself.")
    on_path.add(id(node))
    for key, child in items:
      visit(child, f"{name}/{key}" if name else key)
    on_path.discard(id(node))

  visit(tree, prefix)
  return out


def numeric_array(arr: np.ndarray, path: Any, name: str) -> np.ndarray:
  """`arr` in native byte order if it holds numbers jtl can load (bool, int,
  uint, float, ml_dtypes' bfloat16 and float8), else a CheckpointError."""
  dtype = arr.dtype
  ml = getattr(dtype.type, "__module__", "") == "ml_dtypes"
  if dtype.fields is not None or dtype.subdtype is not None or not (
      dtype.kind in "biuf" or ml):
    what = "Python objects" if dtype.hasobject else f"dtype {dtype.str!r} ({dtype})"
    raise CheckpointError(
        f"{path}: {name!r} holds {what}; jtl reads only bool, int, uint and float "
        "arrays (bfloat16 and float8 too). Convert it to one of them before "
        "saving, or drop it.")
  if dtype.byteorder not in ("=", "|") and dtype != dtype.newbyteorder("="):
    arr = arr.astype(dtype.newbyteorder("="))
  return arr


def file_head(path: epath.Path, n: int = 16) -> bytes:
  """The first `n` bytes of the file at `path`."""
  with path.open("rb") as f:
    return f.read(n)


def local_or_bytes(path: epath.Path) -> Any:
  """A local filename when there is one, else the file's bytes in memory."""
  name = os.fspath(path)
  if "://" not in name:
    return name
  return io.BytesIO(path.read_bytes())


def _file_bytes(path: epath.Path) -> bytearray:
  """The whole file in one writable buffer (arrays may be views into it)."""
  with path.open("rb") as f:
    return torch_files.read_exact(f, path.stat().length, f"{path}")


def _npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Any,
                budget: Budget) -> np.ndarray:
  """One .npy member, inflated at most to its header's size, copied once."""
  with zf.open(info) as f:
    version = np.lib.format.read_magic(f)
    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = reader(f)
    if dtype.hasobject:
      raise CheckpointError(
          f"{path}: member {info.filename!r} holds Python objects, which "
          "jtl does not unpickle.")
    numeric_array(np.zeros(0, dtype), path, info.filename[:-len(".npy")])
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > info.file_size:
      raise CheckpointError(
          f"{path}: member {info.filename!r} declares shape {shape} "
          f"({nbytes} bytes) but holds only {info.file_size} bytes.")
    budget.charge(nbytes, f"member {info.filename!r} (shape {shape})")
    raw = torch_files.read_exact(f, nbytes, f"{path}: member {info.filename!r}")
  arr = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")
  return numeric_array(arr, path, info.filename[:-len(".npy")])


def _read_npz(path: epath.Path, budget: Budget) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  with zipfile.ZipFile(local_or_bytes(path)) as zf:
    members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
    declared = sum(i.file_size for i in members)
    if budget.limit is not None and declared > budget.limit:
      big = max(members, key=lambda i: i.file_size)
      raise CheckpointError(
          f"{path}: the .npy members inflate to {declared} bytes (member "
          f"{big.filename!r}: {big.compress_size} bytes compressed, "
          f"{big.file_size} inflated), more than the limit of {budget.limit} "
          f"bytes {budget.hint}. The file is damaged or a zip bomb; if you "
          "trust it (zero-heavy or pruned weights compress far), pass a larger "
          "max_expansion= (None: no limit) to jtl.weights.read or jtl.load_pretrained.")
    for info in members:
      name = info.filename[:-len(".npy")]
      if name in out:
        raise CheckpointError(
            f"{path}: the zip holds two members named {info.filename!r}; the file is "
            "damaged (np.savez writes each name once). Save it again.")
      out[name] = _npy_member(zf, info, path, budget)
  if not out:
    raise CheckpointError(f"{path}: a zip file without .npy members, so not npz")
  return out


def _safetensors_entry(path: Any, key: str, entry: Any,
                       size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
  """Checks one header entry; returns (dtype, shape, begin, end)."""
  where = f"{path}: tensor {key!r}"
  if not isinstance(entry, dict):
    raise CheckpointError(f"{where}: header entry is not a JSON object")
  name = entry.get("dtype")
  dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
  if dtype is None:
    raise CheckpointError(
        f"{where}: dtype {entry.get('dtype')!r:.40} is not supported; jtl "
        f"reads {sorted(SAFETENSORS_DTYPES)}. Convert the tensor to one of "
        "them (e.g. F32) before saving.")
  shape, offsets = entry.get("shape"), entry.get("data_offsets")
  if not (isinstance(shape, list) and all(
      type(n) is int and n >= 0 for n in shape) and isinstance(offsets, list)
          and len(offsets) == 2 and all(type(o) is int for o in offsets)):
    raise CheckpointError(f"{where}: bad shape {shape!r:.80} or "
                          f"data_offsets {offsets!r:.80}")
  begin, end = offsets
  if not 0 <= begin <= end <= size or end - begin != math.prod(
      shape) * dtype.itemsize:
    raise CheckpointError(
        f"{where}: shape {shape} x {entry['dtype']} needs "
        f"{math.prod(shape) * dtype.itemsize} bytes, but data_offsets are "
        f"{offsets} in a data section of {size} bytes; the file is damaged.")
  return dtype, tuple(shape), begin, end


def safetensors_header(path: epath.Path, f: Any) -> tuple[dict[str, Any], int]:
  """Parses the JSON header; returns it without __metadata__, and its size."""
  head = f.read(8)
  n = int.from_bytes(head, "little") if len(head) == 8 else -1
  size = path.stat().length
  if 2 <= n <= MAX_SAFETENSORS_HEADER and n > size - 8 and f.read(1) == b"{":
    raise CheckpointError(
        f"{path}: a safetensors file cut short: its header declares {n} bytes of JSON, but "
        f"the file has only {size} bytes in all. Download or copy it again.")
  f.seek(8)
  if not 2 <= n <= min(MAX_SAFETENSORS_HEADER, size - 8):
    raise CheckpointError(
        f"{path}: not a safetensors file (the 8-byte header length "
        f"{head.hex()} is missing, or larger than the file or "
        f"{MAX_SAFETENSORS_HEADER}).")
  limit = max(_SAFETENSORS_HEADER_BYTES, min(MAX_SAFETENSORS_HEADER, size // 64))
  if n > limit:
    raise CheckpointError(
        f"{path}: the safetensors header declares {n} bytes of JSON, more than the "
        f"{limit} bytes a file of {size} bytes may have (real headers take a few "
        "hundred bytes per tensor). The file is damaged or built to exhaust memory.")

  def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
      keys = [k for k, _ in pairs]
      twice = next(k for i, k in enumerate(keys) if k in keys[:i])
      raise CheckpointError(
          f"{path}: the safetensors header names {twice!r:.80} twice; the file is "
          "damaged (a writer never repeats a name). Export it again.")
    return out

  try:
    header = json.loads(f.read(n), object_pairs_hook=unique)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(
        f"{path}: the safetensors header is not valid JSON ({e}).") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: the safetensors header is not an object")
  meta = header.pop("__metadata__", {})
  if not (isinstance(meta, dict) and all(type(v) is str for v in meta.values())):
    raise CheckpointError(
        f"{path}: the safetensors __metadata__ is not an object of strings (a "
        f"{type(meta).__name__}); the file is damaged. Export it again.")
  return header, n


def _read_safetensors(path: epath.Path, budget: Budget) -> dict[str, np.ndarray]:
  """Reads every tensor, float8 included, as views of one buffer."""
  with path.open("rb") as f:
    header, n = safetensors_header(path, f)
    size = path.stat().length - 8 - n
    entries = {k: _safetensors_entry(path, k, v, size)
               for k, v in header.items()}
    if not entries:
      raise CheckpointError(
          f"{path}: a safetensors file without tensors (its header is empty); "
          "export the weights again.")
    spans = sorted((b, e, k) for k, (_, _, b, e) in entries.items() if e > b)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
      if begin < end:
        raise CheckpointError(
            f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    budget.charge(size, f"the data section ({size} bytes)")
    buf = torch_files.read_exact(f, size, f"{path}: data section")
  out = {}
  for key, (dtype, shape, begin, end) in entries.items():
    arr = np.frombuffer(buf, dtype, (end - begin) // dtype.itemsize, begin)
    arr = arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    out[key] = arr if arr.flags.aligned else arr.copy()
  return out


def _read_msgpack(path: epath.Path, budget: Budget) -> dict[str, np.ndarray]:
  """flax.serialization's msgpack, with every length bounded by the file's size
  and every map, list and array charged to `budget` as it is built."""
  from flax import serialization  # pylint: disable=g-import-not-at-top

  data = path.read_bytes()
  size = len(data)  # no container holds more elements than the file has bytes

  def node(obj: Any) -> Any:
    budget.charge(_NODE_BYTES * (1 + len(obj)), f"a msgpack {type(obj).__name__} "
                  f"of {len(obj)} entries ({_NODE_BYTES} bytes each)")
    return obj

  def ext(code: int, raw: bytes) -> Any:
    out = serialization._msgpack_ext_unpack(code, raw)  # pylint: disable=protected-access
    budget.charge(getattr(out, "nbytes", len(raw)), f"a msgpack array ({len(raw)} bytes)")
    return out

  tree = msgpack.unpackb(
      data, ext_hook=ext, raw=False, strict_map_key=False, object_hook=node,
      list_hook=node, max_str_len=size, max_bin_len=size, max_array_len=size,
      max_map_len=size, max_ext_len=size)
  tree = serialization._unchunk_array_leaves_in_place(tree)  # pylint: disable=protected-access
  if not isinstance(tree, Mapping):
    raise CheckpointError(
        f"{path}: the msgpack data is a {type(tree).__name__}, not a mapping "
        "of arrays as flax.serialization writes.")
  return to_flat_arrays(tree, path)


def _read_torch(path: epath.Path, budget: Budget) -> dict[str, np.ndarray]:
  head = file_head(path, 4)
  if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
    with zipfile.ZipFile(local_or_bytes(path)) as zf:
      obj = torch_files.read_zip(str(path), zf, budget)
  else:
    obj = torch_files.read_legacy(str(path), _file_bytes(path), budget)
  if not isinstance(obj, Mapping):
    raise CheckpointError(
        f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping "
        "of names to tensors). Save with torch.save(model.state_dict(), ...).")
  return to_flat_arrays(obj, path, scalars=False)


def _read_onnx(path: epath.Path, budget: Budget) -> dict[str, np.ndarray]:
  return onnx_file.parse(_file_bytes(path), str(path), budget)


READERS = {"onnx": _read_onnx, "npz": _read_npz, "safetensors": _read_safetensors,
           "msgpack": _read_msgpack, "torch": _read_torch}
