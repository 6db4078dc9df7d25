"""Input pipelines: TFDS datasets, image folders, arrays and text, as numpy batches.

Importing `jtl.data` imports neither TensorFlow nor TFDS. The names that need
them (`make_dataset`, `BatchIterator`, `NORMALIZE_PRESETS`, `get_normalizer`,
`builders`) are loaded on first use (PEP 562), and TensorFlow is imported,
with its GPUs hidden from it, when a pipeline is built or a TFDS dataset is
read. jtl's local TFDS builders (e.g. "jtl_mnist5k") are registered when a
TFDS source is first resolved, or by `import jtl.data.builders`.
"""

from __future__ import annotations

import importlib
from typing import Any

from jtl.data.device import prefetch_to_device
from jtl.data.sources import DatasetInfo, dataset_info, resolve_source
from jtl.data.text import load_tokenizer, rotten_tomatoes, tokenize

# name -> (module, attribute or None for the module itself); these import TF.
_LAZY = {
    "BatchIterator": ("jtl.data.pipeline", "BatchIterator"),
    "NORMALIZE_PRESETS": ("jtl.data.images", "PRESETS"),
    "builders": ("jtl.data.builders", None),
    "get_normalizer": ("jtl.data.images", "get_normalizer"),
    "make_dataset": ("jtl.data.pipeline", "make_dataset"),
}

__all__ = [
    "BatchIterator",
    "DatasetInfo",
    "NORMALIZE_PRESETS",
    "builders",
    "dataset_info",
    "get_normalizer",
    "load_tokenizer",
    "make_dataset",
    "prefetch_to_device",
    "resolve_source",
    "rotten_tomatoes",
    "tokenize",
]


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module, attr = _LAZY[name]
  value = importlib.import_module(module)
  return value if attr is None else getattr(value, attr)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
