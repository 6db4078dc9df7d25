"""The initializers (weights) of an ONNX model file, read without `onnx`.

An ONNX file is a protobuf `ModelProto`; its weights are the `initializer`
tensors of the `graph` (field 7), each a `TensorProto` with `dims` (1),
`data_type` (2), `name` (8) and the values in `raw_data` (9, little-endian)
or in a typed repeated field (`float_data` 4, `int32_data` 5, `int64_data`
7, `double_data` 10). This module walks the wire format itself (varints and
length-delimited fields; about 60 lines), so reading a model's weights needs
neither `onnx` nor `onnxruntime`, and every array is charged to the reader's
budget before it is made. Tensors stored outside the file (`data_location`
EXTERNAL) are refused with a message.

>>> blob = bytes([0x08, 7]) + _field(7, _field(5, _tensor("w", [2], 1, b"\\0" * 8)))
>>> {k: v.tolist() for k, v in parse(blob, "x.onnx").items()}
{'w': [0.0, 0.0]}
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from jtl.errors import CheckpointError

# TensorProto.DataType -> numpy dtype (the types a weight can have).
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
          7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32,
          13: np.uint64}
# Typed repeated fields: field number -> (wire decoder, numpy dtype of what it holds).
_TYPED = {4: "<f4", 5: "varint", 7: "varint", 10: "<f8"}
_DECODE_BYTES = 48  # a typed value decoded: a Python int in a list, then int64s


def _varint(buf: memoryview, i: int, where: str) -> tuple[int, int]:
  shift, value = 0, 0
  while True:
    if i >= len(buf) or shift > 63:
      raise CheckpointError(f"{where}: truncated or malformed protobuf varint.")
    b = buf[i]
    value |= (b & 0x7F) << shift
    i, shift = i + 1, shift + 7
    if not b & 0x80:
      return value, i


def fields(buf: memoryview, where: str) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of one protobuf message: an int for
  varints and fixed-width fields, a memoryview for length-delimited ones."""
  i = 0
  while i < len(buf):
    key, i = _varint(buf, i, where)
    num, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i, where)
    elif wire in (1, 5):
      n = 8 if wire == 1 else 4
      if i + n > len(buf):
        raise CheckpointError(f"{where}: truncated protobuf field {num}.")
      value, i = int.from_bytes(buf[i:i + n], "little"), i + n
    elif wire == 2:
      n, i = _varint(buf, i, where)
      if i + n > len(buf):
        raise CheckpointError(f"{where}: protobuf field {num} runs past the end of the file.")
      value, i = buf[i:i + n], i + n
    else:
      raise CheckpointError(f"{where}: protobuf wire type {wire} (field {num}) is not "
                            "an ONNX model's; the file is damaged or not ONNX.")
    yield num, wire, value


_MAX_DIMS = 64


def _ints(wire: int, value: Any, where: str, limit: int) -> list[int]:
  """A repeated integer field, packed (one length-delimited run) or not; at
  most `limit` values (counted before any is decoded)."""
  if wire == 0:
    return [value]
  if _count(4, wire, value) > limit:
    raise CheckpointError(f"{where}: a packed integer field holds more than {limit} "
                          "values; the file is damaged.")
  out, i = [], 0
  while i < len(value):
    v, i = _varint(value, i, where)
    out.append(v)
  return out


def _count(num: int, wire: int, value: Any) -> int:
  """How many values a typed field holds, without decoding them."""
  if wire != 2:
    return 1
  if _TYPED.get(num, "varint") == "varint":  # one byte without the high bit per value
    return int(np.count_nonzero(np.frombuffer(value, np.uint8) < 0x80))
  return len(value) // np.dtype(_TYPED[num]).itemsize


def _typed_values(typed: list[Any], where: str, count: int) -> np.ndarray:
  parts = []
  for num, wire, value in typed:
    if _TYPED[num] == "varint":
      parts.append(np.array(_ints(wire, value, where, count), np.uint64).astype(np.int64))
    else:
      parts.append(np.frombuffer(value, _TYPED[num]) if wire == 2
                   else np.array([value], np.uint64).view(_TYPED[num]))
  return np.concatenate(parts) if parts else np.zeros(0)


def _tensor_array(msg: memoryview, where: str, budget: Any) -> tuple[str, np.ndarray]:
  dims: list[int] = []
  dtype, name, raw, typed, held, unpacked = 1, "", None, [], 0, False
  for num, wire, value in fields(msg, where):
    if num == 1:
      dims += _ints(wire, value, where, _MAX_DIMS)
      if len(dims) > _MAX_DIMS:
        raise CheckpointError(f"{where}: an initializer has more than {_MAX_DIMS} dims; "
                              "the file is damaged.")
    elif num == 2:
      dtype = value
    elif num == 8:
      name = bytes(value).decode("utf-8", "replace")
    elif num == 9:
      raw = value
    elif num == 14 and value == 1:
      raise CheckpointError(f"{where}: initializer {name!r} is stored in an external "
                            "data file; only weights inside the .onnx file are read.")
    elif num in _TYPED:
      held += _count(num, wire, value)
      unpacked |= wire != 2
      if wire == 2:  # one packed run: keep it; single values are decoded on a second pass
        typed.append((num, wire, value))
  if dtype not in DTYPES:
    raise CheckpointError(f"{where}: initializer {name!r} has ONNX data type {dtype}; "
                          f"supported: {sorted(DTYPES)}.")
  np_dtype = np.dtype(DTYPES[dtype])
  dims = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]  # int64 two's complement
  if any(d < 0 for d in dims):
    raise CheckpointError(f"{where}: initializer {name!r} has negative dims {dims}.")
  count = math.prod(dims)  # Python ints: np.prod would wrap around in int64
  if raw is None and held != count:
    raise CheckpointError(f"{where}: initializer {name!r} declares dims {dims} "
                          f"({count} values) but holds {held}.")
  budget.charge(count * np_dtype.itemsize, f"initializer {name!r} {dims}")
  if raw is not None:
    values = np.frombuffer(raw, np_dtype.newbyteorder("<"))
  else:
    if unpacked:  # single values: read again, now that their count is known
      typed = [(n, w, v) for n, w, v in fields(msg, where) if n in _TYPED]
    budget.charge(count * _DECODE_BYTES, f"decoding initializer {name!r} ({count} values)")
    values = _typed_values(typed, where, count)
  if values.size != count:
    raise CheckpointError(f"{where}: initializer {name!r} declares dims {dims} "
                          f"({count} values) but holds {values.size}.")
  return name, values.astype(np_dtype).reshape(dims)


class _NoBudget:
  def charge(self, nbytes: int, what: str) -> None:
    del nbytes, what


def parse(data: bytes | bytearray | memoryview, where: str,
          budget: Any = None) -> dict[str, np.ndarray]:
  """{initializer name: array} of a serialized ONNX ModelProto."""
  budget = budget or _NoBudget()
  graph = None
  for num, wire, value in fields(memoryview(data), where):
    if num == 7 and wire == 2:
      graph = value
  if graph is None:
    raise CheckpointError(f"{where}: no ONNX graph in the file (not an ONNX model?).")
  out = {}
  for num, wire, value in fields(graph, where):
    if num == 5 and wire == 2:
      name, array = _tensor_array(value, where, budget)
      if name in out:
        raise CheckpointError(
            f"{where}: two initializers are named {name!r}; the file is damaged "
            "(an ONNX graph names each weight once). Export it again.")
      out[name] = array
  if not out:
    raise CheckpointError(f"{where}: the ONNX graph has no initializers (no weights).")
  return out


def _varint_bytes(n: int) -> bytes:
  """`n` as a protobuf varint (test helper)."""
  out = b""
  while True:
    out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
    n >>= 7
    if not n:
      return out


def _field(num: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (doctest and test helper)."""
  return bytes([num << 3 | 2]) + _varint_bytes(len(payload)) + payload


def _tensor(name: str, dims: list[int], dtype: int, raw: bytes) -> bytes:
  """A TensorProto with raw_data (doctest and test helper)."""
  out = b"".join(bytes([0x08, d]) for d in dims) + bytes([0x10, dtype])
  return out + _field(8, name.encode()) + _field(9, raw)
