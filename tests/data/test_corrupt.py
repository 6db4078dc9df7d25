"""jtl.data.corrupt: the corruptions used to measure accuracy under a shift."""

import numpy as np
import pytest

from jtl.data.corrupt import SEVERITIES, corrupt
from jtl.errors import DataError


def _image(shape=(16, 16, 3)):
  return np.random.default_rng(0).integers(40, 216, shape).astype(np.uint8)


def test_gaussian_noise_has_the_severitys_spread_and_is_seeded():
  image = np.full((64, 64, 3), 128, np.uint8)
  out = corrupt(image, "gaussian_noise", 5, seed=1)
  diff = (out.astype(float) - 128) / 255
  assert abs(diff.mean()) < 0.01
  assert diff.std() == pytest.approx(SEVERITIES["gaussian_noise"][4], rel=0.05)
  np.testing.assert_array_equal(out, corrupt(image, "gaussian_noise", 5, seed=1))
  assert not np.array_equal(out, corrupt(image, "gaussian_noise", 5, seed=2))


def test_blur_keeps_flat_images_and_the_mean_and_smooths_more_with_severity():
  flat = np.full((8, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(corrupt(flat, "gaussian_blur", 5), flat)
  image = _image()
  mild, strong = corrupt(image, "gaussian_blur", 1), corrupt(image, "gaussian_blur", 5)
  assert abs(mild.mean() - image.mean()) < 1.0
  assert np.abs(np.diff(strong.astype(float), axis=1)).mean() < np.abs(
      np.diff(mild.astype(float), axis=1)).mean() < np.abs(np.diff(image.astype(float), axis=1)).mean()
  assert corrupt(image[..., 0], "gaussian_blur", 3).shape == (16, 16)  # greyscale [H, W]


def test_contrast_scales_deviations_from_the_mean():
  image = _image()
  out = corrupt(image, "contrast", 2).astype(float)  # factor 0.5
  assert out.mean() == pytest.approx(image.mean(), abs=0.5)
  assert out.std() == pytest.approx(0.5 * image.std(), abs=0.5)


@pytest.mark.parametrize("name,severity", [("fog", 1), ("contrast", 0), ("contrast", 6),
                                           ("contrast", 2.5)])
def test_bad_corruption_or_severity_is_a_data_error(name, severity):
  with pytest.raises(DataError, match="corruption"):
    corrupt(_image(), name, severity)
