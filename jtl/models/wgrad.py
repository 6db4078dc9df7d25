"""Weight gradients that leave their matmul or convolution in float32.

With bfloat16 compute (`compute_dtype`), the train step casts the float32
master weights to bf16 and autodiff writes each weight's gradient as the bf16
output of a matmul or convolution, cast back to float32 afterwards. Over
several devices XLA's partitioner sums those bf16 outputs across devices,
before the cast (jax-ml/jax#27496): a bf16 all-reduce, where PyTorch's DDP
sums float32 gradients.

`dot_general` and `conv_general_dilated` are drop-ins for Flax's hooks of the
same names (`nn.Dense(dot_general=...)`, `nn.Conv(conv_general_dilated=...)`,
`nn.MultiHeadDotProductAttention(qkv_dot_general=..., out_dot_general=...)`):
the same forward pass and input gradient, and the weight's gradient computed
with a float32 result (the matmul's own accumulator, which tensor cores and
TPU MXUs write at bf16 speed). Devices sum it in float32; it is rounded to the
weight's dtype once, after the sum, as one device's gradient is. `Embed`
does the same for embedding tables. Two exceptions: on GPUs convolution
kernels keep bf16 results (XLA:GPU has no bf16 convolution with a float32
result, see `_conv_bwd`); biases, norms and position embeddings, whose
gradients are reductions over the batch, are summed as XLA writes them
(bf16; 0.5% of ViT-B/16's all-reduced bytes). The zoo's layers use these
(`jtl.models.layers`, `Dense`, `Conv`, `Embed`); a model of your own can pass
them to its Flax layers the same way. Being custom VJPs, their half-precision
path has no forward-mode derivative (`jax.jvp`); float32 operands are plain
`lax`, with every derivative.

>>> import jax, jax.numpy as jnp
>>> x = jnp.linspace(-1, 1, 24, dtype=jnp.bfloat16).reshape(8, 3)
>>> w = jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16).reshape(3, 2)
>>> dims = (((1,), (0,)), ((), ()))
>>> bool(jnp.all(dot_general(x, w, dims) == jax.lax.dot_general(x, w, dims)))
True
>>> grad = jax.grad(lambda w: jnp.sum(dot_general(x, w, dims).astype(jnp.float32) ** 2))
>>> reference = jax.grad(lambda w: jnp.sum((x.astype(jnp.float32) @ w.astype(jnp.float32)) ** 2))
>>> bool(jnp.allclose(grad(w).astype(jnp.float32), reference(w), rtol=2**-8))
True
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _rhs_gradient(lhs: jax.Array, g: jax.Array, dims: Any, rhs_ndim: int,
                  precision: Any) -> jax.Array:
  """d(loss)/d(rhs) of `dot_general(lhs, rhs, dims)` (no batch dimensions) for
  output gradient `g`, as a matmul with a float32 result, in rhs's layout."""
  (lhs_contract, rhs_contract), _ = dims
  lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
  lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract]
  rhs_free = [d for d in range(rhs_ndim) if d not in rhs_contract]
  # Sum over lhs's free dims (g's leading ones): the result holds lhs's
  # contracting dims (in lhs's order), then rhs's free dims.
  raw = lax.dot_general(lhs, g, ((tuple(lhs_free), tuple(range(len(lhs_free)))), ((), ())),
                        precision=precision, preferred_element_type=jnp.float32)
  kept = sorted(lhs_contract)
  position = [kept.index(lhs_contract[rhs_contract.index(d)]) if d in rhs_contract
              else len(kept) + rhs_free.index(d) for d in range(rhs_ndim)]
  return lax.transpose(raw, tuple(position))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot(lhs: jax.Array, rhs: jax.Array, dims: Any, precision: Any) -> jax.Array:
  return lax.dot_general(lhs, rhs, dims, precision=precision)


def _dot_fwd(lhs, rhs, dims, precision):
  return _dot(lhs, rhs, dims, precision), (lhs, rhs)


def _dot_bwd(dims, precision, residuals, g):
  lhs, rhs = residuals
  lhs_gradient = jax.linear_transpose(
      lambda a: lax.dot_general(a, rhs, dims, precision=precision), lhs)(g)[0]
  return lhs_gradient, _rhs_gradient(lhs, g, dims, rhs.ndim, precision).astype(rhs.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)


def _half(*arrays: jax.Array) -> bool:
  """Whether the operands share one floating dtype of at most 16 bits."""
  dtype = arrays[0].dtype
  return (all(a.dtype == dtype for a in arrays) and jnp.issubdtype(dtype, jnp.floating)
          and jnp.finfo(dtype).bits <= 16)


def _hashable(dims: Any) -> Any:
  (lc, rc), (lb, rb) = dims
  return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                precision: Any = None, preferred_element_type: Any = None,
                **kwargs: Any) -> jax.Array:
  """`lax.dot_general` whose gradient with respect to `rhs` (the layer's
  kernel) is a float32 matmul result, cast to rhs's dtype.

  Half-precision operands with a kernel of their own dtype (Flax layers cast
  the kernel before the call) take that path; anything else (batch dims,
  `preferred_element_type`, an `out_sharding`) is `lax.dot_general` itself.
  """
  dims = _hashable(dimension_numbers)
  if kwargs.get("out_sharding", 0) is None:  # what flax.nnx passes when unsharded
    del kwargs["out_sharding"]
  if dims[1] != ((), ()) or preferred_element_type is not None or kwargs or not _half(lhs, rhs):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
  return _dot(lhs, rhs, dims, precision)


def _dilated(shape: Any, dilation: Any) -> list[int]:
  return [0 if s == 0 else 1 + d * (s - 1) for s, d in zip(shape, dilation)]


def _kernel_gradient(lhs: jax.Array, g: jax.Array, rhs_shape: tuple[int, ...],
                     config: tuple, result: Any = jnp.float32) -> jax.Array:
  """d(loss)/d(kernel) of `lax.conv_general_dilated(lhs, kernel, **config)`
  for output gradient `g`: autodiff's own transposed convolution (jax's
  `_conv_general_dilated_transpose_rhs`), with a `result` (dtype) result."""
  strides, pads, lhs_dilation, rhs_dilation, dims, groups, precision = config
  lhs_spec, rhs_spec, out_spec = dims
  in_shape = [lhs.shape[d] for d in lhs_spec[2:]]
  window = [rhs_shape[d] for d in rhs_spec[2:]]
  out_shape = [g.shape[d] for d in out_spec[2:]]
  lo = [p[0] for p in pads]
  hi = [o - i + w - p - 1 for o, i, w, p in zip(
      _dilated(out_shape, strides), _dilated(in_shape, lhs_dilation),
      _dilated(window, rhs_dilation), lo)]
  swap = lambda spec: (spec[1], spec[0]) + tuple(spec[2:])
  return lax.conv_general_dilated(
      lhs, g, window_strides=rhs_dilation, padding=list(zip(lo, hi)),
      lhs_dilation=lhs_dilation, rhs_dilation=strides,
      dimension_numbers=lax.ConvDimensionNumbers(swap(lhs_spec), swap(out_spec), swap(rhs_spec)),
      batch_group_count=groups, precision=precision, preferred_element_type=result)


def _plain_conv(lhs: jax.Array, rhs: jax.Array, config: tuple) -> jax.Array:
  strides, pads, lhs_dilation, rhs_dilation, dims, groups, precision = config
  return lax.conv_general_dilated(lhs, rhs, strides, pads, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dims,
                                  feature_group_count=groups, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(lhs: jax.Array, rhs: jax.Array, config: tuple) -> jax.Array:
  return _plain_conv(lhs, rhs, config)


def _conv_fwd(lhs, rhs, config):
  return _plain_conv(lhs, rhs, config), (lhs, rhs)


def _conv_bwd(config, residuals, g):
  lhs, rhs = residuals
  lhs_gradient = jax.linear_transpose(lambda a: _plain_conv(a, rhs, config), lhs)(g)[0]
  # XLA:GPU has no half-precision convolution with a float32 result: it would
  # convert both operands and run cuDNN's float32 kernel gradient, several
  # times slower. There the gradient stays a bf16 result (and its sum over
  # GPUs bf16); TPUs and CPUs write float32 at no cost.
  gradient = lambda result: (
      lambda: _kernel_gradient(lhs, g, rhs.shape, config, result).astype(rhs.dtype))
  kernel = lax.platform_dependent(cuda=gradient(None), rocm=gradient(None),
                                  default=gradient(jnp.float32))
  return lhs_gradient, kernel


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Any = None,
                         padding: Any = "VALID", lhs_dilation: Any = None,
                         rhs_dilation: Any = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None,
                         **kwargs: Any) -> jax.Array:
  """`lax.conv_general_dilated` whose gradient with respect to `rhs` (the
  kernel) is a float32 convolution result, cast to rhs's dtype, except on
  GPUs (see `_conv_bwd`); the same dispatch as `dot_general`."""
  if kwargs.get("out_sharding", 0) is None:
    del kwargs["out_sharding"]
  if batch_group_count != 1 or preferred_element_type is not None or kwargs or not _half(lhs, rhs):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type, **kwargs)
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  n = lhs.ndim - 2
  strides = tuple(window_strides or (1,) * n)
  lhs_dilation, rhs_dilation = tuple(lhs_dilation or (1,) * n), tuple(rhs_dilation or (1,) * n)
  if isinstance(padding, str):
    window = _dilated([rhs.shape[d] for d in dims.rhs_spec[2:]], rhs_dilation)
    padding = lax.padtype_to_pads([lhs.shape[d] for d in dims.lhs_spec[2:]], window,
                                  strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, (strides, pads, lhs_dilation, rhs_dilation, dims,
                          int(feature_group_count), precision))


@jax.custom_vjp
def _take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
  return jnp.take(table, ids, axis=0)


def _take_rows_fwd(table, ids):
  return _take_rows(table, ids), (table, ids)


def _take_rows_bwd(residuals, g):
  table, ids = residuals
  rows = jnp.zeros(table.shape, jnp.float32).at[ids].add(g.astype(jnp.float32))
  return rows.astype(table.dtype), None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
  """`jnp.take(table, ids, axis=0)` (an embedding lookup) whose gradient
  with respect to a half-precision table is summed over the batch in float32.

  >>> table = jnp.arange(6, dtype=jnp.bfloat16).reshape(3, 2)
  >>> take_rows(table, jnp.array([[2, 0]])).tolist()
  [[[4.0, 5.0], [0.0, 1.0]]]
  """
  if not _half(table):
    return jnp.take(table, ids, axis=0)
  return _take_rows(table, ids)


class Embed(nn.Embed):
  """`nn.Embed` (same param) whose table gradient is a float32 sum (`take_rows`)."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.num_embeddings == 1 or not jnp.issubdtype(inputs.dtype, jnp.integer):
      return super().__call__(inputs)
    embedding = self.embedding if self.dtype is None else self.embedding.astype(self.dtype)
    return take_rows(embedding, inputs)


# The zoo's Flax layers with float32 weight gradients; same params, same names.
Dense = functools.partial(nn.Dense, dot_general=dot_general)
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
