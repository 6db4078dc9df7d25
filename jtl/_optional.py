"""Optional dependencies: import one, or say which extra of jtl installs it.

`pip install jtl` installs the core (jax, flax, optax, orbax-checkpoint,
numpy, safetensors, msgpack, etils, tqdm): reading and writing weights, the
zoo, partitioning, the train step and `fit`. The rest are extras (see
pyproject.toml): "data" (TensorFlow, TFDS, pillow: `jtl.data` pipelines),
"hub" (huggingface_hub, tokenizers), "app" (scripts/, configs/, `jtl.app`:
ml-collections, matplotlib, tensorboardX, with data and hub), "deploy"
(ONNX / LiteRT), "gcs" (gcsfs: `gs://` workdirs and paths), "all".

>>> require("json", "a doctest").dumps([1])
'[1]'
>>> require("tensorboardX_not_here", "TensorBoard logs")
Traceback (most recent call last):
...
jtl.errors.MissingExtraError: TensorBoard logs: tensorboardX_not_here is not installed. Install it with `pip install tensorboardX_not_here`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from jtl.errors import MissingExtraError

# top-level module -> (what pip installs, how to install it)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorflow": ("TensorFlow", "pip install 'jtl[data]'"),
    "tensorflow_datasets": ("TensorFlow Datasets", "pip install 'jtl[data]'"),
    "PIL": ("pillow", "pip install 'jtl[data]'"),
    "huggingface_hub": ("huggingface_hub", "pip install 'jtl[hub]'"),
    "tokenizers": ("tokenizers", "pip install 'jtl[hub]'"),
    "ml_collections": ("ml-collections", "pip install 'jtl[app]'"),
    "matplotlib": ("matplotlib", "pip install 'jtl[app]'"),
    "tensorboardX": ("tensorboardX", "pip install 'jtl[app]'"),
    "gcsfs": ("gcsfs", "pip install 'jtl[gcs]'"),
    "onnx": ("onnx", "pip install 'jtl[deploy]'"),
    "onnx_ir": ("onnx-ir", "pip install 'jtl[deploy]'"),
    "onnxruntime": ("onnxruntime", "pip install 'jtl[deploy]'"),
    "ai_edge_litert": ("ai-edge-litert", "pip install 'jtl[deploy]'"),
    # Not an extra's requirement: its declared orbax pin would downgrade jtl's.
    "jax2onnx": ("jax2onnx", "pip install 'jtl[deploy]' && pip install --no-deps jax2onnx==0.17.1"),
}


def message(module: str, feature: str, extra: str | None = None) -> str:
  """'<feature>: <package> is not installed. Install it with `<command>`.'"""
  top = module.split(".")[0]
  name, how = PACKAGES.get(top, (top, f"pip install {top}"))
  if extra:
    how = f"pip install 'jtl[{extra}]'"
  return f"{feature}: {name} is not installed. Install it with `{how}`."


def require(module: str, feature: str, extra: str | None = None) -> ModuleType:
  """Imports `module`, or raises MissingExtraError naming the extra to install.

  Args:
    module: the module to import, e.g. "tensorflow_datasets" or "PIL.Image".
    feature: what needs it, the message's first words ("jtl.data's input pipelines").
    extra: the extra to name when it is not the package's usual one
      (TensorFlow for LiteRT export: "deploy").
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    missing = (e.name or "").split(".")[0]
    if missing and missing != module.split(".")[0]:
      raise  # the package is there but one of its own imports failed: not ours to rename
    raise MissingExtraError(message(module, feature, extra)) from e


def available(module: str) -> bool:
  """Whether `module` can be imported (found on the path; not imported)."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def check(feature: str, *modules: str) -> None:
  """Raises MissingExtraError for the first of `modules` that is not installed."""
  for module in modules:
    if not available(module):
      raise MissingExtraError(message(module, feature))
