"""A run's own checkpoints: the Orbax manager (atomic saves, the best kept by
the metric in each step's meta, damaged steps skipped) and the workdir lock.

Loaded with Orbax on first use, so that `import jtl` does not import it.
Pretrained weights come in through `jtl.weights`; exports go out through
`jtl.export`.
"""

from __future__ import annotations

import importlib
from typing import Any

_MANAGER_NAMES = ("CheckpointManager", "restore_variables", "select_step")


def __getattr__(name: str) -> Any:
  if name in _MANAGER_NAMES:
    return getattr(importlib.import_module("jtl.checkpoint.manager"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_MANAGER_NAMES))
