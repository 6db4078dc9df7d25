"""Layers shared by the convolutional zoo models: fast depthwise conv, padding.

XLA's CPU backend runs grouped convolutions with one group per channel very
slowly (about 10x slower than the same arithmetic written out). `DepthwiseConv`
therefore picks its formulation by backend when it is traced: on CPU the
"shifted" form (k*k strided slices of the padded input, each times a
per-channel weight, summed: one fused loop), elsewhere lax's grouped conv.
Both give the same numbers and use the same kernel layout, (kh, kw, 1, C),
the layout of `flax.linen.Conv(feature_group_count=C)`.

>>> import jax, numpy as np
>>> x = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
>>> w = np.ones((3, 3, 1, 3), np.float32)
>>> a = depthwise_conv(x, w, strides=2, padding="SAME", formulation="shifted")
>>> b = depthwise_conv(x, w, strides=2, padding="SAME", formulation="grouped")
>>> a.shape, bool(np.allclose(a, b))
((2, 3, 3, 3), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jtl.errors import ConfigError

Padding = Union[str, int, Sequence[tuple[int, int]]]
FORMULATIONS = ("auto", "shifted", "grouped")


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
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (sh, sw), pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
  return _shifted(x, kernel.astype(x.dtype), (sh, sw), pads)


def _shifted(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
             pads: list[tuple[int, int]]) -> jax.Array:
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  (ph0, ph1), (pw0, pw1) = pads
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  ho = (h + ph0 + ph1 - kh) // sh + 1
  wo = (w + pw0 + pw1 - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i, j, 0),
                      (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                      (1, sh, sw, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


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
      y = y + self.param("bias", self.bias_init, (c,), jnp.float32).astype(y.dtype)
    return y


def relu6(x: jax.Array) -> jax.Array:
  """min(max(x, 0), 6), the activation of MobileNet and EfficientNet-Lite."""
  return jnp.clip(x, 0.0, 6.0)


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
