"""Outputs: every way weights and models leave a run.

`write` puts params (or all variables) in npz, safetensors, msgpack or an Orbax
directory (every format `jtl.weights.read` takes). The submodules, loaded on
first use: `peft` (LoRA adapters written as PEFT folders), `peft_import`
(PEFT folders read into jtl params), `hf_export` (merged HF / timm layouts),
`serving` (a jax.export'ed predict function), `quantize` (int8 weights for
inference), `deploy` (ONNX and LiteRT files, and running them).
"""

from __future__ import annotations

import importlib
from typing import Any

from jtl.export.writers import write

_SUBMODULES = ("deploy", "hf_export", "hf_layout", "peft", "peft_import", "quantize", "serving",
               "writers")


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_SUBMODULES))

__all__ = ["write", *_SUBMODULES]
