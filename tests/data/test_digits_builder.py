"""jtl_digits' layout: sklearn's 8x8 digits placed as MNIST places its own
(20x20 box, centre of mass at the frame's centre), on the real data."""

import numpy as np

from jtl.data.builders import digits


def _centre_of_mass(images: np.ndarray) -> np.ndarray:
  """[N, 2] (row, column) centres of mass of [N, H, W] images."""
  m = images.astype(np.float64)
  grid = np.arange(m.shape[1])
  total = m.sum((1, 2))
  return np.stack([m.sum(2) @ grid / total, m.sum(1) @ grid / total], axis=1)


def test_sklearn_digits_are_laid_out_as_mnist():
  images, labels = digits.load_arrays()
  assert images.shape == (1797, 28, 28) and images.dtype == np.uint8
  assert np.bincount(labels).min() >= 170  # ~180 per digit
  assert images.max() == 255  # 0..16 served as 0..255, as MNIST's pixels
  ink = images > 0
  rows, cols = ink.any(2), ink.any(1)
  height = 28 - rows.argmax(1) - rows[:, ::-1].argmax(1)
  width = 28 - cols.argmax(1) - cols[:, ::-1].argmax(1)
  assert height.max() <= 20 and width.max() <= 20  # the 20x20 box, not the frame
  assert np.median(height) >= 16  # and size-normalised: the digit fills its box
  assert np.abs(_centre_of_mass(images) - 13.5).max() <= 1.0


def test_mnist_layout_centres_an_off_centre_digit_and_keeps_blanks():
  small = np.zeros((2, 8, 8), np.float32)
  small[0, 0:3, 0:2] = 1.0  # ink in the top-left corner only
  out = digits.mnist_layout(small)
  assert out.shape == (2, 28, 28) and np.isfinite(out).all()
  before = _centre_of_mass(np.pad(small[:1], ((0, 0), (10, 10), (10, 10))))[0] - 10
  assert (before < 2).all()  # far off the 8x8 centre (3.5)
  # Moved as far as the 20x20 box may go (4 px): towards the centre, no wrap.
  centre = _centre_of_mass(out[:1])[0]
  assert (centre > 9).all() and (centre < 13.5).all()
  assert out[0, 20:, :].sum() == 0 and out[0, :, 20:].sum() == 0
  assert out[1].sum() == 0  # a blank image stays blank
