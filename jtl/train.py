"""The fine-tuning loop: the one path from variables and data to a trained,
checkpointed, evaluated model. `scripts/finetune.py` is a shell over `fit`.

Every step is jit-compiled once and runs data parallel over all devices of
the mesh. The loop resumes from the workdir's latest checkpoint (state and
input position), logs to JSONL/TensorBoard/PNG, and measures how much of each
step's wall time is spent waiting for input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jtl import parallel, partition, steps
from jtl import phases as phases_lib
from jtl.adapter import variables_of
from jtl.batchnorm import make_recompute_batchnorm
from jtl.checkpoint.lock import WorkdirLock
from jtl.checkpoint.manager import CheckpointManager
from jtl.errors import CheckpointError, ConfigError, DivergenceError, Preempted, StepError
from jtl.metrics import MetricWriter
from jtl.preemption import StopRequests, preempted
from jtl.state import TrainState, create_train_state
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
  return steps.summarize_eval(total)


def _first_batch_checked(train_batches: Callable[[int], Iterator[Batch]],
                         eval_step: Callable | None,
                         output_classes: Callable[..., int | None],
                         variables: Callable[[], PyTree]) -> Callable[[int], Iterator[Batch]]:
  """`train_batches` whose first batch is checked before the first training
  step: its keys, its labels against the classes of the model's logits
  (shapes and values), and its trace through `eval_step` (shapes only,
  `jax.eval_shape`), so that outputs evaluation cannot score (a dict without
  eval_output=, ...) fail now instead of at the first evaluation."""
  if not callable(train_batches):
    raise StepError(
        f"fit(train_batches=...) takes a function start_step -> iterator of batches (the "
        f"input position on resume), got {type(train_batches).__name__}; e.g. "
        "train_batches=lambda start: itertools.islice(itertools.cycle(batches), start, None).")

  def make(start_step: int) -> Iterator[Batch]:
    batches = iter(train_batches(start_step))
    first = next(batches, None)
    if first is None:
      return batches
    _check_batch(first)
    probe = {**first, "mask": np.ones(np.shape(first["label"])[:1], bool)}
    try:
      classes = output_classes(variables(), probe)
    except Exception:  # noqa: BLE001 - e.g. a method's training batch: its loss decides
      classes = None
    if classes is not None:
      _check_label_values(first["label"], first.get("mask"), classes)
    if eval_step is not None:
      try:
        jax.eval_shape(eval_step, variables(), probe)
      except StepError:
        raise
      except Exception:  # noqa: BLE001 - e.g. a method's training batch: the evaluation decides
        pass
    return itertools.chain([first], batches)
  return make


def _check_batch(batch: Any) -> None:
  """A training batch is a dict with "inputs" and "label"."""
  if not isinstance(batch, dict) or not {"inputs", "label"} <= set(batch):
    got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise StepError(
        f"A training batch must be a dict with 'inputs' and 'label' (and optionally 'mask'), "
        f"got {got}. Yield {{'inputs': x, 'label': y}} from train_batches(start_step).")


def _check_label_values(label: Any, mask: Any, num_classes: int) -> None:
  """Integer labels of the rows that count (mask) must be class indices of the
  model's `num_classes` logits: one out of range would train on an all-zero
  target (a loss of 0)."""
  label = np.asarray(label)
  if mask is not None and np.shape(mask) == label.shape[:1]:
    label = label[np.asarray(mask, bool)]
  if not np.issubdtype(label.dtype, np.integer) or label.size == 0:
    return
  low, high = int(label.min()), int(label.max())
  if low < 0 or high >= num_classes:
    raise StepError(
        f"The first training batch has labels from {low} to {high}, but the model's logits "
        f"have {num_classes} classes (labels 0..{num_classes - 1}). Give the head as many "
        "outputs as the dataset has classes (num_classes), or map the labels to 0..C-1.")


def _check_meta(mngr: CheckpointManager, meta: dict[str, Any], workdir: Any) -> None:
  """Refuses to resume a checkpoint made by a different model setup."""
  if mngr.latest_step() is None:
    return
  saved = mngr.meta()
  clashes = [f"{k}: checkpoint has {saved.get(k)!r}, this run {v!r}"
             for k, v in meta.items() if (k in ("model", "num_classes") and saved.get(k) != v)
             or (k == "class_names" and None not in (v, saved.get(k)) and saved[k] != v)]
  if clashes:
    raise CheckpointError(
        f"{workdir}: the checkpoint there belongs to a different model:\n  "
        + "\n  ".join(clashes) + "\nUse a new --workdir, or the same model settings.")


def _exit_quietly_on_error(close: Callable[[], None]) -> Callable[..., bool]:
  """An ExitStack exit callback: runs `close`; when the run is already failing,
  a failure to close is logged, so the user sees the one real error."""
  def exit_(exc_type, exc, tb) -> bool:
    del exc, tb
    try:
      close()
    except Exception as e:
      if exc_type is None:
        raise
      logging.error("While stopping after an error, closing also failed: %s", e)
    return False
  return exit_


def _nonfinite_step(steps_and_metrics: list[tuple[int, dict[str, Any]]]
                    ) -> tuple[int, dict[str, float]] | None:
  """The first (step, metrics) whose loss or grad_norm is NaN or inf."""
  for step, metrics in jax.device_get(steps_and_metrics):
    values = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics}
    if not all(np.isfinite(v) for v in values.values()):
      return step, values
  return None


def _divergence(step: int, values: dict[str, float], last_saved: int | None,
                workdir: Any) -> DivergenceError:
  shown = ", ".join(f"{k} {v}" for k, v in values.items())
  kept = (f"The last checkpoint, step {last_saved} in {workdir}, is from before it and is kept."
          if last_saved is not None else "Nothing was saved by this run after it.")
  return DivergenceError(
      f"Training diverged at step {step}: {shown}. The run stops and saves nothing from "
      f"step {step} on. {kept} Lower the learning rate, add clip_norm or warmup, or set "
      "on_nonfinite='skip' (config key on_nonfinite) to skip such updates instead.")


@dataclasses.dataclass
class _Window:
  """Train metrics since the last log line, and the time they took."""
  start: float
  rows: list[tuple[int, dict[str, jax.Array]]] = dataclasses.field(default_factory=list)
  wait: float = 0.0
  busy: float = 0.0
  skipped: float = 0.0

  def summary(self, batch_size: int) -> dict[str, float]:
    fetched = [m for _, m in jax.device_get(self.rows)]  # blocks: the window's compute is done
    now = time.perf_counter()
    row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    if "skipped" in row:
      row["skipped"] = float(np.sum([m["skipped"] for m in fetched]))
      self.skipped += row["skipped"]
      row["skipped_total"] = self.skipped
    elapsed = now - self.start
    self.busy += elapsed
    row["steps_per_second"] = len(fetched) / elapsed
    row["examples_per_second"] = len(fetched) * batch_size / elapsed
    row["input_wait_fraction"] = self.wait / max(self.busy, 1e-9)
    self.rows, self.start = [], time.perf_counter()
    return row


@dataclasses.dataclass(frozen=True)
class _Phases:
  """(start_step, labels, tx) of each phase of a run, sorted by start step."""
  items: list[tuple[int, PyTree, optax.GradientTransformation]]

  def at(self, completed_steps: int) -> int:
    """The phase that runs the step after `completed_steps`."""
    return max(i for i, p in enumerate(self.items) if p[0] <= completed_steps)


def _open_workdir(stack: contextlib.ExitStack, workdir: Any, meta: dict[str, Any],
                  save_every: int, keep: int, best_metric: str | None,
                  async_save: bool) -> CheckpointManager:
  """Takes the workdir's lock and opens its checkpoint manager, both closed by
  `stack`; refuses a workdir whose checkpoints were written for another model."""
  lock = stack.enter_context(WorkdirLock(workdir, enabled=jax.process_index() == 0))
  mngr = CheckpointManager(workdir, save_every=save_every, keep=keep,
                           best_metric=best_metric, async_save=async_save, lock=lock)
  stack.push(_exit_quietly_on_error(mngr.close))
  _check_meta(mngr, meta, workdir)
  return mngr


def _progress_bar(stack: contextlib.ExitStack, start_step: int, num_steps: int) -> Any:
  """A tqdm bar on process 0 when steps remain (closed by `stack`), else None."""
  if jax.process_index() != 0 or num_steps <= start_step:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
  stack.callback(bar.close)
  return bar


def _report(step: int, row: dict[str, float], writer: MetricWriter | None,
            on_log: Callable[[int, dict[str, float]], None] | None, bar: Any) -> None:
  """One train-metrics row to the metrics file, the callback and the bar."""
  if writer:
    writer.write(step, "train", row)
  if on_log:
    on_log(step, row)
  if bar:
    bar.set_postfix(loss=f"{row['loss']:.4f}", steps_s=f"{row['steps_per_second']:.2f}",
                    ex_s=f"{row['examples_per_second']:.1f}",
                    wait=f"{100 * row['input_wait_fraction']:.0f}%")
  if row.get("skipped"):
    logging.warning("Skipped %d non-finite update(s) up to step %d (%d in all).",
                    row["skipped"], step, row["skipped_total"])


def _restore_or_fresh(mngr: CheckpointManager | None, phases: _Phases,
                      fresh_state: Callable[[int], tuple[TrainState, PyTree]]) -> TrainState:
  """The newest intact checkpoint's state (restored into the phase that wrote
  it), or the fresh state of phase 0."""
  state = None
  if mngr is not None:
    # A checkpoint at step s was written by the phase that ran step s.
    state = mngr.restore_latest(lambda s: fresh_state(phases.at(s - 1) if s else 0))
  return state if state is not None else fresh_state(0)[0]


def _enter_phase(state: TrainState, phase: tuple[int, PyTree, optax.GradientTransformation],
                 compile_step: Callable, mesh: jax.sharding.Mesh) -> tuple[TrainState, Callable]:
  """(state, train step) of a new phase: its partition and optimizer, the
  optimizer state of leaves that stay trainable carried over."""
  _, labels, tx = phase
  state = parallel.place_state(phases_lib.switch_phase(jax.device_get(state), labels, tx), mesh)
  return state, compile_step(labels, tx)


def _stop_if_diverged(unchecked: list[tuple[int, dict[str, Any]]], last_saved: int | None,
                      workdir: Any) -> None:
  """Raises DivergenceError at the first of these steps with a NaN/inf loss or
  gradient norm (this reads the metrics back from the device)."""
  bad = _nonfinite_step(unchecked)
  if bad is not None:
    raise _divergence(*bad, last_saved, workdir)


def _open_run(stack: contextlib.ExitStack, workdir: Any, restore: Callable[[Any], TrainState],
              **workdir_kwargs: Any) -> tuple[CheckpointManager | None, MetricWriter | None,
                                              TrainState]:
  """(checkpoint manager, metric writer, start state) of a run, the first two
  None without a workdir and closed by `stack`. `restore(mngr)` gives the state."""
  if workdir is None:
    return None, None, restore(None)
  mngr = _open_workdir(stack, workdir, **workdir_kwargs)
  state = restore(mngr)
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info("Resuming from step %d in %s", start_step, workdir)
  writer = MetricWriter(workdir, resume_step=start_step)
  stack.callback(writer.close)
  return mngr, writer, state


def _batchnorm_refresher(module: Any, phases: _Phases,
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
          module, skip=partition.frozen_module_paths(phases.items[phase][1]), mesh=mesh)
    # With weight EMA, the statistics are those of the EMA weights: the model evaluated and saved.
    variables = compiled[phase](state.eval_variables, batches())
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return state.replace(model_state=jax.tree.map(place, model_state, state.model_state))
  return refresh


@dataclasses.dataclass(frozen=True)
class _Given:
  """What `fit`'s step loop is given once: fit's options, then (set by
  `_run` once the workdir is open) the manager, writer, eval step and bar."""
  phases: _Phases
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
  window: _Window = dataclasses.field(init=False)  # set by `run`
  unchecked: list[tuple[int, dict[str, jax.Array]]] = dataclasses.field(default_factory=list)
  eval_metrics: dict[str, float] | None = None

  def run(self, batches: Iterator[Batch], start_step: int, num_steps: int) -> None:
    """Steps start_step + 1 to num_steps, with their logs, evals and saves."""
    g = self.given
    self.window = _Window(start=time.perf_counter())
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
      if due_log:
        _report(step, self.window.summary(batch_size), g.writer, g.on_log, g.bar)
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
      _report(step, self.window.summary(batch_size), g.writer, g.on_log, None)
    if g.mngr is not None:
      if self.last_saved != step and g.mngr.save(step, self.state, meta=g.meta, force=True):
        self.last_saved = step
      g.mngr.wait()
    raise _preempted(g.stop, self.last_saved if g.mngr else None, step, num_steps, g.workdir)

  def _evaluate_and_save(self, step: int, due_eval: bool, due_save: bool, last: bool) -> None:
    """Precise BatchNorm first (when asked), then the evaluation and the save."""
    g = self.given
    if g.refresh_batchnorm is not None:
      self.state = g.refresh_batchnorm(self.state, self.phase)
    evaluated = self.evaluate(step) if due_eval else None
    if due_save and g.mngr.save(step, self.state, meta=g.meta, force=last,
                                metrics=evaluated if g.save_eval_metrics else None):
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
      self.state, self.train_step = _enter_phase(self.state, g.phases.items[self.phase],
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
    """Step `step`'s batch on the mesh, and its per-process size."""
    batch = self._next_batch(batches, step, num_steps)
    return parallel.shard_batch(batch, self.given.mesh), len(batch["label"])

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
      _stop_if_diverged(fetched, self.last_saved, self.given.workdir)
    self.unchecked = []


def _preempted(stop: StopRequests, saved: int | None, step: int, num_steps: int,
               workdir: Any) -> Preempted:
  """The error `fit` raises after stopping on a signal at `step`."""
  when = ("when training had finished" if step >= num_steps
          else f"after step {step} of {num_steps}")
  return preempted(stop, saved=saved, when=when, workdir=workdir)


def _compile_train_step(labels: PyTree, tx: optax.GradientTransformation, *, module: Any,
                        mesh: jax.sharding.Mesh, skip_nonfinite: bool,
                        **step_kwargs: Any) -> Callable:
  """The jitted train step of one phase (`steps.make_train_step`'s options)."""
  step = steps.make_train_step(module, tx, labels=labels, **step_kwargs)
  return parallel.jit_train_step(steps.skip_nonfinite(step) if skip_nonfinite else step, mesh)


def fit(*, module: Any, variables: PyTree | None, labels: PyTree, tx: optax.GradientTransformation,
        train_batches: Callable[[int], Iterator[Batch]], num_steps: int,
        workdir: str | os.PathLike | None = None,
        eval_batches: Callable[[], Iterable[Batch]] | None = None, eval_every: int = 0,
        checkpoint_every: int = 0, keep: int = 2, best_metric: str | None = "accuracy",
        mesh: jax.sharding.Mesh | None = None, loss_fn: steps.LossFn = steps.cross_entropy_loss,
        microbatches: int = 1, compute_dtype: Any = None, seed: int = 0,
        meta: dict[str, Any] | None = None, log_every: int = 10, progress: bool = True,
        async_checkpoints: bool = True, on_nonfinite: str = "stop",
        later_phases: Sequence[tuple[int, PyTree, optax.GradientTransformation]] = (),
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        batch_transform: steps.BatchTransform | None = None,
        batchnorm_batches: Callable[[], Iterable[Batch]] | None = None,
        stop_on_signals: bool = True, ema_decay: float | None = None,
        eval_output: Any = None, eval_fn: steps.EvalFn | None = None,
        first_phase: phases_lib.SelfTrained | None = None,
        ) -> FitResult:
  """Fine-tunes `module` from `variables` for `num_steps` steps.

  Args:
    module, variables: the model (a Linen or NNX module, an apply function, or a
      `jtl.LinenModel`/`NnxModel`/`FunctionModel`) and its initial (pretrained)
      variables; None: an NNX module's own (`jtl.adapter.variables_of`).
    labels, tx: the partition labels and the optimizer (`make_optimizer`).
    train_batches: `train_batches(start_step)` returns the iterator of global
      numpy batches from that step on (the input position on resume).
    num_steps: total number of training steps.
    workdir: checkpoints and metrics; resumes from its newest intact checkpoint; held
      with `<workdir>/jtl.lock` (a second run there is refused). None: no files.
    eval_batches, eval_every, checkpoint_every: `eval_batches()` returns one pass of
      padded, masked batches; evaluations and saves every so many steps (0: at the end).
    keep, best_metric: the last `keep` checkpoints stay, and the best by this eval metric.
    mesh: device mesh (default: all devices, data parallel).
    meta: JSON-able facts saved with each checkpoint ("model", "num_classes",
      "class_names", ...); resuming with different ones is refused.
    on_nonfinite: "stop": a NaN/inf loss or gradient norm raises a `DivergenceError`
      naming the step, before anything later is saved; "skip": such updates are
      not applied and the train metrics count them ("skipped", "skipped_total").
    later_phases: (start_step, labels, tx) of later phases (`jtl.phases`: LP-FT,
      gradual unfreezing); a resumed run restores into the phase that saved.
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
    first_phase: a `jtl.phases.SelfTrained` phase (e.g. `jtl.recipes.strategies.
      features.cached_head_phase`) run on a fresh start before step 1, skipped on
      resume; its metrics are logged, evaluated and saved at its `steps`.

  Raises:
    Preempted: after a SIGTERM or SIGINT, once the step is saved.
  """
  _check_options(on_nonfinite=on_nonfinite, ema_decay=ema_decay, log_every=log_every,
                 eval_batches=eval_batches, batchnorm_batches=batchnorm_batches)
  mesh = mesh or parallel.make_mesh()
  variables = _initial_variables(module, variables, batchnorm_batches)
  phases = _Phases(sorted([(0, labels, tx), *later_phases], key=lambda p: p[0]))
  compile_step = functools.partial(
      _compile_train_step, module=module, mesh=mesh, skip_nonfinite=on_nonfinite == "skip",
      loss_fn=loss_fn, batch_transform=batch_transform, microbatches=microbatches,
      compute_dtype=compute_dtype, ema_decay=ema_decay)
  given = _Given(
      phases=phases, compile_step=compile_step, mesh=mesh, eval_batches=eval_batches,
      eval_every=eval_every, log_every=log_every, on_log=on_log,
      stop_on_nonfinite=on_nonfinite == "stop", save_eval_metrics=bool(best_metric),
      refresh_batchnorm=_batchnorm_refresher(module, phases, batchnorm_batches, mesh),
      meta=dict(meta or {}), workdir=workdir, stop=StopRequests())
  scoring = dict(eval_output=eval_output, eval_fn=eval_fn, compute_dtype=compute_dtype)
  return _run(given, functools.partial(steps.make_eval_step, module, **scoring),
              functools.partial(steps.output_classes, module, **scoring), train_batches,
              num_steps, variables=variables, seed=seed, ema=ema_decay is not None,
              first_phase=first_phase, stop_on_signals=stop_on_signals, progress=progress,
              save_every=checkpoint_every, keep=keep, async_save=async_checkpoints,
              best_metric=best_metric if eval_batches else None)


def _check_options(*, on_nonfinite: str, ema_decay: float | None, log_every: int,
                   **batch_fns: Any) -> None:
  """Refuses invalid values of `fit`'s options."""
  for name, given_fn in batch_fns.items():
    if given_fn is not None and not callable(given_fn):
      raise StepError(
          f"fit({name}=...) takes a function that returns one pass of batches (called at each "
          f"evaluation), got {type(given_fn).__name__}; e.g. {name}=lambda: batches.")
  if on_nonfinite not in ("stop", "skip"):
    raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
  if ema_decay is not None and (isinstance(ema_decay, bool) or not 0.0 <= ema_decay < 1.0):
    raise ConfigError(f"ema_decay must be a number in [0, 1) (e.g. 0.999; None: no weight "
                      f"EMA), got {ema_decay!r}.")
  if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
    raise ConfigError(f"log_every must be an integer >= 1 (steps between logged training "
                      f"metrics), got {log_every!r}.")


def _initial_variables(module: Any, variables: PyTree | None,
                       batchnorm_batches: Callable[[], Iterable[Batch]] | None) -> PyTree:
  """The given variables, or an NNX module's own; refuses precise BatchNorm
  for variables without BatchNorm statistics."""
  if variables is None:
    variables = variables_of(module)
  if batchnorm_batches is not None and set(variables) == {"params"}:
    raise ConfigError("fit(batchnorm_batches=...): the variables hold no BatchNorm statistics "
                      "(only 'params'); drop batchnorm_batches for a model without BatchNorm.")
  return variables


def _fresh_state(variables: PyTree, phases: _Phases, phase: int, start: PyTree | None = None,
                 step: int = 0, *, mesh: jax.sharding.Mesh, seed: int, ema: bool
                 ) -> tuple[TrainState, PyTree]:
  """The initial state of `phase` (from `start` variables at `step`, by
  default the given ones at 0) and its labels (what a restore fills)."""
  _, labels, tx = phases.items[phase]
  state = create_train_state(variables if start is None else start, labels, tx, rng=seed,
                             ema=ema)
  return parallel.place_state(state.replace(step=jnp.int32(step)) if step else state,
                              mesh), labels


def _run(given: _Given, make_eval_step: Callable[[], Callable],
         output_classes: Callable[..., int | None],
         train_batches: Callable[[int], Iterator[Batch]], num_steps: int, *, variables: PyTree,
         seed: int, ema: bool, first_phase: phases_lib.SelfTrained | None,
         stop_on_signals: bool, progress: bool, **workdir_kwargs: Any) -> FitResult:
  """`fit`'s run: the workdir opened (lock, manager, writer) and closed around
  the first phase and the step loop."""
  phases, stop, workdir = given.phases, given.stop, given.workdir
  fresh_state = functools.partial(_fresh_state, variables, phases, mesh=given.mesh, seed=seed,
                                  ema=ema)
  with contextlib.ExitStack() as stack:
    if stop_on_signals:
      stack.enter_context(stop)  # entered first: restored after the lock is released
    mngr, writer, state = _open_run(
        stack, workdir, lambda mngr: _restore_or_fresh(mngr, phases, fresh_state),
        meta=given.meta, **workdir_kwargs)
    start_step = begin = int(jax.device_get(state.step))
    first_row = None
    if first_phase is not None and start_step == 0:
      state, first_row = _run_first_phase(first_phase, variables, phases, fresh_state, stop,
                                          workdir)
      begin = first_phase.steps
    phase = phases.at(begin - 1) if begin else 0
    eval_step = jax.jit(make_eval_step())
    train_batches = _first_batch_checked(
        train_batches, eval_step if given.eval_batches is not None else None,
        output_classes, lambda: state.variables)
    loop = _Loop(dataclasses.replace(
        given, mngr=mngr, writer=writer, eval_step=eval_step,
        bar=_progress_bar(stack, begin, num_steps) if progress else None),
        state=state, phase=phase, train_step=given.compile_step(*phases.items[phase][1:]),
        last_saved=mngr.latest_step() if mngr else None)
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


def _run_first_phase(first: phases_lib.SelfTrained, variables: PyTree, phases: _Phases,
                     fresh_state: Callable[..., tuple[TrainState, PyTree]], stop: StopRequests,
                     workdir: Any) -> tuple[TrainState, dict[str, float]]:
  """Runs a self-trained first phase: (the state of the phase that runs at
  its end, from its variables at step `first.steps`, and its metrics row)."""
  def stop_point(when: str) -> None:
    if stop.reached(0):  # on every process (multi-host sync), as after each step
      raise preempted(stop, saved=None, when=when, workdir=workdir)

  trained, row = first.run(variables, stop_point)
  phase = phases.at(first.steps - 1) if first.steps else 0
  return fresh_state(phase, trained, first.steps)[0], row


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
