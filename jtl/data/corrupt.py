"""Corrupted copies of images, for measuring accuracy under a distribution shift.

Three of the common corruptions of Hendrycks and Dietterich (2019,
"Benchmarking Neural Network Robustness to Common Corruptions"), with the
severities of their 32-pixel set (CIFAR-10-C): Gaussian noise, Gaussian blur
and contrast, each at severity 1 (mild) to 5 (strong). NumPy only (no
TensorFlow): a benchmark writes the corrupted test images once, as an image
folder split, and evaluates on it as on any other split.

>>> import numpy as np
>>> image = np.full((4, 4, 3), 200, np.uint8)
>>> corrupt(image, "contrast", 5)[0, 0].tolist()  # a flat image has no contrast to lose
[200, 200, 200]
"""

from __future__ import annotations

import math

import numpy as np

from jtl.errors import DataError

# Per corruption, the parameter at severities 1..5 (CIFAR-10-C's values): the
# noise's standard deviation and the blur's sigma in pixels at 32 px, and the
# factor the contrast around the image's mean is scaled by.
SEVERITIES = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
}


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """A separable Gaussian blur of [H, W, C] (reflected borders, radius 3 sigma)."""
  radius = max(1, math.ceil(3 * sigma))
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (t / sigma) ** 2)
  kernel /= kernel.sum()
  for axis in (0, 1):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="reflect" if x.shape[axis] > radius else "edge")
    n = x.shape[axis]
    x = sum(k * np.take(padded, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
  return x


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
  """`image` ([H, W] or [H, W, C], values 0..255) with corruption `name` at
  `severity` (1..5), as uint8. The noise is drawn from `seed` (the same seed,
  the same noise).

  Raises:
    DataError: an unknown corruption or a severity outside 1..5.
  """
  if name not in SEVERITIES:
    raise DataError(f"corruption {name!r}: expected one of {sorted(SEVERITIES)}.")
  if isinstance(severity, bool) or severity not in range(1, 6):
    raise DataError(f"corruption {name!r}: severity must be an integer 1..5, got {severity!r}.")
  c = SEVERITIES[name][severity - 1]
  x = np.asarray(image, np.float64) / 255.0
  if name == "gaussian_noise":
    x = x + np.random.default_rng(seed).normal(0.0, c, x.shape)
  elif name == "gaussian_blur":
    x = _blur(x if x.ndim == 3 else x[..., None], c).reshape(x.shape)
  else:  # contrast: towards the mean over all pixels and channels
    mean = x.mean()
    x = (x - mean) * c + mean
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
