"""LiteRT / TFLite files, float32 and full-integer int8 (through jax2tf and
TensorFlow's converter), and the int8 form of a traced model."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jtl import _optional
from jtl.data import sources
from jtl.errors import bullet_list
from jtl.export.deploy.tracing import TOKEN_INPUTS, ExportError, OpUse, _examples, find_ops
from jtl.export.writers import write_atomic


def _tf(feature: str = "LiteRT export") -> Any:
  # TensorFlow with its GPUs hidden, as jtl's pipeline has it.
  return sources.host_tf(feature, extra="deploy")


def _interpreter() -> Any:
  """ai-edge-litert's Interpreter class, or TensorFlow's (deprecated) without it."""
  if _optional.available("ai_edge_litert"):
    return _optional.require("ai_edge_litert.interpreter", "Running LiteRT files").Interpreter
  return _tf("Running LiteRT files (ai-edge-litert or TensorFlow)").lite.Interpreter


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
  Interpreter = _interpreter()  # noqa: N806
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
