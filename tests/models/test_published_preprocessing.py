"""Preprocessing as the weights were published: jtl's `preprocess` of a timm
pretrained config against timm's own evaluation transform of real photos
(tests/fixtures/make_timm_preprocess_reference.py wrote what timm gives).

timm (PIL): the shorter side resized to floor(size / crop_pct) with the
config's interpolation, the central square cut, then mean/std. jtl does the
same in float32 (PIL rounds to 8 bits after each of its two resize passes:
what remains is that rounding, well under one grey level on average)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import skimage.data

from jtl.models import hub_models
from jtl.models.preprocessing import Normalization

REFERENCE = np.load(Path(__file__).parents[1] / "fixtures" / "timm_preprocess_reference.npz")
CONFIGS = json.loads(str(REFERENCE["meta"]))["configs"]
PHOTOS = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()}


def timm_input(name, photo):
  cfg = CONFIGS[name]
  pixels = REFERENCE[f"{name}/{photo}"].astype(np.float32)
  return (pixels / 255 - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)


def jtl_normalization(name) -> Normalization:
  """The Normalization jtl reads from this timm pretrained_cfg (as for hf-hub:)."""
  cfg = CONFIGS[name]
  return hub_models._image_normalization(  # pylint: disable=protected-access
      {k: cfg[k] for k in ("mean", "std", "crop_pct", "interpolation")}, cfg["side"], 0.875)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_preprocess_matches_timm_eval_transform(name):
  normalization = jtl_normalization(name)
  assert normalization.resize == CONFIGS[name]["interpolation"]
  for photo, pixels in PHOTOS.items():
    want = timm_input(name, photo)
    got = np.asarray(normalization.preprocessor()(pixels))[0]
    assert got.shape == want.shape
    diff = np.abs(got - want)
    # One grey level is 1/255/std = 0.0087 (ImageNet std) / 0.0078 (std 0.5).
    # Measured (2 photos x 4 configs): mean 0.0021-0.0048, max 0.007-0.061;
    # jtl's former crop-then-bilinear view: mean 0.005-0.12, max 0.25-2.7.
    assert diff.mean() < 0.006, (photo, diff.mean())
    assert diff.max() < 0.08, (photo, diff.max())


def test_the_same_top1_as_timm_inputs_with_real_lite0_weights():
  from jtl import models
  created = models.create("efficientnet_lite0", pretrained=True)
  name = "tf_efficientnet_lite0.in1k"
  normalization = jtl_normalization(name)
  ours = np.concatenate([np.asarray(normalization.preprocessor()(p)) for p in PHOTOS.values()])
  timms = np.stack([timm_input(name, p) for p in PHOTOS])
  logits = np.asarray(jax.jit(created.module.apply)(created.variables,
                                                   np.concatenate([ours, timms])))
  assert (logits[:2].argmax(-1) == logits[2:].argmax(-1)).all()
  assert int(logits[1].argmax()) == 967  # espresso
