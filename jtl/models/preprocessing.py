"""Image preprocessing in JAX shared by the zoo models' `preprocess`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jtl.errors import DataError


def center_crop_resize(images: np.ndarray | jax.Array, *, size: int | None = 224,
                       crop_fraction: float = 0.875) -> jax.Array:
  """Central square crop, then antialiased bilinear resize; float32, 0..255 kept.

  Args:
    images: [H, W, 3] or [B, H, W, 3] RGB.
    size: output side; None returns the images unchanged (as float32 NHWC).
    crop_fraction: crop side relative to the shorter image side (0.875 is the
      usual ImageNet evaluation crop).

  Raises:
    DataError: when the images are not RGB [B, H, W, 3] / [H, W, 3].

  >>> center_crop_resize(np.zeros((40, 60, 3), np.uint8), size=16).shape
  (1, 16, 16, 3)
  """
  x = jnp.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise DataError(f"Expected RGB images [batch, height, width, 3] (or one "
                    f"[height, width, 3]); found shape {tuple(jnp.shape(images))}.")
  x = x.astype(jnp.float32)
  if size is None:
    return x
  h, w = x.shape[1:3]
  side = max(1, int(round(min(h, w) * crop_fraction)))
  top, left = (h - side) // 2, (w - side) // 2
  x = x[:, top:top + side, left:left + side]
  if side != size:
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=True)
  return x
