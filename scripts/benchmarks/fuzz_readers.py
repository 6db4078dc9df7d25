"""Fuzz campaign for jtl.weights.read: mutated files read in capped workers.

  nice -n 19 .venv/bin/python scripts/benchmarks/fuzz_readers.py --per_format 10000
  .venv/bin/python scripts/benchmarks/fuzz_readers.py --per_format 200 --formats npz,orbax
  nice -n 19 .venv/bin/python scripts/benchmarks/fuzz_readers.py --per_format 10000 --formats peft,hub_config
  .venv/bin/python scripts/benchmarks/fuzz_readers.py --replay torch_zip:1234

Valid seed files of each format (torch zip, torch legacy, safetensors, npz,
msgpack, Orbax) are mutated with structure-aware mutations: pickle opcodes and
their arguments, zip local/central-directory/end-record fields and deflated
members, safetensors header offsets/shapes/dtypes, npy headers, flax msgpack
ndarray records, zarr metadata (shape/chunks/dtype/compressor) and chunks in
the Orbax OCDBT store, plus plain byte flips, insertions and truncations.
Two folder targets: PEFT adapters (adapter_config.json fields and pattern
keys, hostile regexes among them, and the safetensors) imported by
`import_peft` into the fixture models, and Hub repos whose config.json is
damaged (sizes, layer counts, hostile values; the weights sometimes too),
built by `models.create("hf-hub:...")` with the download served from the
case's folder.

Each mutated file is read (auto-detected, then with format= forced; Orbax
directories also through `verify_orbax`) by one of a pool of long-lived worker
subprocesses, under a memory cap (RLIMIT_AS: --mem_gib above the worker's
footprint after warm-up) and a time cap per file (--timeout seconds of the
worker's CPU time, so that a loaded shared machine does not count as hangs;
or 20 x --timeout of wall time). A worker that
dies or hangs is restarted. Outcomes are counted per format: arrays, JtlError,
other exception, hang, crash, over the memory cap; the goal is 0 in the last
four. Cases in those classes are listed in <workdir>/findings.jsonl and are
reproducible from (format, index) with --replay. Not part of the test suite
(tests/weights/test_fuzz_readers.py is the small CI version).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickletools
import random
import resource
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "tests", "fixtures")
FORMATS = ("torch_zip", "torch_legacy", "safetensors", "npz", "msgpack", "orbax")
ALL_FORMATS = FORMATS + ("peft", "hub_config")  # the last two: folders (see below)
FORCED = {"torch_zip": "torch", "torch_legacy": "torch", "orbax": "orbax",
          "safetensors": "safetensors", "npz": "npz", "msgpack": "msgpack"}
BOMB_MIB = [1, 8, 64, 300]  # a zip member blown up to this many MiB of zeros
OUTCOMES = ("arrays", "jtl_error", "other_exception", "hang", "crash", "memory")
HUGE = [0, 1, 2, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
        2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**12, -1, -2**31, -2**63]

# ------------------------------------------------------------ byte mutations


def mutate_bytes(rng: random.Random, data: bytes, n: int = 0) -> bytes:
  """1-4 blind mutations: truncate, flip, insert, delete, huge fields."""
  data = bytearray(data)
  for _ in range(n or rng.randint(1, 4)):
    pos = rng.randrange(max(len(data), 1))
    kind = rng.choice(["truncate", "flip", "flip", "insert", "delete", "huge"])
    if kind == "truncate":
      del data[pos:]
    elif kind == "flip" and data:
      data[pos] ^= rng.randint(1, 255)
    elif kind == "insert":
      data[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif kind == "delete":
      del data[pos:pos + rng.randint(1, 64)]
    else:
      width = rng.choice([1, 2, 4, 8])
      value = rng.choice(HUGE) % (1 << (8 * width))
      data[pos:pos + width] = value.to_bytes(width, "little")
  return bytes(data)


# ----------------------------------------------------------- pickle mutations

_STRINGS = ["0", "1", "17", "99", "cpu", "storage", "FloatStorage", "", "x" * 300,
            "HalfStorage", "ComplexFloatStorage", "weight", "\udcff" * 0 + "é"]
_GLOBALS = [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
            ("torch", "FloatStorage"), ("torch", "BFloat16Storage"),
            ("torch", "LongStorage"), ("torch", "BoolStorage"), ("torch", "float16"),
            ("collections", "OrderedDict"), ("torch._utils", "_rebuild_parameter"),
            ("torch._tensor", "_rebuild_from_type_v2"), ("os", "system"),
            ("builtins", "eval"), ("builtins", "set"), ("_codecs", "encode"),
            ("torch", "Size"), ("numpy.core.multiarray", "_reconstruct")]
_OPCODES = [b"N", b"}", b"]", b")", b"(", b"t", b"u", b"s", b"e", b"a", b"R",
            b"b", b"0", b"2", b"1", b"Q", b"\x85", b"\x86", b"\x87", b"\x88",
            b"\x89", b"\x94", b"\x95", b"\x96", b"\x8f", b"\x90", b"."]


def _encode_int(value: int) -> bytes:
  if -2**31 <= value < 2**31:
    return b"J" + value.to_bytes(4, "little", signed=True)
  raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(raw)]) + raw


def _encode_str(text: str) -> bytes:
  raw = text.encode("utf-8", "surrogatepass")
  return b"X" + len(raw).to_bytes(4, "little") + raw


def mutate_pickle(rng: random.Random, pkl: bytes) -> bytes:
  """Rewrites 1-3 opcodes: int/str/global arguments, deletes, dups, inserts."""
  try:
    ops = list(pickletools.genops(pkl))
  except Exception:  # noqa: BLE001 - already damaged: blind mutations
    return mutate_bytes(rng, pkl)
  bounds = [p for _, _, p in ops] + [len(pkl)]
  pieces = [pkl[a:b] for a, b in zip(bounds, bounds[1:])]
  for _ in range(rng.randint(1, 3)):
    i = rng.randrange(len(pieces))
    op, arg, _ = ops[i] if i < len(ops) else (None, None, None)
    kind = rng.random()
    if op is not None and isinstance(arg, int) and kind < 0.45:
      pieces[i] = (pieces[i][:1] + rng.choice(HUGE).to_bytes(len(pieces[i]) - 1, "little", signed=False)
                   if op.name.endswith(("PUT", "GET")) and len(pieces[i]) > 1
                   and rng.random() < 0.5 else _encode_int(rng.choice(HUGE + [arg * 1000, arg + 1, arg - 1])))
    elif op is not None and isinstance(arg, str) and op.name != "GLOBAL" and kind < 0.6:
      pieces[i] = _encode_str(rng.choice(_STRINGS))
    elif op is not None and op.name == "GLOBAL" and kind < 0.75:
      module, name = rng.choice(_GLOBALS)
      pieces[i] = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    elif kind < 0.85:
      pieces[i] = b""
    elif kind < 0.92:
      pieces.insert(i, pieces[i])
      ops.insert(i, ops[i])
    else:
      pieces.insert(i, rng.choice(_OPCODES) + rng.randbytes(rng.choice([0, 0, 1, 4, 8])))
      ops.insert(i, (None, None, None))
  return b"".join(pieces)


# -------------------------------------------------------------- zip mutations

_LOCAL = {8: 2, 14: 4, 18: 4, 22: 4, 26: 2, 28: 2}
_CENTRAL = {10: 2, 16: 4, 20: 4, 24: 4, 28: 2, 30: 2, 32: 2, 42: 4}
_END = {8: 2, 10: 2, 12: 4, 16: 4, 20: 2}


def mutate_zip_headers(rng: random.Random, data: bytes) -> bytes:
  """Sets one field of a local header, central entry or end record."""
  data = bytearray(data)
  spots = [(i, _LOCAL) for i in _find_all(data, b"PK\x03\x04")]
  spots += [(i, _CENTRAL) for i in _find_all(data, b"PK\x01\x02")]
  spots += [(i, _END) for i in _find_all(data, b"PK\x05\x06")]
  if not spots:
    return mutate_bytes(rng, bytes(data))
  for _ in range(rng.randint(1, 2)):
    at, fields = rng.choice(spots)
    offset = rng.choice(list(fields))
    width = fields[offset]
    old = int.from_bytes(data[at + offset:at + offset + width], "little")
    value = rng.choice(HUGE + [old + 1, old - 1, old * 2, old * 1000, 8, 0]) % (1 << 8 * width)
    data[at + offset:at + offset + width] = value.to_bytes(width, "little")
  return bytes(data)


def _find_all(data: bytes, needle: bytes) -> list[int]:
  out, i = [], data.find(needle)
  while i >= 0 and len(out) < 4096:
    out.append(i)
    i = data.find(needle, i + 1)
  return out


def rezip(rng: random.Random, data: bytes, edit: Any) -> bytes:
  """Re-writes a zip with `edit(rng, name, payload) -> payload` per member,
  sometimes deflated, sometimes with a member blown up to a run of zeros."""
  out = io.BytesIO()
  method = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
  with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w", method) as zout:
    infos = zin.infolist()
    bomb = rng.choice(infos).filename if rng.random() < 0.15 else None
    for info in infos:
      payload = edit(rng, info.filename, zin.read(info))
      deflate = info.compress_type == zipfile.ZIP_DEFLATED and len(payload) > 1 << 20
      if info.filename == bomb:
        payload, deflate = payload[:128] + bytes(rng.choice(BOMB_MIB) << 20), True
      zout.writestr(info.filename, payload,
                    compress_type=zipfile.ZIP_DEFLATED if deflate else method)
  return out.getvalue()


def mutate_torch_zip(rng: random.Random, data: bytes) -> bytes:
  choice = rng.random()
  if choice < 0.45:
    target = "/data.pkl" if rng.random() < 0.8 else rng.choice(["/data/", "byteorder", "version"])
    return rezip(rng, data, lambda r, name, p: (mutate_pickle(r, p) if name.endswith("/data.pkl")
                                                 else mutate_bytes(r, p)) if target in name else p)
  if choice < 0.7:
    return mutate_zip_headers(rng, data)
  if choice < 0.85:
    return rezip(rng, data, lambda r, name, p: p)  # deflated / bomb only
  return mutate_bytes(rng, data)


# -------------------------------------------------------- torch legacy stream


def _legacy_pickles(data: bytes) -> list[tuple[int, int]]:
  spans, pos = [], 0
  for _ in range(5):
    end = pos
    for op, _, p in pickletools.genops(data[pos:]):
      end = pos + p + 1
    spans.append((pos, end))
    pos = end
  return spans


def mutate_torch_legacy(rng: random.Random, data: bytes) -> bytes:
  spans = _legacy_pickles(data)
  choice = rng.random()
  if choice < 0.55:
    a, b = spans[rng.choice([0, 1, 2, 3, 3, 3, 3, 4, 4])]
    return data[:a] + mutate_pickle(rng, data[a:b]) + data[b:]
  if choice < 0.8:  # a storage's 8-byte element count
    out, pos = bytearray(data), spans[4][1]
    counts = []
    while pos + 8 <= len(out):
      counts.append(pos)
      pos += 8 + int.from_bytes(out[pos:pos + 8], "little") * rng.choice([4])
      if rng.random() < 0.3:
        break
    at = rng.choice(counts)
    old = int.from_bytes(out[at:at + 8], "little")
    value = rng.choice(HUGE + [old + 1, old - 1, old * 4, 0])
    out[at:at + 8] = (value % 2**64).to_bytes(8, "little")
    return bytes(out)
  return mutate_bytes(rng, data)


# ---------------------------------------------------------------- safetensors

_ST_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
              "F64", "C64", "F4", "I4", "X", "", 5, None, ["F32"]]
_SHAPES = [[], [0], [1], [10**12], [-1], [2**31, 2**31], [3, 3, 2, 4], "3",
           [1.5], [True], [2**64], list(range(40)), None]


def _mutate_entry(rng: random.Random, entry: Any, entries: dict) -> Any:
  if not isinstance(entry, dict):
    return entry
  entry = dict(entry)
  field = rng.choice(["dtype", "shape", "shape", "data_offsets", "data_offsets", "drop", "alias"])
  if field == "dtype":
    entry["dtype"] = rng.choice(_ST_DTYPES)
  elif field == "shape":
    shape = list(entry.get("shape") or [1])
    entry["shape"] = rng.choice(_SHAPES + [shape + [rng.choice(HUGE)], shape[::-1], shape[:-1]])
  elif field == "data_offsets":
    begin, end = (entry.get("data_offsets") or [0, 0])[:2]
    entry["data_offsets"] = rng.choice([[end, begin], [begin, 2**63], [begin - 1, end], [0, end],
                                        [begin, begin], [rng.choice(HUGE), rng.choice(HUGE)],
                                        [begin + 1, end + 1], [begin], "0,1", [begin, end, 0]])
  elif field == "drop":
    entry.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
  else:
    other = entries[rng.choice(list(entries))]
    if isinstance(other, dict):
      entry["data_offsets"] = other.get("data_offsets")
  return entry


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
  n = int.from_bytes(data[:8], "little")
  header, body = json.loads(data[8:8 + n]), data[8 + n:]
  choice = rng.random()
  if choice < 0.6:
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(rng.randint(1, 3)):
      key = rng.choice(keys)
      header[key] = _mutate_entry(rng, header[key], header)
  elif choice < 0.7:
    header["__metadata__"] = rng.choice([{"a": {"b": 1}}, [1], "x", {"k": "v" * 1000}, None])
  elif choice < 0.8:
    text = rng.choice([json.dumps(header)[:-rng.randint(1, 20)], "[" * 100000, "[]", "null",
                       json.dumps(header) + " " * rng.randint(1, 9), '{"a": 1e999}'])
    raw = text.encode()
    return len(raw).to_bytes(8, "little") + raw + body
  elif choice < 0.9:
    delta = rng.choice([-9, -1, 1, 7, 2**32, 2**63, -n])
    return ((n + delta) % 2**64).to_bytes(8, "little") + data[8:]
  else:
    return mutate_bytes(rng, data)
  raw = json.dumps(header).encode()
  return len(raw).to_bytes(8, "little") + raw + body


# ------------------------------------------------------------------------ npz

_DESCRS = ["<f4", "<f8", "|b1", "<i8", ">f4", "|O", "<U10", "|V0", "|S0", "<f16", "<c16",
           "bfloat16", "<M8[s]", [("a", "<f4")], "?", 5]


def _npy_header(descr: Any, fortran: Any, shape: Any) -> bytes:
  text = "{'descr': %r, 'fortran_order': %r, 'shape': %r, }" % (descr, fortran, shape)
  text += " " * ((-(len(text) + 11)) % 64) + "\n"
  return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def _mutate_npy(rng: random.Random, name: str, payload: bytes) -> bytes:
  if rng.random() < 0.3:
    return mutate_bytes(rng, payload)
  import numpy as np  # pylint: disable=g-import-not-at-top
  f = io.BytesIO(payload)
  np.lib.format.read_magic(f)
  shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  data = payload[f.tell():]
  pick = rng.random()
  if pick < 0.4:
    shape = rng.choice([(10**6, 10**6), (-1,), (), (0,), (2**62,), shape + (2,),
                        shape[:-1], shape[::-1], (1,) * 33, (2**31, 2**31, 2**31)])
  elif pick < 0.7:
    dtype = rng.choice(_DESCRS)
  elif pick < 0.8:
    fortran = rng.choice([True, 1, "yes", None])
  else:
    data = data[:rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + bytes(
        rng.choice([1, 100, 1 << 20]))
  descr = dtype.str if hasattr(dtype, "str") else dtype
  return _npy_header(descr, fortran, shape) + data


def mutate_npz(rng: random.Random, data: bytes) -> bytes:
  choice = rng.random()
  if choice < 0.55:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
      target = rng.choice(zf.namelist())
    return rezip(rng, data, lambda r, name, p: _mutate_npy(r, name, p) if name == target else p)
  if choice < 0.8:
    return mutate_zip_headers(rng, data)
  if choice < 0.9:
    return rezip(rng, data, lambda r, name, p: p)
  return mutate_bytes(rng, data)


# -------------------------------------------------------------------- msgpack


def _mutate_ndarray_ext(rng: random.Random, payload: bytes) -> bytes:
  import msgpack  # pylint: disable=g-import-not-at-top
  shape, dtype, buf = msgpack.unpackb(payload, raw=False)
  pick = rng.random()
  if pick < 0.4:
    shape = rng.choice([[10**6, 10**6], [-1], [], [0], [2**62], list(shape) + [3],
                        list(shape)[::-1], [2**64 - 1], "x", [1.5]])
  elif pick < 0.7:
    dtype = rng.choice(["float32", "bfloat16", "object", "V0", "U4", "float128", "nope",
                        b"bfloat16", 7, "float8_e4m3fn", "int4"])
  else:
    buf = buf[:rng.randrange(len(buf) + 1)] if rng.random() < 0.6 else buf * 3
  return msgpack.packb((shape, dtype, buf), use_bin_type=True)


def mutate_msgpack(rng: random.Random, data: bytes) -> bytes:
  import msgpack  # pylint: disable=g-import-not-at-top
  if rng.random() < 0.3:
    return mutate_bytes(rng, data)
  tree = msgpack.unpackb(data, raw=False, strict_map_key=False,
                         ext_hook=lambda code, d: msgpack.ExtType(code, d))
  leaves: list[tuple[dict, Any]] = []

  def walk(node: Any) -> None:
    if isinstance(node, dict):
      for k, v in node.items():
        leaves.append((node, k))
        walk(v)

  walk(tree)
  for _ in range(rng.randint(1, 2)):
    parent, key = rng.choice(leaves)
    value = parent[key]
    pick = rng.random()
    if isinstance(value, msgpack.ExtType) and pick < 0.6:
      parent[key] = msgpack.ExtType(value.code, _mutate_ndarray_ext(rng, value.data))
    elif isinstance(value, msgpack.ExtType) and pick < 0.75:
      parent[key] = msgpack.ExtType(rng.choice([2, 3, 0, 99]), value.data)
    else:
      parent[key] = rng.choice([None, 1, "s", [value] * 3, {"x": value}, 2**63,
                                [[[[[[[[1]]]]]]]], msgpack.ExtType(1, b"\x93")])
  return msgpack.packb(tree, use_bin_type=True)


# ---------------------------------------------------------------------- orbax

_ZARRAY = {"shape": [[10**6, 10**6], [-1], [], [2**62], [3, 3, 2, 40], "x", [0]],
           "chunks": [[10**6, 10**6], [0], [], [1, 1, 1, 1], [3, 3, 2, 400], None],
           "dtype": ["<f8", "<f2", "bfloat16", "|b1", "<i8", "<U4", "|O", "float8_e4m3fn",
                     "garbage", ">f4", 7],
           "compressor": [None, {"id": "blosc"}, {"id": "zstd", "level": "x"}, {"id": "gzip"}],
           "fill_value": [0, "NaN", None, [1, 2], 1e308],
           "order": ["F", "Z"], "dimension_separator": ["/", "x"],
           "filters": [[{"id": "delta", "dtype": "<f4"}], "x"], "zarr_format": [3, 1, None]}


def _mutate_zarray(rng: random.Random, raw: bytes) -> bytes:
  try:
    meta = json.loads(raw)
  except ValueError:
    return mutate_bytes(rng, raw)
  for _ in range(rng.randint(1, 2)):
    field = rng.choice(list(_ZARRAY))
    if rng.random() < 0.1:
      meta.pop(field, None)
    else:
      meta[field] = rng.choice(_ZARRAY[field])
  return json.dumps(meta).encode()


def _zstd_fcs_edit(rng: random.Random, raw: bytes) -> bytes:
  if raw[:4] != b"\x28\xb5\x2f\xfd" or len(raw) < 9:
    return mutate_bytes(rng, raw)
  out = bytearray(raw)
  out[5 + rng.randrange(4)] = rng.randrange(256)  # window / content size bytes
  return bytes(out)


def mutate_orbax(rng: random.Random, seed: str, out: str) -> str:
  """Copies the seed checkpoint to `out` and damages one part of it."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  shutil.copytree(seed, out)
  pick = rng.random()
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs)
  if pick < 0.3:
    path = rng.choice(files)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(mutate_bytes(rng, data))
    return out
  if pick < 0.35:
    os.remove(rng.choice(files))
    return out
  if pick < 0.45:
    with open(os.path.join(out, "_METADATA")) as f:
      meta = json.load(f)
    _mutate_metadata(rng, meta)
    with open(os.path.join(out, "_METADATA"), "w") as f:
      json.dump(meta, f)
    return out
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{out}/"}).result()
  keys = [bytes(k) for k in kv.list().result()]
  key = rng.choice(keys)
  if pick < 0.75:
    key = rng.choice([k for k in keys if k.endswith(b".zarray")])
    kv[key] = _mutate_zarray(rng, kv[key])
  elif pick < 0.85:
    kv[key] = rng.choice([_zstd_fcs_edit, mutate_bytes])(rng, kv[key])
  elif pick < 0.93:
    kv.delete_range(ts.KvStore.KeyRange(key, key + b"\0")).result()
  else:
    kv[key.rsplit(b"/", 1)[0] + rng.choice([b"/9", b"/0.1", b"/x", b"/.zattrs"])] = rng.randbytes(40)
  return out


def _mutate_metadata(rng: random.Random, meta: dict) -> None:
  tree = meta.get("tree_metadata", {})
  entry = tree[rng.choice(list(tree))] if tree else {}
  pick = rng.random()
  if pick < 0.3 and entry:
    entry["value_metadata"]["value_type"] = rng.choice(
        ["jax.Array", "string", "None", "scalar", "x", None])
  elif pick < 0.5 and entry:
    entry["key_metadata"][0]["key"] = rng.choice(["nope", "", "a.b", 7])
  elif pick < 0.7:
    flag = rng.choice(["use_ocdbt", "use_zarr3", "store_array_data_equal_to_fill_value"])
    meta[flag] = not meta.get(flag)
  elif pick < 0.85:
    meta["tree_metadata"] = rng.choice([None, [], {"x": 1}, {"('a',)": {"key_metadata": []}}])
  else:
    entry["value_metadata"]["skip_deserialize"] = rng.choice([True, "x"])


# ------------------------------------- PEFT adapter folders, Hub config.json files
# A case is a folder holding one model's files (folder name = fixture model):
# a PEFT adapter (adapter_config.json, adapter_model.safetensors, BERT's
# head.safetensors) read by `import_peft` into the fixture model's params, or
# a Hub repo (config.json, model.safetensors) built by `models.create`
# ("hf-hub:...", the download served from the folder).

FOLDER_FORMATS = ("peft", "hub_config")
FOLDER_MODELS = {"peft": ("vit", "bert", "resnet", "dinov2"), "hub_config": ("vit", "bert", "dinov2")}
PEFT_LAYOUTS = {"bert": "bert", "vit": "timm_vit", "resnet": "timm_resnet", "dinov2": "dinov2_cls"}
_JSON_VALUES = [None, True, False, 0, 1, 2, 3, -1, 0.5, -0.0, 1e308, float("nan"), float("inf"),
                7, 16, 64, 224, 1000, 10**6, 10**9, 2**31, 2**63, 10**30, -2**63, "", "x",
                "12", "gelu", "gelu_tanh", "none", "LORA", "bert", "dinov2", "x" * 5000,
                [], [1], [3, 32, 32], [3, 10**6, 10**6], [0.5] * 3, [-1, 0, 1], {}, {"a": 1},
                [[[[[[[[[[1]]]]]]]]]]]
_HOSTILE_KEYS = ["(a+)+$", "(.*.*)*Z", "(\\w|.)*Z", "(", "[", "\\", ")", "a{1000000000}",
                 "(.*){50}", ".{0,100000}", "(?=blocks).*", "(x)\\1", "(?i)qkv", "^", "$",
                 ".*", "blocks\\.\\d+\\.attn\\.qkv", "encoder.layer.0", "x" * 2000, "",
                 "(((((((((((((((((((((a)))))))))))))))))))))*", "(?P<n>a)(?P=n)"]


def _json_spots(node: Any, out: list) -> list:
  """(container, key) of every value in a JSON tree."""
  if isinstance(node, dict):
    for k in list(node):
      out.append((node, k))
      _json_spots(node[k], out)
  elif isinstance(node, list):
    for i in range(len(node)):
      out.append((node, i))
      _json_spots(node[i], out)
  return out


def mutate_json(rng: random.Random, raw: bytes, names: list[str]) -> bytes:
  """Structure-aware JSON damage: values set to hostile ones, keys dropped,
  renamed or added (`names`: field names worth adding), pattern maps given
  hostile regex keys; sometimes plain text damage."""
  try:
    tree = json.loads(raw)
  except ValueError:
    return mutate_bytes(rng, raw)
  pick = rng.random()
  if pick < 0.08:
    return mutate_bytes(rng, raw)
  if pick < 0.12:
    return rng.choice([b"", b"[]", b"null", b"[" * 100000, raw[:rng.randrange(len(raw) + 1)],
                       b"\xff\xfe" + raw, b'{"a": 1e99999}'])
  if not isinstance(tree, dict):
    return raw
  for _ in range(rng.randint(1, 3)):
    spots = _json_spots(tree, [])
    action = rng.random()
    if action < 0.45 and spots:
      parent, key = rng.choice(spots)
      parent[key] = rng.choice(_JSON_VALUES)
    elif action < 0.6 and spots:
      parent, key = rng.choice(spots)
      if isinstance(parent, dict):
        del parent[key]
    elif action < 0.8:
      target = rng.choice([tree] + [p[k] for p, k in spots if isinstance(p[k], dict)])
      target[rng.choice(names + ["alpha_pattern", "rank_pattern"])] = rng.choice(_JSON_VALUES)
    else:
      field = rng.choice(["alpha_pattern", "rank_pattern", "id2label", "model_args"])
      tree[field] = {rng.choice(_HOSTILE_KEYS + names): rng.choice([2, 4, 8.0, 0, -1, "x", None])
                     for _ in range(rng.randint(1, 3))}
  return json.dumps(tree).encode()


def _names_in(seeds: str, fmt: str) -> list[str]:
  names: set[str] = set()
  for model in FOLDER_MODELS[fmt]:
    name = "adapter_config.json" if fmt == "peft" else "config.json"
    with open(os.path.join(seeds, fmt, model, name), "rb") as f:
      names.update(str(k) for p, k in _json_spots(json.load(f), []) if isinstance(p, dict))
  return sorted(names)


def make_folder_case(fmt: str, rng: random.Random, seeds: str, out: str) -> str:
  """Copies one model's seed folder to out/<model>/ and damages its files."""
  model = rng.choice(FOLDER_MODELS[fmt])
  folder = os.path.join(out, model)
  shutil.copytree(os.path.join(seeds, fmt, model), folder)
  config = "adapter_config.json" if fmt == "peft" else "config.json"
  weights = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
  pick = rng.random()
  targets = ([config] if pick < (0.6 if fmt == "peft" else 0.9) else
             [rng.choice(weights)] if pick < 0.95 else [config, rng.choice(weights)])
  for name in targets:
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
      data = f.read()
    for _ in range(rng.choice([1, 1, 2])):
      try:
        data = (mutate_json(rng, data, _names_in(seeds, fmt)) if name == config
                else mutate_safetensors(rng, data))
      except Exception:  # noqa: BLE001 - damaged beyond the structured mutator
        data = mutate_bytes(rng, data)
    with open(path, "wb") as f:
      f.write(data)
  if rng.random() < 0.02:
    os.remove(os.path.join(folder, rng.choice(os.listdir(folder))))
  return out


def _fixture_module() -> Any:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "make_peft_reference", os.path.join(FIXTURES, "make_peft_reference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_folder_seeds(seeds: str) -> None:
  """PEFT adapters jtl exported for the fixture models (tests/fixtures/peft),
  and Hub repos of the fixture models written by `export_hf`."""
  from jtl.export import hf_export  # pylint: disable=g-import-not-at-top
  for model in FOLDER_MODELS["peft"]:
    dst = os.path.join(seeds, "peft", model)
    if not os.path.exists(dst):
      shutil.copytree(os.path.join(FIXTURES, "peft", "jtl_adapter", model), dst)
  ref = _fixture_module()
  for model in FOLDER_MODELS["hub_config"]:
    dst = os.path.join(seeds, "hub_config", model)
    if not os.path.exists(dst):
      hf_export.export_hf(ref.build(model), ref.base_variables(model), dst)
      if os.path.exists(os.path.join(dst, "head.safetensors")):
        os.remove(os.path.join(dst, "head.safetensors"))  # BERT: built without its head


_BASE_PARAMS: dict[str, Any] = {}


def _serve_hub_from(folder: str) -> None:
  """`hub.download` answers from `folder` (the case's files), as the Hub would."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  from jtl.weights import hub  # pylint: disable=g-import-not-at-top

  def download(repo_id: str, filename: str, revision: str | None = None) -> Any:
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
      raise hub._Missing(f"{repo_id}: no {filename}")  # pylint: disable=protected-access
    return epath.Path(path)
  hub.download = download


def read_folder_case(fmt: str, path: str) -> Any:
  """Imports the PEFT adapter / creates the Hub model of each model folder in
  `path`; returns the last result."""
  from jtl import models  # pylint: disable=g-import-not-at-top
  from jtl.export import peft_import  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  result = None
  for model in sorted(os.listdir(path)):
    folder = os.path.join(path, model)
    if fmt == "peft":
      if model not in _BASE_PARAMS:
        _BASE_PARAMS[model] = _fixture_module().base_variables(model)["params"]
      params, _ = peft_import.import_peft(_BASE_PARAMS[model], folder, layout=PEFT_LAYOUTS[model])
      result = {k: np.asarray(v) for k, v in jtree_flatten(params).items()}
    else:
      _serve_hub_from(folder)
      created = models.create(f"hf-hub:fuzz/{model}", num_classes=None)
      result = {k: np.asarray(v) for k, v in jtree_flatten(created.variables).items()}
  return result


def jtree_flatten(tree: Any) -> dict[str, Any]:
  from jtl import tree as jtree  # pylint: disable=g-import-not-at-top
  return jtree.flatten(tree)


MUTATORS = {"torch_zip": mutate_torch_zip, "torch_legacy": mutate_torch_legacy,
            "safetensors": mutate_safetensors, "npz": mutate_npz, "msgpack": mutate_msgpack}


def make_case(fmt: str, index: int, seed: int, seeds: str, out_dir: str) -> str:
  """Writes mutated file `index` of `fmt` (deterministic) and returns its path."""
  rng = random.Random(f"{seed}/{fmt}/{index}")
  path = os.path.join(out_dir, f"{fmt}-{index}")
  if fmt in FOLDER_FORMATS:
    os.makedirs(path)
    return make_folder_case(fmt, rng, seeds, path)
  if fmt == "orbax":
    return mutate_orbax(rng, os.path.join(seeds, "orbax"), path)
  with open(os.path.join(seeds, fmt), "rb") as f:
    data = f.read()
  for _ in range(rng.choice([1, 1, 1, 2, 3])):
    try:
      data = MUTATORS[fmt](rng, data)
    except Exception:  # noqa: BLE001 - a mutated input no mutator can parse
      data = mutate_bytes(rng, data)
  with open(path, "wb") as f:
    f.write(data)
  return path


def make_seeds(seeds: str) -> None:
  """Valid files of every format: the torch fixtures, exports of one tree."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from jtl.export import write  # pylint: disable=g-import-not-at-top
  os.makedirs(seeds, exist_ok=True)
  rng = np.random.default_rng(0)
  tree = {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                     "head": {"bias": np.arange(5, dtype=np.int64),
                              "w": np.ones((4, 5), ml_dtypes.bfloat16)}},
          "batch_stats": {"bn": {"mean": np.zeros(4, np.float16)}}}
  shutil.copy(os.path.join(FIXTURES, "torch_zip.pt"), os.path.join(seeds, "torch_zip"))
  shutil.copy(os.path.join(FIXTURES, "torch_legacy.pt"), os.path.join(seeds, "torch_legacy"))
  for fmt in ("npz", "safetensors", "msgpack"):
    write(tree, os.path.join(seeds, f"seed.{fmt}"))
    os.replace(os.path.join(seeds, f"seed.{fmt}"), os.path.join(seeds, fmt))
  if not os.path.exists(os.path.join(seeds, "orbax")):
    ocp.PyTreeCheckpointer().save(os.path.join(os.path.abspath(seeds), "orbax"), tree)
  make_folder_seeds(seeds)


# --------------------------------------------------------------------- worker


def _caused_by_memory(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, MemoryError):
      return True
    e = e.__cause__ or e.__context__
  return False


def read_case(fmt: str, path: str) -> tuple[str, str]:
  """Reads one case every way; returns the worst (outcome, detail)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jtl.weights import read  # pylint: disable=g-import-not-at-top
  from jtl.weights.orbax_verify import verify_orbax  # pylint: disable=g-import-not-at-top
  from jtl.errors import JtlError  # pylint: disable=g-import-not-at-top
  calls = ([lambda: read_folder_case(fmt, path)] if fmt in FOLDER_FORMATS else
           [lambda: read(path), lambda: read(path, format=FORCED[fmt])])
  if fmt == "orbax":
    calls.append(lambda: verify_orbax(path))
  worst = ("arrays", "")
  for call in calls:
    try:
      flat = call()
      if flat is not None and not (isinstance(flat, dict) and all(
          isinstance(k, str) and isinstance(v, np.ndarray) for k, v in flat.items())):
        return "other_exception", f"returned {type(flat).__name__} of non-arrays"
      outcome = ("arrays", "")
    except JtlError as e:
      outcome = ("memory", str(e)[:300]) if _caused_by_memory(e) else ("jtl_error", "")
    except MemoryError:
      outcome = ("memory", "MemoryError")
    except Exception as e:  # noqa: BLE001 - the point: what escapes
      detail = "".join(traceback.format_exception(e)[-3:])[-600:]
      return "other_exception", f"{type(e).__name__}: {detail}"
    if OUTCOMES.index(outcome[0]) > OUTCOMES.index(worst[0]):
      worst = outcome
  return worst


def _vm_size() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmSize:"):
        return int(line.split()[1]) * 1024
  return 0


def worker(args: argparse.Namespace) -> None:
  """Reads cases named on stdin ("fmt index"), answers one JSON line each."""
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # stray prints of libraries go to stderr, not the protocol
  import logging  # pylint: disable=g-import-not-at-top
  logging.disable(logging.WARNING)
  tmp = tempfile.mkdtemp(prefix="fuzzw-")
  for fmt in ALL_FORMATS:  # warm up every code path before the cap is set
    read_case(fmt, os.path.join(args.seeds, fmt))
  cap = _vm_size() + int(args.mem_gib * (1 << 30))
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  proto.write("ready\n")
  for line in sys.stdin:
    fmt, index = line.split()
    path = make_case(fmt, int(index), args.seed, args.seeds, tmp)
    proto.write("start\n")  # the time cap counts from here
    try:
      outcome, detail = read_case(fmt, path)
    finally:
      shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    proto.write(json.dumps({"outcome": outcome, "detail": detail}) + "\n")
  shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------- parent


class Worker:
  """One long-lived worker subprocess and the case it is reading."""

  def __init__(self, args: argparse.Namespace, log: str):
    self.args, self.log, self.proc, self.case, self.done = args, log, None, None, 0

  def start(self) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seeds",
           self.args.seeds, "--seed", str(self.args.seed), "--mem_gib", str(self.args.mem_gib)]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=open(self.log, "wb"), bufsize=0)
    if self.proc.stdout.readline().strip() != b"ready":
      raise RuntimeError(f"worker failed to start; see {self.log}")
    self.done, self.buf = 0, b""

  def lines(self) -> list[str] | None:
    """Complete lines from the worker (unbuffered read); None once it died."""
    chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
    if not chunk:
      return None
    self.buf += chunk
    *done, self.buf = self.buf.split(b"\n")
    return [line.decode() for line in done]

  def cpu_seconds(self) -> float:
    """CPU time (user + system, all threads) the worker has used."""
    try:
      with open(f"/proc/{self.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
      return float("inf")  # no /proc: the wall-time cap alone

  def hung(self) -> bool:
    """Past the time cap: --timeout seconds of CPU time on this case (a wall
    clock cap would count the time a shared machine's other jobs took from
    it), or 20 x --timeout of wall time."""
    now = time.monotonic()
    if now < self.deadline:
      return False
    if self.cpu_at is None or now - self.started > 20 * self.args.timeout:
      return True
    if self.cpu_seconds() - self.cpu_at >= self.args.timeout:
      return True
    self.deadline = now + 1.0  # starved, not hung: look again in a second
    return False

  def submit(self, case: tuple[str, int]) -> None:
    # Making the case (a 300 MiB deflated member, say) is not the reader's
    # time: the cap starts when the worker says "start".
    self.case, self.deadline = case, time.monotonic() + 10 * self.args.timeout + 60
    self.cpu_at = None
    self.proc.stdin.write(f"{case[0]} {case[1]}\n".encode())
    self.proc.stdin.flush()

  def kill(self) -> None:
    """Ends the worker: EOF lets it remove its files; a hung one is killed."""
    try:
      self.proc.stdin.close()
      self.proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()
      self.proc.wait()

  def stderr_tail(self) -> str:
    with open(self.log, "rb") as f:
      f.seek(max(0, os.path.getsize(self.log) - 800))
      return f.read().decode(errors="replace")


def run_campaign(args: argparse.Namespace) -> dict[str, dict[str, int]]:
  cases = [(fmt, i) for i in range(args.per_format) for fmt in args.formats]
  counts = {fmt: dict.fromkeys(OUTCOMES, 0) for fmt in args.formats}
  findings = open(os.path.join(args.workdir, "findings.jsonl"), "a")
  workers = [Worker(args, os.path.join(args.workdir, f"worker{k}.log"))
             for k in range(args.workers)]
  sel = selectors.DefaultSelector()
  for w in workers:
    w.start()
  pending, total, start = list(reversed(cases)), len(cases), time.time()

  def record(w: Worker, outcome: str, detail: str) -> None:
    counts[w.case[0]][outcome] += 1
    if outcome not in ("arrays", "jtl_error"):
      findings.write(json.dumps({"format": w.case[0], "index": w.case[1],
                                 "outcome": outcome, "detail": detail}) + "\n")
      findings.flush()
    w.case, w.done = None, w.done + 1

  def feed(w: Worker) -> None:
    if w.done >= args.recycle:
      w.kill()
      w.start()
    if pending:
      w.submit(pending.pop())
      sel.register(w.proc.stdout, selectors.EVENT_READ, w)

  for w in workers:
    feed(w)
  finished = reported = 0
  while any(w.case for w in workers):
    for key, _ in sel.select(timeout=0.5):
      w = key.data
      lines = w.lines()
      if lines is None:  # the worker died reading this case
        sel.unregister(key.fileobj)
        code = w.proc.wait()
        tail = w.stderr_tail()
        record(w, "memory" if "bad_alloc" in tail or "MemoryError" in tail else "crash",
               f"exit {code}: {tail[-400:]}")
        w.start()
        finished += 1
        feed(w)
        continue
      for line in lines:
        if line == "start":
          w.started, w.cpu_at = time.monotonic(), w.cpu_seconds()
          w.deadline = w.started + args.timeout
        else:
          reply = json.loads(line)
          sel.unregister(key.fileobj)
          record(w, reply["outcome"], reply["detail"])
          finished += 1
          feed(w)
    for w in workers:
      if w.case and w.hung():
        sel.unregister(w.proc.stdout)
        w.kill()
        record(w, "hang", f"> {args.timeout} s")
        finished += 1
        w.start()
        feed(w)
    if finished >= reported + 2000:
      reported = finished
      print(f"  {finished}/{total} files, {time.time() - start:.0f} s", flush=True)
  for w in workers:
    w.kill()
  return counts


def print_table(counts: dict[str, dict[str, int]], wall: float) -> None:
  head = "| format | files | " + " | ".join(OUTCOMES) + " |"
  print(head)
  print("|" + "---|" * (len(OUTCOMES) + 2))
  for fmt, row in counts.items():
    print(f"| {fmt} | {sum(row.values())} | " + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
  total = {o: sum(r[o] for r in counts.values()) for o in OUTCOMES}
  print(f"| all | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
  print(f"\nwall time {wall:.0f} s")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--per_format", type=int, default=10_000)
  parser.add_argument("--formats", default=",".join(ALL_FORMATS))
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
  parser.add_argument("--mem_gib", type=float, default=2.0)
  parser.add_argument("--timeout", type=float, default=10.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--recycle", type=int, default=2000, help="restart a worker after N files")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--seeds", default=None)
  parser.add_argument("--replay", default=None, help="FORMAT:INDEX: write that case, read it here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  args.workdir = args.workdir or tempfile.mkdtemp(prefix="fuzz_readers-")
  args.seeds = args.seeds or os.path.join(args.workdir, "seeds")
  args.formats = [f for f in args.formats.split(",") if f]
  unknown = set(args.formats) - set(ALL_FORMATS)
  if unknown:
    parser.error(f"unknown --formats {sorted(unknown)}; choose from {ALL_FORMATS}")
  make_seeds(args.seeds)
  if args.replay:
    fmt, index = args.replay.split(":")
    path = make_case(fmt, int(index), args.seed, args.seeds, args.workdir)
    print(path, read_case(fmt, path))
    return
  print(f"fuzzing {args.formats} x {args.per_format} with {args.workers} workers "
        f"(cap {args.mem_gib} GiB, {args.timeout} s per file) in {args.workdir}", flush=True)
  start = time.time()
  counts = run_campaign(args)
  print_table(counts, time.time() - start)


if __name__ == "__main__":
  main()
