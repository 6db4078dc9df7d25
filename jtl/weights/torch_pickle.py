"""The restricted unpickler behind jtl's PyTorch reader: no torch, no code.

`find_class` knows only an allow-list of names (tensor rebuild functions,
storage types, dtypes, OrderedDict, a few builtins), each mapped to a jtl
stand-in that builds numpy arrays; any other global is refused with a
CheckpointError naming it, so a malicious file cannot run code. Tensors are
built by `materialize` once their storages' bytes are known. The file layouts
(zip archive, legacy stream) are read in `jtl.weights.torch_files`.
"""

from __future__ import annotations

import collections
import math
import pickle
import reprlib
from typing import Any

import ml_dtypes
import numpy as np

from jtl.errors import CheckpointError

# Elements reachable through memo GETs of containers, summed over every GET:
# a state dict refers back to a few containers; a memo bomb to 2**N.
MAX_SHARED_ENTRIES = 1_000_000
_CONTAINERS = (list, tuple, dict, set, frozenset)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60


def short(obj: Any) -> str:
  """A repr of at most a few dozen characters, whatever `obj` holds."""
  return _SHORT.repr(obj)

# Storage class name (as pickled, `torch.<Name>`) -> numpy dtype.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64,
    "double": np.float64, "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


class StorageType:
  """Stands for a `torch.<X>Storage` class named in the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]


class Storage:
  """A flat numpy array of one storage's elements."""

  def __init__(self, data: np.ndarray):
    self.data = data


class _TensorRef:
  """A tensor named by the pickle; built once its storage's bytes are read."""

  def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
    if not isinstance(storage, Storage):
      raise ValueError(
          f"tensor built from {type(storage).__name__}, not a storage")
    self.args = (storage, offset, size, stride)


class Budget:
  """Bytes a reader may still materialise; refuses a file that asks for more.

  A tiny file can declare huge arrays (a stride-0 tensor over a one-element
  storage, a deflated member that inflates a thousandfold); every allocation
  is charged here *before* it is made.
  """

  def __init__(self, path: str, limit: int | None, hint: str = ""):
    self.path, self.limit, self.used, self.hint = path, limit, 0, hint

  def charge(self, nbytes: int, what: str) -> None:
    """Adds `nbytes` for `what`; raises CheckpointError past the limit."""
    self.used += int(nbytes)
    if self.limit is not None and self.used > self.limit:
      raise CheckpointError(
          f"{self.path}: {what} would bring the arrays read from this file to "
          f"{self.used} bytes, more than the limit of {self.limit} bytes "
          f"{self.hint}. The file is damaged or built to exhaust memory (a "
          "decompression or stride-0 bomb); if you trust it, pass a larger "
          "max_expansion= (or max_expansion=None) to jtl.weights.read or "
          "jtl.load_pretrained (e.g. zero-heavy or pruned weights).")


def _is_plain(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  """True when no two elements of the (size, stride) view share memory."""
  span = 0  # the largest offset reached by the dimensions of smaller stride
  for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
    if s <= span:
      return False
    span += (n - 1) * s
  return True


def _build(storage: Storage, offset: Any, size: Any, stride: Any,
           budget: Budget | None = None, name: str = "") -> np.ndarray:
  """The tensor's array: a view of its storage when no elements overlap
  (tied weights then share memory, as in torch), else a charged copy."""
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
          and type(offset) is int):
    raise ValueError(f"bad tensor geometry size={short(size)} "
                     f"stride={short(stride)} offset={short(offset)}")
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride) or any(
      not isinstance(v, int) or v < 0 for v in size + stride) or offset < 0:
    raise ValueError(f"bad tensor geometry size={short(size)} "
                     f"stride={short(stride)} offset={short(offset)}")
  flat = storage.data
  numel = math.prod(size)  # Python ints: no silent int64 overflow
  if numel == 0:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise ValueError(f"tensor (size={size}, stride={stride}, offset={offset}) "
                     f"reaches element {last} of a storage of {flat.size}")
  item = flat.itemsize
  plain = _is_plain(size, stride)
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size,
      strides=[s * item if n > 1 else 0 for n, s in zip(size, stride)],
      writeable=plain and flat.flags.writeable)
  if plain and flat.flags.writeable:
    return view
  if budget is not None:
    budget.charge(numel * item, f"tensor {name!r} ({numel * item} bytes: "
                  f"size={size}, stride={stride} over a storage of "
                  f"{flat.size} elements)")
  return np.array(view, copy=True)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any,
                    *unused: Any) -> _TensorRef:
  return _TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any,
                       requires_grad: Any = None, hooks: Any = None,
                       metadata: Any = None) -> _TensorRef:
  return _TensorRef(storage, offset, size, stride)


def materialize(obj: Any, budget: Budget | None = None) -> Any:
  """Replaces every tensor reference in `obj`'s containers by its array.

  Shared sub-objects are converted once (a pickle can reference one list
  from many places, so a tiny file could otherwise expand exponentially).
  Tensors that overlap themselves (stride 0) are copied and charged to
  `budget` before the copy is made.
  """
  memo: dict[int, Any] = {}

  def convert(node: Any, name: str) -> Any:
    if id(node) in memo:
      return memo[id(node)]
    if isinstance(node, _TensorRef):
      out = _build(*node.args, budget=budget, name=name)
    elif isinstance(node, dict):
      out = memo[id(node)] = {}
      out.update((k, convert(v, f"{name}/{k}" if name else str(k)))
                 for k, v in node.items())
    elif isinstance(node, (list, tuple)):
      out = memo[id(node)] = []
      out.extend(convert(v, f"{name}/{i}" if name else str(i))
                 for i, v in enumerate(node))
    elif isinstance(node, (Storage, StorageType)):
      out = None
    else:
      return node
    memo[id(node)] = out
    return out

  return convert(obj, "")


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
  return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any,
                          state: Any) -> Any:
  if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter):
    raise ValueError("_rebuild_from_type_v2 of a function not allowed")
  return func(*args)


class _TensorType:
  """Stands for torch.Tensor / torch.nn.Parameter as a `new_type` argument."""


def _encode(text: str, encoding: str = "utf-8") -> bytes:
  # protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
  if type(encoding) is not str or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
    raise ValueError(f"codec {short(encoding)} not allowed")
  if type(text) is not str:
    raise ValueError(f"_codecs.encode of a {type(text).__name__}, not a str")
  return text.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _encode,
}
_ALLOWED.update({("torch", n): StorageType(n) for n in STORAGE_DTYPES})
_ALLOWED.update({("torch", n): np.dtype(t) for n, t in _TORCH_DTYPES.items()})


class _Refused(Exception):
  pass


class _TooShared(Exception):
  pass


class _SafeUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler with the opcodes that can hurt taken out.

  The C unpickler is not used: a damaged LONG_BINPUT index makes it allocate
  and zero a memo table of that size (gigabytes). In the Python one the memo
  is a dict; BYTEARRAY8 (which allocates its declared length) is refused and
  BUILD may only set attributes of plain dicts (torch's `_metadata`), so a
  file cannot mutate the shared objects `find_class` hands out.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self._shared: set[int] = set()  # ids of containers fetched from the memo
    self._shared_left = MAX_SHARED_ENTRIES

  def _load_build(self) -> None:
    if not isinstance(self.stack[-2], dict):
      raise ValueError(f"BUILD on a {type(self.stack[-2]).__name__} refused")
    self._mutable(self.stack[-2])
    pickle._Unpickler.load_build(self)  # pylint: disable=protected-access

  def _refuse(self) -> None:
    raise ValueError("BYTEARRAY8 refused (never used by torch.save)")

  def _refuse_dup(self) -> None:
    raise ValueError("DUP refused (never written by pickle or torch.save)")

  def _charge_shared(self, obj: Any) -> None:
    """A container fetched again from the memo is charged every element it
    reaches (shared ones as often as they are reached) and frozen."""
    if not isinstance(obj, _CONTAINERS):
      return
    self._shared.add(id(obj))
    todo, count = [obj], 0
    while todo:
      node = todo.pop()
      count += 1
      if count > self._shared_left:
        raise _TooShared()
      if isinstance(node, dict):
        todo.extend(node.keys())
        todo.extend(node.values())
      elif isinstance(node, _CONTAINERS):
        todo.extend(node)
    self._shared_left -= count

  def _mutable(self, obj: Any) -> None:
    if id(obj) in self._shared:
      raise ValueError(
          f"the pickle changes a {type(obj).__name__} after referring to it "
          "again (a cycle, or a structure shared to blow up in size); refused")

  def _get(self) -> None:
    self._raw_get()
    self._charge_shared(self.stack[-1])

  def _binget(self) -> None:
    self._raw_binget()
    self._charge_shared(self.stack[-1])

  def _long_binget(self) -> None:
    self._raw_long_binget()
    self._charge_shared(self.stack[-1])

  def _target(self, kind: type) -> Any:
    target = self.stack[-1]
    if not isinstance(target, kind):
      raise ValueError(f"items added to a {type(target).__name__}, not a "
                       f"{kind.__name__}")
    self._mutable(target)
    return target

  def _set_items(self, items: list[Any]) -> None:
    target = self._target(dict)
    for i in range(0, len(items) - 1, 2):
      key = items[i]
      if type(key) not in (str, int):
        raise ValueError(f"a dict key is a {type(key).__name__} "
                         f"({short(key)}), not a string or an int")
      target[key] = items[i + 1]

  def _setitem(self) -> None:
    value, key = self.stack.pop(), self.stack.pop()
    self._set_items([key, value])

  def _setitems(self) -> None:
    self._set_items(self.pop_mark())

  def _append(self) -> None:
    value = self.stack.pop()
    self._target(list).append(value)

  def _appends(self) -> None:
    items = self.pop_mark()
    self._target(list).extend(items)

  def _additems(self) -> None:
    items = self.pop_mark()
    self._target(set).update(items)

  _raw_get = pickle._Unpickler.load_get  # pylint: disable=protected-access
  _raw_binget = pickle._Unpickler.load_binget  # pylint: disable=protected-access
  _raw_long_binget = pickle._Unpickler.load_long_binget  # pylint: disable=protected-access
  dispatch[pickle.BUILD[0]] = _load_build
  dispatch[pickle.BYTEARRAY8[0]] = _refuse
  dispatch[pickle.DUP[0]] = _refuse_dup
  dispatch[pickle.GET[0]] = _get
  dispatch[pickle.BINGET[0]] = _binget
  dispatch[pickle.LONG_BINGET[0]] = _long_binget
  dispatch[pickle.SETITEM[0]] = _setitem
  dispatch[pickle.SETITEMS[0]] = _setitems
  dispatch[pickle.APPEND[0]] = _append
  dispatch[pickle.APPENDS[0]] = _appends
  dispatch[pickle.ADDITEMS[0]] = _additems

  def find_class(self, module: str, name: str) -> Any:
    raise _Refused(f"{module}.{name}")


class StateDictUnpickler(_SafeUnpickler):
  """Unpickler that only resolves allow-listed globals."""

  def __init__(self, file: Any, load_storage: Any):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise _Refused(f"{module}.{name}")

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise ValueError(f"unknown persistent id {short(pid)}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if type(key) not in (str, int):
      raise ValueError(f"storage key {short(key)} is not a string")
    key = str(key)
    if isinstance(storage_type, np.dtype):  # newer torch pickles the dtype
      dtype = storage_type
    elif isinstance(storage_type, StorageType):
      dtype = storage_type.dtype
    else:
      raise ValueError(f"storage type {short(storage_type)} is not a known "
                       "tensor storage (float/int/bool types only)")
    if len(pid) > 5 and pid[5] is not None:
      raise ValueError(f"storage {key} is a storage view (torch < 0.4), "
                       "which jtl does not read")
    if not isinstance(numel, int) or numel < 0:
      raise ValueError(f"storage {key} has a bad element count {short(numel)}")
    return self._load_storage(key, dtype, numel)


def unpickle(path: str, data: Any, load_storage: Any, *,
             unpickler: Any = None) -> Any:
  """Loads one pickle from the file object `data` with the allow-list.

  `load_storage(key, dtype, numel) -> Storage` supplies tensor storages;
  `unpickler` replaces StateDictUnpickler (e.g. PlainUnpickler for headers).
  """
  try:
    if unpickler is not None:
      return unpickler(data).load()
    return StateDictUnpickler(data, load_storage).load()
  except _Refused as e:
    raise CheckpointError(
        f"{path}: refused to unpickle the global {e}: only tensors and plain "
        "containers may appear in a state dict, and jtl never runs pickled "
        "code. If you trust this file, load it with torch and re-save "
        "`model.state_dict()` (or export to safetensors).") from None
  except _TooShared:
    raise CheckpointError(
        f"{path}: more than {MAX_SHARED_ENTRIES} entries reached through "
        "structures the pickle refers to again; the file is damaged or a "
        "structure is shared many times over (a memo bomb). A state dict "
        "saved by torch.save shares almost nothing.") from None


class PlainUnpickler(_SafeUnpickler):
  """For the legacy header pickles, which hold only ints, dicts and strings."""
