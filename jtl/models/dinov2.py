"""DINOv2 ViT-S/14 and ViT-B/14 (Oquab et al. 2023) in the facebook/dinov2-* layout.

A pre-LayerNorm ViT with patch 14, a learned layer scale on both residual
branches, a mask token and a position embedding sized for 518 px (37 x 37
patches) that is resized, at run time and in-graph, to the patch grid of the
input: bicubic (Keys, a = -0.75), align_corners=False, border pixels
replicated, exactly as `torch.nn.functional.interpolate`, which
transformers' `Dinov2Embeddings.interpolate_pos_encoding` calls with the new
grid as `size`. `interpolate_offset=0.1` gives instead the original
facebookresearch/dinov2 code (and transformers < 4.44), which passes
`scale_factor=((h + 0.1) / M, (w + 0.1) / M)` so that source coordinates are
scaled by M / (h + 0.1), not M / h.

Parameter paths follow jtl's ViT (`jtl.models.vit`), plus "mask_token" and
the layer scales: "embedding/kernel", "cls", "mask_token", "pos_embedding",
"Transformer/encoderblock_0/LayerNorm_0/scale",
".../MultiHeadDotProductAttention_0/query/kernel", ".../LayerScale_0/scale",
".../LayerNorm_1/...", ".../MlpBlock_0/Dense_0/kernel", ".../LayerScale_1/scale",
"Transformer/encoder_norm/scale", "head/kernel".

What the head sees (`pool`): by default "cls_mean", the concatenation of the
class token and the mean of the patch tokens of the final-LayerNormed
sequence ([B, 2 * width]), the linear-evaluation features of the DINOv2 paper
and the input of transformers' `Dinov2ForImageClassification` (whose
checkpoints, e.g. facebook/dinov2-small-imagenet1k-1-layer, load with their
classifier as the head). "cls" is the class token alone (transformers'
`pooler_output`), "mean" the mean patch token. `tokens` returns the whole
sequence (`last_hidden_state`).

`convert_hf` reads `Dinov2Model` / `Dinov2ForImageClassification` state dicts
(`embeddings.*`, `encoder.layer.N.attention.attention.query.*`, ... as the Hub
repos and `save_pretrained` write them; also the in-memory names of
transformers >= 5, `attention.q_proj`, ...). `hub_spec` maps a config.json with
`model_type: "dinov2"` (and its preprocessor_config.json) to a ModelSpec.

>>> dinov2("s").width, dinov2("b").num_heads
(384, 12)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl.errors import ConfigError
from jtl.models import preprocessing, registry, vit, wgrad
from jtl.models.preprocessing import Normalization, model_normalization

POOLS = ("cls_mean", "cls", "mean")
VARIANTS = {"s": (384, 12, 6), "b": (768, 12, 12)}  # width, depth, heads
HUB_REPOS = {"s": "facebook/dinov2-small", "b": "facebook/dinov2-base"}
NATIVE_IMAGE_SIZE = 518  # position embeddings: 37 x 37 patches + class token
INPUT_SIZE = 224  # facebook/dinov2-* preprocessor: resize 256 (short side), crop 224


# --- bicubic position-embedding resize (torch's interpolate, in-graph) ------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """torch's `get_cubic_upsample_coefficients` for taps x-1, x, x+1, x+2."""
  a = np.float32(a)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  one = np.float32(1)
  return np.stack([far(t + one), near(t), near(one - t), far(2 * one - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, *, offset: float = 0.0) -> np.ndarray:
  """[out_size, in_size] float32 matrix of torch's bicubic resize along one axis.

  align_corners=False, no antialiasing, indices clamped to the border. With
  `offset` > 0 the source coordinate is scaled by in / (out + offset), as
  `interpolate(scale_factor=(out + offset) / in)` does (the DINOv2 quirk).

  >>> np.allclose(bicubic_matrix(4, 4), np.eye(4))
  True
  """
  if offset:
    scale = np.float32(1.0 / ((out_size + offset) / in_size))
  else:
    scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
  base = np.floor(src)
  taps = _cubic_weights((src - base).astype(np.float32))
  matrix = np.zeros((out_size, in_size), np.float32)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), idx), taps[:, k])
  return matrix


def interpolate_pos_embed(posemb: jax.Array, grid: Sequence[int], *,
                          offset: float = 0.0) -> jax.Array:
  """[1, 1 + M*M, D] (class token first) -> [1, 1 + gh*gw, D], bicubic.

  The class-token row is kept; the M x M grid is resized to `grid` with
  `bicubic_matrix` along each axis (float32, as transformers does). The same
  grid comes back unchanged.
  """
  side = math.isqrt(posemb.shape[1] - 1)
  if side * side != posemb.shape[1] - 1:
    raise ConfigError(f"DINOv2 position embeddings: {posemb.shape[1] - 1} patch rows "
                      "(after the class token) are not a square grid.")
  gh, gw = (int(g) for g in grid)
  if (gh, gw) == (side, side):
    return posemb
  width = posemb.shape[-1]
  tokens = posemb[0, 1:].astype(jnp.float32).reshape(side, side, width)
  rows = jnp.asarray(bicubic_matrix(side, gh, offset=offset))
  cols = jnp.asarray(bicubic_matrix(side, gw, offset=offset))
  tokens = jnp.einsum("ij,jkd,lk->ild", rows, tokens, cols,
                      precision=jax.lax.Precision.HIGHEST).astype(posemb.dtype)
  return jnp.concatenate([posemb[:, :1], tokens.reshape(1, gh * gw, width)], axis=1)


# --- the module --------------------------------------------------------------

class Dinov2(nn.Module):
  """DINOv2 Vision Transformer.

  Inputs are float NHWC images normalised with the ImageNet mean/std (see
  `preprocess`), any size whose sides are at least `patch_size` (pixels past
  the last full patch are dropped, as the strided conv does).

  Attributes:
    num_classes: size of the linear head on `features`; 0 returns the features.
    patch_size, width, depth, num_heads, mlp_ratio: the architecture.
    image_size: the resolution `pos_embedding` is sized for (518 published).
    layer_norm_eps: LayerNorm epsilon (1e-6 published).
    layerscale_value: initial layer scale (checkpoints overwrite it).
    pool: what the head sees: "cls_mean" (class token and mean patch token
      concatenated, 2 * width), "cls" or "mean".
    interpolate_offset: 0 resizes position embeddings as transformers does;
      0.1 as the original DINOv2 code (see the module docstring).
    dropout: dropout rate after attention and in the MLP (0 published).
    drop_path_rate: stochastic depth of the last block, rising linearly from 0
      at the first (0.1-0.2 is usual for fine-tuning; transformers'
      `drop_path_rate`).
    remat: gradient checkpointing of every block (`jtl.models.vit.ViT.remat`).
  """
  num_classes: int = 0
  patch_size: int = 14
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  image_size: int = NATIVE_IMAGE_SIZE
  layer_norm_eps: float = 1e-6
  layerscale_value: float = 1.0
  pool: str = "cls_mean"
  interpolate_offset: float = 0.0
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  remat: bool = False

  def setup(self):
    p, grid = self.patch_size, self.image_size // self.patch_size
    self.embedding = wgrad.Conv(self.width, (p, p), strides=(p, p), padding="VALID")
    self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
    self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, self.width))
    self.pos_embedding = self.param("pos_embedding", nn.initializers.normal(0.02),
                                    (1, 1 + grid * grid, self.width))
    self.embedding_dropout = nn.Dropout(self.dropout)
    self.Transformer = vit.Encoder(
        self.depth, int(self.width * self.mlp_ratio), self.num_heads, self.dropout,
        exact_gelu=True, drop_path_rate=self.drop_path_rate, eps=self.layer_norm_eps,
        layerscale=self.layerscale_value, remat=self.remat)
    if self.num_classes:
      self.head = wgrad.Dense(self.num_classes, kernel_init=nn.initializers.zeros)

  def tokens(self, x: jax.Array, *, train: bool = False,
             mask: jax.Array | None = None) -> jax.Array:
    """The final-LayerNormed sequence [B, 1 + gh * gw, width], class token
    first (transformers' `last_hidden_state`). `mask` [B, gh * gw] (bool)
    replaces those patch embeddings by the mask token (`bool_masked_pos`)."""
    x = self.embedding(x)
    batch, gh, gw, width = x.shape
    x = x.reshape(batch, gh * gw, width)
    if mask is not None:
      x = jnp.where(jnp.asarray(mask, bool)[:, :, None],
                    self.mask_token.astype(x.dtype)[None], x)
    x = jnp.concatenate([jnp.broadcast_to(self.cls.astype(x.dtype), (batch, 1, width)), x],
                        axis=1)
    posemb = interpolate_pos_embed(self.pos_embedding, (gh, gw),
                                   offset=self.interpolate_offset)
    x = x + posemb.astype(x.dtype)
    x = self.embedding_dropout(x, deterministic=not train)
    return self.Transformer(x, train=train)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """What the head sees (see `pool`), float32 [B, 2 * width] or [B, width]."""
    if self.pool not in POOLS:
      raise ConfigError(f"Dinov2.pool must be one of {POOLS}; found {self.pool!r}.")
    seq = self.tokens(x, train=train)
    cls, patches = seq[:, 0], jnp.mean(seq[:, 1:], axis=1)
    out = {"cls_mean": lambda: jnp.concatenate([cls, patches], axis=-1),
           "cls": lambda: cls, "mean": lambda: patches}[self.pool]()
    return out.astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    f = self.features(x, train=train)
    return self.head(f).astype(jnp.float32) if self.num_classes else f


def dinov2(variant: str, num_classes: int = 0, **kwargs: Any) -> Dinov2:
  """DINOv2 ViT-`variant`/14 ("s" or "b") at its published size."""
  if variant not in VARIANTS:
    raise ConfigError(f"Unknown DINOv2 variant {variant!r}; expected one of "
                      f"{sorted(VARIANTS)}.")
  width, depth, heads = VARIANTS[variant]
  return Dinov2(num_classes=num_classes, width=width, depth=depth, num_heads=heads,
                **kwargs)


# --- the published layout -> jtl paths -------------------------------------------

_BLOCK = {  # transformers module (after encoder.layer.N.) -> jtl module in the block
    "norm1": "LayerNorm_0", "norm2": "LayerNorm_1",
    "attention.attention.query": "MultiHeadDotProductAttention_0/query",
    "attention.attention.key": "MultiHeadDotProductAttention_0/key",
    "attention.attention.value": "MultiHeadDotProductAttention_0/value",
    "attention.output.dense": "MultiHeadDotProductAttention_0/out",
    "attention.q_proj": "MultiHeadDotProductAttention_0/query",  # transformers >= 5
    "attention.k_proj": "MultiHeadDotProductAttention_0/key",    # in memory
    "attention.v_proj": "MultiHeadDotProductAttention_0/value",
    "attention.o_proj": "MultiHeadDotProductAttention_0/out",
    "mlp.fc1": "MlpBlock_0/Dense_0", "mlp.fc2": "MlpBlock_0/Dense_1",
    "layer_scale1": "LayerScale_0", "layer_scale2": "LayerScale_1",
}
_TOP = {"embeddings.cls_token": "cls", "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embedding"}


def _leaf(path: str, leaf: str, value: np.ndarray, num_heads: int) -> tuple[str, np.ndarray] | None:
  """One tensor of module `path` (jtl) -> (flat path, array); None if unknown."""
  kind = path.rsplit("/", 1)[-1]
  if kind.startswith("LayerNorm") or kind == "encoder_norm":
    names = {"weight": "scale", "bias": "bias"}
    return (f"params/{path}/{names[leaf]}", value) if leaf in names else None
  if kind.startswith("LayerScale"):
    return (f"params/{path}/scale", value) if leaf == "lambda1" else None
  if kind == "embedding" and leaf == "weight" and value.ndim == 4:
    return "params/embedding/kernel", np.transpose(value, (2, 3, 1, 0))
  heads_ok = value.shape[0] % num_heads == 0 if value.ndim else False
  if kind in ("query", "key", "value") and heads_ok:
    if leaf == "weight" and value.ndim == 2:  # (out, in) -> (in, heads, head_dim)
      return f"params/{path}/kernel", value.T.reshape(value.shape[1], num_heads, -1)
    if leaf == "bias" and value.ndim == 1:
      return f"params/{path}/bias", value.reshape(num_heads, -1)
  if kind == "out" and leaf == "weight" and value.ndim == 2 and value.shape[1] % num_heads == 0:
    return f"params/{path}/kernel", value.T.reshape(num_heads, -1, value.shape[0])
  if leaf == "weight" and value.ndim == 2:
    return f"params/{path}/kernel", value.T
  if leaf == "bias" and value.ndim == 1:
    return f"params/{path}/bias", value
  return None


def convert_hf(state_dict: Mapping[str, np.ndarray], *, num_heads: int) -> dict[str, np.ndarray]:
  """transformers Dinov2Model / Dinov2ForImageClassification state dict -> jtl paths.

  A "dinov2." prefix is dropped and "classifier" becomes the head. Keys that
  are not understood, or whose rank or head split does not fit, pass through
  under their own name so that a strict load reports them.

  >>> sd = {"encoder.layer.1.attention.attention.query.weight": np.zeros((8, 8)),
  ...       "embeddings.mask_token": np.zeros((1, 8))}
  >>> {k: v.shape for k, v in convert_hf(sd, num_heads=2).items()}  # doctest: +NORMALIZE_WHITESPACE
  {'params/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel': (8, 2, 4),
   'params/mask_token': (1, 8)}
  """
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    name = key.removeprefix("dinov2.")
    module, _, leaf = name.rpartition(".")
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
    path = (f"Transformer/encoderblock_{m.group(1)}/{_BLOCK[m.group(2)]}"
            if m is not None and m.group(2) in _BLOCK else
            {"embeddings.patch_embeddings.projection": "embedding",
             "layernorm": "Transformer/encoder_norm", "classifier": "head"}.get(module))
    converted = None
    if name in _TOP:
      converted = f"params/{_TOP[name]}", value
    elif path is not None:
      converted = _leaf(path, leaf, value, num_heads)
    if converted is None:
      out[key] = value
    else:
      out[converted[0]] = converted[1]
  return out


def hf_shapes(*, hidden_size: int, num_hidden_layers: int, image_size: int = NATIVE_IMAGE_SIZE,
              patch_size: int = 14, mlp_ratio: float = 4.0, num_channels: int = 3,
              num_labels: int = 0) -> dict[str, tuple[int, ...]]:
  """{key: shape} of a transformers Dinov2Model state dict (or, with
  `num_labels`, Dinov2ForImageClassification's), from the config formulas.

  >>> len(hf_shapes(hidden_size=384, num_hidden_layers=12))
  223
  """
  d, inner = hidden_size, int(hidden_size * mlp_ratio)
  grid = (image_size // patch_size) ** 2
  shapes = {"embeddings.cls_token": (1, 1, d), "embeddings.mask_token": (1, d),
            "embeddings.position_embeddings": (1, grid + 1, d),
            "embeddings.patch_embeddings.projection.weight": (d, num_channels, patch_size,
                                                              patch_size),
            "embeddings.patch_embeddings.projection.bias": (d,)}
  for i in range(num_hidden_layers):
    pre = f"encoder.layer.{i}"
    for name in ("norm1", "norm2"):
      shapes.update({f"{pre}.{name}.weight": (d,), f"{pre}.{name}.bias": (d,)})
    for name in ("attention.query", "attention.key", "attention.value", "output.dense"):
      shapes.update({f"{pre}.attention.{name}.weight": (d, d),
                     f"{pre}.attention.{name}.bias": (d,)})
    shapes.update({f"{pre}.layer_scale1.lambda1": (d,), f"{pre}.layer_scale2.lambda1": (d,),
                   f"{pre}.mlp.fc1.weight": (inner, d), f"{pre}.mlp.fc1.bias": (inner,),
                   f"{pre}.mlp.fc2.weight": (d, inner), f"{pre}.mlp.fc2.bias": (d,)})
  shapes.update({"layernorm.weight": (d,), "layernorm.bias": (d,)})
  if num_labels:
    shapes = {f"dinov2.{k}": v for k, v in shapes.items()}
    shapes.update({"classifier.weight": (num_labels, 2 * d), "classifier.bias": (num_labels,)})
  return shapes


# --- zoo -------------------------------------------------------------------------

# The facebook/dinov2-* evaluation preprocessing (transformers' BitImageProcessor):
# resize the shorter side to 256 (bicubic), central crop 224, ImageNet mean/std;
# `preprocess(images, size=224, crop_fraction=0.875)`.
NORMALIZATION = dataclasses.replace(
    model_normalization("imagenet", image_size=INPUT_SIZE, crop_fraction=INPUT_SIZE / 256),
    resize="bicubic")
preprocess = NORMALIZATION.preprocessor()


def published_normalization(image_size: int = NATIVE_IMAGE_SIZE) -> Normalization:
  """The published preprocessing of a DINOv2 whose position embeddings are
  sized for `image_size` px: `NORMALIZATION` (224 px), a smaller one's own
  size with the same crop. What a Hub folder without a preprocessor_config.json
  gets (`hub_spec`), and what an export without a run's inputs writes."""
  return dataclasses.replace(NORMALIZATION, image_size=min(INPUT_SIZE, image_size))


def groups(depth: int) -> list[tuple[str, str]]:
  """Layer groups bottom to top: embedding, one per block, encoder_norm, head."""
  return ([("embedding", r"embedding/.*|cls|mask_token|pos_embedding")]
          + [(f"encoderblock_{i}", rf"Transformer/encoderblock_{i}/.*") for i in range(depth)]
          + [("encoder_norm", r"Transformer/encoder_norm/.*"), ("head", r"head/.*")])


def built_groups(params: Mapping[str, Any]) -> list[tuple[str, str]]:
  """`groups` of a DINOv2 as built (model_kwargs may set its depth)."""
  return groups(registry.numbered(params.get("Transformer", {}), "encoderblock_"))


def make_spec(name: str, *, width: int, depth: int, num_heads: int, patch_size: int = 14,
              image_size: int = NATIVE_IMAGE_SIZE, mlp_ratio: float = 4.0,
              layer_norm_eps: float = 1e-6, layerscale_value: float = 1.0,
              pretrained: str | None = None, num_classes: int = 0,
              input_size: int = INPUT_SIZE,
              normalization: Normalization | None = None) -> registry.ModelSpec:
  """The ModelSpec of a DINOv2 of this size; `input_size` is what the input
  pipeline feeds (224 for the published models; the position embeddings are
  interpolated from `image_size`), with `NORMALIZATION`'s crop and affine
  unless `normalization` (a preprocessor_config.json's) says otherwise."""
  arch = {"patch_size": patch_size, "width": width, "depth": depth, "num_heads": num_heads,
          "mlp_ratio": mlp_ratio, "image_size": image_size, "layer_norm_eps": layer_norm_eps,
          "layerscale_value": layerscale_value}

  def build(num_classes: int = num_classes, **kwargs: Any) -> Dinov2:
    return Dinov2(num_classes=num_classes, **{**arch, **kwargs})

  return registry.ModelSpec(
      name=name, build=build,
      **registry.image_inputs(normalization or dataclasses.replace(NORMALIZATION,
                                                                   image_size=input_size)),
      groups=groups(depth), groups_of=built_groups, head_level=vit.HEAD_LEVEL,
      pretrained=pretrained,
      converter=functools.partial(convert_hf, num_heads=num_heads),
      default_num_classes=num_classes, min_image_size=patch_size)


_HUB_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads")


def hub_spec(source: str, config: Mapping[str, Any],
             preprocessor: Mapping[str, Any] | None = None) -> registry.ModelSpec:
  """ModelSpec of a transformers config.json with model_type "dinov2"
  (Dinov2Model, or Dinov2ForImageClassification with its `id2label` classes).

  Its preprocessing is the repo's preprocessor_config.json (`preprocessor`,
  read by `preprocessing.from_image_processor`: an exported run's size,
  resize and no crop; facebook/dinov2-*'s is `NORMALIZATION`), else
  `published_normalization` of config.json's image_size. config.json's
  image_size sizes the position embeddings only (interpolated to the input's
  grid, as in transformers).

  The training-time options drop_path_rate, hidden_dropout_prob and
  attention_probs_dropout_prob (0 in the published configs) are not read from
  config.json (stochastic depth is `Dinov2(drop_path_rate=...)`);
  `layerscale_value` only initialises the layer scales that checkpoints set.
  """
  where = f"{source} (config.json model_type 'dinov2')"
  unsupported = {k: config.get(k) for k, ok in (
      ("use_swiglu_ffn", False), ("qkv_bias", True), ("hidden_act", "gelu"),
      ("num_channels", 3)) if config.get(k, ok) != ok}
  if unsupported:
    raise ConfigError(f"{where}: {unsupported}; jtl's Dinov2 implements "
                      "use_swiglu_ffn=False (ViT-S/B/L, not g), qkv_bias=True, "
                      "hidden_act='gelu', num_channels=3.")
  try:
    width, depth, heads = (int(config[k]) for k in _HUB_KEYS)
    image, patch = config.get("image_size", 224), config.get("patch_size", 14)
    image = image if isinstance(image, int) else (int(image[0]) if len(set(image)) == 1 else None)
    patch = patch if isinstance(patch, int) else (int(patch[0]) if len(set(patch)) == 1 else None)
    ratio = float(config.get("mlp_ratio", 4))
    eps = float(config.get("layer_norm_eps", 1e-6))
    scale = float(config.get("layerscale_value", 1.0))
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{where}: config.json lacks or mangles {e}; expected "
                      f"{', '.join(_HUB_KEYS)} (integers), image_size, patch_size.") from None
  if image is None or patch is None or width % heads:
    raise ConfigError(f"{where}: image_size {config.get('image_size')!r} / patch_size "
                      f"{config.get('patch_size')!r} must be square, hidden_size {width} "
                      f"a multiple of num_attention_heads {heads}.")
  classes = 0
  if "Dinov2ForImageClassification" in (config.get("architectures") or ()):
    classes = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
  inputs = (published_normalization(image) if preprocessor is None else
            preprocessing.from_image_processor(
                preprocessor, f"{source}: {preprocessing.IMAGE_PROCESSOR_FILE}"))
  return make_spec(source, width=width, depth=depth, num_heads=heads, patch_size=patch,
                   image_size=image, mlp_ratio=ratio, layer_norm_eps=eps,
                   layerscale_value=scale, pretrained=source, num_classes=classes,
                   normalization=inputs)


for _variant, (_width, _depth, _heads) in VARIANTS.items():
  registry.register(make_spec(f"dinov2_{_variant}14", width=_width, depth=_depth,
                              num_heads=_heads, pretrained=f"hf-hub:{HUB_REPOS[_variant]}"))
