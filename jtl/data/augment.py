"""RandAugment and CutMix in tf.data, stateless like the rest of the pipeline.

RandAugment (Cubuk et al. 2020) applies `n` operations, each drawn uniformly
from `OPS`, at magnitude `m` (0..30; 10 is the published scale's top, where
e.g. rotations reach 30 degrees; each op's sign is random). Only ops whose
strength scales with m are in `OPS` (no AutoContrast / Equalize / Invert), so
m = 0, like n = 0, leaves the image unchanged. CutMix (Yun et al. 2019) pastes
a box of the batch reversed into each image, the box's area fraction drawn
from Beta(alpha, alpha), and mixes the labels by the pasted area exactly.

Every random choice comes from an explicit `seed` tensor of shape [2]: the
pipeline derives it from (seed, example index) for RandAugment and (seed,
process, step) for CutMix, so a resumed run sees the same pixels.
"""

from __future__ import annotations

import math
from typing import Any

from jtl import _optional

tf = _optional.require("tensorflow", "jtl.data's input pipelines")

MAX_MAGNITUDE = 30.0
_GRAY = 128.0


def _blend(image: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """image * f + other * (1 - f): exactly `image` at f = 1."""
  return tf.clip_by_value(image * factor + other * (1.0 - factor), 0.0, 255.0)


def _gray(image: tf.Tensor) -> tf.Tensor:
  g = tf.image.rgb_to_grayscale(image)
  return tf.tile(g, [1, 1, 3])


def _smooth(image: tf.Tensor) -> tf.Tensor:
  """PIL's SMOOTH filter (sharpness' degenerate image), edges kept."""
  k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
  blurred = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  return tf.pad(blurred, [[1, 1], [1, 1], [0, 0]]) + tf.pad(
      tf.zeros_like(blurred), [[1, 1], [1, 1], [0, 0]], constant_values=1.0) * image


def _transform(image: tf.Tensor, matrix: list[tf.Tensor]) -> tf.Tensor:
  """Projective transform (output pixel -> input pixel), gray fill."""
  hw = tf.shape(image)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.stack(matrix + [0.0, 0.0])[None],
      output_shape=hw, fill_value=_GRAY, interpolation="BILINEAR", fill_mode="CONSTANT")
  return out[0]


def _rotate(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  angle = level * 30.0 * math.pi / 180.0
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  c, s = tf.cos(angle), tf.sin(angle)
  return _transform(image, [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy])


def _shear_x(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  return _transform(image, [1.0, level * 0.3, 0.0, 0.0, 1.0, 0.0])


def _shear_y(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  return _transform(image, [1.0, 0.0, 0.0, level * 0.3, 1.0, 0.0])


def _translate_x(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  dx = level * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
  return _transform(image, [1.0, 0.0, dx, 0.0, 1.0, 0.0])


def _translate_y(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  dy = level * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, dy])


def _solarize(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  threshold = 256.0 - 256.0 * tf.abs(level)  # 256: no pixel is inverted
  return tf.where(image >= threshold, 255.0 - image, image)


def _posterize(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  shift = tf.minimum(tf.round(4.0 * tf.abs(level)), 7.0)  # bits dropped: 0 keeps the image
  q = tf.pow(2.0, shift)
  return tf.cond(shift > 0, lambda: tf.floor(image / q) * q, lambda: image)


OPS = {
    "brightness": lambda im, lv: _blend(im, tf.zeros_like(im), 1.0 + 0.9 * lv),
    "contrast": lambda im, lv: _blend(
        im, tf.fill(tf.shape(im), tf.reduce_mean(_gray(im))), 1.0 + 0.9 * lv),
    "color": lambda im, lv: _blend(im, _gray(im), 1.0 + 0.9 * lv),
    "sharpness": lambda im, lv: _blend(im, _smooth(im), 1.0 + 0.9 * lv),
    "solarize": _solarize,
    "posterize": _posterize,
    "rotate": _rotate,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}


def apply_op(name: str, image: tf.Tensor, magnitude: float, sign: Any = 1.0) -> tf.Tensor:
  """One RandAugment op at `magnitude` (0..MAX_MAGNITUDE) with `sign` +-1."""
  level = tf.cast(sign, tf.float32) * (float(magnitude) / 10.0)
  return OPS[name](image, level)


def randaugment(image: tf.Tensor, seed: tf.Tensor, *, n: int, m: float) -> tf.Tensor:
  """`n` ops drawn from OPS at magnitude `m` on a float 0..255 [H, W, 3] image."""
  names = sorted(OPS)
  for i in range(n):
    op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, i), 2))
    index = tf.random.stateless_uniform([], op_seed, 0, len(names), tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    branches = [lambda name=name: apply_op(name, image, m, sign) for name in names]
    image = tf.switch_case(index, branches)
    image.set_shape([None, None, 3])
  return image


def cutmix_box(seed: tf.Tensor, height: int, width: int, alpha: float
               ) -> tuple[tf.Tensor, tf.Tensor]:
  """(mask [H, W, 1] float, 1 inside the pasted box; lam = 1 - box area / (H W))."""
  g1, g2, g3 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  a = tf.random.stateless_gamma([], g1, alpha)
  b = tf.random.stateless_gamma([], g2, alpha)
  cut = tf.sqrt(1.0 - a / (a + b))  # the box's side fraction
  cy, cx = tf.unstack(tf.random.stateless_uniform([2], g3) * [height, width])
  ch, cw = cut * height, cut * width
  top = tf.cast(tf.clip_by_value(tf.round(cy - ch / 2), 0, height), tf.int32)
  bottom = tf.cast(tf.clip_by_value(tf.round(cy + ch / 2), 0, height), tf.int32)
  left = tf.cast(tf.clip_by_value(tf.round(cx - cw / 2), 0, width), tf.int32)
  right = tf.cast(tf.clip_by_value(tf.round(cx + cw / 2), 0, width), tf.int32)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  mask = tf.cast(inside, tf.float32)[:, :, None]
  lam = 1.0 - tf.reduce_sum(mask) / float(height * width)
  return mask, lam


def as_soft_labels(label: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Class indices [B] as one-hot float32 [B, num_classes]; soft labels as they are."""
  if label.dtype.is_floating and label.shape.rank == 2:
    return tf.cast(label, tf.float32)
  return tf.one_hot(label, num_classes, dtype=tf.float32)


def cutmix(batch: dict[str, Any], seed: tf.Tensor, *, alpha: float,
           num_classes: int) -> dict[str, Any]:
  """Pastes one box of the batch reversed into every image; the labels mix
  by the pasted area (soft labels [B, num_classes], rows summing to 1)."""
  inputs = batch["inputs"]
  height, width = inputs.shape[1], inputs.shape[2]
  mask, lam = cutmix_box(seed, height, width, alpha)
  onehot = as_soft_labels(batch["label"], num_classes)
  out = dict(batch)
  out["inputs"] = inputs * (1.0 - mask) + tf.reverse(inputs, [0]) * mask
  out["label"] = lam * onehot + (1.0 - lam) * tf.reverse(onehot, [0])
  return out
