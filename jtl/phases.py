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

import jax
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


# optax states whose `count` is the position in a learning-rate schedule.
_SCHEDULE_STATES = ("ScaleByScheduleState", "InjectHyperparamsState",
                    "InjectStatefulHyperparamsState", "WrappedScheduleState")


def _is_state(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(x, "_fields")


def _roles(tree: Any, prefix: str = "", owner: tuple[str, str] = ("", ""), rel: str = ""
           ) -> dict[str, tuple[str, str, str]]:
  """{path: (state type, field, path below the field)} of every optimizer
  state leaf: what a leaf is ("ScaleByAdamState", "mu", "head/kernel"),
  whatever chain or partition index the optimizer puts it under."""
  join = lambda a, b: f"{a}/{b}" if a and b else a or b  # noqa: E731
  if _is_state(tree):
    out = {}
    for field in tree._fields:
      out.update(_roles(getattr(tree, field), join(prefix, field), (type(tree).__name__, field)))
    return out
  out = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree
                                                 and _is_state(x))
  for key_path, leaf in flat:
    name = jtree.path_name(key_path)
    if _is_state(leaf):
      out.update(_roles(leaf, join(prefix, name), owner, join(rel, name)))
    else:
      out[join(prefix, name)] = (*owner, join(rel, name))
  return out


def transfer_opt_state(old: optax.OptState, new: optax.OptState, step: int | None = None
                       ) -> optax.OptState:
  """`new` (a fresh `tx.init` of the new partition) with the state of every
  leaf that stays trainable carried over from `old`.

  A leaf is matched by what it is: its optax state type and field and the
  param path below it ("ScaleByAdamState", "mu", "head/kernel"; or the step
  count), with the same shape and dtype, wherever the two optimizers put it
  (a clip or per-label learning rates added in one phase shift the chain
  indices). So moments and step counts carry over; a newly trainable leaf
  keeps its fresh state; and a schedule's count that `old` lacks (a
  constant-rate probe before a schedule) is set to `step`, so the schedule
  continues at the run's step.

  >>> import jax.numpy as jnp
  >>> params = {"head": jnp.ones(2)}
  >>> old = optax.adam(0.1).init(params)
  >>> new = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)).init(params)
  >>> old = old[0]._replace(count=jnp.int32(5), mu={"head": jnp.full(2, 0.5)}), old[1]
  >>> out = transfer_opt_state(old, new)
  >>> int(out[1][0].count), out[1][0].mu["head"].tolist()
  (5, [0.5, 0.5])
  """
  old_flat, old_roles, new_roles = jtree.flatten(old), _roles(old), _roles(new)
  by_role: dict[tuple[str, str, str], list[Any]] = {}
  for path, role in old_roles.items():
    by_role.setdefault(role, []).append(old_flat[path])

  def fits(prev: Any, leaf: Any) -> bool:
    return np.shape(prev) == np.shape(leaf) and _dtype(prev) == _dtype(leaf)

  def pick(path: str, leaf: Any) -> Any:
    role = new_roles.get(path)
    prev = old_flat.get(path)
    if prev is not None and old_roles.get(path) == role and fits(prev, leaf):
      return prev
    found = [x for x in by_role.get(role, []) if fits(x, leaf)]
    if found and all(np.array_equal(x, found[0]) for x in found[1:]):
      return found[0]  # one leaf of that role, or several equal ones (step counts)
    if step is not None and role and role[0] in _SCHEDULE_STATES and role[1] == "count":
      return np.asarray(step, _dtype(leaf))
    return leaf

  return jtree.map_with_path(pick, new)


def switch_phase(state: TrainState, labels: PyTree, tx: optax.GradientTransformation) -> TrainState:
  """Re-splits the params by `labels`; the optimizer state carries over, and
  so does the weight EMA (a newly trainable leaf's average starts at its
  value, which it has kept while frozen: the EMA of the full params)."""
  trainable, frozen = partition.split(state.params, labels)
  opt_state = transfer_opt_state(state.opt_state, tx.init(trainable), int(state.step))
  ema = None if state.ema is None else partition.split(state.ema_params, labels)[0]
  return state.replace(trainable=trainable, frozen=frozen, opt_state=opt_state, ema=ema)
