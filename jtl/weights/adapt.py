"""Adapting pretrained arrays to a model that differs a little (numpy only).

>>> import numpy as np
>>> resize_pos_embed(np.zeros((1, 1 + 4, 8)), (3, 3)).shape
(1, 10, 8)
>>> adapt_input_conv(np.ones((3, 3, 3, 16)), 1)[..., 0, 0]
array([[3., 3., 3.],
       [3., 3., 3.],
       [3., 3., 3.]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jtl.errors import LoadError


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of 1-d linear interpolation, half-pixel centres."""
  scale = n_in / n_out
  x = (np.arange(n_out) + 0.5) * scale - 0.5
  x = np.clip(x, 0, n_in - 1)
  lo = np.floor(x).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = x - lo
  w = np.zeros((n_out, n_in))
  w[np.arange(n_out), lo] += 1 - frac
  w[np.arange(n_out), hi] += frac
  return w


def resize_bilinear(grid: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of an (H, W, C) array to (h, w, C), half-pixel centres.

  Matches `jax.image.resize(..., "bilinear", antialias=False)` and PyTorch's
  `interpolate(mode="bilinear", align_corners=False)`.
  """
  h, w = size
  wy = _linear_weights(grid.shape[0], h)
  wx = _linear_weights(grid.shape[1], w)
  out = np.einsum("yh,hwc,xw->yxc", wy, grid.astype(np.float64), wx)
  return out.astype(grid.dtype)


def resize_pos_embed(posemb: np.ndarray, new_grid: int | Sequence[int], *,
                     num_prefix_tokens: int = 1,
                     old_grid: Sequence[int] | None = None) -> np.ndarray:
  """Resizes ViT position embeddings to a new patch grid.

  The first `num_prefix_tokens` rows (class/register tokens) are kept as they
  are; the rest, a (gh, gw) grid, is resized bilinearly, as big_vision's
  `resample_posemb` does when fine-tuning at a new resolution.

  Args:
    posemb: (1, N, D) or (N, D) embeddings.
    new_grid: the new (gh, gw) grid, or one int for a square grid.
    num_prefix_tokens: leading tokens that are not part of the grid.
    old_grid: the old grid; inferred as square when None.

  Returns:
    Embeddings of shape (1, P + gh * gw, D) (or without the 1 when the input
    had rank 2), same dtype.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim not in (2, 3) or (posemb.ndim == 3 and posemb.shape[0] != 1):
    raise LoadError(f"resize_pos_embed: expected (1, N, D) or (N, D), got "
                    f"shape {posemb.shape}.")
  tokens = posemb.reshape(posemb.shape[-2:])
  prefix, grid = tokens[:num_prefix_tokens], tokens[num_prefix_tokens:]
  if old_grid is None:
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
      raise LoadError(
          f"resize_pos_embed: {grid.shape[0]} grid tokens (after "
          f"{num_prefix_tokens} prefix tokens) is not a square grid; pass "
          "old_grid=(h, w) or the right num_prefix_tokens.")
    old_grid = (side, side)
  if isinstance(new_grid, int):
    new_grid = (new_grid, new_grid)
  if old_grid[0] * old_grid[1] != grid.shape[0]:
    raise LoadError(f"resize_pos_embed: old_grid={tuple(old_grid)} does not "
                    f"hold {grid.shape[0]} tokens.")
  grid = grid.reshape(*old_grid, -1)
  if tuple(old_grid) != tuple(new_grid):
    grid = resize_bilinear(grid, new_grid)
  out = np.concatenate([prefix, grid.reshape(-1, grid.shape[-1])], axis=0)
  return out[None] if posemb.ndim == 3 else out


def adapt_input_conv(kernel_hwio: np.ndarray, in_channels: int) -> np.ndarray:
  """Adapts a first-layer conv kernel (H, W, I, O) to `in_channels` inputs.

  Follows timm's `adapt_input_conv`: for 1 channel the RGB filters are summed
  (space-to-depth stems with I = 3k sum each RGB triple); for N != 3 channels
  the RGB filters are repeated to N and scaled by 3 / N, so that the response
  to a constant input keeps its size.
  """
  kernel = np.asarray(kernel_hwio)
  if kernel.ndim != 4:
    raise LoadError(f"adapt_input_conv: expected an HWIO kernel, got shape "
                    f"{kernel.shape}.")
  h, w, i, o = kernel.shape
  k = kernel.astype(np.float32)
  if in_channels == i:
    return kernel
  if in_channels == 1:
    if i > 3:
      if i % 3:
        raise LoadError(f"adapt_input_conv: cannot sum {i} input channels in "
                        "RGB groups.")
      k = k.reshape(h, w, i // 3, 3, o).sum(axis=3)
    else:
      k = k.sum(axis=2, keepdims=True)
  elif i != 3:
    raise LoadError(
        f"adapt_input_conv: only RGB (3-channel) kernels can be adapted to "
        f"{in_channels} channels; this kernel has {i}.")
  else:
    reps = math.ceil(in_channels / 3)
    k = np.tile(k, (1, 1, reps, 1))[:, :, :in_channels] * (3 / in_channels)
  return k.astype(kernel.dtype)
