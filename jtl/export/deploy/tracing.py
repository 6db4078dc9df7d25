"""The model in the form converters like: inference-mode functions with the zoo's
plain conv formulations, the file contract's constants, and the primitives a
traced model uses (layer by layer) for converters' error messages."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jtl import adapter
from jtl.errors import JtlError
from jtl.models import layers, vit
from jtl.tree import PyTree

FORMATS = ("onnx", "tflite", "tflite_int8")
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "tflite_int8": ".int8.tflite"}
# A file name's ending -> the formats written under it, the first the one it
# names (an int8 LiteRT file is a .tflite flatbuffer too).
SUFFIX_FORMATS = {".onnx": ("onnx",), ".int8.tflite": ("tflite_int8",),
                  ".tflite": ("tflite", "tflite_int8")}
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points (percent) lost by int8 before the check warns


class ExportError(JtlError):
  """A model that a converter cannot turn into a deployment format."""


class QuantizationWarning(UserWarning):
  """An int8 model that loses more accuracy than allowed on the calibration check."""


@dataclasses.dataclass(frozen=True)
class OpUse:
  """One primitive of the traced model and the layer (module path) it is in."""
  op: str
  layer: str

  def __str__(self) -> str:
    return f"layer {self.layer or '<top level>'}: op {self.op}"

TOKEN_INPUTS = ("input_ids", "attention_mask")


def _examples(input_shape: Sequence[int], token_inputs: bool) -> list[Any]:
  """The example inputs of `fn` at batch 1: one float32 image batch, or int32
  token ids and attention mask."""
  dtype, count = (jnp.int32, len(TOKEN_INPUTS)) if token_inputs else (jnp.float32, 1)
  return [jax.ShapeDtypeStruct((1, *input_shape), dtype) for _ in range(count)]


# Tracing the model in the form converters like.


def _plain_layers_interceptor(next_fun, args, kwargs, context):
  """Runs jtl's platform-specific layers in their plain form (same numbers):
  the CPU's conv formulations, and ViT's attention without its per-platform
  branches (`lax.platform_dependent`, which converters cannot lower)."""
  module = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if isinstance(module, layers.DepthwiseConv) and module.formulation != "grouped":
    plain = module.clone(parent=None, formulation="grouped")
  elif (isinstance(module, nn.Conv)
        and getattr(module, "conv_general_dilated", None) is layers.conv_general_dilated):
    plain = module.clone(parent=None, conv_general_dilated=lax.conv_general_dilated)
  elif (isinstance(module, nn.MultiHeadDotProductAttention)
        and module.attention_fn in (vit.xla_attention, vit.fused_attention)):
    plain = module.clone(parent=None, attention_fn=nn.dot_product_attention)
  else:
    return next_fun(*args, **kwargs)
  return plain.apply({"params": module.variables["params"]}, *args, **kwargs)


def inference_fn(module: Any, variables: PyTree | None = None, *,
                 train_kwarg: str | None = "train",
                 pixel_affine: tuple[Any, Any] | None = None,
                 token_inputs: bool = False) -> Callable[..., jax.Array]:
  """`fn(x) -> logits` in inference mode, traced in converter-friendly form.

  With `token_inputs` (text models such as BERT / MiniLM) it is
  `fn(input_ids, attention_mask) -> outputs`, int32 [batch, length] each; the
  model gets them as its token dict with `token_type_ids` all zero (one
  segment, as sentence encoders are used).

  Args:
    module: a Linen or NNX module, or a jtl adapter (`jtl.LinenModel`, ...).
    variables: {"params": ..., "batch_stats": ...}; None for an NNX module.
    train_kwarg: the module's mode flag ("train", "deterministic" or None);
      ignored for adapters.
    pixel_affine: (mul, add) per channel: the function then takes RGB
      0..255 and normalises as `x / 255 * mul + add` first.
  """
  if isinstance(module, nn.Module):
    model = adapter.LinenModel(module, train_kwarg=train_kwarg)
  else:
    model = adapter.as_model(module)
  if variables is None:
    variables = adapter.variables_of(model)
  params = jax.tree.map(jnp.asarray, variables["params"])
  state = {k: jax.tree.map(jnp.asarray, v) for k, v in variables.items() if k != "params"}

  def run(x: Any) -> jax.Array:
    with nn.intercept_methods(_plain_layers_interceptor):
      out, _ = model.apply(params, state, x, train=False, rng=None)
    return out.astype(jnp.float32)

  if token_inputs:
    def text_fn(input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
      ids = jnp.asarray(input_ids, jnp.int32)
      return run({"input_ids": ids, "attention_mask": jnp.asarray(attention_mask, jnp.int32),
                  "token_type_ids": jnp.zeros_like(ids)})
    return text_fn

  def fn(x: jax.Array) -> jax.Array:
    if pixel_affine is not None:
      mul, add = (jnp.asarray(a, jnp.float32).reshape(1, 1, 1, -1) for a in pixel_affine)
      x = x * (mul / 255.0) + add
    return run(x)

  return fn


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  return list(jex_core.jaxprs_in_params(params))


def find_ops(fn: Callable[..., Any], *examples: Any) -> list[OpUse]:
  """Every primitive of `fn(*examples)` with the layer (name stack) it is in,
  nested jaxprs included (each (op, layer) once, in trace order)."""
  closed = jax.make_jaxpr(fn)(*examples)
  seen: dict[tuple[str, str], None] = {}

  def walk(jaxpr: Any, prefix: str) -> None:
    for eqn in jaxpr.eqns:
      stack = str(eqn.source_info.name_stack)
      layer = "/".join(p for p in (prefix, stack) if p)
      seen.setdefault((eqn.primitive.name, layer), None)
      for sub in _sub_jaxprs(eqn.params):
        walk(getattr(sub, "jaxpr", sub), layer)

  walk(closed.jaxpr, "")
  return [OpUse(op, _clean_layer(layer)) for op, layer in seen]


def _clean_layer(layer: str) -> str:
  """'jit(fn)/Net/odd' -> 'odd': drops jit wrappers and the root module's name."""
  parts = [p for p in layer.split("/") if p and not re.match(r"^\w+\(.*\)$", p)]
  return "/".join(parts[1:] if len(parts) > 1 else parts)
