"""Phased training: the trainable set changes at phase boundaries.

Gradual unfreezing (ULMFiT: the head first, then one more group from the top
per stage) and LP-FT (linear probe, then full fine-tuning) are lists of
`Phase`s, each with its own partition rules. At a boundary `switch_phase`
re-splits the params and builds the new optimizer state; `transfer_opt_state`
carries over the state of every leaf that stays trainable (moments, step
count), and newly trainable leaves start fresh. `train_phases` compiles the
train step once per phase.

>>> groups = [("stem", "stem/.*"), ("b0", "b0/.*"), ("b1", "b1/.*"), ("head", "head/.*")]
>>> [(p.start, p.name) for p in gradual_unfreezing_phases(groups, steps_per_stage=10)]
[(0, 'head'), (10, 'head+b1'), (20, 'head+b1+b0'), (30, 'head+b1+b0+stem')]
>>> [(p.start, p.name) for p in lp_ft_phases(groups, probe_steps=5)]
[(0, 'linear_probe'), (5, 'full')]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import optax

from jtl import losses, parallel, partition, steps
from jtl.errors import ConfigError, bullet_list
from jtl.phases import switch_phase, transfer_opt_state  # noqa: F401 (re-exported)
from jtl.recipes.strategies import rules as rules_lib
from jtl.state import TrainState, create_train_state
from jtl.tree import PyTree


@dataclasses.dataclass(frozen=True)
class Phase:
  """From step `start` on (steps done so far), train by `rules`; at the
  constant `learning_rate` when given (LP-FT's probe phase), else at the
  run's schedule."""
  start: int
  rules: tuple[tuple[str, str | None], ...]
  name: str = ""
  learning_rate: float | None = None


def _phase_tx(make_tx: Callable[..., Any], labels: PyTree, phase: Phase) -> Any:
  """`make_tx(labels)`, at the phase's own learning rate when it has one."""
  if phase.learning_rate is None:
    return make_tx(labels)
  try:
    return make_tx(labels, learning_rate=phase.learning_rate)
  except TypeError as e:
    if "learning_rate" not in str(e):
      raise
    raise ConfigError(
        f"Phase {phase.name or phase.start!r} trains at its own learning_rate="
        f"{phase.learning_rate}, but make_tx takes no learning_rate= ({e}); accept it, e.g. "
        "make_tx=lambda labels, learning_rate=1e-4: jtl.make_optimizer(labels, "
        "learning_rate=learning_rate).") from None


def check_phases(phases: Sequence[Phase]) -> None:
  """Raises ConfigError unless starts begin at 0 and strictly increase."""
  starts = [p.start for p in phases]
  if not phases or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
    raise ConfigError(f"Phase starts must begin at 0 and strictly increase; got {starts}.")


def phase_index(phases: Sequence[Phase], step: int) -> int:
  """Index of the phase that the step after `step` completed steps runs in."""
  return max(i for i, p in enumerate(phases) if p.start <= step)


def _count(value: Any) -> bool:
  """An int >= 1 (not a bool, not a float)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def lp_ft_phases(groups: rules_lib.Groups, probe_steps: int, *,
                 head: str | None = "head") -> tuple[Phase, ...]:
  """LP-FT (Kumar et al. 2022): the head alone for `probe_steps`, then all."""
  if not _count(probe_steps):
    raise ConfigError(f"probe_steps={probe_steps!r}: expected an int >= 1.")
  return (Phase(0, tuple(rules_lib.linear_probe_rules(groups, head=head)), "linear_probe"),
          Phase(probe_steps, tuple(rules_lib.full_rules(groups)), "full"))


def gradual_unfreezing_phases(groups: rules_lib.Groups, steps_per_stage: int, *,
                              head: str | None = "head", blocks_per_stage: int = 1,
                              max_blocks: int | None = None) -> tuple[Phase, ...]:
  """ULMFiT's gradual unfreezing: the head, then `blocks_per_stage` more groups
  from the top every `steps_per_stage` steps, up to `max_blocks` (default all)."""
  head = rules_lib.head_group(groups, head)
  below = len(groups) - 1
  max_blocks = below if max_blocks is None else max_blocks
  problems = [f"{k}={v!r} must be an int >= 1" for k, v in (
      ("steps_per_stage", steps_per_stage), ("blocks_per_stage", blocks_per_stage))
      if not _count(v)]
  if not 0 <= max_blocks <= below:
    problems.append(f"max_blocks={max_blocks} must be in 0..{below}: the model has {below} "
                    f"layer groups below the head ({', '.join(g for g, _ in groups if g != head)}"
                    "); lower it, or leave it None for all")
  if problems:
    raise ConfigError("gradual unfreezing: " + "; ".join(problems) + ".")
  phases, n = [], 0
  while True:
    names = rules_lib.top_groups(groups, n, head=head)
    phases.append(Phase(len(phases) * steps_per_stage,
                        tuple(rules_lib.group_rules(groups, names)),
                        "+".join([head] + names[:-1][::-1])))
    if n >= max_blocks:
      return tuple(phases)
    n = min(n + blocks_per_stage, max_blocks)


@dataclasses.dataclass
class PhasedResult:
  state: TrainState
  labels: PyTree
  losses: np.ndarray
  phase_starts: list[int]


def train_phases(module: Any, variables: PyTree, phases: Sequence[Phase],
                 make_tx: Callable[[PyTree], optax.GradientTransformation],
                 batches: Iterator[dict[str, Any]], num_steps: int, *,
                 mesh: jax.sharding.Mesh | None = None,
                 loss_fn: losses.LossFn = losses.cross_entropy_loss, seed: int = 0,
                 on_phase: Callable[[Phase, PyTree], None] | None = None) -> PhasedResult:
  """Trains through `phases` for `num_steps` steps, data parallel on `mesh`.

  Args:
    module, variables: the model and its (pretrained) variables.
    phases: from `lp_ft_phases`, `gradual_unfreezing_phases`, or one
      `Phase(0, rules)` for a fixed partition.
    make_tx: `make_tx(labels) -> tx` builds each phase's optimizer; a phase with
      its own `learning_rate` (LP-FT's probe) calls `make_tx(labels,
      learning_rate=rate)` (e.g. `functools.partial(jtl.make_optimizer, ...)`).
    batches: iterator of global numpy batches.
    on_phase: called with (phase, labels) at each phase start (e.g. to print
      `jtl.summarize(params, labels)`).

  Each phase jit-compiles its own train step once; the optimizer state of
  leaves trainable in consecutive phases carries over.
  """
  check_phases(phases)
  mesh = mesh or parallel.make_mesh()
  state, labels, losses, starts = None, None, [], []
  for i, phase in enumerate(phases):
    if phase.start >= num_steps:
      break
    end = phases[i + 1].start if i + 1 < len(phases) else num_steps
    end = min(end, num_steps)
    params = variables["params"] if state is None else state.params
    labels = partition.label_params(params, list(phase.rules), warn_unused=False)
    tx = _phase_tx(make_tx, labels, phase)
    if on_phase:
      on_phase(phase, labels)
    if state is None:
      state = create_train_state(variables, labels, tx, rng=seed, copy=False)  # placed next
    else:
      state = switch_phase(state, labels, tx)
    state = parallel.place_state(state, mesh)
    step = parallel.jit_train_step(
        steps.make_train_step(module, tx, labels=labels, loss_fn=loss_fn), mesh)
    phase_losses = []
    for _ in range(phase.start, end):
      state, metrics = step(state, parallel.shard_batch(next(batches), mesh))
      phase_losses.append(metrics["loss"])
    losses.extend(float(x) for x in jax.device_get(phase_losses))
    starts.append(phase.start)
  if state is None:
    raise ConfigError(f"num_steps={num_steps} leaves no step to train.")
  return PhasedResult(state, labels, np.asarray(losses), starts)


def describe(phases: Sequence[Phase]) -> str:
  """One line per phase: its start step and name."""
  return bullet_list([f"step {p.start}: {p.name or 'phase'}" for p in phases])
