"""A run's phases as `fit` runs them: which phase runs a step (`Phases`),
each phase's fresh state and compiled train step, the switch at a phase
start, the state a run starts from (its newest checkpoint or fresh), a
self-trained first phase, and precise BatchNorm recomputed per phase. The
phase switch itself (partition and optimizer state) is `jtl.phases`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtl import parallel, partition, steps
from jtl import phases as phases_lib
from jtl.batchnorm import make_recompute_batchnorm
from jtl.checkpoint.lock import Heartbeat
from jtl.checkpoint.manager import CheckpointManager
from jtl.preemption import StopRequests, preempted
from jtl.state import TrainState, create_train_state
from jtl.losses import Batch
from jtl.tree import PyTree


@dataclasses.dataclass(frozen=True)
class Phases:
  """(start_step, labels, tx) of each phase of a run, sorted by start step."""
  items: list[tuple[int, PyTree, optax.GradientTransformation]]

  def at(self, completed_steps: int) -> int:
    """The phase that runs the step after `completed_steps`."""
    return max(i for i, p in enumerate(self.items) if p[0] <= completed_steps)


def restore_or_fresh(mngr: CheckpointManager | None, phases: Phases,
                     fresh_state: Callable[[int], tuple[TrainState, PyTree]]) -> TrainState:
  """The newest intact checkpoint's state (restored into the phase that wrote
  it), or the fresh state of phase 0."""
  state = None
  if mngr is not None:
    # A checkpoint at step s was written by the phase that ran step s.
    state = mngr.restore_latest(lambda s: fresh_state(phases.at(s - 1) if s else 0))
  return state if state is not None else fresh_state(0)[0]


def enter_phase(state: TrainState, phase: tuple[int, PyTree, optax.GradientTransformation],
                compile_step: Callable, mesh: jax.sharding.Mesh) -> tuple[TrainState, Callable]:
  """(state, train step) of a new phase: its partition and optimizer, the
  optimizer state of leaves that stay trainable carried over."""
  _, labels, tx = phase
  state = parallel.place_state(phases_lib.switch_phase(state, labels, tx), mesh)
  return state, compile_step(labels, tx)


def batchnorm_refresher(module: Any, phases: Phases,
                        batches: Callable[[], Iterable[Batch]] | None, mesh: jax.sharding.Mesh
                        ) -> Callable[[TrainState, int], TrainState] | None:
  """`refresh(state, phase)`: the state with the statistics of every BatchNorm
  layer that trains in `phase` recomputed on one pass of `batches` (precise
  BN; each process passes its own rows, as for training), placed as before.
  Compiled once per phase. None without `batches`."""
  if batches is None:
    return None
  compiled: dict[int, Callable] = {}

  def place(new: Any, old: jax.Array) -> jax.Array:
    if isinstance(new, jax.Array) and new.sharding == old.sharding:  # not recomputed
      return new
    value = np.asarray(new, old.dtype)  # the same on every process
    return jax.make_array_from_callback(value.shape, old.sharding, lambda index: value[index])

  def refresh(state: TrainState, phase: int) -> TrainState:
    if phase not in compiled:
      compiled[phase] = make_recompute_batchnorm(
          module, skip=partition.frozen_module_paths(phases.items[phase][1], state.model_state),
          mesh=mesh)
    # With weight EMA, the statistics are those of the EMA weights: the model evaluated and saved.
    variables = compiled[phase](state.eval_variables, batches())
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return state.replace(model_state=jax.tree.map(place, model_state, state.model_state))
  return refresh


def compile_train_step(labels: PyTree, tx: optax.GradientTransformation, *, module: Any,
                       mesh: jax.sharding.Mesh, skip_nonfinite: bool,
                       **step_kwargs: Any) -> Callable:
  """The jitted train step of one phase (`steps.make_train_step`'s options)."""
  step = steps.make_train_step(module, tx, labels=labels, **step_kwargs)
  return parallel.jit_train_step(steps.skip_nonfinite(step) if skip_nonfinite else step, mesh)


def new_phase_state(variables: PyTree, phases: Phases, phase: int, start: PyTree | None = None,
                    step: int = 0, *, mesh: jax.sharding.Mesh, seed: int, ema: bool
                    ) -> tuple[TrainState, PyTree]:
  """The initial state of `phase` (from `start` variables at `step`, by
  default the given ones at 0) and its labels (what a restore fills)."""
  _, labels, tx = phases.items[phase]
  state = create_train_state(variables if start is None else start, labels, tx, rng=seed,
                             ema=ema, copy=False)  # place_state copies
  return parallel.place_state(state.replace(step=jnp.int32(step)) if step else state,
                              mesh), labels


def run_first_phase(first: phases_lib.SelfTrained, variables: PyTree, phases: Phases,
                    fresh_state: Callable[..., tuple[TrainState, PyTree]], stop: StopRequests,
                    workdir: Any, heartbeat: Heartbeat
                    ) -> tuple[TrainState, dict[str, float]]:
  """Runs a self-trained first phase: (the state of the phase that runs at
  its end, from its variables at step `first.steps`, and its metrics row).
  Its stop points beat `heartbeat`, as the step loop's batches do."""
  def stop_point(when: str) -> None:
    heartbeat.beat()
    if stop.reached(0):  # on every process (multi-host sync), as after each step
      raise preempted(stop, saved=None, when=when, workdir=workdir)

  trained, row = first.run(variables, stop_point)
  phase = phases.at(first.steps - 1) if first.steps else 0
  return fresh_state(phase, trained, first.steps)[0], row
