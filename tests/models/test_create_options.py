"""`jtl.models.create` with constructor options: what a model does not take,
or cannot be built with, is a ConfigError before any weights are read; an
`image_size` option gives the model's preprocessing that size."""

import warnings

import numpy as np
import pytest

from jtl import models
from jtl.errors import ConfigError, DataError


def test_an_option_the_model_lacks_names_the_ones_it_takes():
  with pytest.raises(ConfigError, match=r"'resnet18' takes no option \['drop_path_rate'\].*"
                                        r"its options: \[.*'remat'"):
    models.create("resnet18", pretrained=True, drop_path_rate=0.1)  # before any download


@pytest.mark.parametrize("kwargs, match", [
    ({"num_heads": 5, "depth": 1}, "must be divisible by number of heads"),
    ({"patch_size": 0, "depth": 1}, "ZeroDivisionError"),
])
def test_values_the_model_cannot_be_built_with_are_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=rf"'vit_ti16' cannot be built with .*{match}"):
    models.create("vit_ti16", pretrained=False, **kwargs)
  with pytest.raises(ConfigError, match="num_classes=-1: expected >= 0"):
    models.create("vit_ti16", pretrained=False, num_classes=-1)


def test_an_image_size_option_resizes_the_preprocessing_too():
  created = models.create("vit_ti16", pretrained=False, image_size=64, depth=1, num_classes=3)
  assert created.spec.image_size == 64
  image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)
  inputs = created.preprocess(image[None])
  assert inputs.shape == (1, 64, 64, 3)
  logits = created.module.apply(created.variables, inputs, train=False)
  assert logits.shape == (1, 3) and np.all(np.isfinite(logits))


def test_preprocess_takes_grayscale_and_rgba_as_the_pipeline_decodes_them():
  created = models.create("vit_ti16", pretrained=False, image_size=32, depth=1)
  gray = np.random.default_rng(1).integers(0, 255, (24, 30), np.uint8)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  rgba = np.concatenate([rgb, np.full((24, 30, 1), 7, np.uint8)], axis=-1)
  want = np.asarray(created.preprocess(rgb))
  for image in (gray, gray[..., None], rgba):
    np.testing.assert_array_equal(np.asarray(created.preprocess(image)), want)
  with pytest.raises(DataError, match="one at a time"):
    created.preprocess([rgb, rgb[:10]])


@pytest.mark.parametrize("name, option", [("vit_ti16", "drop_path_rate"),
                                          ("efficientnet_lite0", "dropout_rate")])
def test_a_drop_probability_outside_0_to_1_is_refused(name, option):
  with pytest.raises(ConfigError, match=rf"{option}=1.0 is a drop probability.*< 1"):
    models.create(name, pretrained=True, **{option: 1.0})  # before any download


def test_float_images_in_0_to_1_are_warned_about_as_they_are_read_as_0_to_255():
  created = models.create("vit_ti16", pretrained=False, image_size=32, depth=1)
  image = np.random.default_rng(2).uniform(0, 1, (32, 32, 3)).astype(np.float32)
  with pytest.warns(UserWarning, match=r"in 0\.\.1, but .*multiply them by 255"):
    created.preprocess(image)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    created.preprocess(image * 255)
    created.preprocess(np.zeros((32, 32, 3), np.float32))
