"""The fine-tuning loop: the one path from variables and data to a trained,
checkpointed, evaluated model. `scripts/finetune.py` is a shell over `fit`.

Every step is jit-compiled once and runs data parallel over all devices of
the mesh. The loop resumes from the workdir's latest checkpoint (state and
input position), logs to JSONL/TensorBoard/PNG, and measures how much of each
step's wall time is spent waiting for input.

Its parts: what `fit` refuses (`jtl.fit_checks`), its workdir and reports
(`jtl.fit_io`), the state and step of each of its phases (`jtl.fit_phases`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import optax
from absl import logging

from jtl import eval_steps, losses, parallel, steps
from jtl import phases as phases_lib
from jtl.checkpoint.lock import Heartbeat
from jtl.checkpoint.manager import CheckpointManager
from jtl.errors import ConfigError, Preempted, StepError, bullet_list
from jtl.fit_checks import (
  check_options,
  first_batch_checked,
  initial_variables,
  stop_if_diverged,
  trace_first_step,
)
from jtl.fit_io import open_run, progress_bar, report, LogWindow
from jtl.fit_phases import (
  batchnorm_refresher,
  compile_train_step,
  enter_phase,
  new_phase_state,
  Phases,
  restore_or_fresh,
  run_first_phase,
)
from jtl.metrics import MetricWriter
from jtl.preemption import StopRequests, preempted
from jtl.state import TrainState
from jtl.tree import PyTree

Batch = dict[str, Any]


@dataclasses.dataclass
class FitResult:
  state: TrainState
  eval_metrics: dict[str, float] | None
  start_step: int
  steps_per_second: float
  input_wait_fraction: float


def evaluate(eval_step: Callable, variables: PyTree, batches: Iterable[Batch],
             mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Sums eval-step results over `batches` and returns loss/accuracy/top-5.

  The per-batch sums stay on the device until the pass ends (no wait for the
  device per batch); they are added on the host in float64."""
  results = []
  for batch in batches:
    if mesh is not None:
      batch = parallel.shard_batch(batch, mesh)
    results.append(eval_step(variables, batch))
  total: dict[str, float] = {}
  for sums in jax.device_get(results):
    for k, v in sums.items():
      total[k] = total.get(k, 0.0) + float(v)
  if not total:
    return {"loss": float("nan"), "accuracy": float("nan"), "count": 0}
  return eval_steps.summarize_eval(total)


@dataclasses.dataclass(frozen=True)
class _Given:
  """What `fit`'s step loop is given once: fit's options, then (set by
  `_run` once the workdir is open) the manager, writer, eval step and bar."""
  phases: Phases
  compile_step: Callable[[PyTree, optax.GradientTransformation], Callable]
  mesh: jax.sharding.Mesh
  eval_batches: Callable[[], Iterable[Batch]] | None
  eval_every: int
  log_every: int
  on_log: Callable[[int, dict[str, float]], None] | None
  stop_on_nonfinite: bool
  save_eval_metrics: bool  # a best_metric picks the best checkpoint by them
  refresh_batchnorm: Callable[[TrainState, int], TrainState] | None
  meta: dict[str, Any]
  workdir: Any
  stop: StopRequests
  heartbeat: Heartbeat  # beaten at each batch read: the workdir's lock lapses without
  mngr: CheckpointManager | None = None
  writer: MetricWriter | None = None
  eval_step: Callable | None = None
  bar: Any = None


@dataclasses.dataclass
class _Loop:
  """The step loop of `fit`: what it is given, then what each step carries
  on to the next."""
  given: _Given
  state: TrainState
  phase: int
  train_step: Callable
  last_saved: int | None
  window: LogWindow = dataclasses.field(init=False)  # set by `run`
  unchecked: list[tuple[int, dict[str, jax.Array]]] = dataclasses.field(default_factory=list)
  eval_metrics: dict[str, float] | None = None

  def run(self, batches: Iterator[Batch], start_step: int, num_steps: int) -> None:
    """Steps start_step + 1 to num_steps, with their logs, evals and saves."""
    g = self.given
    self.window = LogWindow(start=time.perf_counter())
    ahead = None
    for step in range(start_step + 1, num_steps + 1):
      self._enter_phase_if_due(step)
      batch, batch_size = ahead or self._device_batch(batches, step, num_steps)
      self.state, metrics = self.train_step(self.state, batch)
      # The next batch is read and sent while this step computes, so that a
      # log, evaluation or save (which wait for the device) leaves it ready;
      # an error reading it is raised after this step's log, evaluation and save.
      ahead, failed = self._read_ahead(batches, step, num_steps)
      self.window.rows.append((step, metrics))
      self.unchecked.append((step, metrics))
      last = step == num_steps
      due_eval = g.eval_batches is not None and (
          (g.eval_every and step % g.eval_every == 0) or last)
      due_save = g.mngr is not None and (last or g.mngr.should_save(step))
      due_log = step % g.log_every == 0 or last
      if due_log or due_eval or due_save:
        self._check_finite()
        if g.mngr is not None:
          g.mngr.check_lock()  # nothing more is written by a run that lost its workdir
      if due_log:
        report(step, self.window.summary(batch_size), g.writer, g.on_log, g.bar)
      if g.bar:
        g.bar.update(1)
      if due_eval or due_save:
        self._evaluate_and_save(step, due_eval, due_save, last)
      if g.stop.reached(step):  # after every step, on every process (multi-host sync)
        self._save_and_stop(step, num_steps, batch_size)
      if failed is not None:
        raise failed

  def end_first_phase(self, step: int, row: dict[str, float], last: bool) -> None:
    """After a self-trained first phase: its metrics row logged at `step`;
    evaluated and saved there when that ends the run."""
    g = self.given
    if step:
      if g.writer:
        g.writer.write(step, "train", row)
      if g.on_log:
        g.on_log(step, row)
    if step and last:
      self._evaluate_and_save(step, g.eval_batches is not None, g.mngr is not None, last=True)

  def _save_and_stop(self, step: int, num_steps: int, batch_size: int) -> None:
    """After a stop request (SIGTERM, SIGINT): the train metrics since the
    last log line written, `step` saved synchronously and `Preempted` raised
    (`fit` then closes the writers and releases the lock). The state is
    saved as it stands (no precise-BatchNorm pass), so the resumed run
    continues exactly as an uninterrupted one."""
    g = self.given
    if self.window.rows:
      self._check_finite()
      report(step, self.window.summary(batch_size), g.writer, g.on_log, None)
    if g.mngr is not None:
      if self.last_saved != step and g.mngr.save(step, self.state, meta=g.meta, force=True):
        self.last_saved = step
      g.mngr.wait()
    raise _preempted(g.stop, self.last_saved if g.mngr else None, step, num_steps, g.workdir)

  def _evaluate_and_save(self, step: int, due_eval: bool, due_save: bool, last: bool) -> None:
    """Precise BatchNorm first (when asked), then the evaluation and the save:
    at a checkpoint step, or at any evaluation that beats the best kept
    checkpoint's best_metric (so the best is never an unsaved state)."""
    g = self.given
    if g.refresh_batchnorm is not None:
      self.state = g.refresh_batchnorm(self.state, self.phase)
    evaluated = self.evaluate(step) if due_eval else None
    metrics = evaluated if g.save_eval_metrics else None
    best = not due_save and g.mngr is not None and g.mngr.beats_best(metrics)
    if (due_save or best) and g.mngr.save(step, self.state, meta=g.meta, force=last or best,
                                          metrics=metrics):
      self.last_saved = step

  def evaluate(self, step: int) -> dict[str, float]:
    """Evaluates the current state, writes and logs the result, and keeps it
    as the latest eval metrics."""
    g = self.given
    result = evaluate(g.eval_step, self.state.eval_variables, g.eval_batches(), g.mesh)
    if g.writer:
      g.writer.write(step, "eval", result)
      g.writer.plot()
    logging.info("eval step %d: %s", step, result)
    self.eval_metrics = result
    return result

  def _enter_phase_if_due(self, step: int) -> None:
    g = self.given
    if g.phases.at(step - 1) != self.phase:
      self.phase = g.phases.at(step - 1)
      self.state, self.train_step = enter_phase(self.state, g.phases.items[self.phase],
                                                g.compile_step, g.mesh)
      logging.info("Phase %d from step %d", self.phase, step - 1)

  def _read_ahead(self, batches: Iterator[Batch], step: int, num_steps: int
                  ) -> tuple[tuple[Batch, int] | None, Exception | None]:
    """(the batch of step + 1 on the devices, None) or (None, the error that
    reading it raised); (None, None) after the last step."""
    if step >= num_steps:
      return None, None
    try:
      return self._device_batch(batches, step + 1, num_steps), None
    except Exception as e:  # noqa: BLE001 - raised by `run` once this step is logged and saved
      return None, e

  def _device_batch(self, batches: Iterator[Batch], step: int, num_steps: int
                    ) -> tuple[Batch, int]:
    """Step `step`'s batch on the mesh, and its global size (every process's
    rows: examples_per_second counts the whole run's)."""
    batch = parallel.shard_batch(self._next_batch(batches, step, num_steps), self.given.mesh)
    rows = batch["label"] if "label" in batch else jax.tree.leaves(batch)[0]  # a transform's
    return batch, int(rows.shape[0])

  def _next_batch(self, batches: Iterator[Batch], step: int, num_steps: int) -> Batch:
    """The next batch; the time spent waiting for it counts as input wait."""
    t0 = time.perf_counter()
    batch = next(batches, None)
    if batch is None:
      raise StepError(
          f"train_batches ran out before step {step} of num_steps={num_steps}: it must yield "
          "a batch for every step (repeat the data, e.g. itertools.cycle, or lower num_steps).")
    self.window.wait += time.perf_counter() - t0
    return batch

  def _check_finite(self) -> None:
    """Checks the steps since the last check for NaN/inf (on_nonfinite="stop"),
    before anything of the latest step is saved."""
    if self.given.stop_on_nonfinite and self.unchecked:
      fetched = jax.device_get(self.unchecked)
      # The log line reads the same values: fetched once, not again there.
      by_step = dict(fetched)
      self.window.rows = [(s, by_step.get(s, m)) for s, m in self.window.rows]
      stop_if_diverged(fetched, self.last_saved, self.given.workdir)
    self.unchecked = []


def _preempted(stop: StopRequests, saved: int | None, step: int, num_steps: int,
               workdir: Any) -> Preempted:
  """The error `fit` raises after stopping on a signal at `step`."""
  when = ("when training had finished" if step >= num_steps
          else f"after step {step} of {num_steps}")
  return preempted(stop, saved=saved, when=when, workdir=workdir)


def fit(*, module: Any, variables: PyTree | None, labels: PyTree, tx: optax.GradientTransformation,
        train_batches: Callable[[int], Iterator[Batch]], num_steps: int,
        workdir: str | os.PathLike | None = None,
        eval_batches: Callable[[], Iterable[Batch]] | None = None, eval_every: int = 0,
        checkpoint_every: int = 0, keep: int = 2, best_metric: str | None = "accuracy",
        mesh: jax.sharding.Mesh | None = None, loss_fn: losses.LossFn = losses.cross_entropy_loss,
        microbatches: int = 1, compute_dtype: Any = None, seed: int = 0,
        meta: dict[str, Any] | None = None, log_every: int = 10, progress: bool = True,
        async_checkpoints: bool = True, on_nonfinite: str = "stop",
        later_phases: Sequence[tuple[int, PyTree, optax.GradientTransformation]] = (),
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        batch_transform: steps.BatchTransform | None = None,
        batchnorm_batches: Callable[[], Iterable[Batch]] | None = None,
        stop_on_signals: bool = True, ema_decay: float | None = None,
        eval_output: Any = None, eval_fn: eval_steps.EvalFn | None = None,
        first_phase: phases_lib.SelfTrained | None = None,
        ) -> FitResult:
  """Fine-tunes `module` from `variables` for `num_steps` steps.

  Args:
    module, variables: the model (a Linen or NNX module, an apply function, or a
      `jtl.LinenModel`/`NnxModel`/`FunctionModel`) and its initial (pretrained)
      variables; None: an NNX module's own (`jtl.adapter.variables_of`).
    labels, tx: the partition labels and the optimizer (`make_optimizer`).
    train_batches, num_steps: `train_batches(start_step)` returns the iterator of global
      numpy batches from that step on (the input position on resume); total steps.
    workdir: checkpoints and metrics; resumes from its newest intact checkpoint; held
      with `<workdir>/jtl.lock` (a second run is refused; see `WorkdirLock`). None: no files.
    eval_batches, eval_every, checkpoint_every: `eval_batches()` returns one pass of
      padded, masked batches; evaluations and saves every so many steps (0: at the end).
    keep, best_metric: the last `keep` checkpoints stay, and the best evaluation (saved too).
    mesh: device mesh from `jtl.make_mesh` (default: all devices, data parallel).
    meta: JSON-able facts saved with each checkpoint ("model", "num_classes",
      "class_names", ...); resuming with different ones is refused.
    on_nonfinite: "stop": a NaN/inf loss or gradient norm raises a `DivergenceError`
      naming the step, before anything later is saved; "skip": such updates are
      not applied and the train metrics count them ("skipped", "skipped_total").
    later_phases: (start_step, labels, tx) of later phases (LP-FT, gradual unfreezing: a
      strategy's `Strategy.fit_phases`); a resumed run restores into the phase that saved.
    loss_fn, batch_transform, microbatches, compute_dtype: the train step's
      (`jtl.make_train_step`), e.g. a method's parts (`jtl.recipes.distill.distill_parts`).
    batchnorm_batches: precise BatchNorm: `batchnorm_batches()` gives one pass of
      unaugmented training batches (each process its rows, padding masked) on which
      the statistics of the BatchNorm layers that train in the current phase are
      recomputed before each evaluation and save (`jtl.recompute_batchnorm`).
    eval_output, eval_fn: what evaluation scores when the output is not the logits
      (`jtl.make_eval_step`); checked on the first training batch.
    stop_on_signals: SIGTERM/SIGINT save the step, raise `Preempted` (False: not).
    ema_decay: weight EMA (`TrainState.ema`, saved and resumed); evaluations, the
      best checkpoint and `restore_variables` use the EMA weights. None: off.
    first_phase: a `jtl.phases.SelfTrained` phase (e.g. `features.cached_head_phase`), run on a
      fresh start before step 1 (skipped on resume), logged, evaluated and saved at its `steps`.

  Raises:
    Preempted: after a SIGTERM or SIGINT, once the step is saved.
  """
  check_options(on_nonfinite=on_nonfinite, ema_decay=ema_decay, compute_dtype=compute_dtype,
                log_every=log_every, eval_batches=eval_batches, batchnorm_batches=batchnorm_batches)
  mesh = parallel.check_mesh(mesh or parallel.make_mesh())
  variables = initial_variables(module, variables, batchnorm_batches)
  heartbeat = Heartbeat()  # beaten by each batch read: see `WorkdirLock`
  eval_batches, batchnorm_batches = map(heartbeat.each_batch, (eval_batches, batchnorm_batches))
  phases = _phases(labels, tx, later_phases)
  compile_step = functools.partial(
      compile_train_step, module=module, mesh=mesh, skip_nonfinite=on_nonfinite == "skip",
      loss_fn=loss_fn, batch_transform=batch_transform, microbatches=microbatches,
      compute_dtype=compute_dtype, ema_decay=ema_decay)
  given = _Given(
      phases=phases, compile_step=compile_step, mesh=mesh, eval_batches=eval_batches,
      eval_every=eval_every, log_every=log_every, on_log=on_log,
      stop_on_nonfinite=on_nonfinite == "stop", save_eval_metrics=bool(best_metric),
      refresh_batchnorm=batchnorm_refresher(module, phases, batchnorm_batches, mesh),
      meta=dict(meta or {}), workdir=workdir, stop=StopRequests(), heartbeat=heartbeat)
  scoring = dict(eval_output=eval_output, eval_fn=eval_fn, compute_dtype=compute_dtype)
  return _run(given, functools.partial(eval_steps.make_eval_step, module, **scoring),
              functools.partial(eval_steps.output_classes, module, **scoring), train_batches,
              num_steps, variables=variables, seed=seed, ema=ema_decay is not None,
              first_phase=first_phase, stop_on_signals=stop_on_signals, progress=progress,
              save_every=checkpoint_every, keep=keep, async_save=async_checkpoints,
              best_metric=best_metric if eval_batches else None)


# Core names the recipe's helper in its advice only (no import: core never imports recipes).
_FIT_PHASES = ("A strategy's phases in this form: labels, tx, later_phases = "
               "strategy.fit_phases(learning_rate=...) (jtl.recipes.strategies.Strategy."
               "fit_phases), then fit(labels=labels, tx=tx, later_phases=later_phases)")


def _phases(labels: PyTree, tx: optax.GradientTransformation, later_phases: Any) -> Phases:
  """`fit`'s phases: (0, labels, tx) and `later_phases`, each a (start_step >= 1,
  labels, tx) triple, a tuple or list (else a ConfigError saying what each entry
  must be)."""
  if isinstance(later_phases, (str, bytes, Mapping)) or not isinstance(later_phases, Iterable):
    raise ConfigError(f"fit(later_phases={later_phases!r}): expected a sequence of "
                      f"(start_step, labels, tx) tuples. {_FIT_PHASES}.")
  later_phases = [tuple(p) if isinstance(p, list) else p for p in later_phases]
  problems = []
  for i, phase in enumerate(later_phases):
    if hasattr(phase, "rules") and hasattr(phase, "start"):  # a strategies.Phase
      problems.append(f"later_phases[{i}] is a strategy's Phase ({getattr(phase, 'name', '')!r} "
                      f"from step {phase.start}): rules, not labels and an optimizer")
    elif not (isinstance(phase, tuple) and len(phase) == 3):
      problems.append(f"later_phases[{i}] is {type(phase).__name__} {phase!r:.80}, not a "
                      "(start_step, labels, tx) tuple")
    elif not (isinstance(phase[0], numbers.Integral) and not isinstance(phase[0], bool)
              and phase[0] >= 1):
      problems.append(f"later_phases[{i}] starts at step {phase[0]!r}: expected an int >= 1 "
                      "(step 0 is the first phase's: fit's labels and tx)")
    elif not (hasattr(phase[2], "init") and hasattr(phase[2], "update")):
      problems.append(f"later_phases[{i}]'s tx is {type(phase[2]).__name__}, not an optax "
                      "GradientTransformation")
  starts = [p[0] for p in later_phases if isinstance(p, tuple) and len(p) == 3]
  if not problems and len(set(starts)) < len(starts):
    problems.append(f"later_phases start at steps {starts}: two phases at one step")
  if problems:
    raise ConfigError("fit(later_phases=...) takes (start_step, labels, tx) tuples:\n"
                      + bullet_list(problems) + f"\n{_FIT_PHASES}.")
  return Phases(sorted([(0, labels, tx), *later_phases], key=lambda p: p[0]))


def _run(given: _Given, make_eval_step: Callable[[], Callable],
         output_classes: Callable[..., int | None],
         train_batches: Callable[[int], Iterator[Batch]], num_steps: int, *, variables: PyTree,
         seed: int, ema: bool, first_phase: phases_lib.SelfTrained | None,
         stop_on_signals: bool, progress: bool, **workdir_kwargs: Any) -> FitResult:
  """`fit`'s run: the workdir opened (lock, manager, writer) and closed around
  the first phase and the step loop."""
  phases, stop, workdir = given.phases, given.stop, given.workdir
  fresh_state = functools.partial(new_phase_state, variables, phases, mesh=given.mesh,
                                  seed=seed, ema=ema)
  with contextlib.ExitStack() as stack:
    if stop_on_signals:
      stack.enter_context(stop)  # entered first: restored after the lock is released
    mngr, writer, state = open_run(
        stack, workdir, lambda mngr: restore_or_fresh(mngr, phases, fresh_state),
        meta=given.meta, heartbeat=given.heartbeat, **workdir_kwargs)
    start_step = begin = int(jax.device_get(state.step))
    first_row = None
    if first_phase is not None and start_step == 0:
      state, first_row = run_first_phase(first_phase, variables, phases, fresh_state, stop,
                                         workdir, given.heartbeat)
      begin = first_phase.steps
    phase = phases.at(begin - 1) if begin else 0
    eval_step = jax.jit(make_eval_step())
    loop = _Loop(dataclasses.replace(
        given, mngr=mngr, writer=writer, eval_step=eval_step,
        bar=progress_bar(stack, begin, num_steps) if progress else None),
        state=state, phase=phase, train_step=given.compile_step(*phases.items[phase][1:]),
        last_saved=mngr.latest_step() if mngr else None)
    # Read at the loop's first step, once its phase is entered: that step's trace.
    train_batches = given.heartbeat.each_batch(first_batch_checked(
        train_batches, eval_step if given.eval_batches is not None else None, output_classes,
        lambda: state.variables,
        lambda batch: trace_first_step(loop.train_step, loop.state, batch, given.mesh)))
    if first_row is not None:
      loop.end_first_phase(begin, first_row, last=begin == num_steps)
    loop.run(train_batches(begin), begin, num_steps)
    if mngr is not None and num_steps == start_step and given.eval_batches is not None:
      # A finished run started again (a rescheduled job): its result, not a second row.
      saved = mngr.meta().get("metrics")
      if saved:
        loop.eval_metrics = dict(saved)
      else:
        loop.evaluate(start_step)
  if stop.signum is not None:  # during the last step or the final save: all is saved
    raise _preempted(stop, loop.last_saved, num_steps, num_steps, workdir)
  return _result(loop, start_step, num_steps - begin, first_row)


def _result(loop: _Loop, start_step: int, steps_run: int,
            first_row: dict[str, float] | None) -> FitResult:
  """What `fit` returns; a run trained by its first phase alone reports that
  phase's steps per second."""
  window = getattr(loop, "window", None)
  busy = window.busy if window else 0.0
  speed = steps_run / busy if busy else 0.0
  if not busy and first_row:
    speed = first_row.get("steps_per_second", 0.0)
  return FitResult(state=loop.state, eval_metrics=loop.eval_metrics, start_step=start_step,
                   steps_per_second=speed,
                   input_wait_fraction=window.wait / busy if busy else 0.0)
