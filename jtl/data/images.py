"""Image preprocessing in tf.data: decode, resize, augment, normalise, mixup.

Every random op is *stateless*: it takes an explicit `seed` tensor of shape [2]
(the pipeline passes `[seed, example_index]`), so an example gets the same crop
and flip whatever the parallelism, and a resumed run sees the same pixels.

Images enter as uint8 (or float 0..255) [H, W, C] and leave as float32
[size, size, 3], normalised the model's way:

>>> import numpy as np, tensorflow as tf
>>> image = tf.constant(np.full((8, 6, 3), 255, np.uint8))
>>> out = eval_image(image, image_size=4, normalize="efficientnet")
>>> out.shape.as_list(), float(out[0, 0, 0])
([4, 4, 3], 1.0)
"""

from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np

from jtl import _optional
from jtl.data import augment as augment_lib
from jtl.errors import DataError
from jtl.models import preprocessing

tf = _optional.require("tensorflow", "jtl.data's input pipelines")

Normalizer = Callable[[tf.Tensor], tf.Tensor]
NormalizeSpec = Union[str, Normalizer, tuple[Sequence[float], Sequence[float]],
                      preprocessing.Normalization, None]

# Each maps float32 pixel values in 0..255 to what a model family was trained
# on; the affines are data (`jtl.models.preprocessing.PRESETS`), shared with
# the zoo models' JAX `preprocess`.
PRESETS: dict[str, Normalizer] = {name: n.apply for name, n in preprocessing.PRESETS.items()}


def get_normalizer(normalize: NormalizeSpec) -> Normalizer:
  """Returns the pixel normaliser for a preset name, (mean, std) or callable.

  Args:
    normalize: one of `PRESETS` ("efficientnet", "imagenet", "vit", "unit",
      "none"), a `(mean, std)` pair in 0..255 units (per channel or scalar), a
      callable on float32 tf tensors of 0..255 values, a
      `jtl.models.preprocessing.Normalization`, or None (= "none").
  """
  if callable(normalize):
    return normalize
  return preprocessing.as_normalization(normalize).apply


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  """Returns (height, width) for an int or (height, width) image size."""
  if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
    size = (int(image_size),) * 2
  else:
    size = tuple(int(s) for s in image_size)
  if len(size) != 2 or min(size) <= 0:
    raise DataError(f"image_size must be a positive int or (height, width) of positive ints, "
                    f"got {image_size!r}.")
  return size  # type: ignore[return-value]


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [H, W, 3]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def to_rgb_float(image: tf.Tensor) -> tf.Tensor:
  """Casts to float32 0..255 and makes [H, W] / [H, W, 1] images 3-channel."""
  image = tf.cast(image, tf.float32)
  if image.shape.rank == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  return image


def _resize(image: tf.Tensor, hw: tuple[int, int]) -> tf.Tensor:
  # antialias so that downscaling large photos does not alias.
  return tf.image.resize(image, hw, method="bilinear", antialias=True)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, hw: tuple[int, int], *,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Inception-style crop of `scale` area and `ratio` aspect, resized to hw."""
  shape = tf.shape(image)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=tuple(scale),
      aspect_ratio_range=tuple(ratio), min_object_covered=0.0, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, size)
  crop.set_shape([None, None, image.shape[-1]])
  return _resize(crop, hw)


def resize_and_crop(image: tf.Tensor, hw: tuple[int, int], fraction: float,
                    method: str = "bilinear") -> tf.Tensor:
  """The published evaluation view (timm, torchvision; as JAX's
  `preprocessing.center_crop_resize`): the shorter side resized to
  floor(side / fraction), the longer in proportion, then the central hw."""
  size = hw[0]
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  short = tf.cast(max(size, int(math.floor(size / fraction))), tf.float64)
  h, w = shape[0], shape[1]
  new_h = tf.cast(tf.where(h <= w, short, tf.floor(short * h / w)), tf.int32)
  new_w = tf.cast(tf.where(h <= w, tf.floor(short * w / h), short), tf.int32)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method=method, antialias=True)
  top = tf.cast(tf.round(tf.cast(new_h - hw[0], tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - hw[1], tf.float64) / 2.0), tf.int32)
  return tf.image.crop_to_bounding_box(image, top, left, hw[0], hw[1])


def train_image(image: tf.Tensor, seed: tf.Tensor, *, image_size: int | Sequence[int],
                normalize: NormalizeSpec = None, augment: bool = True, flip: bool = True,
                crop_scale: Sequence[float] = (0.08, 1.0),
                crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
                randaugment: tuple[int, float] | None = None) -> tf.Tensor:
  """Training view of one image: random resized crop, flip, RandAugment
  (`randaugment` = (n, m), `jtl.data.augment.randaugment`), normalise."""
  hw = image_hw(image_size)
  image = to_rgb_float(image)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if augment:
    image = random_resized_crop(image, crop_seed, hw, scale=crop_scale, ratio=crop_ratio)
  else:
    image = _resize(image, hw)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = tf.clip_by_value(image, 0.0, 255.0)
  if randaugment and randaugment[0]:
    # Its own seed stream: the crop and flip of every example stay what they were.
    ra_seed = tf.random.experimental.stateless_fold_in(seed, 7919)
    image = augment_lib.randaugment(image, ra_seed, n=randaugment[0], m=randaugment[1])
  return tf.cast(get_normalizer(normalize)(image), tf.float32)


def eval_image(image: tf.Tensor, *, image_size: int | Sequence[int],
               normalize: NormalizeSpec = None, crop_fraction: float = 1.0,
               resize: str = "bilinear") -> tf.Tensor:
  """Evaluation view of one image, normalised: with crop_fraction 1 the whole
  image resized to image_size (bilinear); below 1 (square sizes) the
  published view, `resize_and_crop` with `resize` ("bilinear" / "bicubic")."""
  hw = image_hw(image_size)
  image = to_rgb_float(image)
  if crop_fraction < 1.0 and hw[0] == hw[1]:
    image = resize_and_crop(image, hw, crop_fraction, resize)
  else:
    image = _resize(image, hw)
  image = tf.clip_by_value(image, 0.0, 255.0)
  return tf.cast(get_normalizer(normalize)(image), tf.float32)


def mixup(batch: dict[str, Any], seed: tf.Tensor, *, alpha: float,
          num_classes: int) -> dict[str, Any]:
  """Mixes each example with the batch reversed, with one Beta(alpha) weight.

  Returns the batch with "label" as float32 soft labels [B, num_classes]
  (rows sum to 1). Padding rows never occur: mixup is for training only.
  """
  g1, g2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  a = tf.random.stateless_gamma([], g1, alpha)
  b = tf.random.stateless_gamma([], g2, alpha)
  lam = a / (a + b)
  onehot = augment_lib.as_soft_labels(batch["label"], num_classes)
  inputs = batch["inputs"]
  out = dict(batch)
  out["inputs"] = lam * inputs + (1.0 - lam) * tf.reverse(inputs, [0])
  out["label"] = lam * onehot + (1.0 - lam) * tf.reverse(onehot, [0])
  return out
