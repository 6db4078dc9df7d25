"""Orbax training checkpoints in a run's workdir: save, keep, resume, restore.

A checkpoint holds everything a run needs to continue exactly: the step (which
is also the input position: the pipeline restarts at `start_step=step`), the
full params, the model's mutable collections (BatchNorm statistics), the
optimizer state of the trainable leaves and the rng. Orbax writes each step to
a temporary directory and renames it when complete, so a process killed during
a save leaves the last good checkpoint untouched; the next start uses it.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`, where `meta` is JSON
(model name, number of classes, metrics, anything the caller adds).

What is kept is decided from the files alone, so it survives any number of
restarts: the last `keep` intact steps plus the best by the metric saved in
each step's meta. A state with a NaN or inf is never saved, and a non-finite
metric never counts as best. A damaged step (truncated files, a stray folder)
is skipped with a warning naming it, and resuming falls back to the newest
intact step; an intact step saved from another state (model, partition,
optimizer, phase) is no damage: resuming stops there, nothing renamed.

What a checkpoint folder holds and which step is read: `jtl.checkpoint.layout`;
a run's variables read without a manager: `jtl.checkpoint.restore`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jtl import partition, paths
from jtl import tree as jtree
from jtl.checkpoint import integrity
from jtl.checkpoint import lock as lock_lib
from jtl.checkpoint.layout import (
  best_scored,
  read_meta,
  score,
  checkpoint_dir,
  default_mode,
  select_step,
  step_numbers,
  step_problem,
)
from jtl.checkpoint.restore import FINGERPRINTS, check_fingerprints, saved_shapes
from jtl.errors import CheckpointError, CheckpointMismatchError, bullet_list
from jtl.state import TrainState
from jtl.tree import PyTree

log = logging.getLogger(__name__)


def _remove_unfinished_saves(directory: epath.Path) -> None:
  """In a bucket: deletes step folders without Orbax's commit marker that are
  newer than every finished step (saves a kill interrupted); an older one
  lost its marker afterwards (a deletion stopped part-way), so it is kept
  where it is, unused, with a warning naming it."""
  steps = step_numbers(directory)
  finished = [s for s in steps if ocp.utils.is_checkpoint_finalized(directory / str(s))]
  newest = max(finished, default=-1)
  for step in sorted(set(steps) - set(finished)):
    if step > newest:
      log.info("Removing %s: its save did not finish.", directory / str(step))
      (directory / str(step)).rmtree()
    else:
      log.warning("Checkpoint %s has no commit marker (commit_success.txt), though newer steps "
                  "finished: its deletion stopped part-way, or the marker was removed. It is not "
                  "used and left as it is; restore the marker if its files are complete.",
                  directory / str(step))


def _write_arrays_whole_in_one_process() -> None:
  """In one process, Orbax writes each replicated array whole, not in slices
  spread over its devices: the slices buy nothing when one host writes all
  the data, and cost a compile per leaf shape and device at the first save
  (20 leaves on 8 devices: 160 programs, ~19 s on CPU). Orbax's default
  handler only (a handler the user registered stays); multi-process runs keep
  replica-parallel writes, where each host writes its part."""
  if jax.process_count() > 1:
    return
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if type(handler) is ocp.type_handlers.ArrayHandler and handler._use_replica_parallel:  # pylint: disable=protected-access
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # Orbax warns of any override
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
      absl_log.setLevel(level)


def _check_fits(saved: dict[str, tuple[int, ...] | None], abstract: PyTree,
                where: Any) -> None:
  """Raises a CheckpointMismatchError when the arrays a step holds (`saved`,
  from its metadata) are not the target's, before any is read: Orbax would
  restore a subset the target asks for and drop the rest silently, and fill
  a target array from a leaf saved as None (a parameter frozen, so without
  optimizer state, when the checkpoint was written) with None."""
  target = {p: x for p, x in jtree.leaves_with_paths(abstract) if x is not None}
  missing = sorted(set(target) - set(saved))
  extra = sorted(set(saved) - set(target))
  reshaped = sorted(
      f"{p}: saved {saved[p]}, this run {tuple(x.shape)}" for p, x in target.items()
      if p in saved and saved[p] is not None and saved[p] != tuple(x.shape)
      and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
  if not (missing or extra or reshaped):
    return
  roots = {p.split("/")[0].split(":")[0] for p in missing + extra + reshaped}
  what = ("another model (other parameters, statistics or shapes)"
          if roots & {"params", "model_state"} else
          "another partition or optimizer (e.g. other rules or phases, so other parameters "
          "train at this step)")
  ema = ("\nweight EMA (fit(ema_decay=)) is on in one of them only." if "ema_params" in roots
         else "")
  raise CheckpointMismatchError(
      f"{where}: the checkpoint does not fit the state of this run: it was saved with {what} "
      f"than this run has.\nIn this run, not in the checkpoint:\n"
      f"{bullet_list(missing, limit=10) or '  (none)'}\nIn the checkpoint, not in this run:\n"
      f"{bullet_list(extra, limit=10) or '  (none)'}"
      + (f"\nOther shapes:\n{bullet_list(reshaped, limit=10)}" if reshaped else "") + ema
      + "\nNo checkpoint was renamed or deleted. Resume with the model, rules, phases and "
      "optimizer it was saved with, or use a new workdir (to start from its weights, restore "
      "them with jtl.restore_variables and pass them as the new run's variables).")


def _to_saved(state: TrainState) -> dict[str, Any]:
  saved = {"step": state.step, "params": state.params, "model_state": state.model_state,
           "opt_state": state.opt_state, "rng": state.rng}
  if state.ema is not None:  # the full EMA params: restorable into any phase's partition
    saved["ema_params"] = state.ema_params
  return saved


def _finite_metrics(metrics: dict[str, Any] | None) -> dict[str, float | None] | None:
  """Metrics as floats, a NaN or inf as None (JSON null, never the best)."""
  if metrics is None:
    return None
  return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}


class CheckpointManager:
  """Saves every `save_every` steps (and on request), keeps the last `keep`
  checkpoints plus the best one by `best_metric`, asynchronously.

  Example:
    mngr = CheckpointManager(workdir, save_every=100, keep=2, best_metric="accuracy")
    state = mngr.restore_or(state, labels)      # resume if a checkpoint exists
    ...
    mngr.save(step, state, metrics={"accuracy": 0.9})
    mngr.close()                                # waits for pending saves
  """

  def __init__(self, workdir: str | os.PathLike, *, save_every: int = 1000, keep: int = 2,
               best_metric: str | None = None, best_mode: str | None = None,
               async_save: bool = True, lock: Any = None):
    best_mode = best_mode or default_mode(best_metric)
    if best_mode not in ("max", "min"):
      raise CheckpointError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if keep < 1:
      raise CheckpointError(f"keep must be >= 1 (checkpoints to keep), got {keep}.")
    self.directory = checkpoint_dir(workdir)
    self.save_every = save_every
    self.keep = keep
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._lock = lock  # a WorkdirLock: verified before each save
    # Orbax deletes nothing: `_prune` decides from the files, so the best
    # survives restarts (Orbax's own policy forgets metrics across processes).
    # In a bucket Orbax's clean-up of unfinished saves takes every step without
    # its commit marker for one, a finished best whose deletion stopped
    # part-way too: there `_remove_unfinished_saves` decides instead.
    remote = paths.is_remote(self.directory)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=not remote, create=True)
    # Only the run holding the workdir's lock (process 0) clears: a manager
    # opened to read a workdir (evaluation) must not delete a live run's save.
    if remote and lock is not None and getattr(lock, "held", False):
      _remove_unfinished_saves(self.directory)
    _write_arrays_whole_in_one_process()
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
    # A finished step's files do not change (this run owns the workdir), so
    # each is checked once, not at every save.
    self._problems: dict[int, str | None] = {}
    self._step_scores: dict[int, float | None] = {}  # read once per step, as _problems

  def _step_dirs(self) -> list[int]:
    return step_numbers(self.directory)

  def _problem(self, step: int) -> str | None:
    if step not in self._problems:
      self._problems[step] = step_problem(self.directory / str(step))
    return self._problems[step]

  def intact_steps(self, *, warn: bool = False) -> list[int]:
    """Finished, undamaged steps, oldest first (damaged ones logged if `warn`)."""
    intact = []
    for step in self._step_dirs():
      problem = self._problem(step)
      if problem is None:
        intact.append(step)
      elif warn:
        log.warning("Checkpoint %s is damaged and skipped: %s", self.directory / str(step), problem)
    return intact

  def latest_step(self) -> int | None:
    steps = self.intact_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The intact step with the best finite `best_metric` (None if none has it)."""
    if not self.best_metric:
      return None
    return best_scored(self.directory, self.intact_steps(), self.best_metric, self.best_mode)

  def all_steps(self) -> list[int]:
    return self.intact_steps()

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: TrainState, *, metrics: dict[str, float] | None = None,
           meta: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` at `step` if due (or `force`); returns whether it saved.

    Raises a CheckpointError, and saves nothing, if the state holds a NaN or
    inf; a non-finite metric is saved as null and never counts as best.
    """
    if not force and not self.should_save(step):
      return False
    if step in self._step_dirs():
      return False
    if self.best_metric and metrics is not None and self.best_metric not in metrics:
      raise CheckpointError(
          f"best_metric {self.best_metric!r} is not among the metrics given to save(): "
          f"{sorted(metrics)}.")
    saved = _to_saved(state)
    prints, bad = integrity.inspect(saved)  # one pass over the arrays for both
    if bad:
      raise CheckpointError(
          f"Not saving step {step} to {self.directory}: the state holds NaN or inf in\n"
          + bullet_list(bad, limit=10) + f"\nThe kept checkpoints {self._step_dirs()} are "
          "left as they are.")
    self.wait()  # the previous save is complete before it counts for pruning
    if self._lock is not None:
      self._verify_lock()  # nothing is written or pruned by a run that lost the workdir
    self._prune()
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(saved),
        meta=ocp.args.JsonSave({"step": int(step), "metrics": _finite_metrics(metrics),
                                **self._selection(), **(meta or {}),
                                FINGERPRINTS: prints}))
    try:
      return self._manager.save(step, args=args, force=True)
    except Exception as e:  # Orbax/tensorstore raise bare exceptions
      raise self._save_error(step, e) from e

  def check_lock(self) -> None:
    """Raises when this run's lock was found taken over or deleted by its
    renewals (no request: called before each log line, evaluation and save).
    In one process only: with several, the save's `_verify_lock` decides for
    all of them together."""
    if self._lock is not None and getattr(self._lock, "lost", False) and \
        jax.process_count() == 1:
      self._lock.verify()

  def _verify_lock(self) -> None:
    """Raises on every process when process 0 (the lock's holder) lost the
    lock: a save is collective, so the others must stop with it."""
    lock_lib.raise_on_every_process(
        self._lock.verify, f"Process 0 no longer holds the lock of {self.directory.parent}: "
        "this run stops without saving (process 0 says why).")

  def _selection(self) -> dict[str, str]:
    # Recorded with each step, so that step="best" later needs no metric.
    return {"best_metric": self.best_metric, "best_mode": self.best_mode} \
        if self.best_metric else {}

  def _save_error(self, step: int | None, error: Exception) -> CheckpointError:
    text = str(error)
    full = "RESOURCE_EXHAUSTED" in text or "No space left" in text or (
        isinstance(error, OSError) and error.errno == 28)
    cause = "the disk is full" if full else f"{type(error).__name__}: {text[:500]}"
    latest = self.latest_step()
    kept = (f"The last complete checkpoint, step {latest}, is intact." if latest is not None
            else "No complete checkpoint exists yet.")
    what = f"step {step}" if step is not None else "a checkpoint"
    return CheckpointError(f"Saving {what} to {self.directory} failed: {cause}. {kept} "
                           + ("Free disk space, then run again to resume." if full else ""))

  def _prune(self) -> None:
    """Deletes intact steps that are neither among the last `keep` nor the best."""
    steps = self.intact_steps()
    kept = set(steps[-self.keep:])
    if self.best_metric:
      scores, unread = self._scores(steps)
      if unread:  # a failed read (a timeout) must not cost the best: no deletion now
        log.warning("Keeping every checkpoint for now: the meta of step(s) %s could not be "
                    "read, and one of them may be the best.", unread)
        return
      if scores:
        kept.add((max if self.best_mode == "max" else min)(scores, key=scores.get))
    for step in steps:
      if step not in kept:
        self._manager.delete(step)
        self._problems.pop(step, None)
        self._step_scores.pop(step, None)

  def _scores(self, steps: list[int]) -> tuple[dict[int, float], list[int]]:
    """({step: finite best_metric} of `steps`, each step's meta read once;
    the steps whose meta cannot be read now)."""
    unread = []
    for s in steps:
      if s not in self._step_scores:
        meta = read_meta(self.directory / str(s))
        if meta:
          self._step_scores[s] = score(meta, self.best_metric)
        else:
          unread.append(s)
    scores = {s: self._step_scores[s] for s in steps
              if s in self._step_scores and self._step_scores[s] is not None}
    return scores, unread

  def beats_best(self, metrics: dict[str, Any] | None) -> bool:
    """Whether `metrics` (an evaluation) beat every kept step's `best_metric`
    (True when no step has one): a state worth saving, so that the best
    evaluation is kept even when it falls between checkpoint steps. False
    without a best_metric, a finite value of it, or when a meta cannot be read."""
    value = score({"metrics": _finite_metrics(metrics)}, self.best_metric)
    if not self.best_metric or value is None:
      return False
    self.wait()  # a save under way counts (and is never checked half-written)
    scores, unread = self._scores(self.intact_steps())
    if unread:  # it may be the best: saved at the next checkpoint step as before
      return False
    best = (max if self.best_mode == "max" else min)(scores.values(), default=None)
    return best is None or (value > best if self.best_mode == "max" else value < best)

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON saved with `step` (default: the newest intact step)."""
    if step is None:
      step = self.latest_step()
    return read_meta(self.directory / str(self._resolve(step)))

  def _resolve(self, step: int | str | None) -> int:
    return select_step(self.directory, step, metric=self.best_metric, mode=self.best_mode)

  def restore(self, target: TrainState, labels: PyTree, step: int | str | None = None) -> TrainState:
    """Restores a full TrainState shaped (and sharded) like `target`.

    The params are split again by `labels`; the target's shardings decide
    where arrays go, so a run saved on 8 devices restores onto 1 and back.
    A step whose saved arrays (paths, shapes: its metadata, read first) are
    not the target's is a CheckpointMismatchError naming them.
    """
    step = self._resolve(step)
    step_dir = self.directory / str(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saved(target))
    _check_fits(saved_shapes(step_dir / "state"), abstract, step_dir)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"{self.directory}/{step}: the checkpoint does not fit the state of this run "
          f"(different model, partition or optimizer?) or is damaged: {e}") from e
    except Exception as e:  # tensorstore raises bare exceptions on bad files
      raise CheckpointError(f"{self.directory}/{step}: the checkpoint is damaged: "
                            f"{type(e).__name__}: {str(e)[:500]}") from e
    check_fingerprints(step_dir, read_meta(step_dir), integrity.fingerprints(restored))
    trainable, frozen = partition.split(restored["params"], labels)
    ema = partition.split(restored["ema_params"], labels)[0] if "ema_params" in restored else None
    return TrainState(step=restored["step"], trainable=trainable, frozen=frozen,
                      opt_state=restored["opt_state"], model_state=restored["model_state"],
                      rng=restored["rng"], ema=ema)

  def restore_latest(self, make_target: Callable[[int], tuple[TrainState, PyTree]]
                     ) -> TrainState | None:
    """Restores the newest step that reads back, or None if there is none.

    `make_target(step)` gives the (state, labels) to restore step `step`
    into. A damaged newer step is logged, renamed to `<step>.damaged` (kept
    for inspection, out of the way of new saves) and skipped. If no step
    reads back, the newest one's error is raised. A step saved from another
    state (another model, partition, optimizer or phase: a
    CheckpointMismatchError) is raised at once, nothing renamed: the newer
    steps are this run's, intact.
    """
    errors: list[tuple[int, CheckpointError]] = []
    for step in reversed(self._step_dirs()):
      problem = self._problem(step)
      try:
        if problem is not None:
          raise CheckpointError(f"{self.directory / str(step)}: {problem}")
        state = self.restore(*make_target(step), step=step)
      except CheckpointMismatchError:
        raise
      except CheckpointError as e:
        errors.append((step, e))
        continue
      for bad, error in errors:
        kept = _unused_name(self.directory, f"{bad}.damaged")
        log.warning("Checkpoint step %d is damaged; resuming from step %d instead. It is "
                    "kept as %s. %s", bad, step, self.directory / kept, error)
        if jax.process_index() == 0:  # one host moves it; the others only skip it
          (self.directory / str(bad)).rename(self.directory / kept)
        self._problems.pop(bad, None)
      if errors and hasattr(self._manager, "reload"):
        self._manager.reload()
      return state
    if errors:
      raise errors[0][1]
    return None

  def restore_or(self, target: TrainState, labels: PyTree) -> TrainState:
    """Restores the newest intact checkpoint if there is one, else returns `target`."""
    restored = self.restore_latest(lambda step: (target, labels))
    return target if restored is None else restored

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # an async save's error surfaces here
      raise self._save_error(None, e) from e

  def close(self) -> None:
    """Waits for the pending save, prunes, and closes (call on every exit path)."""
    try:
      self.wait()
      self._prune()
    finally:
      self._manager.close()


def _unused_name(directory: epath.Path, name: str) -> str:
  """`name`, or `name-2`, `name-3`, ... when taken (a step damaged twice)."""
  candidate, n = name, 1
  while (directory / candidate).exists():
    n += 1
    candidate = f"{name}-{n}"
  return candidate
