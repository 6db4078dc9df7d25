"""Vision Transformer (ViT-Ti/16, S/16, B/16) with big_vision parameter names.

Inputs are float NHWC images in [-1, 1] (`NORMALIZATION`, `preprocess`). Parameter paths:
"embedding/kernel", "cls", "pos_embedding",
"Transformer/encoderblock_0/LayerNorm_0/scale",
"Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
"Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", ...,
"Transformer/encoder_norm/scale", "pre_logits/kernel" (optional), "head/kernel".

`pos_embedding` covers the class token too, as in the google-research
vision_transformer checkpoints; it is sized for `image_size` and resized on
the fly (bilinear, as big_vision does) for inputs with another patch grid.
`convert_npz` reads both published `.npz` layouts (vision_transformer and
big_vision); `jtl.weights.load_pretrained` resizes a checkpoint's position
embedding to the model's grid (`jtl.weights.adapt.resize_pos_embed`).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl.errors import ConfigError
from jtl.models import registry, wgrad
from jtl.models.layers import drop_path_rate_of
from jtl.models.remat import can_scan, scan_blocks, traced_drop_path
from jtl.models.preprocessing import model_normalization


def _resize_grid(posemb: jax.Array, grid: tuple[int, int], num_prefix: int) -> jax.Array:
  """In-graph twin of `jtl.weights.adapt.resize_pos_embed` (same numbers)."""
  prefix, tokens = posemb[:, :num_prefix], posemb[:, num_prefix:]
  old = math.isqrt(tokens.shape[1])
  if (old, old) == tuple(grid):
    return posemb
  width = tokens.shape[-1]
  tokens = jax.image.resize(tokens.reshape(1, old, old, width), (1, *grid, width),
                            "bilinear", antialias=False)
  return jnp.concatenate([prefix, tokens.reshape(1, grid[0] * grid[1], width)], axis=1)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense. GELU in its tanh form, as the big_vision and
  vision_transformer models; `exact_gelu` for the erf form (timm, HF)."""
  mlp_dim: int
  dropout: float = 0.0
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    x = nn.gelu(wgrad.Dense(self.mlp_dim, name="Dense_0")(x), approximate=not self.exact_gelu)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return wgrad.Dense(width, name="Dense_1")(x)


def _cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """cuDNN's fused (flash) attention of [B, T, heads, head_dim] inputs.

  jax's cuDNN path refuses an odd sequence length when differentiated (its
  training check counts the absent bias as present and then asks for even
  lengths), and ViT's 197 tokens are odd: the tokens are padded to an even
  count and the padding masked out with sequence lengths, then sliced off.
  """
  batch, tokens = query.shape[:2]
  if tokens % 2 == 0:
    return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
  pad = lambda a: jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0)))
  lengths = jnp.full((batch,), tokens, jnp.int32)
  out = jax.nn.dot_product_attention(pad(query), pad(key), pad(value),
                                     query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation="cudnn")
  return out[:, :tokens]


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    bias: jax.Array | None = None, mask: jax.Array | None = None,
                    **kwargs: Any) -> jax.Array:
  """`xla_attention`, or cuDNN's fused (flash) kernel in a program lowered
  for CUDA: bf16/fp16 inputs, no bias, mask or dropout. The fused kernel never
  writes the [batch, heads, tokens, tokens] scores to device memory.

  The choice is made by the platform the program is lowered for
  (`lax.platform_dependent`), not by the host's default backend, so a step
  lowered for CUDA on a CPU host is the GPU's program. Where cuDNN is absent
  (no CUDA jaxlib plugin), or refuses the shapes, this is `xla_attention`
  itself (a warning says why on a GPU backend).
  """
  xla = functools.partial(xla_attention, bias=bias, mask=mask, **kwargs)
  dropout = kwargs.get("dropout_rate", 0.0) and not kwargs.get("deterministic", True)
  if (bias is not None or mask is not None or dropout
      or query.dtype not in (jnp.bfloat16, jnp.float16)):
    return xla(query, key, value)
  try:
    # Rematerialised, the other platforms' branch keeps only its inputs for
    # the backward pass: a switch's branches share their residuals, so its
    # [batch, heads, tokens, tokens] probabilities would otherwise be
    # zero-filled outputs of the cuDNN branch too.
    return jax.lax.platform_dependent(query, key, value, cuda=_cudnn_attention,
                                      default=jax.checkpoint(xla))
  except (ValueError, NotImplementedError, RuntimeError) as e:  # no cuDNN, or shapes
    if jax.default_backend() == "gpu":  # shown once per reason (warnings' registry)
      warnings.warn(f"fused_attention: cuDNN's kernel not used ({type(e).__name__}: {e}); "
                    "running XLA's attention instead.", stacklevel=2)
    return xla(query, key, value)


def _aligned_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                       **kwargs: Any) -> jax.Array:
  """Flax's attention over tokens padded to a multiple of 8, the padded keys
  masked out (exactly zero weight) and the padded queries sliced off."""
  tokens = key.shape[1]
  pad = lambda a: jnp.pad(a, ((0, 0), (0, -tokens % 8), (0, 0), (0, 0)))
  real_keys = (jnp.arange(tokens + -tokens % 8) < tokens)[None, None, None, :]
  return nn.dot_product_attention(pad(query), pad(key), pad(value), mask=real_keys,
                                  **kwargs)[:, :tokens]


def xla_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                  bias: jax.Array | None = None, mask: jax.Array | None = None,
                  **kwargs: Any) -> jax.Array:
  """Flax's attention; in a program lowered for CUDA, over tokens padded to a
  multiple of 8 (ViT's 197 -> 200), the padding masked.

  cuBLAS wants aligned matrices, so XLA pads each of the attention matmuls'
  operands itself, the [batch x heads, T, T] scores and their gradients
  included: ViT-B/16's full step at batch 256, compiled for an H100, has 96
  such pad kernels moving 24 GiB. Padded once here, the same cuBLAS calls
  read aligned operands and 72 of those kernels go (`scripts/benchmarks/
  deviceless.py`: 187 -> 169 GiB moved per step). Other platforms keep Flax's
  program (`lax.platform_dependent`: chosen by the platform lowered for).
  """
  plain = functools.partial(nn.dot_product_attention, bias=bias, mask=mask, **kwargs)
  if (bias is not None or mask is not None or key.shape[1] % 8 == 0
      or query.shape[1] != key.shape[1]):
    return plain(query, key, value)
  return jax.lax.platform_dependent(query, key, value, default=plain,
                                    cuda=functools.partial(_aligned_attention, **kwargs))


class LayerScale(nn.Module):
  """x * scale, one learned value per channel (DINOv2's `lambda1`)."""
  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * scale.astype(x.dtype).reshape((1,) * (x.ndim - 1) + scale.shape)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm block: x + MHA(LN(x)), then x + MLP(LN(x)); with
  `layerscale`, each branch is scaled per channel first (DINOv2)."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  exact_gelu: bool = False
  fused: bool = False
  drop_path: float | jax.Array = 0.0
  eps: float = 1e-6
  layerscale: float | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:  # train positional: remat's static arg
    # Stochastic depth: a residual branch dropped for whole examples (a traced
    # rate: the block is one step of a scan, `jtl.models.remat`).
    if isinstance(self.drop_path, (int, float)):
      drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))
    else:
      drop_path = functools.partial(traced_drop_path, self, self.drop_path)
    y = nn.LayerNorm(epsilon=self.eps, name="LayerNorm_0")(x)
    attention_fn = fused_attention if self.fused else xla_attention
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_fn=attention_fn,
        qkv_dot_general=wgrad.dot_general, out_dot_general=wgrad.dot_general,
        name="MultiHeadDotProductAttention_0")(y, y, deterministic=True)
    if self.layerscale is not None:
      y = LayerScale(self.layerscale, name="LayerScale_0")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    x = x + drop_path(y, deterministic=not train)
    y = nn.LayerNorm(epsilon=self.eps, name="LayerNorm_1")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.exact_gelu, name="MlpBlock_0")(y, train=train)
    if self.layerscale is not None:
      y = LayerScale(self.layerscale, name="LayerScale_1")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return x + drop_path(y, deterministic=not train)


def remat_block(cls: type[nn.Module], *, static_argnum: int) -> type[nn.Module]:
  """`cls` whose activations are recomputed in the backward pass instead of
  stored (gradient checkpointing): the same params and outputs, less memory,
  one more forward pass. `static_argnum` is the position of `train` in its
  `__call__` (self is 0), a Python bool that must not be traced."""
  return nn.remat(cls, static_argnums=(static_argnum,))


class Encoder(nn.Module):
  """The stack of blocks and the final LayerNorm ("Transformer" in the npz)."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  exact_gelu: bool = False
  fused_attention: bool = False
  drop_path_rate: float = 0.0
  eps: float = 1e-6
  layerscale: float | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    names = [f"encoderblock_{i}" for i in range(self.depth)]
    rates = [drop_path_rate_of(self.drop_path_rate, i, self.depth) for i in range(self.depth)]
    scanned = self._scanned(names, rates, x, train) if self.remat else None
    if scanned is not None:
      x = scanned
    else:
      block = remat_block(Encoder1DBlock, static_argnum=2) if self.remat else Encoder1DBlock
      for name, rate in zip(names, rates):
        x = block(self.mlp_dim, self.num_heads, self.dropout, self.exact_gelu,
                  self.fused_attention, rate, self.eps, self.layerscale, name=name)(x, train)
    return nn.LayerNorm(epsilon=self.eps, name="encoder_norm")(x)

  def _scanned(self, names: list[str], rates: list[float], x: jax.Array, train: bool
               ) -> jax.Array | None:
    """The blocks as one checkpointed scan (`jtl.models.remat`), or None."""
    if not can_scan(self, train):
      return None
    template = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout, self.exact_gelu,
                              self.fused_attention, 0.0, self.eps, self.layerscale, parent=None)
    random = self.dropout > 0 or self.drop_path_rate > 0
    return scan_blocks(template, names, self.variables, x, train,
                             rng=self.make_rng("dropout") if random else None,
                             per_block={"drop_path": rates} if self.drop_path_rate > 0 else None)


class ViT(nn.Module):
  """Vision Transformer.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    patch_size, width, depth, mlp_dim, num_heads: the architecture.
    image_size: the resolution `pos_embedding` is sized for.
    pool: "tok" (class token) or "gap" (mean of the patch tokens).
    representation_size: width of the tanh "pre_logits" layer, or None.
    dropout: dropout rate after attention and in the MLP.
    exact_gelu: the MLP's GELU in its erf form (timm / HF weights) instead of
      the tanh form (big_vision / vision_transformer weights).
    drop_path_rate: stochastic depth of the last block, rising linearly from 0
      at the first (timm's `drop_path_rate`; 0.1 is usual for fine-tuning
      ViT-B); the residual branches of a block are dropped for whole examples
      in training.
    fused_attention: cuDNN's fused attention in programs lowered for CUDA, in
      bf16/fp16 (`fused_attention`), same parameters; Flax's attention
      elsewhere. Off by default: not yet measured on a GPU (BENCHMARKS.md,
      "Accelerators").
    remat: gradient checkpointing of every encoder block: its activations
      are recomputed in the backward pass instead of kept (the train step's
      temporary memory drops, a step costs one more forward pass; same
      params, and the same gradients without dropout). In training the
      blocks run as one checkpointed `lax.scan` (`jtl.models.remat`; with
      dropout or drop path the masks are drawn per block from the step's
      key). BENCHMARKS.md, "Gradient checkpointing".
  """
  num_classes: int = 1000
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  image_size: int = 224
  pool: str = "tok"
  representation_size: int | None = None
  dropout: float = 0.0
  exact_gelu: bool = False
  fused_attention: bool = False
  drop_path_rate: float = 0.0
  remat: bool = False

  def setup(self):
    p = self.patch_size
    self.embedding = wgrad.Conv(self.width, (p, p), strides=(p, p), padding="VALID")
    prefix = 1 if self.pool == "tok" else 0
    grid = self.image_size // p
    if prefix:
      self.cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    self.pos_embedding = self.param(
        "pos_embedding", nn.initializers.normal(stddev=0.02),
        (1, prefix + grid * grid, self.width))
    self.embedding_dropout = nn.Dropout(self.dropout)
    self.Transformer = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout,
                               self.exact_gelu, self.fused_attention, self.drop_path_rate,
                               remat=self.remat)
    if self.representation_size:
      self.pre_logits = wgrad.Dense(self.representation_size)
    if self.num_classes:
      self.head = wgrad.Dense(self.num_classes, kernel_init=nn.initializers.zeros)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled, normalised encoder output (after pre_logits if any) [B, D]."""
    if self.pool not in ("tok", "gap"):
      raise ConfigError(f"ViT.pool must be 'tok' (class token) or 'gap' (mean of "
                        f"the patch tokens); found {self.pool!r}.")
    x = self.embedding(x)
    batch, h, w, width = x.shape
    x = x.reshape(batch, h * w, width)
    prefix = 1 if self.pool == "tok" else 0
    if prefix:
      x = jnp.concatenate([jnp.broadcast_to(self.cls, (batch, 1, width)), x], axis=1)
    posemb = _resize_grid(self.pos_embedding, (h, w), prefix)
    x = x + posemb.astype(x.dtype)
    x = self.embedding_dropout(x, deterministic=not train)
    x = self.Transformer(x, train=train)
    x = x[:, 0] if prefix else jnp.mean(x, axis=1)
    if self.representation_size:
      x = jnp.tanh(self.pre_logits(x))
    return x.astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    f = self.features(x, train=train)
    return self.head(f).astype(jnp.float32) if self.num_classes else f


VARIANTS = {  # name: (width, depth, mlp_dim, num_heads)
    "ti": (192, 12, 768, 3), "s": (384, 12, 1536, 6), "b": (768, 12, 3072, 12),
}


def vit(variant: str, num_classes: int = 1000, *, patch_size: int = 16,
        **kwargs: Any) -> ViT:
  """Builds ViT-`variant`/`patch_size`, e.g. `vit("b", 10, image_size=384)`.

  >>> vit("s", 0).width
  384
  """
  if variant not in VARIANTS:
    raise ConfigError(f"Unknown ViT variant {variant!r}; expected one of "
                      f"{sorted(VARIANTS)}.")
  width, depth, mlp_dim, num_heads = VARIANTS[variant]
  # The variant's sizes are defaults: model_kwargs may set them (model_options lists them).
  sizes = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  return ViT(num_classes=num_classes, patch_size=patch_size, **{**sizes, **kwargs})


# Both layouts -> big_vision names. vision_transformer numbers a block's
# submodules in creation order (LayerNorm_0, MHA_1, LayerNorm_2, MlpBlock_3).
_RENAMES = [
    (r"Transformer/posembed_input/pos_embedding", "pos_embedding"),
    (r"(Transformer/encoderblock_\d+)/LayerNorm_2/(.*)", r"\1/LayerNorm_1/\2"),
    (r"(Transformer/encoderblock_\d+)/MultiHeadDotProductAttention_1/(.*)",
     r"\1/MultiHeadDotProductAttention_0/\2"),
    (r"(Transformer/encoderblock_\d+)/MlpBlock_3/(.*)", r"\1/MlpBlock_0/\2"),
]
_KNOWN = re.compile(
    r"embedding/(kernel|bias)|cls|pos_embedding|(head|pre_logits)/(kernel|bias)"
    r"|Transformer/encoder_norm/(scale|bias)"
    r"|Transformer/encoderblock_\d+/(LayerNorm_[01]/(scale|bias)"
    r"|MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)"
    r"|MlpBlock_0/Dense_[01]/(kernel|bias))")


def convert_npz(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a ViT `.npz` (vision_transformer or big_vision) to flat "params/..." paths.

  A big_vision checkpoint whose `pos_embedding` has no row for the class
  token gets a zero row, which is the same model. Unknown keys pass through
  unchanged so that a strict load reports them.

  >>> out = convert_npz({"Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias":
  ...                    np.zeros(4, np.float32)})
  >>> list(out)
  ['params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias']
  """
  out: dict[str, np.ndarray] = {}
  for key, value in arrays.items():
    name = key[len("params/"):] if key.startswith("params/") else key
    for pattern, target in _RENAMES:
      name = re.sub(rf"^{pattern}$", target, name)
    out[f"params/{name}" if _KNOWN.fullmatch(name) else key] = np.asarray(value)
  posemb = out.get("params/pos_embedding")
  if posemb is not None and "params/cls" in out and posemb.ndim == 3:
    side = math.isqrt(posemb.shape[1])
    if side * side == posemb.shape[1]:
      out["params/pos_embedding"] = np.concatenate(
          [np.zeros_like(posemb[:, :1]), posemb], axis=1)
  return out


# big_vision's evaluation: resize the whole image, scale 0..255 to [-1, 1].
NORMALIZATION = model_normalization("vit", crop_fraction=1.0)
# `preprocess(images, size=224, crop_fraction=1.0)`; size=None only normalises.
preprocess = NORMALIZATION.preprocessor()


example_input = registry.image_input


def groups(depth: int) -> list[tuple[str, str]]:
  """Layer groups bottom to top: embedding, one per block, encoder_norm, head."""
  return ([("embedding", r"(embedding/.*|cls|pos_embedding)")]
          + [(f"encoderblock_{i}", rf"Transformer/encoderblock_{i}/.*")
             for i in range(depth)]
          + [("encoder_norm", r"Transformer/encoder_norm/.*|pre_logits/.*"),
             ("head", r"head/.*")])


# Layer-wise learning-rate decay trains the final norm at the head's rate (timm, BEiT, MAE).
HEAD_LEVEL = ("encoder_norm",)


def built_groups(params: Mapping[str, Any]) -> list[tuple[str, str]]:
  """`groups` of a ViT as built (model_kwargs may set its depth)."""
  return groups(registry.numbered(params.get("Transformer", {}), "encoderblock_"))


for _variant in VARIANTS:
  registry.register(registry.ModelSpec(
      name=f"vit_{_variant}16",
      build=functools.partial(
          lambda v, num_classes=21843, **kw: vit(v, num_classes, **kw), _variant),
      **registry.image_inputs(NORMALIZATION),
      groups=groups(VARIANTS[_variant][1]), groups_of=built_groups, head_level=HEAD_LEVEL,
      pretrained=f"vit_{_variant}16/augreg_in21k",
      converter=convert_npz,
      default_num_classes=21843,
))
