"""Normalisation as data, and image preprocessing in JAX.

A `Normalization` says how one model wants its pixels: the affine
(pixels / scale - mean) / std, the channel order, the evaluation resolution,
the central crop and the resize. It is declared once per model (on its
`ModelSpec`) and everything else is derived from it: the JAX `preprocess`
(`Normalization.preprocessor`), the input pipeline's preset
(`jtl.data.images.PRESETS`, through `Normalization.apply`, which runs on
NumPy, JAX and TensorFlow arrays alike) and the per-channel affine that
deployment and distillation fold in (`Normalization.affine`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtl.errors import ConfigError, DataError

# Resize methods of the evaluation view (jax.image.resize / tf.image.resize names).
RESIZE_METHODS = ("bilinear", "bicubic")
# torchvision's ImageNet statistics, on pixels scaled to 0..1.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Normalization:
  """How a model's inputs are made from RGB pixels in 0..255.

  normalised = (pixels / scale - mean) / std, per channel (one value is
  broadcast over the three).

  Attributes:
    preset: the name of the input pipeline's preset with this affine (what
      the pipeline's presets name), or None when none matches.
    mean, std: per channel (or one value), in units of pixels / scale.
    scale: what pixels are divided by first (255: mean/std on 0..1 pixels).
    channels: channel order the model takes ("RGB", the only one jtl's
      pipelines produce).
    image_size: evaluation resolution (square side).
    crop_fraction: side of the central square crop at evaluation, relative
      to the resized shorter image side (0.875: resize 256, crop 224); None:
      no crop, the whole image resized to image_size x image_size (jtl's
      input pipeline; timm's crop_mode "squash").
    resize: resize method of the evaluation view, "bilinear" or "bicubic"
      (antialiased; a timm pretrained_cfg's `interpolation`). jtl's tf.data
      pipeline takes it for its central-crop evaluation and resizes
      bilinear otherwise.

  >>> Normalization("unit", image_size=8).apply(np.full(3, 255.0, np.float32)).tolist()
  [1.0, 1.0, 1.0]
  """
  preset: str | None
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  scale: float = 255.0
  channels: str = "RGB"
  image_size: int = 224
  crop_fraction: float | None = 0.875
  resize: str = "bilinear"

  def __post_init__(self) -> None:
    # Tuples, so that the dataclass stays hashable and compares by value.
    object.__setattr__(self, "mean", tuple(float(m) for m in np.ravel(self.mean)))
    object.__setattr__(self, "std", tuple(float(s) for s in np.ravel(self.std)))
    problems = []
    if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3):
      problems.append(f"mean {self.mean} / std {self.std}: expected 1 or 3 values each")
    if min(self.std, default=0.0) <= 0 or self.scale <= 0:
      problems.append(f"std {self.std} and scale {self.scale} must be > 0")
    if self.channels != "RGB" or self.resize not in RESIZE_METHODS:
      problems.append(f"channels={self.channels!r}, resize={self.resize!r}: jtl's "
                      f"pipelines produce 'RGB' and resize with one of {RESIZE_METHODS}")
    crop = self.crop_fraction
    if (crop is not None and not 0 < crop <= 1) or self.image_size < 1:
      problems.append(f"crop_fraction {crop} must lie in (0, 1] (or be None: no crop), "
                      f"image_size {self.image_size} be >= 1")
    if problems:
      raise ConfigError("Normalization: " + "; ".join(problems) + ".")

  def describe(self) -> dict[str, Any]:
    """A JSON-able record (for exported files' metadata).

    >>> Normalization("unit", image_size=8).describe()["mean"]
    [0.0]
    """
    return {"preset": self.preset, "mean": list(self.mean), "std": list(self.std),
            "scale": self.scale, "image_size": self.image_size,
            "crop_fraction": self.crop_fraction, "resize": self.resize}

  def apply(self, x: Any) -> Any:
    """(x / scale - mean) / std on float pixels 0..255 [..., C]: NumPy, JAX or
    tf tensors (the same float32 operations in each, so they agree)."""
    # Constants of x's rank: JAX may be set to refuse implicit rank promotion.
    shape = (1,) * (len(x.shape) - 1) + (-1,)
    mean = np.asarray(self.mean, np.float32).reshape(shape)
    std = np.asarray(self.std, np.float32).reshape(shape)
    return (x / self.scale - mean) / std

  def affine(self) -> tuple[np.ndarray, np.ndarray]:
    """(mul, add) per channel with normalised = pixels / 255 * mul + add."""
    return affine_of(self.apply)

  def preprocessor(self) -> Callable[..., jax.Array]:
    """`preprocess(images, *, size=image_size, crop_fraction=crop_fraction)`:
    uint8 RGB images -> resize (`resize`), central crop, normalise (see
    `preprocess`): the published evaluation transform."""
    return functools.partial(preprocess, normalization=self, size=self.image_size,
                             crop_fraction=self.crop_fraction)


# The input pipeline's presets, by name: each is the pixel affine of a family.
PRESETS: dict[str, Normalization] = {
    # EfficientNet-Lite (TF reference): (x - 127) / 128.
    "efficientnet": Normalization("efficientnet", mean=(127.0,), std=(128.0,), scale=1.0),
    # torchvision models: ImageNet mean/std on 0..1 pixels.
    "imagenet": Normalization("imagenet", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # ViT / big_vision: [-1, 1].
    "vit": Normalization("vit", mean=(0.5,), std=(0.5,)),
    "unit": Normalization("unit"),
    "none": Normalization("none", scale=1.0),
}


def affine_of(normalize: Callable[[Any], Any]) -> tuple[np.ndarray, np.ndarray]:
  """(mul, add) per channel of an affine pixel normaliser, normalised =
  pixels / 255 * mul + add: `normalize` run on black and white float32
  pixels [1, 1, 1, 3] (as the pipeline computes them).

  >>> [a.tolist() for a in affine_of(lambda x: (x - 127.0) / 128.0)]
  [[1.9921875, 1.9921875, 1.9921875], [-0.9921875, -0.9921875, -0.9921875]]
  """
  black = np.asarray(normalize(np.zeros((1, 1, 1, 3), np.float32)), np.float64).reshape(3)
  white = np.asarray(normalize(np.full((1, 1, 1, 3), 255.0, np.float32)), np.float64).reshape(3)
  return (white - black).astype(np.float32), black.astype(np.float32)


def model_normalization(preset: str, *, image_size: int = 224,
                        crop_fraction: float = 0.875) -> Normalization:
  """A model's `Normalization`: a preset's affine at this resolution and crop.

  >>> model_normalization("vit", crop_fraction=1.0).mean
  (0.5,)
  """
  return dataclasses.replace(as_normalization(preset), image_size=image_size,
                             crop_fraction=crop_fraction)


def unit_mean_std(normalization: Normalization) -> tuple[list[float], list[float]]:
  """The affine's mean and std per channel on 0..1 pixels (p / 255), as timm's
  pretrained_cfg and transformers' image processors write them.

  >>> unit_mean_std(PRESETS["vit"])
  ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
  """
  # (p / scale - mean) / std = (p / 255 - mean * scale / 255) / (std * scale / 255)
  unit = normalization.scale / 255.0
  mean = np.broadcast_to(np.asarray(normalization.mean, np.float64) * unit, (3,))
  std = np.broadcast_to(np.asarray(normalization.std, np.float64) * unit, (3,))
  return [float(v) for v in mean], [float(v) for v in std]


def preset_of(mean: Any, std: Any) -> str | None:
  """The preset ("imagenet", "vit") with this mean and std on 0..1 pixels (to
  1e-3), else None."""
  imagenet = PRESETS["imagenet"]
  if np.allclose(mean, imagenet.mean, atol=1e-3) and np.allclose(std, imagenet.std, atol=1e-3):
    return "imagenet"
  return "vit" if np.allclose(mean, .5) and np.allclose(std, .5) else None


# --- transformers' image-processor file ----------------------------------------

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
# PIL resampling codes (an image processor's `resample`) of jtl's resize methods.
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}
_PROCESSOR_TYPES = ("BitImageProcessor", "BitImageProcessorFast")
MAX_SIDE = 4096  # past any published model's input: a file asking more is damaged
# BitImageProcessor's own defaults: what transformers takes for a key the file lacks.
_BIT_DEFAULTS = {"do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
                 "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": (0.48145466, 0.4578275, 0.40821073),  # OPENAI_CLIP_MEAN
                 "image_std": (0.26862954, 0.26130258, 0.27577711)}


def image_processor_config(normalization: Normalization) -> dict[str, Any]:
  """transformers' BitImageProcessor preprocessor_config.json (the form of
  facebook/dinov2-*) for images made as `normalization` says: the whole image
  resized to image_size x image_size (crop_fraction None: size height/width,
  no crop), or the shorter side resized as `center_crop_resize` does and the
  central square; `from_image_processor` reads it back.

  >>> image_processor_config(Normalization("unit", image_size=8, crop_fraction=None))["size"]
  {'height': 8, 'width': 8}
  """
  side, crop = int(normalization.image_size), normalization.crop_fraction
  mean, std = unit_mean_std(normalization)
  size = ({"height": side, "width": side} if crop is None else
          {"shortest_edge": max(side, int(math.floor(side / crop)))})
  return {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": size,
          "resample": PIL_RESAMPLE[normalization.resize], "do_center_crop": crop is not None,
          "crop_size": {"height": side, "width": side}, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
          "image_std": std, "do_convert_rgb": True}


def from_image_processor(config: Mapping[str, Any], where: str) -> Normalization:
  """The `Normalization` of a transformers BitImageProcessor config
  (`image_processor_config`'s form, or facebook/dinov2-*'s: shorter side 256,
  bicubic, central 224, ImageNet mean/std). A key the file lacks takes
  BitImageProcessor's default, as transformers does; keys jtl does not need
  (do_convert_rgb: jtl's images are RGB) are not read.

  Raises:
    ConfigError: naming `where` (the file) and the key, for a value jtl's
      preprocessing does not reproduce: another processor or resample, a
      size form other than shortest_edge or a square, a crop larger than the
      resize or contradicting a square resize, no resize.
  """
  def get(key: str) -> Any:
    return config.get(key, _BIT_DEFAULTS.get(key))

  def bad(key: str, expected: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={get(key)!r:.80}; expected {expected} (jtl reproduces "
                       "BitImageProcessor's resize, central crop and normalisation).")

  if config.get("image_processor_type", _PROCESSOR_TYPES[0]) not in _PROCESSOR_TYPES:
    raise bad("image_processor_type", " or ".join(_PROCESSOR_TYPES))
  for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
    if not isinstance(get(key), bool):
      raise bad(key, "true or false")
  if not get("do_resize"):
    raise bad("do_resize", "true (a model of jtl takes one image size)")
  methods = {code: name for name, code in PIL_RESAMPLE.items()}
  resample = get("resample")
  if isinstance(resample, bool) or resample not in methods:
    raise bad("resample", "2 (bilinear) or 3 (bicubic)")
  side, crop = _processor_geometry(get, bad)
  scale, mean, std = _processor_affine(get, bad)
  unit = scale / 255.0
  preset = preset_of(np.asarray(mean) * unit, np.asarray(std) * unit)
  return Normalization(preset, mean=mean, std=std, scale=scale, image_size=side,
                       crop_fraction=crop, resize=methods[resample])


def _processor_side(value: Any, key: str, bad: Callable[..., ConfigError]) -> int:
  """An image processor's size or crop_size as one side (an int is
  shortest_edge for size, a square for crop_size, as transformers reads it)."""
  if isinstance(value, int) and not isinstance(value, bool):
    value = {"shortest_edge": value} if key == "size" else {"height": value, "width": value}
  if isinstance(value, dict) and set(value) == {"height", "width"}:
    value = {"side": value["height"]} if value["height"] == value["width"] else None
  elif isinstance(value, dict) and set(value) == {"shortest_edge"} and key == "size":
    value = {"side": value["shortest_edge"]}
  side = value.get("side") if isinstance(value, dict) else None
  if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SIDE:
    forms = '{"shortest_edge": n} or ' if key == "size" else ""
    raise bad(key, forms + f'{{"height": n, "width": n}} (a square), n from 1 to {MAX_SIDE}')
  return side


def _processor_geometry(get: Callable[[str], Any], bad: Callable[..., ConfigError]
                        ) -> tuple[int, float | None]:
  """(image_size, crop_fraction) of an image processor's resize and crop."""
  side = _processor_side(get("size"), "size", bad)
  crop = _processor_side(get("crop_size"), "crop_size", bad) if get("do_center_crop") else None
  size = get("size")
  if not (isinstance(size, int) or "shortest_edge" in size):  # a square resize
    if crop not in (None, side):  # a crop of the squashed image: not jtl's
      raise bad("crop_size", f"size's {side} x {side} with do_center_crop (or do_center_crop "
                "false)")
    return side, None
  if crop is None:  # the shorter side resized, the aspect kept: not one size
    raise bad("do_center_crop", "true with size shortest_edge (one image size)")
  if crop > side:
    raise bad("crop_size", f"at most size's shortest_edge {side}")
  fraction = crop / side
  while math.floor(crop / fraction) < side:  # float rounding: the resize must be `side` again
    fraction = float(np.nextafter(fraction, 0.0))
  return crop, fraction


def _processor_affine(get: Callable[[str], Any], bad: Callable[..., ConfigError]
                      ) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
  """(scale, mean, std) of an image processor's rescale and normalisation."""
  scale = 1.0
  if get("do_rescale"):
    factor = get("rescale_factor")
    if (isinstance(factor, bool) or not isinstance(factor, (int, float))
        or not math.isfinite(factor) or factor <= 0):
      raise bad("rescale_factor", "a positive number (1/255)")
    scale = 255.0 if math.isclose(factor * 255.0, 1.0, rel_tol=1e-9) else 1.0 / factor
  if not get("do_normalize"):
    return scale, (0.0,), (1.0,)
  values = []
  for key in ("image_mean", "image_std"):
    value = get(key)
    value = [value] if isinstance(value, (int, float)) else value
    ok = isinstance(value, (list, tuple)) and len(value) in (1, 3) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in value)
    if not ok or (key == "image_std" and min(value) <= 0):
      raise bad(key, "1 or 3 finite numbers" + (", each > 0" if key == "image_std" else ""))
    values.append(tuple(float(v) for v in value))
  return scale, values[0], values[1]


def as_normalization(normalize: str | Normalization | Sequence[Any] | None) -> Normalization:
  """The `Normalization` of a preset name, a (mean, std) pair in 0..255 units
  (per channel or scalar), a `Normalization`, or None (= "none").

  Raises:
    DataError: an unknown name, a std <= 0, or anything else.
  """
  if normalize is None:
    return PRESETS["none"]
  if isinstance(normalize, Normalization):
    return normalize
  if isinstance(normalize, str):
    if normalize not in PRESETS:
      raise DataError(
          f"Unknown normalisation {normalize!r}. Expected one of "
          f"{sorted(PRESETS)}, a (mean, std) pair in 0..255 units, or a "
          "callable on float32 tensors.")
    return PRESETS[normalize]
  if isinstance(normalize, (tuple, list)) and len(normalize) == 2:
    mean = np.asarray(normalize[0], np.float32)
    std = np.asarray(normalize[1], np.float32)
    if np.any(std <= 0):
      raise DataError(f"normalize std must be > 0, got {std.tolist()}.")
    return Normalization(None, mean=mean, std=std, scale=1.0)
  raise DataError(
      f"normalize={normalize!r} is not a preset name, (mean, std) pair or "
      "callable.")


def preprocess(images: np.ndarray | jax.Array, *, normalization: Normalization,
               size: int | None, crop_fraction: float | None) -> jax.Array:
  """Resize and central crop to size x size (`center_crop_resize`, with the
  normalization's `resize` method), then `normalization.apply`.

  Args:
    images: uint8 or float [B, H, W, 3] or [H, W, 3] on a 0..255 scale.
    normalization: the model's pixel affine.
    size: output height and width; None keeps the input as it is (only
      normalises).
    crop_fraction: side of the central square crop relative to the shorter
      side; None: no crop, the whole image resized to size x size (what
      jtl's input pipeline does at evaluation).

  Raises:
    DataError: when the images are not RGB [B, H, W, 3] / [H, W, 3].
  """
  return normalization.apply(center_crop_resize(images, size=size, crop_fraction=crop_fraction,
                                                resize=normalization.resize))


def _warn_if_unit_scale(x: jax.Array) -> None:
  """Warns when concrete float pixels all lie in 0..1: they are read as 0..255,
  so the model would see near-black images (ToTensor's scale, not PIL's)."""
  if isinstance(x, jax.core.Tracer) or not jnp.issubdtype(x.dtype, jnp.floating) or not x.size:
    return
  low, high = float(jnp.min(x)), float(jnp.max(x))
  if 0.0 <= low and 0.0 < high <= 1.0:
    warnings.warn(f"The float images lie in 0..{high:.3g}, but preprocessing takes pixels on a "
                  "0..255 scale (as uint8 images): multiply them by 255 first.", stacklevel=3)


def center_crop_resize(images: np.ndarray | jax.Array, *, size: int | None = 224,
                       crop_fraction: float | None = 0.875, resize: str = "bilinear") -> jax.Array:
  """The published evaluation view: resize, then central crop; float32, 0..255.

  As timm's and torchvision's eval transforms: the shorter side is resized
  (antialiased) to floor(size / crop_fraction), the longer in proportion,
  then the central size x size square is cut (timm: `Resize(int(size /
  crop_pct))`, `CenterCrop(size)`).

  Args:
    images: [H, W, 3] or [B, H, W, 3] RGB (grayscale [H, W] / [..., 1] is
      repeated, RGBA's alpha dropped, as the input pipeline decodes them).
    size: output side; None returns the images unchanged (as float32 NHWC).
    crop_fraction: crop side relative to the resized shorter side (0.875 is
      the usual ImageNet evaluation crop: 256 then 224); None: no crop, the
      whole image resized to size x size, clipped to 0..255 (as jtl's tf.data
      evaluation pipeline).
    resize: "bilinear" or "bicubic" (timm's `interpolation`; Keys' cubic,
      a = -0.5, as PIL's).

  Raises:
    DataError: when the images are not RGB [B, H, W, 3] / [H, W, 3].

  >>> center_crop_resize(np.zeros((40, 60, 3), np.uint8), size=16).shape
  (1, 16, 16, 3)
  """
  try:
    x = jnp.asarray(images)
  except (ValueError, TypeError) as e:  # e.g. a list of images of different sizes
    raise DataError(f"Cannot stack the images into one array ({e}): pass a batch of one size, "
                    "or preprocess the images one at a time.") from None
  if x.ndim == 2:  # one grayscale image
    x = x[..., None]
  if x.ndim == 3:
    x = x[None]
  if x.ndim == 4 and x.shape[-1] in (1, 4):  # grayscale, RGBA: as the pipeline decodes them
    x = jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise DataError(f"Expected RGB images [batch, height, width, 3] (or one "
                    f"[height, width, 3]; grayscale and RGBA are made RGB); found shape "
                    f"{tuple(jnp.shape(images))}.")
  if resize not in RESIZE_METHODS:
    raise DataError(f"resize={resize!r}: expected one of {RESIZE_METHODS}.")
  _warn_if_unit_scale(x)
  x = x.astype(jnp.float32)
  if size is None:
    return x
  h, w = x.shape[1:3]
  if crop_fraction is None:
    if (h, w) == (size, size):
      return x
    x = jax.image.resize(x, (x.shape[0], size, size, 3), resize, antialias=True)
    return jnp.clip(x, 0.0, 255.0)
  short = max(size, int(math.floor(size / crop_fraction)))
  # torchvision's Resize(int): the shorter side to `short`, the longer truncated.
  new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (x.shape[0], new_h, new_w, 3), resize, antialias=True)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  # Clipped as PIL's 8-bit result is (a bicubic kernel overshoots at edges).
  return jnp.clip(x[:, top:top + size, left:left + size], 0.0, 255.0)
