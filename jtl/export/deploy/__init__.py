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
them, and they are needed only here: the "deploy" extra (onnx, onnx-ir,
onnxruntime, ai-edge-litert, TensorFlow for the LiteRT converter) and
jax2onnx, each named by the error when it is missing.

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

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jtl import paths
from jtl.errors import ConfigError
from jtl.export import writers
from jtl.export.deploy.litert import (
  TANH_GELU_MAX_DIFF,
  export_tflite,
  int8_form,
  unresolvable_int8_tensors,
)
from jtl.export.deploy.onnx_export import export_onnx
from jtl.export.deploy.runtime import (
  Runtime,
  check_int8,
  format_of,
  load,
  read_meta,
  tflite_tensor_types,
  write_meta,
)
from jtl.export.deploy.tracing import (
  DEFAULT_MAX_ACCURACY_DROP,
  FORMATS,
  SUFFIX,
  SUFFIX_FORMATS,
  TOKEN_INPUTS,
  ExportError,
  OpUse,
  QuantizationWarning,
  find_ops,
  inference_fn,
)
from jtl.tree import PyTree

__all__ = [
    "DEFAULT_MAX_ACCURACY_DROP", "FORMATS", "SUFFIX", "SUFFIX_FORMATS", "TANH_GELU_MAX_DIFF",
    "TOKEN_INPUTS", "ExportError", "Exported", "OpUse", "QuantizationWarning", "Runtime",
    "check_int8", "export", "export_onnx", "export_tflite", "find_ops", "format_of",
    "inference_fn", "int8_form", "load", "output_format", "read_meta", "tflite_tensor_types",
    "unresolvable_int8_tensors", "write_meta",
]


def output_format(path: str | os.PathLike,
                  format: str | None = None,  # pylint: disable=redefined-builtin
                  *, option: str = "format=") -> str:
  """The deployment format of the file `path`: `format`, else the one its name
  ends in (.onnx, .tflite, .int8.tflite: `SUFFIX_FORMATS`), checked as
  `jtl.export.writers.output_format` checks weight files: runtimes and
  readers go by the suffix, so ONNX bytes are never written under .tflite.

  >>> output_format("m.int8.tflite"), output_format("m.tflite", "tflite_int8")
  ('tflite_int8', 'tflite_int8')

  Raises:
    CheckpointError: a suffix that names no deployment format while `format`
      is not given, or one that names another format.
  """
  return writers.output_format(path, format, option=option, suffixes=SUFFIX_FORMATS,
                               formats=FORMATS)


@dataclasses.dataclass(frozen=True)
class Exported:
  """What `export` wrote: the file, its format and size, and its contract."""
  path: str
  format: str
  bytes: int
  input_shape: tuple[int, ...]
  meta: dict[str, Any]

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
    CheckpointError: a file name of another format (`output_format`).
    ExportError: the converter cannot convert the model (layer and op named).
  """
  if format not in FORMATS:
    raise ConfigError(f"format={format!r}: expected one of {FORMATS}.")
  output_format(path, format)  # before tracing: m.tflite holding ONNX bytes
  if format == "tflite_int8" and representative is None:
    raise ConfigError("format='tflite_int8' needs representative images to calibrate "
                      "the int8 ranges (a few hundred from the training split).")
  if token_inputs and pixel_affine is not None:
    raise ConfigError("pixel_affine folds image normalisation in; a text model has none.")
  fn = inference_fn(module, variables, train_kwarg=train_kwarg, pixel_affine=pixel_affine,
                    token_inputs=token_inputs)
  extra: dict[str, Any] = {}
  names = list(TOKEN_INPUTS) if token_inputs else ["x"]
  if format == "onnx":  # the names the file's graph has (what onnxruntime is fed by)
    names = export_onnx(fn, path, input_shape=input_shape, token_inputs=token_inputs)
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
          "inputs": names, "input": contract,
          "output": "float32 [batch, outputs] (logits, or the features of a model without head)",
          "input_pixels": pixel_affine is not None, **extra, **(meta or {})}
  write_meta(path, info)
  return Exported(os.fspath(path), format, paths.size(path), tuple(input_shape), info)

