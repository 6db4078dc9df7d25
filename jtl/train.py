"""The fine-tuning loop: the one path from variables and data to a trained,
checkpointed, evaluated model. `scripts/finetune.py` is a shell over `fit`.

Every step is jit-compiled once and runs data parallel over all devices of
the mesh. The loop resumes from the workdir's latest checkpoint (state and
input position), logs to JSONL/TensorBoard/PNG, and measures how much of each
step's wall time is spent waiting for input.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

from jtl import parallel, steps
from jtl.checkpoint.manager import CheckpointManager
from jtl.errors import CheckpointError
from jtl.metrics import MetricWriter
from jtl.state import TrainState, create_train_state

PyTree = Any
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
  """Sums eval-step results over `batches` and returns loss/accuracy/top-5."""
  total: dict[str, float] = {}
  for batch in batches:
    if mesh is not None:
      batch = parallel.shard_batch(batch, mesh)
    sums = eval_step(variables, batch)
    for k, v in jax.device_get(sums).items():
      total[k] = total.get(k, 0.0) + float(v)
  if not total:
    return {"loss": float("nan"), "accuracy": float("nan"), "top5_accuracy": float("nan"), "count": 0}
  return steps.summarize_eval(total)


def _check_meta(mngr: CheckpointManager, meta: dict[str, Any], workdir: Any) -> None:
  """Refuses to resume a checkpoint made by a different model setup."""
  if mngr.latest_step() is None:
    return
  saved = mngr.meta()
  clashes = [f"{k}: checkpoint has {saved.get(k)!r}, this run {v!r}"
             for k, v in meta.items() if k in ("model", "num_classes") and saved.get(k) != v]
  if clashes:
    raise CheckpointError(
        f"{workdir}: the checkpoint there belongs to a different model:\n  "
        + "\n  ".join(clashes) + "\nUse a new --workdir, or the same model settings.")


def fit(*, module: Any, variables: PyTree, labels: PyTree, tx: optax.GradientTransformation,
        train_batches: Callable[[int], Iterator[Batch]], num_steps: int,
        workdir: str | os.PathLike | None = None,
        eval_batches: Callable[[], Iterable[Batch]] | None = None, eval_every: int = 0,
        checkpoint_every: int = 0, keep: int = 2, best_metric: str | None = "accuracy",
        mesh: jax.sharding.Mesh | None = None, loss_fn: steps.LossFn = steps.cross_entropy_loss,
        microbatches: int = 1, compute_dtype: Any = None, seed: int = 0,
        meta: dict[str, Any] | None = None, log_every: int = 10, progress: bool = True,
        async_checkpoints: bool = True,
        later_phases: Sequence[tuple[int, PyTree, optax.GradientTransformation]] = (),
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        make_step: Callable[[PyTree, optax.GradientTransformation], Callable] | None = None,
        ) -> FitResult:
  """Fine-tunes `module` from `variables` for `num_steps` steps.

  Args:
    module, variables: the Flax model and its initial (pretrained) variables.
    labels, tx: the partition labels and the optimizer (`make_optimizer`).
    train_batches: `train_batches(start_step)` returns the iterator of global
      numpy batches from that step on (the input position on resume).
    num_steps: total number of training steps.
    workdir: where checkpoints and metrics go; resumes from it if it holds a
      checkpoint. None: no checkpoints, no files.
    eval_batches: `eval_batches()` returns one pass of padded, masked batches.
    eval_every, checkpoint_every: in steps (0: only at the end).
    keep, best_metric: keep the last `keep` checkpoints plus the best by
      this eval metric.
    mesh: device mesh (default: all devices, data parallel).
    meta: JSON-able facts saved with each checkpoint ("model",
      "num_classes", ...); resuming with a different model is refused.
    later_phases: (start_step, labels, tx) of later phases (gradual
      unfreezing, LP-FT): from `start_step` on, the partition and optimizer
      change; the optimizer state of leaves that stay trainable carries over.
      Each phase compiles its step once. Resuming restores into the phase
      the checkpoint was written in.
    make_step: `make_step(labels, tx) -> train_step(state, batch) -> (state,
      metrics)`, a pure step to use instead of `jtl.make_train_step` (e.g.
      `jtl.distill.make_distill_train_step`, `jtl.domain.make_adapt_train_step`,
      `jtl.adversarial.make_adversarial_train_step`); loss_fn, microbatches
      and compute_dtype are then the factory's business.
  """
  mesh = mesh or parallel.make_mesh()
  meta = dict(meta or {})
  phases = sorted([(0, labels, tx), *later_phases], key=lambda p: p[0])

  def phase_at(completed_steps: int) -> int:
    return max(i for i, p in enumerate(phases) if p[0] <= completed_steps)

  mngr = writer = None
  latest = None
  if workdir is not None:
    mngr = CheckpointManager(workdir, save_every=checkpoint_every, keep=keep,
                             best_metric=best_metric if eval_batches else None,
                             async_save=async_checkpoints)
    _check_meta(mngr, meta, workdir)
    latest = mngr.latest_step()
    writer = MetricWriter(workdir)
  # A checkpoint at step s was written by the phase that ran step s.
  phase = phase_at(latest - 1) if latest else 0
  _, labels, tx = phases[phase]
  state = create_train_state(variables, labels, tx, rng=seed)
  state = parallel.place_state(state, mesh)
  if latest:
    state = mngr.restore(state, labels)
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info("Resuming from step %d in %s", start_step, workdir)

  def compile_step(labels, tx):
    if make_step is not None:
      return parallel.jit_train_step(make_step(labels, tx), mesh)
    return parallel.jit_train_step(
        steps.make_train_step(module, tx, labels=labels, loss_fn=loss_fn,
                              microbatches=microbatches, compute_dtype=compute_dtype), mesh)

  train_step = compile_step(labels, tx)
  eval_step = jax.jit(steps.make_eval_step(module, compute_dtype=compute_dtype))

  def run_eval(step: int) -> dict[str, float]:
    result = evaluate(eval_step, state.variables, eval_batches(), mesh)
    if writer:
      writer.write(step, "eval", result)
      writer.plot()
    logging.info("eval step %d: %s", step, result)
    return result

  bar = None
  if progress and jax.process_index() == 0 and num_steps > start_step:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)

  eval_metrics = None
  batches = train_batches(start_step)
  wait_time = busy_time = 0.0
  window_start, window_steps, batch_size = time.perf_counter(), 0, 0
  pending: list[dict[str, jax.Array]] = []
  for step in range(start_step + 1, num_steps + 1):
    if phase_at(step - 1) != phase:
      from jtl.strategies.schedules import switch_phase  # pylint: disable=g-import-not-at-top
      phase = phase_at(step - 1)
      _, labels, tx = phases[phase]
      state = parallel.place_state(switch_phase(jax.device_get(state), labels, tx), mesh)
      train_step = compile_step(labels, tx)
      logging.info("Phase %d from step %d", phase, step - 1)
    t0 = time.perf_counter()
    batch = next(batches)
    t1 = time.perf_counter()
    wait_time += t1 - t0
    batch_size = len(batch["label"])
    state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
    pending.append(metrics)
    window_steps += 1
    if step % log_every == 0 or step == num_steps:
      fetched = jax.device_get(pending)  # blocks: the window's compute is done
      t2 = time.perf_counter()
      row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      elapsed = t2 - window_start
      row["steps_per_second"] = window_steps / elapsed
      row["examples_per_second"] = window_steps * batch_size / elapsed
      busy_time += elapsed
      row["input_wait_fraction"] = wait_time / max(busy_time, 1e-9)
      if writer:
        writer.write(step, "train", row)
      if on_log:
        on_log(step, row)
      if bar:
        bar.set_postfix(loss=f"{row['loss']:.4f}", steps_s=f"{row['steps_per_second']:.2f}",
                        ex_s=f"{row['examples_per_second']:.1f}",
                        wait=f"{100 * row['input_wait_fraction']:.0f}%")
      pending, window_start, window_steps = [], time.perf_counter(), 0
    if bar:
      bar.update(1)
    last = step == num_steps
    evaluated = None
    if eval_batches is not None and ((eval_every and step % eval_every == 0) or last):
      evaluated = eval_metrics = run_eval(step)
    if mngr is not None:
      mngr.save(step, state, metrics=evaluated if best_metric else None, meta=meta, force=last)
  if bar:
    bar.close()
  if mngr is not None:
    if num_steps == start_step and eval_batches is not None:
      eval_metrics = run_eval(start_step)
    mngr.close()
  if writer:
    writer.close()
  total = busy_time if busy_time else 1e-9
  return FitResult(state=state, eval_metrics=eval_metrics, start_step=start_step,
                   steps_per_second=(num_steps - start_step) / total if busy_time else 0.0,
                   input_wait_fraction=wait_time / total if busy_time else 0.0)
