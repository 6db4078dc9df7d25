"""jtl: transfer learning in JAX.

Load pretrained weights, split the params into frozen and trainable partitions
by rules, and fine-tune with pure, jit-compiled steps on every device.

The top level holds the path a user's code takes (create or load a model,
label its params, build the optimizer, state and step, fit, restore); the
rest lives in its module: `jtl.weights` (weights in), `jtl.export` (outputs),
`jtl.checkpoint` (a run's checkpoints), `jtl.partition`, `jtl.tree`,
`jtl.optim`, `jtl.parallel`, `jtl.steps` (the train step), `jtl.eval_steps`,
`jtl.losses`, `jtl.data`, `jtl.models`, `jtl.errors`, and the recipes under
`jtl.recipes` (`strategies`, `distill`, `domain`, `adversarial`).

`import jtl` imports neither TensorFlow nor TFDS: they are loaded when an input
pipeline is first built (`jtl.make_dataset`) or a TFDS dataset is read, and
Orbax when a training checkpoint is written or restored (`jtl.train`,
`jtl.CheckpointManager`). The model zoo, the weight readers and the input
pipelines load on first use too (`jtl.create`, `jtl.models`,
`jtl.load_pretrained`, `jtl.weights`, `jtl.data`).
"""

import importlib
from typing import Any

from jtl import checkpoint, errors, export, optim, parallel, partition, recipes
from jtl import eval_steps, losses, steps, tree
from jtl.adapter import FunctionModel, LinenModel, NnxModel, as_model, update_module
from jtl.batchnorm import recompute_batchnorm
from jtl.errors import JtlError
from jtl.optim import make_optimizer
from jtl.parallel import jit_eval_step, jit_train_step, make_mesh, place_state, shard_batch
from jtl.partition import label_params, summarize
from jtl.state import TrainState, create_train_state
from jtl.eval_steps import make_eval_step
from jtl.steps import make_train_step

__version__ = "0.1.0"

# Loaded on first use (name -> its module; None: the submodule itself), so
# that `import jtl` costs about what `import jax, flax` costs: the model zoo
# (every family's module) with `models` and `create`, the weight readers with
# `weights` and `load_pretrained`, the input pipelines with `data`;
# `make_dataset` brings TensorFlow, `train` and the checkpoint names Orbax.
_LAZY = {"models": None, "create": "jtl.models", "weights": None,
         "load_pretrained": "jtl.weights", "data": None, "make_dataset": "jtl.data",
         "CheckpointManager": "jtl.checkpoint", "restore_variables": "jtl.checkpoint",
         "train": None}


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  if _LAZY[name] is None:
    return importlib.import_module(f"{__name__}.{name}")
  return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
  # The public names only: not this file's own imports (importlib, Any) nor
  # the submodules that importing the package leaves as attributes.
  return sorted(__all__)

__all__ = [
    # modules
    "checkpoint", "data", "errors", "eval_steps", "export", "losses", "models", "optim",
    "parallel", "partition", "recipes", "steps", "train", "tree", "weights",
    # a model and its weights
    "create", "load_pretrained", "FunctionModel", "LinenModel", "NnxModel", "as_model",
    "update_module",
    # what trains, how, where
    "label_params", "summarize", "make_optimizer", "TrainState", "create_train_state",
    "make_train_step", "make_eval_step", "recompute_batchnorm",
    "make_mesh", "place_state", "shard_batch", "jit_train_step", "jit_eval_step", "make_dataset",
    # a run's checkpoints and errors
    "CheckpointManager", "restore_variables", "JtlError",
]
