"""Deployment: ONNX and LiteRT (TFLite) files, float32 and full-integer int8.

A fine-tuned model leaves jtl in the formats that deployment runtimes load:

- "onnx": float32 ONNX through `jax2onnx` (ONNX Runtime runs it);
- "tflite": float32 LiteRT / TFLite through `jax.experimental.jax2tf` and the
  TFLite converter that TensorFlow ships;
- "tflite_int8": full-integer int8 LiteRT (int8 weights and activations, real
  int8 kernels), post-training quantized with a representative dataset.

The input contract of every exported file is the input of the jtl model:
float32 NHWC `[batch, size, size, 3]`, already normalised as the zoo model's
`spec.normalization` says (what jtl's input pipeline yields), with a
dynamic batch dimension (ONNX: a symbolic "B"; LiteRT: stored as batch 1,
which the interpreter resizes to any batch, as `Runtime` does; a graph with
the batch in a reshape, such as ViT's tokens, runs one example at a time);
the output is float32 logits `[batch, classes]`.
`input_pixels=True` folds the normalisation in instead: the file then takes
RGB values in 0..255 (float32). The int8 file keeps float32 input and output
(quantize/dequantize ops at its edges). A JSON sidecar `<file>.json` records
the contract, the model and the int8 calibration check.

For export the zoo's CPU-specific formulations are traced in their plain
form: depthwise convs as grouped convs (not shifted multiply-adds) and convs
as `lax.conv_general_dilated` (not matmuls), so converters see one conv op
per layer and map it to their conv kernels. The numbers are the same.

`load(path)` runs a file in its own runtime (onnxruntime; ai-edge-litert's
interpreter, or TensorFlow's as a fallback) as `predict(x) -> logits`.
The converters and runtimes are imported lazily: `import jtl` never imports
them, and they are needed only here (onnx, onnx-ir, onnxruntime, jax2onnx,
ai-edge-litert are test/deployment dependencies, not runtime ones).

>>> import numpy as np, flax.linen as nn, jax, tempfile, os
>>> module = nn.Dense(3)
>>> variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.float32))
>>> path = os.path.join(tempfile.mkdtemp(), "dense.tflite")
>>> info = export(module, variables, path, format="tflite", input_shape=(4,), train_kwarg=None)
>>> predict = load(path)
>>> x = np.ones((2, 4), np.float32)
>>> bool(np.allclose(predict(x), module.apply(variables, x), atol=1e-5))
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jtl.checkpoint.writers import write_atomic
from jtl.errors import CheckpointError, ConfigError, JtlError, bullet_list
from jtl.tree import PyTree

FORMATS = ("onnx", "tflite", "tflite_int8")
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "tflite_int8": ".int8.tflite"}
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


@dataclasses.dataclass(frozen=True)
class Exported:
  """What `export` wrote: the file, its format and size, and its contract."""
  path: str
  format: str
  bytes: int
  input_shape: tuple[int, ...]
  meta: dict[str, Any]


# --------------------------------------------------------------------------
# Tracing the model in the form converters like.


def _plain_conv_interceptor(next_fun, args, kwargs, context):
  """Runs jtl's CPU-specific conv layers in their plain form (same numbers)."""
  from jtl.models import layers  # pylint: disable=g-import-not-at-top
  module = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if isinstance(module, layers.DepthwiseConv) and module.formulation != "grouped":
    plain = module.clone(parent=None, formulation="grouped")
  elif (isinstance(module, nn.Conv)
        and getattr(module, "conv_general_dilated", None) is layers.conv_general_dilated):
    plain = module.clone(parent=None, conv_general_dilated=lax.conv_general_dilated)
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
  from jtl import adapter  # pylint: disable=g-import-not-at-top
  if isinstance(module, nn.Module):
    model = adapter.LinenModel(module, train_kwarg=train_kwarg)
  else:
    model = adapter.as_model(module)
  if variables is None:
    variables = adapter.variables_of(model)
  params = jax.tree.map(jnp.asarray, variables["params"])
  state = {k: jax.tree.map(jnp.asarray, v) for k, v in variables.items() if k != "params"}

  def run(x: Any) -> jax.Array:
    with nn.intercept_methods(_plain_conv_interceptor):
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


# --------------------------------------------------------------------------
# ONNX.


@contextlib.contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR):
  logger = logging.getLogger(name)
  old = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(old)


def _jax2onnx() -> tuple[Callable[..., Any], Any]:
  """jax2onnx's `to_onnx` and its plugin system (the registry of lowerings)."""
  try:
    with _quiet_logger("jax2onnx"):  # it tries to import optional plugins (equinox, dm_pix)
      from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
      from jax2onnx.plugins import plugin_system  # pylint: disable=g-import-not-at-top
      plugin_system.import_all_plugins()
  except ImportError as e:
    raise ConfigError(
        f"ONNX export needs jax2onnx, onnx and onnx-ir ({e}). Install them with "
        "`pip install onnx onnx-ir onnxruntime` and `pip install --no-deps jax2onnx` "
        "(its declared orbax pin would downgrade orbax-checkpoint).") from e
  return to_onnx, plugin_system


# jax2onnx (0.17) replaces `flax.linen.max_pool` / `flax.linen.pool` while it
# traces, with versions that take `window_shape` only as a keyword and
# `padding` only as "SAME"/"VALID" (jtl's ResNet: `nn.max_pool(x, (3, 3),
# strides=(2, 2), padding=[(1, 1), (1, 1)])` fails). jtl turns those patches
# off during its export, so flax's max pool traces as `lax.reduce_window_max`,
# and lowers that primitive itself (`_max_pool_lowering`).
_UNPATCHED_ONNX_PLUGINS = ("linen.max_pool", "linen.pool")


def _max_pool_lowering(plugin_system: Any) -> Any:
  """A jax2onnx lowering of `reduce_window_max` as an ONNX MaxPool on NC...

  jax2onnx's own lowering adds two unit axes in front and pools over every
  axis of the operand: an NHWC max pool becomes a 4-D MaxPool (kernel
  [1, 3, 3, 1]) that ONNX Runtime has no kernel for. Here the pooled axes
  (window, stride, padding or dilation other than the identity) go last and
  the two others (batch, channels) first: Transpose NHWC -> NCHW, a 2-D
  MaxPool with the explicit pads (MaxPool pads with -inf, as the reduce
  window's init), Transpose back. Other shapes keep jax2onnx's lowering.
  """
  from jax2onnx.plugins import _ir_shapes  # pylint: disable=g-import-not-at-top
  from jax2onnx.plugins.jax.lax import reduce_window_max  # pylint: disable=g-import-not-at-top

  base = reduce_window_max.ReduceWindowMaxPrimitivePlugin

  class JtlReduceWindowMax(base):  # pylint: disable=missing-class-docstring
    def lower(self, ctx: Any, eqn: Any) -> None:
      p = eqn.params
      window = tuple(int(v) for v in p["window_dimensions"])
      rank = len(window)
      strides = tuple(int(v) for v in p.get("window_strides") or (1,) * rank)
      pads = tuple(tuple(int(v) for v in pair) for pair in p.get("padding") or ((0, 0),) * rank)
      base_dil = tuple(int(v) for v in p.get("base_dilation") or (1,) * rank)
      dil = tuple(int(v) for v in p.get("window_dilation") or (1,) * rank)
      pooled = [a for a in range(rank) if (window[a], strides[a], pads[a], dil[a]) !=
                (1, 1, (0, 0), 1)]
      kept = [a for a in range(rank) if a not in pooled]
      x_var, (y_var,) = eqn.invars[0], eqn.outvars
      dtype = np.dtype(x_var.aval.dtype)
      if (len(kept) != 2 or not 1 <= len(pooled) <= 3 or any(d != 1 for d in base_dil)
          or any(v < 0 for pair in pads for v in pair) or dtype not in self._MAXPOOL_DTYPES):
        return super().lower(ctx, eqn)
      perm = kept + pooled
      inverse = [perm.index(a) for a in range(rank)]
      x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("jtl_maxpool_in"))
      y_spec = ctx.get_value_for_var(y_var, name_hint=ctx.fresh_name("jtl_maxpool_out"))
      label = _ir_shapes._dim_label_from_value_or_aval  # pylint: disable=protected-access
      x_dims = [label(x, x_var.aval.shape, a) for a in range(rank)]
      y_dims = [x_dims[a] if a in kept else int(y_var.aval.shape[a]) for a in range(rank)]

      def stamp(value: Any, dims: Sequence[Any]) -> Any:
        value.type = x.type
        _ir_shapes._stamp_type_and_shape(value, dims)  # pylint: disable=protected-access
        _ir_shapes._ensure_value_metadata(ctx, value)  # pylint: disable=protected-access
        return value

      b = ctx.builder
      nc = stamp(b.Transpose(x, _outputs=[ctx.fresh_name("jtl_maxpool_nchw")], perm=perm),
                 [x_dims[a] for a in perm])
      kwargs: dict[str, Any] = {"kernel_shape": [window[a] for a in pooled],
                                "strides": [strides[a] for a in pooled]}
      if any(pads[a] != (0, 0) for a in pooled):
        kwargs["pads"] = [pads[a][0] for a in pooled] + [pads[a][1] for a in pooled]
      if any(dil[a] != 1 for a in pooled):
        kwargs["dilations"] = [dil[a] for a in pooled]
      pooled_value = stamp(b.MaxPool(nc, _outputs=[ctx.fresh_name("jtl_maxpool")], **kwargs),
                           [y_dims[a] for a in perm])
      out = stamp(b.Transpose(pooled_value, _outputs=[getattr(y_spec, "name", None)
                                                      or ctx.fresh_name("jtl_maxpool_out")],
                              perm=inverse), y_dims)
      ctx.bind_value_for_var(y_var, out)

  old = plugin_system.PLUGIN_REGISTRY[reduce_window_max.jax.lax.reduce_window_max_p.name]
  plugin = JtlReduceWindowMax()
  plugin.primitive, plugin.metadata = old.primitive, old.metadata
  return plugin


@contextlib.contextmanager
def _jtl_onnx_plugins(plugin_system: Any):
  """jax2onnx's plugin registry with jtl's pooling fixes, restored on exit."""
  registry = plugin_system.PLUGIN_REGISTRY
  name = lax.reduce_window_max_p.name
  saved = {k: registry[k] for k in (*_UNPATCHED_ONNX_PLUGINS, name) if k in registry}
  try:
    if name in registry:
      registry[name] = _max_pool_lowering(plugin_system)
    for k in _UNPATCHED_ONNX_PLUGINS:
      registry.pop(k, None)
    yield registry
  finally:
    for k in _UNPATCHED_ONNX_PLUGINS:
      registry.pop(k, None)
    registry.update(saved)


TOKEN_INPUTS = ("input_ids", "attention_mask")


def _examples(input_shape: Sequence[int], token_inputs: bool) -> list[Any]:
  """The example inputs of `fn` at batch 1: one float32 image batch, or int32
  token ids and attention mask."""
  dtype, count = (jnp.int32, len(TOKEN_INPUTS)) if token_inputs else (jnp.float32, 1)
  return [jax.ShapeDtypeStruct((1, *input_shape), dtype) for _ in range(count)]


def export_onnx(fn: Callable[..., jax.Array], path: str | os.PathLike, *,
                input_shape: Sequence[int], name: str = "jtl_model",
                token_inputs: bool = False) -> None:
  """Writes `fn` as a float32 ONNX model with a dynamic batch dimension.

  With `token_inputs`, the inputs are int32 "input_ids" and "attention_mask"
  [B, L], `input_shape` = (L,): the batch is dynamic, the length fixed (pad
  to it; jax2onnx 0.17 cannot trace BERT's position embeddings over a symbolic
  length).

  Raises:
    ExportError: `fn` uses an op jax2onnx has no lowering for (named with its
      layer), or the conversion fails.
  """
  to_onnx, plugin_system = _jax2onnx()
  missing = [u for u in find_ops(fn, *_examples(input_shape, token_inputs))
             if u.op not in plugin_system.PLUGIN_REGISTRY]
  if missing:
    raise ExportError(
        f"Cannot export to ONNX: jax2onnx has no lowering for these ops of the model:\n"
        f"{bullet_list(missing)}\nReplace the op in that layer, or export to another format.")
  try:
    # jax2onnx's flax plugins broadcast biases by rank promotion.
    with (_quiet_logger("jax2onnx"), _quiet_logger("onnx_ir"),
          jax.numpy_rank_promotion("allow"), _jtl_onnx_plugins(plugin_system)):
      if token_inputs:
        (b,) = jax.export.symbolic_shape("B")
        specs = [jax.ShapeDtypeStruct((b, *input_shape), jnp.int32) for _ in TOKEN_INPUTS]
        proto = to_onnx(fn, specs, return_mode="proto", model_name=name,
                        input_names=list(TOKEN_INPUTS))
      else:
        proto = to_onnx(fn, [("B", *input_shape)], return_mode="proto", model_name=name)
  except Exception as e:  # any converter failure, reported with its cause
    raise ExportError(f"jax2onnx failed to convert the model: {type(e).__name__}: "
                      f"{str(e)[:2000]}") from e
  # jax2onnx leaves stale NHWC shape annotations on tensors it moved to NCHW;
  # onnxruntime infers them again without the mismatch warnings.
  del proto.graph.value_info[:]
  write_atomic(path, proto.SerializeToString())


# --------------------------------------------------------------------------
# LiteRT / TFLite.


def _tf():
  from jtl.data import sources  # pylint: disable=g-import-not-at-top
  return sources.host_tf()  # TensorFlow with its GPUs hidden, as jtl's pipeline has it


_TFLITE_ALIASES = {"countleadingzeros": "clz", "populationcount": "population_count"}


def _op_key(name: str) -> str:
  """'tf.PopulationCount' / 'vhlo.fft_v1' / 'population_count' -> a comparable key."""
  name = re.sub(r"_v\d+$", "", name.split(".")[-1])
  name = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()
  key = name.replace("_", "")
  return _TFLITE_ALIASES.get(key, name).replace("_", "")


MAX_INT8_SCALE = 1e6  # a tensor spanning more than 2.5e8: -inf padding, a finfo.min mask, ...


def unresolvable_int8_tensors(model: bytes | str | os.PathLike) -> list[str]:
  """'op OP: tensor NAME (scale S)' for every quantized tensor of a LiteRT
  model whose scale is not finite, zero, or above MAX_INT8_SCALE (read
  without allocating: the runtime aborts while preparing such ops)."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    Interpreter = _tf().lite.Interpreter
  if isinstance(model, bytes):
    it = Interpreter(model_content=model)
  else:
    it = Interpreter(model_path=os.fspath(model))
  bad: dict[int, str] = {}
  tensors = {t["index"]: t for t in it.get_tensor_details()}
  for op in it._get_ops_details():  # pylint: disable=protected-access
    for i in op["outputs"]:
      t = tensors.get(i)
      scales = np.asarray(t["quantization_parameters"]["scales"]) if t else np.zeros(0)
      if t is None or not scales.size or i in bad:
        continue
      worst = float(np.max(np.abs(scales))) if np.all(np.isfinite(scales)) else float("inf")
      if not np.isfinite(worst) or worst > MAX_INT8_SCALE or np.any(scales == 0):
        bad[i] = f"op {op['op_name']}: tensor {t['name']} (scale {worst:.3g})"
  return list(bad.values())


def _tflite_error(error: Exception, uses: Sequence[OpUse]) -> ExportError:
  """An ExportError naming the converter's failing ops and the layers that use them.

  The converter names TF/StableHLO ops (its MLIR diagnostics with jax's name
  stacks go to stderr); they are matched to the jaxpr's primitives by name.
  """
  text = str(error)
  ops = sorted(set(re.findall(r"'((?:tf|vhlo|stablehlo|mhlo|chlo|tfl)\.\w+)' op", text))
               | {f"tf.{o.strip()}" for o in re.findall(r"TF Select ops: ([\w, ]+)", text)
                  for o in o.split(",")})
  keys = {_op_key(o) for o in ops}
  found = [str(u) for u in uses if _op_key(u.op) in keys]
  if not ops:
    detail = f"  {text[-2000:]}"
  else:
    detail = bullet_list([f"converter ops without a TFLite builtin kernel: {', '.join(ops)}"]
                         + (found or ["(no layer of the model uses a jax op of that name; "
                                      "see the converter's log above)"]))
  return ExportError(f"The TFLite converter cannot convert the model "
                     f"({type(error).__name__}):\n{detail}\n"
                     "Replace the op in that layer, or export to ONNX.")


# Full-integer int8 calibrates one range per tensor and builds its kernels from
# them; two forms of a float graph break that, and are traced differently for
# "tflite_int8" (the float files keep the model's own form):
# - a max pool with explicit padding pads with -inf (PADV2): that tensor's range
#   is infinite, its scale 1e36, and the runtime refuses the graph (XNNPACK:
#   "failed to create XNNPACK runtime"; without it the pool reads garbage).
#   The padding is taken from the edge instead (`_edge_padded_max_pool`):
#   the same maximum, as every window holds an element of the input.
# - the exact (erf) GELU: jax writes it with `erfc`, which the converter expands
#   into a rational approximation whose divisions calibrate to ranges of 1e18
#   and more; LiteRT then aborts the process in the ADD kernel's Prepare
#   (QuantizeMultiplierSmallerThanOneExp). Traced as the tanh GELU instead, the
#   converter fuses it into LiteRT's GELU kernel (an int8 lookup table); the two
#   GELUs differ by at most 4.8e-4, far below int8's resolution.
TANH_GELU_MAX_DIFF = 4.8e-4


def _edge_padded_max_pool(x: jax.Array, **params: Any) -> jax.Array | None:
  """`reduce_window_max` with explicit padding as an edge pad + VALID window
  (equal results), or None when that is not exact (dilations, windows that
  could lie wholly in the padding)."""
  window, pads = params["window_dimensions"], params["padding"]
  if (not any(lo or hi for lo, hi in pads)
      or any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))
      or any(lo < 0 or hi < 0 or lo >= w or hi >= w for (lo, hi), w in zip(pads, window))):
    return None
  padded = jnp.pad(x, pads, mode="edge")
  return lax.reduce_window_max_p.bind(padded, **{**params,
                                                 "padding": tuple((0, 0) for _ in pads)})


_INLINED = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call")


def _masked_select(invals: list[Any], fills: list[float | None]) -> jax.Array | None:
  """`select_n(which, *cases)` where a case is a huge negative constant (an
  attention mask's `finfo.min` / -inf): that case becomes the smallest value
  of the other cases minus `MASK_MARGIN`, which a softmax still sends to 0
  (exp(-16) = 1e-7) while the tensor keeps a range int8 can resolve."""
  masked = [i for i, f in enumerate(fills) if f is not None and f <= -1e30]
  if not masked or len(masked) == len(fills):
    return None
  which, cases = invals[0], list(invals[1:])
  floor = min(jnp.min(c) for i, c in enumerate(cases) if i not in masked) - MASK_MARGIN
  for i in masked:
    cases[i] = jnp.broadcast_to(floor.astype(jnp.result_type(cases[i])), jnp.shape(cases[i]))
  return lax.select_n(which, *cases)


MASK_MARGIN = 16.0


def _eval_int8_form(jaxpr: Any, consts: Sequence[Any], *args: Any, record: list[str],
                    scalars: dict[Any, float] | None = None) -> list[Any]:
  """`jax.core.eval_jaxpr` with max pools (`_edge_padded_max_pool`) and
  attention masks (`_masked_select`) rewritten; jit and custom-derivative
  calls are inlined (inference needs no derivative). `scalars`: the vars known
  to hold one constant (a literal, broadcast or passed into a jit)."""
  from jax._src import source_info_util  # pylint: disable=g-import-not-at-top
  env: dict[Any, Any] = {}
  scalars = dict(scalars or {})

  def is_literal(v: Any) -> bool:
    return type(v).__name__ == "Literal"

  def read(v: Any) -> Any:
    return v.val if is_literal(v) else env[v]

  def scalar(v: Any) -> float | None:
    if is_literal(v):
      return float(v.val) if np.ndim(v.val) == 0 and np.isrealobj(v.val) else None
    return scalars.get(v)

  for v, val in zip(jaxpr.constvars, consts):
    env[v] = val
  for v, val in zip(jaxpr.invars, args):
    env[v] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if (name in ("broadcast_in_dim", "convert_element_type", "reshape", "copy")
        and scalar(eqn.invars[0]) is not None):
      scalars[eqn.outvars[0]] = scalar(eqn.invars[0])
    with source_info_util.user_context(eqn.source_info.traceback,
                                       name_stack=source_info_util.current_name_stack()
                                       + eqn.source_info.name_stack):
      out = None
      if name == lax.reduce_window_max_p.name:
        out = _edge_padded_max_pool(*invals, **eqn.params)
        if out is not None:
          record.append("max_pool")
      elif name == lax.select_n_p.name:
        out = _masked_select(invals, [scalar(v) for v in eqn.invars[1:]])
        if out is not None:
          record.append("mask")
      elif name in _INLINED:
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if sub is not None:
          inner = getattr(sub, "jaxpr", sub)
          known = {iv: scalar(ov) for iv, ov in zip(inner.invars, eqn.invars)
                   if scalar(ov) is not None}
          out = _eval_int8_form(inner, getattr(sub, "consts", ()), *invals, record=record,
                                scalars=known)
      if out is None:
        params = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = params if isinstance(params, tuple) else ((), params)  # jax < 0.8
        with eqn.ctx.manager:
          out = eqn.primitive.bind(*subfuns, *invals, **params)
    if eqn.primitive.multiple_results or name in _INLINED:
      for v, val in zip(eqn.outvars, out):
        env[v] = val
    else:
      env[eqn.outvars[0]] = out
  return [read(v) for v in jaxpr.outvars]


@contextlib.contextmanager
def _tanh_gelu(record: list[str]):
  """`jax.nn.gelu` (and flax's re-exports) in its tanh form while tracing;
  `record` gets one entry per exact GELU replaced."""
  import flax.linen.activation as flax_activation  # pylint: disable=g-import-not-at-top
  original = jax.nn.gelu

  def gelu(x: Any, approximate: bool = True) -> Any:
    if not approximate:
      record.append("gelu")
    return original(x, approximate=True)

  targets = [(jax.nn, "gelu"), (nn, "gelu"), (flax_activation, "gelu")]
  saved = [(mod, attr, getattr(mod, attr)) for mod, attr in targets]
  try:
    for mod, attr in targets:
      if getattr(mod, attr) is original:
        setattr(mod, attr, gelu)
    yield
  finally:
    for mod, attr, value in saved:
      setattr(mod, attr, value)


def int8_form(fn: Callable[[jax.Array], jax.Array], record: list[str] | None = None
              ) -> Callable[[jax.Array], jax.Array]:
  """`fn` in the form full-integer int8 can calibrate (see above): max pools
  padded from the edge, exact GELUs as tanh GELUs (listed in `record`)."""
  record = [] if record is None else record

  def wrapped(*args: jax.Array) -> jax.Array:
    with _tanh_gelu(record):
      closed = jax.make_jaxpr(fn)(*args)
    (out,) = _eval_int8_form(closed.jaxpr, closed.consts, *args, record=record)
    return out

  return wrapped


def export_tflite(fn: Callable[..., jax.Array], path: str | os.PathLike, *,
                  input_shape: Sequence[int],
                  representative: Iterable[Any] | None = None,
                  token_inputs: bool = False) -> dict[str, int]:
  """Writes `fn` as a LiteRT (.tflite) model (traced at batch 1; resizable).

  Args:
    fn: `fn(x) -> logits` (see `inference_fn`).
    path: the file to write.
    input_shape: the per-example input shape, e.g. (224, 224, 3).
    representative: None for float32; else single images [1, *input_shape]
      (a few hundred) that calibrate full-integer int8 post-training
      quantization (int8 weights and activations; float32 input and output);
      with `token_inputs`, (input_ids, attention_mask) pairs, [1, L] each.
    token_inputs: int32 "input_ids" and "attention_mask" [1, L] inputs
      (`input_shape` = (L,)) instead of one float32 image.

  Returns:
    for int8, what was traced in its int8 form (see `int8_form`), with counts:
    {"max_pool": pools padded from the edge, "gelu": exact GELUs as tanh}.

  Raises:
    ExportError: an op has no TFLite kernel (named with its layer), or the
      conversion fails.
  """
  tf = _tf()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  rewrites: list[str] = []
  try:
    # Traced at batch 1: with a symbolic batch every constant broadcast (BatchNorm,
    # ReLU6 bounds) becomes a dynamic BROADCAST_TO that the converter can neither
    # fold nor fuse into the convs (3x the ops, int8 error 20x larger). The file
    # still runs any batch: the runtime resizes its input (`Runtime`).
    converted = jax2tf.convert(int8_form(fn, rewrites) if representative is not None else fn,
                               with_gradient=False)
    if token_inputs:
      signature = [tf.TensorSpec([1, *input_shape], tf.int32, name=n) for n in TOKEN_INPUTS]
    else:
      signature = [tf.TensorSpec([1, *input_shape], tf.float32)]
    tf_fn = tf.function(converted, autograph=False, input_signature=signature)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [tf_fn.get_concrete_function()], tf_fn)
    if representative is not None:
      images = list(representative)
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      if token_inputs:
        converter.representative_dataset = lambda: ([np.asarray(a, np.int32) for a in x]
                                                     for x in images)
      else:
        converter.representative_dataset = lambda: ([np.asarray(x, np.float32)] for x in images)
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs.*")
      data = converter.convert()
  except Exception as e:  # converter errors come in many types
    raise _tflite_error(e, find_ops(fn, *_examples(input_shape, token_inputs))) from e
  if representative is not None:
    bad = unresolvable_int8_tensors(data)
    if bad:
      raise ExportError(
          "The int8 LiteRT model has tensors whose calibrated range int8 cannot hold "
          "(LiteRT would refuse or abort on them; the names carry the layer and op):\n"
          f"{bullet_list(bad[:8])}" + (f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else "")
          + "\nExport float32 (format='tflite' or 'onnx'), or replace that op.")
  write_atomic(path, data)
  return {k: rewrites.count(k) for k in sorted(set(rewrites))}


# --------------------------------------------------------------------------
# One entry point, files, runtimes.


def export(module: Any, variables: PyTree | None, path: str | os.PathLike, *, format: str,
           input_shape: Sequence[int] = (224, 224, 3),
           representative: Iterable[np.ndarray] | None = None,
           train_kwarg: str | None = "train", pixel_affine: tuple[Any, Any] | None = None,
           meta: dict[str, Any] | None = None, token_inputs: bool = False) -> Exported:
  """Exports a model in inference mode to ONNX or LiteRT (float32 or int8).

  Args:
    module, variables: the model (see `inference_fn`); the variables become
      constants of the file.
    path: the file to write; a JSON sidecar `<path>.json` records the meta.
    format: "onnx", "tflite" or "tflite_int8".
    input_shape: per-example input shape (the batch dimension is dynamic).
    representative: for "tflite_int8": calibration images, each
      [1, *input_shape] in the input contract (a few hundred).
    train_kwarg: the module's mode flag (see `inference_fn`).
    pixel_affine: fold the normalisation in (see `inference_fn`).
    meta: extra entries for the sidecar (model name, classes, ...).
    token_inputs: a text model (BERT / MiniLM): the file takes int32
      "input_ids" and "attention_mask" [batch, length] (`input_shape` =
      (length,), fixed: pad the tokens to it); see `inference_fn`.

  Raises:
    ConfigError: unknown format, or int8 without representative images.
    ExportError: the converter cannot convert the model (layer and op named).
  """
  if format not in FORMATS:
    raise ConfigError(f"format={format!r}: expected one of {FORMATS}.")
  if format == "tflite_int8" and representative is None:
    raise ConfigError("format='tflite_int8' needs representative images to calibrate "
                      "the int8 ranges (a few hundred from the training split).")
  if token_inputs and pixel_affine is not None:
    raise ConfigError("pixel_affine folds image normalisation in; a text model has none.")
  fn = inference_fn(module, variables, train_kwarg=train_kwarg, pixel_affine=pixel_affine,
                    token_inputs=token_inputs)
  extra: dict[str, Any] = {}
  if format == "onnx":
    export_onnx(fn, path, input_shape=input_shape, token_inputs=token_inputs)
  else:
    rewrites = export_tflite(fn, path, input_shape=input_shape, token_inputs=token_inputs,
                             representative=representative if format == "tflite_int8" else None)
    if format == "tflite_int8":
      extra["int8_form"] = {
          "max_pools_padded_from_the_edge": rewrites.get("max_pool", 0),
          "exact_gelus_as_tanh_gelu": rewrites.get("gelu", 0),
          "tanh_gelu_max_abs_diff": TANH_GELU_MAX_DIFF}
  if token_inputs:
    contract = ("int32 input_ids and attention_mask [batch, length] (the model's tokenizer; "
                "token_type_ids are zeros), padded to the length")
  elif pixel_affine is not None:
    contract = "float32 RGB 0..255, NHWC"
  else:
    contract = "float32 NHWC, normalised as the model's preprocessing (jtl's pipeline)"
  info = {"format": format, "input_shape": [None, *map(int, input_shape)],
          "inputs": list(TOKEN_INPUTS) if token_inputs else ["x"], "input": contract,
          "output": "float32 [batch, outputs] (logits, or the features of a model without head)",
          "input_pixels": pixel_affine is not None, **extra, **(meta or {})}
  write_meta(path, info)
  return Exported(os.fspath(path), format, os.path.getsize(path), tuple(input_shape), info)


def write_meta(path: str | os.PathLike, meta: dict[str, Any]) -> None:
  """Writes the JSON sidecar `<path>.json`."""
  write_atomic(os.fspath(path) + ".json", json.dumps(meta, indent=2).encode())


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON sidecar of an exported file, or {} when there is none."""
  side = os.fspath(path) + ".json"
  if not os.path.exists(side):
    return {}
  try:
    with open(side, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{side}: unreadable export sidecar ({e}).") from e


def format_of(path: str | os.PathLike) -> str:
  """"onnx", "tflite" or "tflite_int8", from the sidecar or the file name."""
  fmt = read_meta(path).get("format")
  if fmt in FORMATS:
    return fmt
  name = os.fspath(path).lower()
  if name.endswith(".onnx"):
    return "onnx"
  if name.endswith(".tflite"):
    return "tflite_int8" if "int8" in os.path.basename(name) else "tflite"
  raise ConfigError(f"{path}: cannot tell the format (expected a .onnx or .tflite file).")


class Runtime:
  """An exported file in its own runtime: `runtime(x) -> logits` (numpy).

  `x` is the image batch, or for a text model (`token_inputs`) the token dict
  {"input_ids", "attention_mask"} of int32 [batch, length] (a
  "token_type_ids" entry must be all zeros, as the file assumes).

  Attributes:
    format: "onnx", "tflite" or "tflite_int8" (from the sidecar / name).
    input_names: the file's inputs, in order ("x", or TOKEN_INPUTS).
    input_shape: the per-example shape of the first input (None: dynamic).
  """

  def __init__(self, path: str | os.PathLike, *, num_threads: int | None = None):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise CheckpointError(f"{self.path}: no such file; export it first "
                            "(scripts/convert.py --workdir ... --format ...).")
    self.format = format_of(self.path)
    try:
      if self.format == "onnx":
        self._init_onnx(num_threads)
      else:
        self._init_tflite(num_threads)
    except (ImportError, ConfigError):
      raise
    except Exception as e:  # a runtime's parse error
      raise CheckpointError(f"{self.path}: the {self.format} runtime cannot load it "
                            f"({type(e).__name__}: {e}).") from e

  def _init_onnx(self, num_threads: int | None) -> None:
    try:
      import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConfigError(f"Running ONNX needs onnxruntime ({e}): pip install onnxruntime") from e
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if num_threads:
      options.intra_op_num_threads = num_threads
      options.inter_op_num_threads = 1
    self._session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
    inputs = self._session.get_inputs()
    self._onnx_names = [i.name for i in inputs]
    self.input_names = self._onnx_names if len(inputs) > 1 else ["x"]
    self._dtypes = [np.int32 if "int32" in i.type else np.float32 for i in inputs]
    self.input_shape = tuple(int(d) if isinstance(d, int) else None for d in inputs[0].shape[1:])

  def _init_tflite(self, num_threads: int | None) -> None:
    try:
      from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    except ImportError:
      Interpreter = _tf().lite.Interpreter  # TensorFlow's own, deprecated
    self._interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
    details = self._interpreter.get_input_details()
    if len(details) > 1:  # token inputs: match the file's names ("serving_..._input_ids:0")
      by_name = {n: [d for d in details if n in d["name"]] for n in TOKEN_INPUTS}
      if sorted(len(v) for v in by_name.values()) != [1] * len(TOKEN_INPUTS):
        raise ConfigError(f"{self.path}: inputs {[d['name'] for d in details]} are not "
                          f"{TOKEN_INPUTS}.")
      details = [by_name[n][0] for n in TOKEN_INPUTS]
      self.input_names = list(TOKEN_INPUTS)
    else:
      self.input_names = ["x"]
    self._inputs = details
    self._dtypes = [np.dtype(d["dtype"]) if d["dtype"] == np.int32 else np.float32
                    for d in details]
    self._output = self._interpreter.get_output_details()[0]
    self.input_shape = tuple(int(d) for d in details[0]["shape_signature"][1:])
    self._batch = None
    self._batch_one_only = False  # set when the graph cannot be resized

  def _arrays(self, x: Any) -> list[np.ndarray]:
    if isinstance(x, Mapping):
      types = x.get("token_type_ids")
      if types is not None and np.any(np.asarray(types)):
        raise ConfigError(f"{self.path} assumes token_type_ids = 0 (one segment); got "
                          "non-zero token types.")
      missing = [n for n in self.input_names if n not in x]
      if missing:
        raise ConfigError(f"{self.path} takes inputs {self.input_names}; missing {missing}.")
      arrays = [x[n] for n in self.input_names]
    elif len(self.input_names) > 1:
      raise ConfigError(f"{self.path} takes a dict of {self.input_names}, got "
                        f"{type(x).__name__}.")
    else:
      arrays = [x]
    arrays = [np.ascontiguousarray(a, t) for a, t in zip(arrays, self._dtypes)]
    for a in arrays:
      if (a.ndim != len(self.input_shape) + 1 or a.shape[0] != arrays[0].shape[0]
          or any(d is not None and d != g for d, g in zip(self.input_shape, a.shape[1:]))):
        raise ConfigError(f"{self.path} takes inputs [batch, {self.input_shape}] "
                          f"(None: any), got {tuple(a.shape)}.")
    return arrays

  def __call__(self, x: Any) -> np.ndarray:
    arrays = self._arrays(x)
    if self.format == "onnx":
      return self._session.run(None, dict(zip(self._onnx_names, arrays)))[0]
    return self._run_tflite(arrays)

  def _run_tflite(self, arrays: list[np.ndarray]) -> np.ndarray:
    n = len(arrays[0])
    if self._batch_one_only and n != 1:
      return np.concatenate([self._run_tflite([a[i:i + 1] for a in arrays]) for i in range(n)])
    try:
      return self._invoke(arrays)
    except RuntimeError:
      if n == 1:
        raise
      # A graph with the traced batch (1) in a reshape (ViT's tokens) cannot
      # be resized: run it one example at a time.
      self._batch_one_only = True
      return self._run_tflite(arrays)

  def _invoke(self, arrays: list[np.ndarray]) -> np.ndarray:
    it = self._interpreter
    if self._batch != arrays[0].shape[0]:
      self._batch = None
      for a, detail in zip(arrays, self._inputs):
        it.resize_tensor_input(detail["index"], list(a.shape))
      it.allocate_tensors()
      self._batch = arrays[0].shape[0]
    for a, detail in zip(arrays, self._inputs):
      it.set_tensor(detail["index"], _quantize_input(a, detail))
    it.invoke()
    return _dequantize_output(it.get_tensor(self._output["index"]), self._output)


def _quantize_input(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
  if detail["dtype"] not in (np.int8, np.uint8, np.int16) or x.dtype == detail["dtype"]:
    return x
  scale, zero = detail["quantization"]
  info = np.iinfo(detail["dtype"])
  return np.clip(np.rint(x / scale + zero), info.min, info.max).astype(detail["dtype"])


def _dequantize_output(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
  if detail["dtype"] == np.float32:
    return y.copy()
  scale, zero = detail["quantization"]
  return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def load(path: str | os.PathLike, *, num_threads: int | None = None) -> Runtime:
  """Opens an exported file in its runtime; returns `predict(x) -> logits`."""
  return Runtime(path, num_threads=num_threads)


def tflite_tensor_types(path: str | os.PathLike) -> dict[str, list[str]]:
  """{op name: sorted dtypes of its inputs} of a LiteRT file: shows whether
  the conv and matmul kernels run in int8."""
  runtime = Runtime(path)
  it = runtime._interpreter  # pylint: disable=protected-access
  tensors = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
  types: dict[str, set[str]] = {}
  for op in it._get_ops_details():  # pylint: disable=protected-access
    types.setdefault(op["op_name"], set()).update(
        tensors[i] for i in op["inputs"] if i >= 0 and i in tensors)
  return {k: sorted(v) for k, v in sorted(types.items())}


# --------------------------------------------------------------------------
# The int8 calibration check.


def check_int8(float_fn: Callable[[np.ndarray], Any], int8_fn: Callable[[np.ndarray], Any],
               images: np.ndarray, labels: np.ndarray | None = None, *,
               max_drop: float = DEFAULT_MAX_ACCURACY_DROP,
               batch_size: int = 32) -> dict[str, Any]:
  """Compares an int8 model with its float32 original on calibration images.

  With labels, the check is accuracy (in points, 0..100); without, the
  agreement of int8's top-1 with float32's (float32 counts as 100). When int8
  is more than `max_drop` points below float32, a `QuantizationWarning` gives
  both numbers.

  >>> import warnings
  >>> x = np.eye(4, dtype=np.float32)
  >>> with warnings.catch_warnings(record=True) as w:
  ...   warnings.simplefilter("always")
  ...   r = check_int8(lambda v: v, lambda v: v[:, ::-1], x, np.arange(4))
  >>> r["float_accuracy"], r["int8_accuracy"], len(w)
  (100.0, 0.0, 1)
  """
  fl, q = [], []
  for i in range(0, len(images), batch_size):
    fl.append(np.asarray(float_fn(images[i:i + batch_size])).argmax(-1))
    q.append(np.asarray(int8_fn(images[i:i + batch_size])).argmax(-1))
  fl, q = np.concatenate(fl), np.concatenate(q)
  result: dict[str, Any] = {"count": int(len(fl)), "max_drop_points": float(max_drop),
                            "top1_agreement": float(100.0 * np.mean(fl == q))}
  if labels is not None:
    labels = np.asarray(labels)
    result["float_accuracy"] = float(100.0 * np.mean(fl == labels))
    result["int8_accuracy"] = float(100.0 * np.mean(q == labels))
    what, ref, got = "accuracy", result["float_accuracy"], result["int8_accuracy"]
  else:
    what, ref, got = "top-1 agreement with float32", 100.0, result["top1_agreement"]
  result["drop_points"] = float(ref - got)
  if ref - got > max_drop:
    warnings.warn(
        f"int8 model loses {ref - got:.2f} points on the calibration check "
        f"({len(fl)} images): float32 {what} {ref:.2f}%, int8 {got:.2f}% (threshold "
        f"{max_drop:.2f} points). Calibrate on more or more varied images, or deploy "
        "float32.", QuantizationWarning, stacklevel=2)
  return result
