"""Exported files at run time: their JSON sidecars, `load` into their runtime
(onnxruntime; ai-edge-litert or TensorFlow's interpreter), and the int8
calibration check."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jtl import _optional, paths
from jtl.errors import CheckpointError, ConfigError
from jtl.export.deploy import litert
from jtl.export.deploy.tracing import (
  DEFAULT_MAX_ACCURACY_DROP,
  FORMATS,
  TOKEN_INPUTS,
  QuantizationWarning,
)
from jtl.export.writers import write_atomic


def write_meta(path: str | os.PathLike, meta: dict[str, Any]) -> None:
  """Writes the JSON sidecar `<path>.json`."""
  write_atomic(os.fspath(path) + ".json", json.dumps(meta, indent=2).encode())


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON sidecar of an exported file, or {} when there is none."""
  side = paths.path(os.fspath(path) + ".json")
  if not side.exists():
    return {}
  try:
    return json.loads(side.read_text(encoding="utf-8"))
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
    if not paths.path(self.path).is_file():
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

  def _model(self) -> str | bytes:
    """The file's path, or its bytes when it lies in a bucket (`jtl.paths`)."""
    return paths.path(self.path).read_bytes() if paths.is_remote(self.path) else self.path

  def _init_onnx(self, num_threads: int | None) -> None:
    ort = _optional.require("onnxruntime", "Running ONNX files")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if num_threads:
      options.intra_op_num_threads = num_threads
      options.inter_op_num_threads = 1
    self._session = ort.InferenceSession(self._model(), options,
                                         providers=["CPUExecutionProvider"])
    inputs = self._session.get_inputs()
    self._onnx_names = [i.name for i in inputs]
    self.input_names = self._onnx_names if len(inputs) > 1 else ["x"]
    self._dtypes = [np.int32 if "int32" in i.type else np.float32 for i in inputs]
    self.input_shape = tuple(int(d) if isinstance(d, int) else None for d in inputs[0].shape[1:])

  def _init_tflite(self, num_threads: int | None) -> None:
    model = self._model()
    interpreter = litert._interpreter()
    self._interpreter = (interpreter(model_content=model, num_threads=num_threads)
                         if isinstance(model, bytes) else
                         interpreter(model_path=model, num_threads=num_threads))
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
      out = self._invoke(arrays)
    except RuntimeError:
      if n == 1:
        raise
      out = None
    if out is None or (n != 1 and out.shape[0] != n):
      # A graph with the traced batch (1) in a reshape (ViT's tokens, a
      # flatten) cannot be resized: it fails to prepare, or prepares and
      # answers for one example. Run it one example at a time.
      self._batch_one_only = True
      return self._run_tflite(arrays)
    return out

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
