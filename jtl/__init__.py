"""jtl: transfer learning in JAX.

Load pretrained weights, split the params into frozen and trainable partitions
by rules, and fine-tune with pure, jit-compiled steps on every device.

`import jtl` imports neither TensorFlow nor TFDS: they are loaded when an input
pipeline is first built (`jtl.make_dataset`) or a TFDS dataset is read, and
Orbax when a training checkpoint is written or restored (`jtl.train`,
`jtl.CheckpointManager`).
"""

import importlib
from typing import Any

# Subpackages, importable as jtl.checkpoint, jtl.data, jtl.models, jtl.train.
from jtl import checkpoint, data, models
from jtl.adapter import (
  FunctionModel,
  LinenModel,
  NnxModel,
  as_model,
  update_module,
  variables_of,
)
from jtl.batchnorm import recompute_batchnorm
from jtl.checkpoint import LoadReport, export, load_pretrained, read
from jtl.data import DatasetInfo, dataset_info, prefetch_to_device
from jtl.errors import (
  CheckpointError,
  ConfigError,
  DataError,
  DeviceError,
  DivergenceError,
  JtlError,
  LoadError,
  OptimizerError,
  PartitionError,
  StepError,
)
from jtl.models import CreatedModel, create
from jtl.optim import base_optimizer, make_optimizer, scale_by_tree, tree_bytes
from jtl.parallel import (
  batch_sharding,
  initialize_distributed,
  jit_eval_step,
  jit_train_step,
  make_mesh,
  place_state,
  pmap_train_step,
  replicate,
  shard_batch,
  shard_for_pmap,
  state_shardings,
  unreplicate,
)
from jtl.partition import (
  FROZEN,
  Summary,
  frozen_module_paths,
  is_frozen,
  label_params,
  merge,
  split,
  summarize,
  trainable_labels,
)
from jtl.recipes import adversarial, distill, domain, quantize, strategies
from jtl.state import TrainState, create_train_state
from jtl.steps import (
  cross_entropy_loss,
  frozen_batchnorm,
  make_eval_step,
  make_train_step,
  masked_mean,
  summarize_eval,
)
from jtl.tree import flatten, map_with_path, match_rules, unflatten

__version__ = "0.1.0"

# Loaded on first use, so that `import jtl` costs about what `import jax`
# costs: `make_dataset` brings TensorFlow, the others Orbax.
_LAZY = {"make_dataset": "jtl.data", "CheckpointManager": "jtl.checkpoint",
         "restore_variables": "jtl.checkpoint", "train": None}


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  if _LAZY[name] is None:
    return importlib.import_module(f"{__name__}.{name}")
  return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))

__all__ = [
    "CheckpointManager", "CreatedModel", "DatasetInfo", "LoadReport", "adversarial", "checkpoint",
    "create", "distill", "domain", "quantize",
    "data", "dataset_info", "export", "load_pretrained", "make_dataset", "models",
    "prefetch_to_device", "read", "recompute_batchnorm", "restore_variables", "strategies", "train",
    "CheckpointError", "ConfigError", "DataError", "DeviceError", "DivergenceError", "FROZEN",
    "FunctionModel", "JtlError", "LinenModel", "NnxModel", "as_model", "update_module",
    "variables_of",
    "LoadError", "OptimizerError", "PartitionError", "StepError", "Summary", "TrainState",
    "base_optimizer", "batch_sharding", "create_train_state", "cross_entropy_loss", "flatten",
    "frozen_batchnorm", "frozen_module_paths", "initialize_distributed", "is_frozen",
    "jit_eval_step", "jit_train_step", "label_params", "make_eval_step", "make_mesh",
    "make_optimizer", "make_train_step", "map_with_path", "masked_mean", "match_rules", "merge",
    "place_state", "pmap_train_step", "replicate", "scale_by_tree", "shard_batch",
    "shard_for_pmap", "split", "state_shardings", "summarize", "summarize_eval",
    "trainable_labels", "tree_bytes", "unflatten", "unreplicate",
]
