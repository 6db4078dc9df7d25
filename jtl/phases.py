"""Phase boundaries: the partition and optimizer change during training.

A phase is (start_step, labels, tx). At a boundary `switch_phase` re-splits the
params by the new labels and builds the new optimizer state;
`transfer_opt_state` carries over the state of every leaf that stays
trainable (moments, step counts), and newly trainable leaves start fresh.
The fit loop (`jtl.train.fit`) and the strategies' schedules (LP-FT, gradual
unfreezing) both use these. A `SelfTrained` first phase trains by its own
means (the head on cached features) and `fit` checkpoints and evaluates it
like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import optax

from jtl import partition
from jtl import tree as jtree
from jtl.state import TrainState
from jtl.tree import PyTree


@dataclasses.dataclass(frozen=True)
class SelfTrained:
  """A first phase that trains itself, on a fresh start before step 1.

  `run(variables, stop_point)` returns (the trained variables, a row of
  train metrics) and calls `stop_point(when)` where it may stop (SIGTERM:
  `fit` raises `Preempted` there, nothing saved). The run then goes on from
  step `steps` (0: the phase is outside the run's step count, as LP-FT's
  probe; the run's num_steps: it is the whole run, as a cached linear probe)
  in the phase that runs there, with a fresh optimizer state.
  """
  run: Callable[[PyTree, Callable[[str], None]], tuple[PyTree, dict[str, float]]]
  steps: int


def _dtype(x: Any) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def transfer_opt_state(old: optax.OptState, new: optax.OptState) -> optax.OptState:
  """`new` (a fresh `tx.init` of the new partition) with every leaf that also
  exists in `old` at the same path, shape and dtype copied from `old`.

  Optimizer state leaves are keyed by the optimizer's structure followed by
  the param path ("0/mu/blocks_3/conv/kernel", "0/count"), so the moments of a
  leaf that stays trainable carry over, and so do step counts (the learning
  rate schedule continues); a newly trainable leaf keeps its fresh state.
  """
  old_flat = jtree.flatten(old)

  def pick(path: str, leaf: Any) -> Any:
    prev = old_flat.get(path)
    if (prev is not None and np.shape(prev) == np.shape(leaf)
        and _dtype(prev) == _dtype(leaf)):
      return prev
    return leaf

  return jtree.map_with_path(pick, new)


def switch_phase(state: TrainState, labels: PyTree, tx: optax.GradientTransformation) -> TrainState:
  """Re-splits the params by `labels`; the optimizer state carries over, and
  so does the weight EMA (a newly trainable leaf's average starts at its
  value, which it has kept while frozen: the EMA of the full params)."""
  trainable, frozen = partition.split(state.params, labels)
  opt_state = transfer_opt_state(state.opt_state, tx.init(trainable))
  ema = None if state.ema is None else partition.split(state.ema_params, labels)[0]
  return state.replace(trainable=trainable, frozen=frozen, opt_state=opt_state, ema=ema)
