"""Normalisation as data: each zoo image model's `Normalization` gives the same
inputs through the tf.data pipeline's preset, the JAX `preprocess` and
`methods.pixel_affine` (which runs no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from jtl import models
from jtl.app import methods
from jtl.data import images
from jtl.errors import ConfigError, DataError
from jtl.models import preprocessing


def _image_specs():
  specs = [models.get_spec(n) for n in models.list_models()]
  return [s for s in specs if s.input_kind == "image"]


def _distinct_normalizations():
  seen = {}
  for spec in _image_specs():
    seen.setdefault(spec.normalization, spec)
  return list(seen.values())


def test_every_image_model_declares_one_normalization_the_spec_derives_from():
  specs = _image_specs()
  assert len(specs) >= 10
  for spec in specs:
    n = spec.normalization
    assert n is not None, spec.name
    assert (spec.normalization.preset, spec.image_size) == (n.preset, n.image_size), spec.name
    assert spec.example_input(2).shape == (2, n.image_size, n.image_size, 3), spec.name
    # The preset the pipeline gets has the same affine as the model's own.
    np.testing.assert_array_equal(preprocessing.PRESETS[n.preset].affine(), n.affine())


def _id(spec) -> str:
  n = spec.normalization
  return f"{n.preset}-{n.image_size}px-crop{n.crop_fraction:.3f}"


@pytest.mark.parametrize("spec", _distinct_normalizations(), ids=_id)
def test_pipeline_preset_jax_preprocess_and_pixel_affine_agree(spec):
  n = spec.normalization
  # A square image whose central crop is whole pixels in both crops (tf's
  # central_crop and jtl's), twice the crop's side: the resize halves it.
  side = 2 * round(n.image_size / n.crop_fraction)
  image = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
  want = np.asarray(spec.preprocess(image))[0]
  assert want.shape == (n.image_size, n.image_size, 3)
  tf_out = np.asarray(images.eval_image(image, image_size=n.image_size, normalize=spec.normalization.preset,
                                        crop_fraction=n.crop_fraction, resize=n.resize))
  # tf.image.resize and jax.image.resize (both antialiased): float rounding
  # only (one grey level is 0.004..0.017 after normalisation).
  np.testing.assert_allclose(tf_out, want, atol=1e-5)
  # Without resize, the affine alone: pipeline, JAX and pixel_affine.
  pixels = image[:8, :8].astype(np.float32)
  mul, add = methods.pixel_affine(spec.normalization.preset)
  jax_only = np.asarray(spec.preprocess(image[:8, :8], size=None))[0]
  np.testing.assert_allclose(jax_only, pixels / 255 * mul + add, rtol=1e-6, atol=1e-5)
  # (XLA may divide by multiplying with the reciprocal: a few ulp.)
  np.testing.assert_allclose(np.asarray(images.get_normalizer(spec.normalization.preset)(pixels)),
                             jax_only, rtol=1e-6, atol=1e-6)


def test_normalization_values_and_errors():
  mul, add = preprocessing.PRESETS["efficientnet"].affine()
  np.testing.assert_array_equal(mul, np.full(3, 255 / 128, np.float32))
  np.testing.assert_array_equal(add, np.full(3, -127 / 128, np.float32))
  # A (mean, std) pair in 0..255 units, as the pipeline takes it.
  mul, add = methods.pixel_affine(((10.0, 20.0, 30.0), 2.0))
  np.testing.assert_allclose(mul, [127.5] * 3)
  np.testing.assert_allclose(add, [-5.0, -10.0, -15.0])
  with pytest.raises(DataError, match="Unknown normalisation 'resnet'"):
    methods.pixel_affine("resnet")
  with pytest.raises(ConfigError, match=r"std \(0.0,\)"):
    preprocessing.Normalization("x", std=(0.0,))
  with pytest.raises(ConfigError, match="channels='BGR'"):
    preprocessing.Normalization("x", channels="BGR")


def test_a_hub_model_with_its_own_mean_and_std_is_normalised_by_the_pipeline():
  # CLIP's mean/std match no preset: the pipeline and pixel_affine must still
  # use them (the spec's Normalization), not skip normalisation.
  from jtl.models import hub_models, registry
  clip = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}
  n = hub_models._image_normalization(clip, 224, 0.9)
  spec = registry.ModelSpec(name="clip_like", build=lambda **_: None,
                            **registry.image_inputs(n))
  assert spec.normalization.preset is None and spec.normalization is n
  pixels = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3)).astype(np.float32)
  piped = np.asarray(images.get_normalizer(spec.normalization)(pixels))
  expected = (pixels / 255.0 - np.asarray(clip["mean"])) / np.asarray(clip["std"])
  np.testing.assert_allclose(piped, expected, rtol=1e-5, atol=1e-5)
  mul, add = methods.pixel_affine(spec.normalization)
  np.testing.assert_allclose(pixels / 255.0 * mul + add, expected, rtol=1e-5, atol=1e-5)
