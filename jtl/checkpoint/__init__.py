"""A run's own checkpoints: the Orbax manager (atomic saves, the best kept by
the metric in each step's meta, damaged steps skipped), what a checkpoint
folder holds (`layout`), variables read back without a manager (`restore`)
and the workdir lock.

Loaded with Orbax on first use, so that `import jtl` does not import it.
Pretrained weights come in through `jtl.weights`; exports go out through
`jtl.export`.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it, imported (with Orbax) on first use.
_LAZY = {
    "CheckpointManager": "jtl.checkpoint.manager",
    "restore_variables": "jtl.checkpoint.restore",
    "select_step": "jtl.checkpoint.layout",
}


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
