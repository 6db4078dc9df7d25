"""Layers shared by the convolutional zoo models: fast depthwise conv, padding,
BatchNorm, drop path. Weight conversion lives in `conversion`, image
preprocessing in `preprocessing`.

XLA's CPU backend runs grouped convolutions with one group per channel very
slowly (about 10x slower than the same arithmetic written out). `DepthwiseConv`
therefore picks its formulation by backend when it is traced: on CPU the
"shifted" form (k*k strided slices of the padded input, each times a
per-channel weight, summed: one fused loop), elsewhere lax's grouped conv.
Both give the same numbers and use the same kernel layout, (kh, kw, 1, C),
the layout of `flax.linen.Conv(feature_group_count=C)`.

`conv_general_dilated` does the same for 1x1 convolutions (the expand and
project convs of inverted residuals, ResNet bottlenecks): XLA differentiates a
convolution into a convolution whose window is the whole image for the kernel
gradient, which XLA:CPU runs 10x slower than the matmul it is. Written as a
matmul, forward and both gradients are matmuls on every backend. Both go
through `wgrad`: their kernel gradients are float32 results.

>>> import jax, numpy as np
>>> x = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
>>> w = np.ones((3, 3, 1, 3), np.float32)
>>> a = depthwise_conv(x, w, strides=2, padding="SAME", formulation="shifted")
>>> b = depthwise_conv(x, w, strides=2, padding="SAME", formulation="grouped")
>>> a.shape, bool(np.allclose(a, b))
((2, 3, 3, 3), True)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np  # noqa: F401 - the doctests use it
from jax import lax

from jtl.errors import ConfigError
from jtl.models import wgrad

Padding = Union[str, int, Sequence[tuple[int, int]]]
FORMULATIONS = ("auto", "shifted", "grouped")
IM2COL_MAX_COLUMNS = 32  # 3x3 RGB stems (27); not ResNet's 7x7 stem (147)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF-style SAME padding (lo, hi) of one spatial axis: extra pixel at the end.

  >>> same_padding(224, 3, 2), same_padding(224, 5, 2), same_padding(7, 3, 1)
  ((0, 1), (1, 2), (1, 1))
  """
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def resolve_padding(padding: Padding, spatial: Sequence[int],
                    kernel: Sequence[int], strides: Sequence[int]
                    ) -> list[tuple[int, int]]:
  """Explicit [(lo, hi)] per spatial axis for "SAME", "VALID", an int or pairs.

  An int p means (p, p) on every axis, as PyTorch's `padding=p`.

  >>> resolve_padding("SAME", (8, 8), (3, 3), (2, 2))
  [(0, 1), (0, 1)]
  >>> resolve_padding(1, (8, 8), (3, 3), (2, 2))
  [(1, 1), (1, 1)]
  """
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == "SAME":
      return [same_padding(n, k, s) for n, k, s in zip(spatial, kernel, strides)]
    if mode == "VALID":
      return [(0, 0)] * len(spatial)
    raise ConfigError(f"padding={padding!r}: expected 'SAME', 'VALID', an int "
                      "or a sequence of (lo, hi) pairs.")
  if isinstance(padding, int):
    return [(padding, padding)] * len(spatial)
  pairs = [tuple(int(v) for v in p) for p in padding]
  if len(pairs) != len(spatial) or any(len(p) != 2 for p in pairs):
    raise ConfigError(f"padding={padding!r}: expected one (lo, hi) pair per "
                      f"spatial axis ({len(spatial)}).")
  return pairs  # type: ignore[return-value]


def default_formulation(backend: str | None = None) -> str:
  """"shifted" on CPU, where grouped convs are slow; "grouped" elsewhere."""
  backend = backend or jax.default_backend()
  return "shifted" if backend == "cpu" else "grouped"


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def depthwise_conv(x: jax.Array, kernel: jax.Array, *,
                   strides: int | Sequence[int] = 1, padding: Padding = "SAME",
                   formulation: str = "auto") -> jax.Array:
  """Depthwise 2-D convolution of NHWC `x` with a (kh, kw, 1, C) kernel.

  Args:
    x: [N, H, W, C] input.
    kernel: [kh, kw, 1, C], one filter per channel.
    strides: int or (sh, sw).
    padding: "SAME" (TF-style), "VALID", int p (PyTorch-style) or pairs.
    formulation: "shifted", "grouped", or "auto" (by backend, see
      `default_formulation`).

  Returns:
    [N, H', W', C], same dtype as `x`.
  """
  if formulation not in FORMULATIONS:
    raise ConfigError(f"formulation={formulation!r}: expected one of "
                      f"{FORMULATIONS}.")
  kh, kw, one, c = kernel.shape
  if one != 1 or c != x.shape[-1] or x.ndim != 4:
    raise ConfigError(
        f"depthwise_conv: expected x [N, H, W, C] and kernel [kh, kw, 1, C] "
        f"with the same C; found x {tuple(x.shape)}, kernel "
        f"{tuple(kernel.shape)}.")
  sh, sw = _pair(strides)
  pads = resolve_padding(padding, x.shape[1:3], (kh, kw), (sh, sw))
  if formulation == "auto":
    formulation = default_formulation()
  if formulation == "grouped":
    return wgrad.conv_general_dilated(
        x, kernel.astype(x.dtype), (sh, sw), pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
  return _shifted(x, kernel.astype(x.dtype), (sh, sw),
                  tuple(tuple(p) for p in pads))


def _strided_taps(xp: jax.Array, kh: int, kw: int, strides: tuple[int, int]
                  ) -> list[jax.Array]:
  """The kh*kw windows xp[:, i::s, j::s] of a padded input, each [N, H', W', C]."""
  n, hp, wp, c = xp.shape
  sh, sw = strides
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  return [lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def _shifted_forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                     pads: tuple[tuple[int, int], ...]) -> jax.Array:
  kh, kw, _, c = kernel.shape
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  terms = [tap * kernel[t // kw, t % kw].reshape(1, 1, 1, c)
           for t, tap in enumerate(_strided_taps(xp, kh, kw, strides))]
  out = terms[0]
  for term in terms[1:]:
    out = out + term
  return out


def _kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...],
                 strides: tuple[int, int], pads: tuple[tuple[int, int], ...]
                 ) -> jax.Array:
  """d(loss)/d(kernel) of the shifted form, for output gradient `g`.

  dk[i, j] = sum over (n, h, w) of xp[n, s*h + i, s*w + j] * g[n, h, w]. Sliced
  operands make XLA:CPU's reductions ~5x slower, so the padded input is split
  into its s*s stride phases and `g` is zero-padded to a phase's shape instead:
  every reduction then reads two arrays of one shape.
  """
  kh, kw = kernel_shape[:2]
  (sh, sw), ((ph0, ph1), (pw0, pw1)) = strides, pads
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  n, hp, wp, c = xp.shape
  ho, wo = g.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  rows = [[None] * kw for _ in range(kh)]
  for a in range(min(sh, kh)):
    for b in range(min(sw, kw)):
      ha, wb = -(-(hp - a) // sh), -(-(wp - b) // sw)
      phase = lax.slice(xp, (0, a, b, 0),
                        (n, a + sh * (ha - 1) + 1, b + sw * (wb - 1) + 1, c),
                        (1, sh, sw, 1))
      for i in range(a, kh, sh):
        for j in range(b, kw, sw):
          i2, j2 = i // sh, j // sw
          gq = lax.pad(g, zero, ((0, 0, 0), (i2, ha - i2 - ho, 0),
                                 (j2, wb - j2 - wo, 0), (0, 0, 0)))
          rows[i][j] = jnp.sum(phase * gq, axis=(0, 1, 2), dtype=jnp.float32)
  return jnp.stack([jnp.stack(r) for r in rows]).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
             pads: tuple[tuple[int, int], ...]) -> jax.Array:
  return _shifted_forward(x, kernel, strides, pads)


# Autodiff of the shifted form keeps all k*k taps of the input for the kernel
# gradient (k*k times the activation memory, written in the forward pass).
# The custom rule keeps only x and recomputes what the backward pass needs.
def _shifted_fwd(x, kernel, strides, pads):
  return _shifted_forward(x, kernel, strides, pads), (x, kernel)


def _input_grad(g: jax.Array, kernel: jax.Array, input_hw: tuple[int, int],
                strides: tuple[int, int], pads: tuple[tuple[int, int], ...]
                ) -> jax.Array:
  """d(loss)/dx of the shifted form: a stride-1 shifted correlation of `g`.

  `g` is dilated by the stride and padded (one materialised pad) so that
  dx[h] = sum_i g'[h + i] * kernel[kh - 1 - i]: the forward's structure again.
  (Autodiff's version sums k*k padded copies inside one loop, ~5x slower.)
  """
  kh, kw = kernel.shape[:2]
  (sh, sw), ((ph0, _), (pw0, _)) = strides, pads
  ho, wo = g.shape[1:3]
  lo_h, lo_w = kh - 1 - ph0, kw - 1 - pw0
  hi_h = input_hw[0] + kh - 1 - lo_h - (sh * (ho - 1) + 1)
  hi_w = input_hw[1] + kw - 1 - lo_w - (sw * (wo - 1) + 1)
  gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (lo_h, hi_h, sh - 1),
                                           (lo_w, hi_w, sw - 1), (0, 0, 0)))
  return _shifted_forward(gp, kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)))


def _shifted_bwd(strides, pads, res, g):
  x, kernel = res
  dx = _input_grad(g, kernel, x.shape[1:3], strides, pads)
  dk = _kernel_grad(x, g, kernel.shape, strides, pads).astype(kernel.dtype)
  return dx, dk


_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated`, with 1x1 stride-1 NHWC convs as a matmul
  (every backend) and, on CPU, convs with few input channels as patches
  times a matrix (kh * kw * C_in <= IM2COL_MAX_COLUMNS).

  A drop-in for `flax.linen.Conv(conv_general_dilated=...)`: same arguments,
  same result, same kernel layout (kh, kw, C_in, C_out).

  >>> x, w = np.ones((2, 4, 4, 3), np.float32), np.ones((1, 1, 3, 5), np.float32)
  >>> conv_general_dilated(x, w, (1, 1), "SAME",
  ...     dimension_numbers=("NHWC", "HWIO", "NHWC")).shape
  (2, 4, 4, 5)
  """
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  spatial_ones = lambda v: v is None or all(int(d) == 1 for d in v)
  plain = (dims == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                              ("NHWC", "HWIO", "NHWC"))
           and spatial_ones(lhs_dilation) and spatial_ones(rhs_dilation)
           and feature_group_count == 1 and batch_group_count == 1)
  zero_pad = (padding in ("SAME", "VALID") or
              (not isinstance(padding, str) and
               all(tuple(p) == (0, 0) for p in padding)))
  kh, kw, cin, cout = rhs.shape if plain else (0, 0, 0, 0)
  n = lhs.shape[0]
  if plain and (kh, kw) == (1, 1) and spatial_ones(window_strides) and zero_pad:
    _, h, w, _ = lhs.shape
    y = wgrad.dot_general(lhs.reshape(n * h * w, cin), rhs.reshape(cin, cout),
                        (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
    return y.reshape(n, h, w, cout)
  if plain and kh * kw * cin <= IM2COL_MAX_COLUMNS and jax.default_backend() == "cpu":
    # Few input channels (an RGB stem): XLA:CPU's kernel gradient of this
    # conv is a whole-image-window conv (25 ms for MobileNetV2's stem at
    # 128 px, batch 32); patches times a matrix make it a small matmul.
    strides = tuple(window_strides) if window_strides is not None else (1, 1)
    pads = resolve_padding(padding if isinstance(padding, str) else list(padding),
                           lhs.shape[1:3], (kh, kw), strides)
    taps = _strided_taps(jnp.pad(lhs, ((0, 0), *pads, (0, 0))), kh, kw, strides)
    _, ho, wo, _ = taps[0].shape
    patches = jnp.concatenate(taps, axis=-1).reshape(n * ho * wo, kh * kw * cin)
    y = wgrad.dot_general(patches, rhs.reshape(kh * kw * cin, cout),
                        (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
    return y.reshape(n, ho, wo, cout)
  return wgrad.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


class DepthwiseConv(nn.Module):
  """Depthwise conv with kernel "kernel" of shape (kh, kw, 1, C).

  Attributes:
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw).
    padding: "SAME" (TF-style), "VALID", int (PyTorch-style) or pairs.
    use_bias: adds a per-channel "bias".
    formulation: "auto" (by backend at trace time), "shifted" or "grouped".
  """
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  use_bias: bool = False
  formulation: str = "auto"
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = _pair(self.kernel_size)
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, c), jnp.float32)
    y = depthwise_conv(x, kernel, strides=self.strides, padding=self.padding,
                       formulation=self.formulation)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (c,), jnp.float32)
      y = y + bias.astype(y.dtype).reshape(1, 1, 1, c)
    return y


# Activation dtypes the closed form takes: float32 as is; half precision
# (compute_dtype=bf16) read and written in its own dtype, every statistic and
# the arithmetic of each pass in float32, as Flax's BatchNorm computes them.
_FUSED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _f32(a: jax.Array) -> jax.Array:
  """`a` in float32; a float32 array itself (no convert op in the program)."""
  return a if a.dtype == jnp.float32 else a.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch norm over all axes but the last: (y, mean, var).

  Same numbers as `flax.linen.BatchNorm` (var = E[x^2] - E[x]^2), with the
  closed-form backward pass: two reductions and one elementwise pass, where
  autodiff of the forward takes several more passes over the activation.

  Half-precision inputs (bf16, f16) stay half precision in memory: each pass
  reads them, computes in float32 (statistics, normalisation, gradients) and
  writes its result in half precision, so the forward and the backward each
  convert only what they read and write. y has Flax's dtype (that of x,
  scale and bias together), mean and var are float32, the gradients have
  their inputs' dtypes. Float32 inputs take the float32 ops alone.

  >>> x = np.array([[1.0], [3.0]], np.float32)
  >>> y, mean, var = batch_norm_train(x, np.ones(1, np.float32),
  ...                                 np.zeros(1, np.float32), 0.0)
  >>> y.ravel().tolist(), mean.tolist(), var.tolist()
  ([-1.0, 1.0], [2.0], [1.0])
  """
  return _batch_norm_forward(x, scale, bias, epsilon)[0]


def _batch_norm_forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  row = (1,) * (x.ndim - 1) + (x.shape[-1],)
  xf = _f32(x)
  mean = jnp.mean(xf, axes)
  var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)
  inv = lax.rsqrt(var + epsilon)
  a = _f32(scale) * inv
  y = xf * a.reshape(row) + (_f32(bias) - mean * a).reshape(row)
  y = y.astype(jnp.result_type(x, scale, bias))
  # x is kept in its own dtype (half the memory of a float32 copy in bf16);
  # bias only for its dtype (one value per channel).
  return (y, mean, var), (x, mean, inv, scale, bias)


def _batch_norm_bwd(epsilon, res, cotangents):
  del epsilon
  x, mean, inv, scale, bias = res
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  row = (1,) * (x.ndim - 1) + (x.shape[-1],)
  m = x.size // x.shape[-1]
  g = _f32(g)
  xc = _f32(x) - mean.reshape(row)
  xhat = xc * inv.reshape(row)
  dbias = jnp.sum(g, axes)
  dscale = jnp.sum(g * xhat, axes)
  dx = (_f32(scale) * inv / m).reshape(row) * (
      m * g - dbias.reshape(row) - xhat * dscale.reshape(row))
  # The statistics are outputs too (for the running averages).
  dx = dx + (g_mean.reshape(row) + 2.0 * g_var.reshape(row) * xc) / m
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_bwd)


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm` with `batch_norm_train`'s backward in training.

  Same variables ("scale", "bias"; batch_stats "mean", "var"), same updates
  and numbers. The fused path covers the zoo's case (float32, or bf16/f16
  activations under `compute_dtype` with float32 statistics; last axis, no
  mask or cross-device axis_name); anything else is flax's own code.
  """

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    # An explicit dtype other than float32 (or float32 for half-precision
    # inputs) asks for Flax's own output dtype rules: its code.
    fused = (not use_running_average and mask is None and self.axis_name is None
             and self.axis in (-1, x.ndim - 1) and self.use_bias
             and self.use_scale and jnp.dtype(x.dtype) in _FUSED_DTYPES
             and (self.dtype is None or (jnp.dtype(self.dtype) == jnp.float32
                                         and x.dtype == jnp.float32))
             and self.param_dtype == jnp.float32
             and self.force_float32_reductions)
    if not fused:
      return super().__call__(x, use_running_average=use_running_average, mask=mask)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean",
                            lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var",
                           lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def relu6(x: jax.Array) -> jax.Array:
  """min(max(x, 0), 6), the activation of MobileNet and EfficientNet-Lite."""
  return jnp.clip(x, 0.0, 6.0)


def drop_path_rate_of(rate: float, block: int, depth: int) -> float:
  """Stochastic depth of `block`: 0 for the first, `rate` for the last (timm).

  >>> [drop_path_rate_of(0.1, i, 3) for i in range(3)]
  [0.0, 0.05, 0.1]
  """
  return rate * block / max(depth - 1, 1)


def drop_path(x: jax.Array, rate: float, *, deterministic: bool,
              rng: jax.Array | None) -> jax.Array:
  """Drops whole examples of a residual branch with probability `rate`.

  Kept examples are scaled by 1 / (1 - rate) (stochastic depth, as the
  EfficientNet reference's `drop_connect`).
  """
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))
