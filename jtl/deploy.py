"""Deployment: ONNX and LiteRT (TFLite) files, float32 and full-integer int8.

A fine-tuned model leaves jtl in the formats that deployment runtimes load:

- "onnx": float32 ONNX through `jax2onnx` (ONNX Runtime runs it);
- "tflite": float32 LiteRT / TFLite through `jax.experimental.jax2tf` and the
  TFLite converter that TensorFlow ships;
- "tflite_int8": full-integer int8 LiteRT (int8 weights and activations, real
  int8 kernels), post-training quantized with a representative dataset.

The input contract of every exported file is the input of the jtl model:
float32 NHWC `[batch, size, size, 3]`, already normalised as the zoo model's
`spec.normalize` preset says (what jtl's input pipeline yields), with a
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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jtl.checkpoint.writers import write_atomic
from jtl.errors import CheckpointError, ConfigError, JtlError, bullet_list

PyTree = Any
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
                 pixel_affine: tuple[Any, Any] | None = None) -> Callable[[jax.Array], jax.Array]:
  """`fn(x) -> logits` in inference mode, traced in converter-friendly form.

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

  def fn(x: jax.Array) -> jax.Array:
    if pixel_affine is not None:
      mul, add = (jnp.asarray(a, jnp.float32).reshape(1, 1, 1, -1) for a in pixel_affine)
      x = x * (mul / 255.0) + add
    with nn.intercept_methods(_plain_conv_interceptor):
      out, _ = model.apply(params, state, x, train=False, rng=None)
    return out.astype(jnp.float32)

  return fn


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  return list(jex_core.jaxprs_in_params(params))


def find_ops(fn: Callable[..., Any], example: Any) -> list[OpUse]:
  """Every primitive of `fn(example)` with the layer (name stack) it is in,
  nested jaxprs included (each (op, layer) once, in trace order)."""
  closed = jax.make_jaxpr(fn)(example)
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


def _jax2onnx() -> tuple[Callable[..., Any], set[str]]:
  """jax2onnx's `to_onnx` and the primitives it has a lowering for."""
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
  return to_onnx, set(plugin_system.PLUGIN_REGISTRY)


def export_onnx(fn: Callable[[jax.Array], jax.Array], path: str | os.PathLike, *,
                input_shape: Sequence[int], name: str = "jtl_model") -> None:
  """Writes `fn` as a float32 ONNX model with a dynamic batch dimension.

  Raises:
    ExportError: `fn` uses an op jax2onnx has no lowering for (named with its
      layer), or the conversion fails.
  """
  to_onnx, supported = _jax2onnx()
  example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  missing = [u for u in find_ops(fn, example) if u.op not in supported]
  if missing:
    raise ExportError(
        f"Cannot export to ONNX: jax2onnx has no lowering for these ops of the model:\n"
        f"{bullet_list(missing)}\nReplace the op in that layer, or export to another format.")
  try:
    # jax2onnx's flax plugins broadcast biases by rank promotion.
    with _quiet_logger("jax2onnx"), jax.numpy_rank_promotion("allow"):
      proto = to_onnx(fn, [("B", *input_shape)], return_mode="proto", model_name=name)
  except Exception as e:  # noqa: BLE001 - any converter failure, reported with its cause
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


def export_tflite(fn: Callable[[jax.Array], jax.Array], path: str | os.PathLike, *,
                  input_shape: Sequence[int],
                  representative: Iterable[np.ndarray] | None = None) -> None:
  """Writes `fn` as a LiteRT (.tflite) model (traced at batch 1; resizable).

  Args:
    fn: `fn(x) -> logits` (see `inference_fn`).
    path: the file to write.
    input_shape: the per-example input shape, e.g. (224, 224, 3).
    representative: None for float32; else single images [1, *input_shape]
      (a few hundred) that calibrate full-integer int8 post-training
      quantization (int8 weights and activations; float32 input and output).

  Raises:
    ExportError: an op has no TFLite kernel (named with its layer), or the
      conversion fails.
  """
  tf = _tf()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  try:
    # Traced at batch 1: with a symbolic batch every constant broadcast (BatchNorm,
    # ReLU6 bounds) becomes a dynamic BROADCAST_TO that the converter can neither
    # fold nor fuse into the convs (3x the ops, int8 error 20x larger). The file
    # still runs any batch: the runtime resizes its input (`Runtime`).
    converted = jax2tf.convert(fn, with_gradient=False)
    tf_fn = tf.function(converted, autograph=False,
                        input_signature=[tf.TensorSpec([1, *input_shape], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [tf_fn.get_concrete_function()], tf_fn)
    if representative is not None:
      images = list(representative)
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = lambda: ([np.asarray(x, np.float32)] for x in images)
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs.*")
      data = converter.convert()
  except Exception as e:  # noqa: BLE001 - converter errors come in many types
    raise _tflite_error(e, find_ops(fn, jax.ShapeDtypeStruct((1, *input_shape),
                                                            jnp.float32))) from e
  write_atomic(path, data)


# --------------------------------------------------------------------------
# One entry point, files, runtimes.


def export(module: Any, variables: PyTree | None, path: str | os.PathLike, *, format: str,
           input_shape: Sequence[int] = (224, 224, 3),
           representative: Iterable[np.ndarray] | None = None,
           train_kwarg: str | None = "train", pixel_affine: tuple[Any, Any] | None = None,
           meta: dict[str, Any] | None = None) -> Exported:
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

  Raises:
    ConfigError: unknown format, or int8 without representative images.
    ExportError: the converter cannot convert the model (layer and op named).
  """
  if format not in FORMATS:
    raise ConfigError(f"format={format!r}: expected one of {FORMATS}.")
  if format == "tflite_int8" and representative is None:
    raise ConfigError("format='tflite_int8' needs representative images to calibrate "
                      "the int8 ranges (a few hundred from the training split).")
  fn = inference_fn(module, variables, train_kwarg=train_kwarg, pixel_affine=pixel_affine)
  if format == "onnx":
    export_onnx(fn, path, input_shape=input_shape)
  else:
    export_tflite(fn, path, input_shape=input_shape,
                  representative=representative if format == "tflite_int8" else None)
  contract = ("float32 RGB 0..255, NHWC" if pixel_affine is not None
              else "float32 NHWC, normalised as the model's preprocessing (jtl's pipeline)")
  info = {"format": format, "input_shape": [None, *map(int, input_shape)],
          "input": contract, "output": "float32 logits [batch, classes]",
          "input_pixels": pixel_affine is not None, **(meta or {})}
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

  Attributes:
    format: "onnx", "tflite" or "tflite_int8" (from the sidecar / name).
    input_shape: the per-example input shape the file takes.
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
    except Exception as e:  # noqa: BLE001 - a runtime's parse error
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
    inp = self._session.get_inputs()[0]
    self._input_name = inp.name
    self.input_shape = tuple(int(d) for d in inp.shape[1:])

  def _init_tflite(self, num_threads: int | None) -> None:
    try:
      from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    except ImportError:
      Interpreter = _tf().lite.Interpreter  # noqa: N806 - TensorFlow's own, deprecated
    self._interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
    self._input = self._interpreter.get_input_details()[0]
    self._output = self._interpreter.get_output_details()[0]
    self.input_shape = tuple(int(d) for d in self._input["shape_signature"][1:])
    self._batch = None
    self._batch_one_only = False  # set when the graph cannot be resized

  def __call__(self, x: Any) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    if tuple(x.shape[1:]) != self.input_shape:
      raise ConfigError(f"{self.path} takes inputs [batch, {self.input_shape}], got "
                        f"{tuple(x.shape)}.")
    if self.format == "onnx":
      return self._session.run(None, {self._input_name: x})[0]
    if self._batch_one_only and len(x) != 1:
      return np.concatenate([self(x[i:i + 1]) for i in range(len(x))])
    try:
      return self._invoke(x)
    except RuntimeError:
      if len(x) == 1:
        raise
      # A graph with the traced batch (1) in a reshape (ViT's tokens) cannot
      # be resized: run it one example at a time.
      self._batch_one_only = True
      return self(x)

  def _invoke(self, x: np.ndarray) -> np.ndarray:
    it = self._interpreter
    if self._batch != x.shape[0]:
      self._batch = None
      it.resize_tensor_input(self._input["index"], list(x.shape))
      it.allocate_tensors()
      self._batch = x.shape[0]
    it.set_tensor(self._input["index"], _quantize_input(x, self._input))
    it.invoke()
    return _dequantize_output(it.get_tensor(self._output["index"]), self._output)


def _quantize_input(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
  if detail["dtype"] == np.float32:
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
