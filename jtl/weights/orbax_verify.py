"""Checks an Orbax checkpoint directory from its metadata before anything is restored.

`verify_orbax` checks a PyTree checkpoint directory from its metadata alone
(the `_METADATA` file, each array's zarr `.zarray` / `zarr.json`, the chunk
keys of the OCDBT store and the first bytes of each chunk) before anything is
restored: TensorStore allocates the shape an array declares, so a damaged
`.zarray` declaring [10^6, 10^6] would otherwise abort the interpreter.
`inspect_orbax` (and `inspect`, its failures as CheckpointErrors) also return
the bytes each array declares, which `jtl.weights.orbax_reader` checks
against the memory available before it restores them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from typing import Any

import numpy as np
from etils import epath

from jtl import paths
from jtl.errors import CheckpointError

_ARRAY_TYPES = ("np.ndarray", "jax.Array", "scalar")
_META_KEYS = (".zarray", ".zattrs", ".zgroup", "zarr.json")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# No codec inflates more than this (zstd's limit: a 4-byte RLE block holds
# 128 KiB), so a chunk decoding to N bytes must store at least N / this.
_MAX_RATIO = 1 << 15


@dataclasses.dataclass(frozen=True)
class _Array:
  """What an array's zarr metadata declares."""
  shape: tuple[int, ...]
  chunks: tuple[int, ...]  # the stored chunk (zarr3: shard) grid
  inner_bytes: int  # bytes one (zarr3: inner) chunk decodes to
  itemsize: int
  codec: str  # "zstd" or "blosc" (headers state the size), "raw", "other"

  @property
  def min_stored(self) -> int:
    """The fewest bytes a stored chunk can have and still decode."""
    ratio = 1 if self.codec == "raw" else _MAX_RATIO
    return max(1, -(-self.inner_bytes // ratio))

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.itemsize

  @property
  def num_chunks(self) -> int:
    return math.prod(-(-n // c) for n, c in zip(self.shape, self.chunks))


def _damaged(path: Any, what: str) -> CheckpointError:
  return CheckpointError(
      f"{path}: damaged Orbax checkpoint: {what}. Restore an earlier step, "
      "or save this one again.")


def _ints(value: Any, positive: bool) -> tuple[int, ...] | None:
  if not isinstance(value, list) or len(value) > 64 or not all(
      type(v) is int and (v > 0 if positive else v >= 0) for v in value):
    return None
  return tuple(value)


def _itemsize(name: Any) -> int | None:
  import ml_dtypes  # noqa: F401 - registers the float8/bfloat16 names with numpy

  try:
    return np.dtype(name).itemsize or None if isinstance(name, str) else None
  except (TypeError, ValueError):
    return None


def _parse_zarr(path: Any, name: str, raw: bytes, zarr3: bool) -> _Array:
  """Parses `.zarray` (zarr 2) or `zarr.json` (zarr 3) metadata."""
  try:
    meta = json.loads(raw)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise _damaged(path, f"array {name!r}: unparsable zarr metadata ({e})")
  meta = meta if isinstance(meta, dict) else {}
  if zarr3:
    grid = (meta.get("chunk_grid") or {}).get("configuration") or {}
    chunks, dtype = grid.get("chunk_shape"), meta.get("data_type")
    codecs = meta.get("codecs") if isinstance(meta.get("codecs"), list) else []
    inner, inner_codecs = chunks, codecs
    for codec in codecs:
      if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
        conf = codec.get("configuration") or {}
        inner, inner_codecs = conf.get("chunk_shape"), conf.get("codecs") or []
    names = [c.get("name") for c in inner_codecs if isinstance(c, dict)]
    codec = _codec(next((n for n in names if n not in ("bytes", "transpose",
                                                       "crc32c")), None))
  else:
    chunks = inner = meta.get("chunks")
    dtype = meta.get("dtype")
    compressor = meta.get("compressor")
    codec = _codec(compressor.get("id") if isinstance(compressor, dict)
                   else compressor)
    codec = "other" if meta.get("filters") else codec
  shape, chunks = _ints(meta.get("shape"), False), _ints(chunks, True)
  inner, itemsize = _ints(inner, True), _itemsize(dtype)
  if None in (shape, chunks, inner, itemsize) or not (
      len(shape) == len(chunks) == len(inner)):
    raise _damaged(path, f"array {name!r}: zarr metadata with shape "
                   f"{meta.get('shape')!r:.80}, chunks {chunks!r:.80}, dtype "
                   f"{dtype!r:.40}: expected lists of non-negative integers "
                   "of one length and a known dtype")
  return _Array(shape, chunks, math.prod(inner) * itemsize, itemsize, codec)


def _codec(name: Any) -> str:
  if name is None:
    return "raw"
  return name if name in ("zstd", "blosc") else "other"


def _declared_size(arr: _Array, head: bytes) -> int | None:
  """The decoded size a chunk's codec header states (-1: not that codec)."""
  if arr.codec == "zstd":
    return _frame_content_size(head)
  if arr.codec == "blosc":
    return int.from_bytes(head[4:8], "little") if len(head) >= 16 else -1
  return None


def _frame_content_size(head: bytes) -> int | None:
  """The decompressed size a zstd frame header declares (None: not stated)."""
  if len(head) < 6 or head[:4] != _ZSTD_MAGIC:
    return -1 if head[:4] != _ZSTD_MAGIC else None
  fhd = head[4]
  single, fcs_flag = (fhd >> 5) & 1, fhd >> 6
  size = (0, 2, 4, 8)[fcs_flag] or single
  if not size:
    return None
  start = 5 + (not single) + (0, 1, 2, 4)[fhd & 3]
  field = head[start:start + size]
  if len(field) != size:
    return -1
  return int.from_bytes(field, "little") + (256 if size == 2 else 0)


def _open_store(path: epath.Path, use_ocdbt: bool) -> Any:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  base = {"driver": "file", "path": os.fspath(path) + "/"}
  if "://" in os.fspath(path):
    base = os.fspath(path) + "/"
  if use_ocdbt:
    if not (path / "manifest.ocdbt").exists():
      raise _damaged(path, "manifest.ocdbt is missing (the metadata says "
                     "the arrays are in an OCDBT store)")
    return ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
  return ts.KvStore.open(base).result()


def _required(path: epath.Path) -> tuple[list[str], dict[str, Any]]:
  """The array names `_METADATA` lists, and its storage flags."""
  try:
    meta = json.loads((path / "_METADATA").read_text())
  except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
    raise _damaged(path, f"_METADATA is unreadable ({type(e).__name__}: "
                   f"{str(e)[:200]})")
  tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
  if not isinstance(tree, dict):
    raise _damaged(path, "_METADATA has no 'tree_metadata' mapping")
  names = []
  for entry in tree.values():
    try:
      value = entry["value_metadata"]
      keys = [str(k["key"]) for k in entry["key_metadata"]]
    except (TypeError, KeyError) as e:
      raise _damaged(path, f"_METADATA entry {str(entry)[:80]} lacks {e}")
    if value.get("value_type") in _ARRAY_TYPES and not value.get(
        "skip_deserialize"):
      names.append(".".join(keys))
  return names, meta


def _chunk_reads(store: Any, keys: list[bytes],
                 arr: _Array) -> list[tuple[Any, ...]]:
  """Per chunk: its first 18 bytes, its last byte, byte `min_stored - 1`."""
  need = arr.min_stored
  return [(store.read(k, byte_range=slice(0, 18)),
           store.read(k, byte_range=slice(-1, None)),
           store.read(k, byte_range=slice(need - 1, need))) for k in keys]


def _head(store: Any, key: bytes, head: Any, tail: Any, probe: Any,
          need: int) -> bytes:
  """The first (up to 18) bytes of a chunk; raises if it is missing/cut."""
  if tail.result().state != "value" or not tail.result().value:
    raise ValueError("missing or empty")
  try:
    probe.result()
  except Exception:  # noqa: BLE001 - OUT_OF_RANGE: shorter than `need`
    raise ValueError(f"it holds fewer than the {need} bytes it needs to "
                     "decode to its declared size") from None
  try:
    return head.result().value
  except Exception:  # noqa: BLE001 - a value shorter than 18 bytes
    return store.read(key).result().value[:18]


def _first_missing(name: str, arr: _Array, keys: list[bytes]) -> str:
  """"; chunk 0.1 is missing" for the first grid chunk not in `keys` ("" if
  the grid is too large to list)."""
  if arr.num_chunks > 1_000_000:
    return ""
  stored = set()
  for key in keys:
    leaf = key.decode(errors="replace")[len(name) + 1:]
    parts = re.split(r"[./]", leaf[2:] if leaf.startswith(("c/", "c.")) else leaf)
    if all(p.isdigit() for p in parts):
      stored.add(tuple(int(p) for p in parts))
  grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks)]
  for index in itertools.product(*grid):
    if index not in stored:
      return f"; chunk {'.'.join(map(str, index)) or '0'} is missing"
  return ""


def _check_chunks(path: Any, name: str, arr: _Array, keys: list[bytes],
                  reads: list[tuple[Any, Any]], all_stored: bool,
                  store: Any) -> None:
  """Chunk count, and each chunk's presence and zstd frame content size."""
  if (all_stored and len(keys) < arr.num_chunks) or (
      arr.num_chunks == 0 and keys):
    raise _damaged(path, f"array {name!r} declares shape {list(arr.shape)} in "
                   f"chunks of {list(arr.chunks)}, that is {arr.num_chunks} "
                   f"chunks ({arr.nbytes} bytes), but {len(keys)} are stored"
                   + _first_missing(name, arr, keys) + " (its _METADATA says "
                   "Orbax stored every chunk, zeros included)")
  for key, (head, tail, probe) in zip(keys, reads):
    chunk = key.decode(errors="replace")
    try:
      first = _head(store, key, head, tail, probe, arr.min_stored)
    except Exception as e:  # noqa: BLE001 - tensorstore's own error types
      raise _damaged(path, f"array {name!r} (shape {list(arr.shape)}, chunks "
                     f"{list(arr.chunks)}): chunk {chunk} is unreadable, "
                     f"missing or truncated: {str(e)[:200]}")
    size = _declared_size(arr, first)
    if size is not None and size != arr.inner_bytes:
      raise _damaged(path, f"array {name!r}: a chunk of {list(arr.chunks)} x "
                     f"{arr.itemsize}-byte elements should hold "
                     f"{arr.inner_bytes} bytes, but chunk {chunk} "
                     + (f"is not {arr.codec} data" if size < 0 else
                        f"holds {size}")
                     + f" (the array declares shape {list(arr.shape)})")


def inspect_orbax(path: epath.Path) -> dict[str, int]:
  """Checks a PyTree checkpoint directory; returns {array name: bytes}.

  See `verify_orbax`; this also returns what each array will take in memory.
  """
  if not (path / "_METADATA").exists():
    if (path / "checkpoint").exists():
      return {}  # the old msgpack layout: nothing declared up front
    raise _damaged(path, "_METADATA is missing")
  names, meta = _required(path)
  zarr3 = bool(meta.get("use_zarr3"))
  store = _open_store(path, bool(meta.get("use_ocdbt")))
  listed = [bytes(k) for k in store.list().result()]
  by_array: dict[str, list[bytes]] = {}
  meta_file = b"/zarr.json" if zarr3 else b"/.zarray"
  metas = {k[:-len(meta_file)].decode(errors="replace"): k
           for k in listed if k.endswith(meta_file)}
  missing = sorted(set(names) - set(metas))
  if missing:
    more = f" (nor have {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise _damaged(path, f"array {missing[0]!r} is listed in _METADATA but "
                   f"has no {meta_file[1:].decode()!r}{more}")
  for key in listed:
    name, _, leaf = key.decode(errors="replace").rpartition("/")
    while name and name not in metas:
      name, _, rest = name.rpartition("/")
      leaf = f"{rest}/{leaf}"
    if name in metas and leaf not in _META_KEYS:
      by_array.setdefault(name, []).append(key)
  raws = {n: store.read(k) for n, k in metas.items()}
  arrays = {n: _parse_zarr(path, n, r.result().value, zarr3)
            for n, r in raws.items()}
  all_stored = bool(meta.get("store_array_data_equal_to_fill_value"))
  reads = {n: _chunk_reads(store, by_array.get(n, []), a)
           for n, a in arrays.items()}
  for name, arr in arrays.items():
    _check_chunks(path, name, arr, by_array.get(name, []), reads[name],
                  all_stored, store)
  return {n: a.nbytes for n, a in arrays.items()}


def verify_orbax(path: Any) -> None:
  """Raises CheckpointError if the PyTree checkpoint at `path` is damaged.

  Reads metadata only (no array data): `_METADATA` must parse and every array
  it lists must have zarr metadata with a sane shape, chunk grid and dtype;
  every chunk the grid needs must be stored, readable to its last byte, and
  its zstd frame must declare the chunk's size. So a checkpoint whose
  metadata declares arrays far larger than the bytes present is refused
  before TensorStore tries to allocate them. Stray extra entries are ignored.

  Args:
    path: an Orbax PyTree item directory, e.g. `<workdir>/checkpoints/<step>
      /state` (the one holding `_METADATA`).

  Raises:
    CheckpointError: naming the directory and the damaged array.
  """
  path = paths.path(path)
  if not paths.is_remote(path):
    path = epath.Path(os.path.abspath(os.fspath(path)))
  if not path.is_dir():
    raise CheckpointError(f"{path}: no such checkpoint directory.")
  inspect(path)


def inspect(path: epath.Path) -> dict[str, int]:
  """inspect_orbax with any TensorStore/OS failure as a CheckpointError."""
  try:
    return inspect_orbax(path)
  except CheckpointError:
    raise
  except Exception as e:  # tensorstore/OS errors of any type
    raise _damaged(path, f"{type(e).__name__}: {str(e)[:300]}") from e
