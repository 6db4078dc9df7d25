"""Post-training weight quantization (int8, per output channel) and bf16 inference.

A quantized leaf is a `QTensor`: int8 values and one float32 scale per output
channel (the last axis of Dense, Conv and depthwise kernels; (head, column)
of an attention projection's [width, heads, head_dim] kernel), symmetric and
rounded to nearest, so `|dequantize(q) - w| <= scale / 2` elementwise. The
weights stay int8 in memory and on disk; they are dequantized inside the
compiled forward pass (`make_inference_fn`, `make_quantized_eval_step`), so
any zoo model runs unchanged. Biases, norms and BatchNorm statistics stay
float.

Qwix 0.1.8 (pip) does not fit here: its PTQ provider refuses weight-only
quantized convolutions (it needs act_qtype == weight_qtype) and cannot see
jtl's `DepthwiseConv`, which is written with slices rather than a conv op.

>>> import numpy as np
>>> w = np.array([[0.5, -2.0], [0.25, 1.0]], np.float32)
>>> q = quantize_tensor(w)
>>> q.qvalue.dtype, q.scale.shape
(dtype('int8'), (1, 2))
>>> bool(np.all(np.abs(np.asarray(q.dequantize()) - w) <= np.asarray(q.scale) / 2))
True
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jtl import eval_steps, losses, paths
from jtl.export.writers import write_atomic
from jtl.errors import CheckpointError, ConfigError
from jtl.tree import PyTree, Rules, cast_floats, map_with_path, match_rules, path_name, unflatten

PRECISIONS = ("float32", "bfloat16", "int8", "int8_bfloat16")
DEFAULT_RULES: Rules = ((r"(.*/)?kernel", True), (r".*", False))
_Q, _S = "::qvalue", "::scale"


@flax.struct.dataclass
class QTensor:
  """int8 `qvalue` times a float32 `scale` broadcast over it."""
  qvalue: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.qvalue.shape)

  def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
    return (jnp.asarray(self.qvalue, jnp.float32) * self.scale).astype(dtype)


def _is_q(x: Any) -> bool:
  return isinstance(x, QTensor)


def quantize_tensor(w: Any, *, bits: int = 8,
                    channel_axis: int | tuple[int, ...] = -1) -> QTensor:
  """Symmetric per-channel quantization of `w`: one scale per index of the
  `channel_axis` axis (or axes)."""
  if not 2 <= bits <= 8:
    raise ConfigError(f"bits={bits}: expected 2..8 (values are stored as int8).")
  w = np.asarray(w, np.float32)
  qmax = 2 ** (bits - 1) - 1
  axes = {a % w.ndim for a in np.atleast_1d(channel_axis).tolist()}
  reduce = tuple(i for i in range(w.ndim) if i not in axes)
  amax = np.max(np.abs(w), axis=reduce, keepdims=True)
  scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
  return QTensor(qvalue=q, scale=scale)


def quantize_params(params: PyTree, *, rules: Rules = DEFAULT_RULES, bits: int = 8,
                    min_size: int = 256) -> PyTree:
  """Replaces the leaves selected by `rules` with `QTensor`s.

  Args:
    params: a params tree (numpy or jax arrays).
    rules: ordered (regex, bool) over "/"-joined paths, first match wins,
      every leaf must match; default: every "kernel".
    bits: 8 for int8; fewer bits use the same storage with a smaller range.
    min_size: leaves with fewer elements (or ndim < 2) stay float, as their
      scales would cost more than they save.
  """
  selected = match_rules(params, rules, what="quantization choice")

  def quantize(path: str, leaf: Any, choose: Any) -> Any:
    if choose and np.ndim(leaf) >= 2 and np.size(leaf) >= min_size:
      return quantize_tensor(leaf, bits=bits, channel_axis=output_axes(path, np.ndim(leaf)))
    return leaf

  return map_with_path(quantize, params, selected)


def output_axes(path: str, ndim: int) -> int | tuple[int, ...]:
  """The output channel axes of a kernel: the last; both (head, column) axes of
  an attention projection's [width, heads, head_dim] kernel (Flax
  `MultiHeadDotProductAttention`'s query/key/value), whose heads differ in
  range.

  >>> output_axes("encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", 3)
  (-2, -1)
  >>> output_axes("encoderblock_0/MultiHeadDotProductAttention_0/out/kernel", 3)
  -1
  """
  return (-2, -1) if ndim == 3 and re.search(r"(^|/)(query|key|value)/kernel$", path) else -1


def quantize_variables(variables: PyTree, **kwargs: Any) -> PyTree:
  """`variables` with params quantized (`quantize_params`); other collections kept."""
  variables = dict(variables)
  return {**variables, "params": quantize_params(variables["params"], **kwargs)}


def dequantize(tree: PyTree, dtype: Any = jnp.float32) -> PyTree:
  """Float tree: `QTensor`s dequantized, other float leaves cast to `dtype`."""
  def one(x):
    if _is_q(x):
      return x.dequantize(dtype)
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(one, tree, is_leaf=_is_q)


def prepare(variables: PyTree, precision: str, **quantize_kwargs: Any) -> PyTree:
  """Stored variables for a precision: float32, bfloat16 (cast), int8 (quantized)."""
  if precision not in PRECISIONS:
    raise ConfigError(f"precision={precision!r}: expected one of {PRECISIONS}.")
  if precision == "float32":
    return cast_floats(jax.tree.map(np.asarray, variables), np.float32)
  if precision == "bfloat16":
    return cast_floats(jax.tree.map(np.asarray, variables), jnp.bfloat16)
  return quantize_variables(variables, **quantize_kwargs)


def _compute_dtype(precision: str) -> Any:
  return jnp.bfloat16 if precision in ("bfloat16", "int8_bfloat16") else jnp.float32


def make_inference_fn(module: nn.Module, variables: PyTree, *,
                      precision: str = "int8") -> Callable[[jax.Array], jax.Array]:
  """A jitted `predict(x) -> float32 logits` at `precision`.

  `variables` are as `prepare(..., precision)` returns them (or float ones,
  which are prepared here). int8 weights are passed to the compiled function
  as int8 and dequantized inside it.
  """
  if precision not in PRECISIONS:
    raise ConfigError(f"precision={precision!r}: expected one of {PRECISIONS}.")
  has_q = any(_is_q(x) for x in jax.tree.leaves(variables, is_leaf=_is_q))
  if precision.startswith("int8") and not has_q:
    variables = prepare(variables, "int8")
  elif not precision.startswith("int8"):
    variables = prepare(dequantize(variables) if has_q else variables, precision)
  dtype = _compute_dtype(precision)
  variables = jax.tree.map(jnp.asarray, variables)

  def cast(x: Any) -> Any:
    """An image batch in the compute dtype; a text model's dict of token ids
    and masks as it is (integers)."""
    if isinstance(x, dict):
      return jax.tree.map(jnp.asarray, x)
    return jnp.asarray(x).astype(dtype)

  @jax.jit
  def predict(v, x):
    out = module.apply(dequantize(v, dtype), cast(x), train=False)
    return out.astype(jnp.float32)

  return lambda x: predict(variables, x)


def make_quantized_eval_step(module: nn.Module, *, precision: str = "int8"
                             ) -> Callable[[PyTree, losses.Batch], dict[str, jax.Array]]:
  """`eval_step(variables, batch) -> sums` as `jtl.make_eval_step`, where
  `variables` may hold `QTensor`s (dequantized inside the step)."""
  if precision not in PRECISIONS:
    raise ConfigError(f"precision={precision!r}: expected one of {PRECISIONS}.")
  dtype = _compute_dtype(precision)
  inner = eval_steps.make_eval_step(module, compute_dtype=None if dtype == jnp.float32 else dtype)

  def eval_step(variables: PyTree, batch: losses.Batch) -> dict[str, jax.Array]:
    return inner(dequantize(variables, jnp.float32), batch)

  eval_step.axis_name = inner.axis_name  # for jtl.parallel's checks: a mesh step, no pmap
  return eval_step


def check_save_path(path: str | os.PathLike) -> None:
  """A CheckpointError unless `path` is named .safetensors: `save` writes
  safetensors bytes, and readers (np.load, `jtl.weights.read`) go by the
  suffix. Callers check it before the work whose result is saved."""
  name = paths.path(path).name
  if not name.endswith(".safetensors"):
    stem = name[:-len(paths.path(path).suffix)] if paths.path(path).suffix else name
    raise CheckpointError(
        f"{path}: quantized variables are written as a safetensors file, which readers tell "
        f"by its suffix (np.load refuses one named .npz); name it {stem}.safetensors.")


def save(path: str | os.PathLike, variables: PyTree, *, meta: dict[str, Any] | None = None) -> int:
  """Writes (quantized) variables to a .safetensors file; returns its size in bytes.

  A QTensor at "params/a/kernel" is stored as "params/a/kernel::qvalue"
  (int8) and "params/a/kernel::scale" (float32); `meta` (JSON) goes into the
  file's metadata. Another suffix than .safetensors is refused
  (`check_save_path`).
  """
  from safetensors.numpy import save as to_bytes  # pylint: disable=g-import-not-at-top
  check_save_path(path)
  flat: dict[str, np.ndarray] = {}
  for path_, leaf in _flat_q(variables).items():
    if _is_q(leaf):
      flat[path_ + _Q] = np.ascontiguousarray(np.asarray(leaf.qvalue))
      flat[path_ + _S] = np.ascontiguousarray(np.asarray(leaf.scale))
    else:
      arr = np.asarray(leaf)
      if arr.dtype == jnp.bfloat16:
        raise CheckpointError(f"{path}: {path_} is bfloat16; save float32 or int8 variables "
                              "(bf16 is a compute precision: prepare(..., 'bfloat16') at load).")
      flat[path_] = np.ascontiguousarray(arr)
  data = to_bytes(flat, metadata={"jtl_quantized": "1", "meta": json.dumps(meta or {})})
  write_atomic(path, data)  # local or in a bucket (jtl.paths)
  return len(data)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
  """The `__metadata__` of a safetensors file's bytes (its JSON header)."""
  size = int.from_bytes(data[:8], "little")
  return json.loads(data[8:8 + size]).get("__metadata__") or {}


def _flat_q(tree: PyTree) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_q)
  return {path_name(kp): leaf for kp, leaf in leaves}


def load(path: str | os.PathLike) -> tuple[PyTree, dict[str, Any]]:
  """Reads `save`'s file: (variables with QTensors, meta)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load as load_bytes  # pylint: disable=g-import-not-at-top
  path = paths.path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file; expected a file written by jtl.export.quantize.save.")
  try:
    if paths.is_remote(path):
      data = path.read_bytes()
      metadata, arrays = _safetensors_metadata(data), load_bytes(data)
    else:
      with safe_open(os.fspath(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        arrays = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # name the file
    raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from e
  if metadata.get("jtl_quantized") != "1":
    raise CheckpointError(f"{path}: not written by jtl.export.quantize.save (no 'jtl_quantized' "
                          "metadata); read plain checkpoints with jtl.weights.read.")
  flat: dict[str, Any] = {}
  broken = []
  for key, arr in arrays.items():
    if key.endswith(_Q):
      base = key[:-len(_Q)]
      if base + _S not in arrays:
        broken.append(base)
        continue
      flat[base] = QTensor(qvalue=arr, scale=arrays[base + _S])
    elif key.endswith(_S):
      if key[:-len(_S)] + _Q not in arrays:
        broken.append(key[:-len(_S)])
    else:
      flat[key] = arr
  if broken:
    raise CheckpointError(f"{path}: quantized entries missing their values or scales: "
                          f"{sorted(broken)}. The file is incomplete; save it again.")
  return unflatten(flat), json.loads(metadata.get("meta", "{}"))
