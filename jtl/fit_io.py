"""`fit`'s workdir and reports: the workdir opened (its lock, its checkpoint
manager, the metric writer) and closed on every exit path, the progress bar,
and each log window's train metrics (`LogWindow`) written, passed on and shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from jtl.checkpoint.lock import Heartbeat, WorkdirLock, raise_on_every_process
from jtl.checkpoint.manager import CheckpointManager
from jtl.fit_checks import check_meta
from jtl.metrics import MetricWriter
from jtl.state import TrainState


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


@dataclasses.dataclass
class LogWindow:
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


def _take_lock(stack: contextlib.ExitStack, workdir: Any, heartbeat: Heartbeat | None
               ) -> WorkdirLock:
  """The workdir's lock, taken by process 0 (released by `stack`). With several
  processes, whether process 0 got it is sent to all of them, so that a
  refusal stops every process instead of leaving the others waiting in the
  checkpoint manager's first collective."""
  lock = WorkdirLock(workdir, enabled=jax.process_index() == 0, heartbeat=heartbeat)
  raise_on_every_process(lambda: stack.enter_context(lock),
                         f"Process 0 could not take the lock of {workdir}: this process stops "
                         "with it (process 0 says why).")
  return lock


def _open_workdir(stack: contextlib.ExitStack, workdir: Any, meta: dict[str, Any],
                  save_every: int, keep: int, best_metric: str | None,
                  async_save: bool, heartbeat: Heartbeat | None) -> CheckpointManager:
  """Takes the workdir's lock (renewed while `heartbeat` beats) and opens its
  checkpoint manager, both closed by `stack`; refuses a workdir whose
  checkpoints were written for another model."""
  lock = _take_lock(stack, workdir, heartbeat)
  mngr = CheckpointManager(workdir, save_every=save_every, keep=keep,
                           best_metric=best_metric, async_save=async_save, lock=lock)
  stack.push(_exit_quietly_on_error(mngr.close))
  check_meta(mngr, meta, workdir)
  return mngr


def progress_bar(stack: contextlib.ExitStack, start_step: int, num_steps: int) -> Any:
  """A tqdm bar on process 0 when steps remain (closed by `stack`), else None."""
  if jax.process_index() != 0 or num_steps <= start_step:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
  stack.callback(bar.close)
  return bar


def report(step: int, row: dict[str, float], writer: MetricWriter | None,
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


def open_run(stack: contextlib.ExitStack, workdir: Any, restore: Callable[[Any], TrainState],
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
