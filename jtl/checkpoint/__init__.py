"""Pretrained checkpoints: read any format, merge into a model, export.

`read` returns a flat {name: numpy array} dict from Orbax, msgpack, npz,
safetensors or PyTorch files; `load_pretrained` puts those arrays into a
model's fresh variables and reports what it did; `export` writes params back
out; `resolve` and `register_source` name where checkpoints come from, including
the Hugging Face Hub ("hf://<owner>/<name>[@rev]/<file>", "hf-hub:<owner>/<name>",
see `jtl.checkpoint.hub`).
"""

from __future__ import annotations

import importlib
from typing import Any

from jtl.checkpoint import hub
from jtl.checkpoint.adapt import adapt_input_conv, resize_pos_embed
from jtl.checkpoint.hub import HubRef
from jtl.checkpoint.loading import Entry, LoadReport, load_pretrained
from jtl.checkpoint.readers import FORMATS, detect_format, read, tensor_names
from jtl.checkpoint.sources import (
  cache_dir,
  download,
  list_sources,
  register_source,
  resolve,
)
from jtl.checkpoint.writers import export

# The Orbax checkpoint manager (training state) is loaded, with orbax, on first
# use, so that reading and exporting checkpoints does not import orbax.
_MANAGER_NAMES = ("CheckpointManager", "restore_variables", "select_step")


def __getattr__(name: str) -> Any:
  if name in _MANAGER_NAMES:
    return getattr(importlib.import_module("jtl.checkpoint.manager"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_MANAGER_NAMES))
