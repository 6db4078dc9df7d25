"""BatchNorm during fine-tuning: frozen whole, or statistics only.

A pretrained network's BatchNorm statistics describe its pretraining data.
Fine-tuning in training mode normalises with each batch's statistics and
moves the running averages slowly (momentum 0.99: 20 steps move them 18% of
the way), so after a short run the evaluated network (running averages) is
not the one that was trained (batch statistics). On small, shifted data
(8x8 digits upsampled to 128 px) that costs 47 points of accuracy
(BENCHMARKS.md, "Strategies: BatchNorm modes"). Two remedies, one option
(`strategy.freeze_batchnorm`):

- True: BatchNorm layers are frozen whole: stored statistics, and their
  scale and offset do not train (`batchnorm_rule`, a partition rule; the
  train step runs layers whose params are all frozen on stored statistics).
- "statistics": stored statistics, but scale and offset train
  (`FrozenStatistics`, a wrapper of a Linen module; `FrozenStatisticsModel`
  the same for any model jtl calls, an NNX module included). BitFit's
  default: its trainable params are mostly BatchNorm offsets and scales.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from jtl import adapter
from jtl import tree as jtree
from jtl.errors import ConfigError
from jtl.tree import PyTree


def batchnorm_paths(variables: PyTree, module: Any = None) -> tuple[str, ...]:
  """Module paths of the BatchNorm layers, sorted.

  Linen variables: the layers that hold `batch_stats`. NNX variables
  ({"params", "state"}, `jtl.adapter.variables_of`): with the NNX `module`
  (or its `NnxModel`), its `nnx.BatchNorm` layers (a Linen module inside
  `nnx.bridge.ToNNX`: its `nnx.BatchStat` statistics' layers, at their Linen
  paths); without it, the modules whose "state" holds both a `mean` and a
  `var`, the statistics of an `nnx.BatchNorm`. A Linen `module` is not
  read (its variables say which layers hold statistics).

  >>> batchnorm_paths({"params": {}, "batch_stats": {"b0": {"bn": {"mean": 0, "var": 1}}}})
  ('b0/bn',)
  >>> batchnorm_paths({"params": {}, "state": {"b0": {"bn": {"mean": 0, "var": 1}}}})
  ('b0/bn',)
  """
  if isinstance(module, adapter.NnxModel):
    own = module.variables
    module = module.merge(own["params"], own)
  if adapter.is_nnx_module(module):
    return tuple(sorted(_nnx_batchnorm_paths(module)))
  if not isinstance(variables, Mapping):
    return ()
  if variables.get("batch_stats"):
    modules = {p.rsplit("/", 1)[0] for p, _ in jtree.leaves_with_paths(variables["batch_stats"])}
    return tuple(sorted(modules))
  leaves: dict[str, set[str]] = {}
  for path, _ in jtree.leaves_with_paths(variables.get("state") or {}):
    if "/" in path:
      parent, name = path.rsplit("/", 1)
      leaves.setdefault(parent, set()).add(name)
  return tuple(sorted(m for m, names in leaves.items() if {"mean", "var"} <= names))


def _nnx_batchnorm_paths(module: Any) -> set[str]:
  """The NNX `module`'s `nnx.BatchNorm` layers, and the Linen layers with
  statistics inside its `nnx.bridge.ToNNX` modules (the zoo's api="nnx")."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  found: set[str] = set()
  for path, sub in nnx.iter_modules(module):
    prefix = "/".join(map(str, path))
    if isinstance(sub, nnx.BatchNorm):
      found.add(prefix)
    elif isinstance(sub, nnx.bridge.ToNNX):
      stats = nnx.to_pure_dict(nnx.state(sub, nnx.BatchStat))
      found |= {"/".join(filter(None, (prefix, p.rsplit("/", 1)[0])))
                for p, _ in jtree.leaves_with_paths(stats) if "/" in p}
  return found


def batchnorm_rule(variables: PyTree, module: Any = None) -> tuple[str, None] | None:
  """A rule freezing every BatchNorm layer's params (None when the model has
  none); the layers are `batchnorm_paths(variables, module)`'s.

  >>> batchnorm_rule({"params": {}, "batch_stats": {"b0": {"bn": {"mean": 0, "var": 1}}}})
  ('(b0/bn)/.*', None)
  """
  paths = batchnorm_paths(variables, module)
  if not paths:
    return None
  return ("(" + "|".join(re.escape(m) for m in paths) + ")/.*", None)


class FrozenStatistics:
  """Wraps a Flax Linen module so that its BatchNorm layers at `paths` use
  their stored statistics in training too (and do not update them), while
  their scale and offset may train.

  Like `LoraModel`, it stands in for the module wherever jtl calls
  `module.apply(...)`; other attributes (`features`, ...) pass through.

  Example:
    module = FrozenStatistics(module, batchnorm_paths(variables))
    step = jtl.make_train_step(module, tx, labels=labels)
  """

  def __init__(self, base: Any, paths: Iterable[str]):
    if adapter.is_nnx_module(base) or getattr(base, "jtl_adapter", False):
      raise ConfigError(f"FrozenStatistics wraps a Linen module; got a {type(base).__name__}: "
                        "use FrozenStatisticsModel(model, paths) for an NNX module or an "
                        "adapter.")
    self.base = base
    self.paths = frozenset(paths)

  def apply(self, variables: PyTree, *args: Any, **kwargs: Any) -> Any:
    with adapter.frozen_batchnorm(self.paths):
      return self.base.apply(variables, *args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name == "base":  # not set yet (copy, unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.base, name)

  def __repr__(self) -> str:
    return f"FrozenStatistics({len(self.paths)} layers, base={type(self.base).__name__})"


class FrozenStatisticsModel:
  """`FrozenStatistics` for any model jtl calls (`jtl.adapter.as_model`): an
  NNX module (`jtl.models.create(..., api="nnx")`'s `nnx.bridge.ToNNX`
  around a Linen module, or an own NNX model), a `LinenModel`, `LoraWeights`.

  A jtl adapter: in training its BatchNorm layers at `paths` join the step's
  `frozen_paths`, the layers the core runs on their stored statistics (for
  NNX on the merged copy being traced; nothing global is patched), so the
  statistics stay bit-identical while scale and offset may train.

  Example:
    model = FrozenStatisticsModel(nnx_model, batchnorm_paths(variables, nnx_model))
    step = jtl.make_train_step(model, tx, labels=labels)
  """
  jtl_adapter = True

  def __init__(self, model: Any, paths: Iterable[str]):
    self.model = adapter.as_model(model)
    if isinstance(self.model, adapter.FunctionModel):
      raise ConfigError("FrozenStatisticsModel: an apply function has no BatchNorm layers "
                        "jtl can address; wrap a Linen or NNX module.")
    self.paths = frozenset(paths)

  def apply(self, params: PyTree, model_state: dict[str, PyTree], inputs: Any, *, train: bool,
            rng: jax.Array | None, frozen_paths: frozenset[str] = frozenset()
            ) -> tuple[Any, dict[str, PyTree]]:
    return self.model.apply(params, model_state, inputs, train=train, rng=rng,
                            frozen_paths=frozenset(frozen_paths) | self.paths)

  def __repr__(self) -> str:
    return f"FrozenStatisticsModel({len(self.paths)} layers, model={type(self.model).__name__})"
