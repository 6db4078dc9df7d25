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
intact step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jtl import partition, paths
from jtl import tree as jtree
from jtl.checkpoint import integrity
from jtl.weights import orbax_reader
from jtl.errors import CheckpointError, bullet_list
from jtl.state import TrainState
from jtl.tree import PyTree
from jtl.weights.orbax_reader import metadata_tree
from jtl.weights.readers import read

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"


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


def default_mode(metric: str | None) -> str:
  """Which way a metric improves: "min" for a loss or error, else "max".

  >>> default_mode("loss"), default_mode("top5_error"), default_mode("accuracy")
  ('min', 'min', 'max')
  """
  return "min" if metric and ("loss" in metric or "error" in metric) else "max"


def _check_restored(restored: PyTree, abstract: PyTree, where: Any) -> None:
  """Refuses a restore that left target leaves empty or added others: Orbax
  fills a target array from a leaf saved as None (a parameter frozen, so
  without optimizer state, when the checkpoint was written) with None."""
  def paths(tree: PyTree) -> set[str]:
    return {p for p, leaf in jtree.leaves_with_paths(tree) if leaf is not None}
  missing = sorted(paths(abstract) - paths(restored))
  extra = sorted(paths(restored) - paths(abstract))
  if missing or extra:
    raise CheckpointError(
        f"{where}: the checkpoint was saved with another partition or optimizer than this run "
        f"has (e.g. other rules, so other parameters train).\nIn this run, not in the "
        f"checkpoint:\n{bullet_list(missing[:10]) or '  (none)'}\nIn the checkpoint, not in "
        f"this run:\n{bullet_list(extra[:10]) or '  (none)'}\nResume with the rules and "
        "optimizer it was saved with, or use a new workdir (to start from its weights, "
        "restore them with jtl.restore_variables and pass them as the new run's variables).",
    )


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`, local or in a bucket (`jtl.paths`)."""
  path = paths.path(workdir)
  # Orbax refuses relative paths; "runs/x" means relative to the cwd.
  return (path if path.is_absolute() else paths.path(os.path.abspath(workdir))) / CHECKPOINT_DIR


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


@jax.jit
def _nonfinite(leaves: list[jax.Array]) -> list[jax.Array]:
  return [~jnp.all(jnp.isfinite(x)) for x in leaves]


def nonfinite_paths(tree: PyTree) -> list[str]:
  """The "/"-joined paths of the float leaves of `tree` holding a NaN or inf."""
  floats = [(path, x) for path, x in jtree.leaves_with_paths(tree)
            if x is not None and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  flags = jax.device_get(_nonfinite([x for _, x in floats]))
  return [path for (path, _), bad in zip(floats, flags) if bad]


def step_problem(step_dir: epath.Path) -> str | None:
  """Why `step_dir` is not a complete, readable checkpoint (None if it is).

  Cheap: reads metadata only (see `orbax_reader.verify_orbax`), never arrays.
  """
  if not ocp.utils.is_checkpoint_finalized(step_dir):
    # In a bucket Orbax writes in place and marks a finished save with a
    # commit_success.txt file (no atomic rename there).
    return "its save did not finish (not finalized by Orbax)"
  if not (step_dir / "state").is_dir():
    return "no state/ folder (not a complete checkpoint)"
  if not (step_dir / "meta" / "metadata").exists():
    return "no meta/metadata file (not a complete checkpoint)"
  try:
    json.loads((step_dir / "meta" / "metadata").read_text())
  except (OSError, ValueError) as e:
    return f"unreadable meta/metadata ({e})"
  verify = getattr(orbax_reader, "verify_orbax", None)
  if verify is not None:
    try:
      verify(step_dir / "state")
    except CheckpointError as e:
      return str(e)
  return None


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
    return _best(self.directory, self.intact_steps(), self.best_metric, self.best_mode)

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
    bad = nonfinite_paths(_to_saved(state))
    if bad:
      raise CheckpointError(
          f"Not saving step {step} to {self.directory}: the state holds NaN or inf in\n"
          + bullet_list(bad, limit=10) + f"\nThe kept checkpoints {self._step_dirs()} are "
          "left as they are.")
    self.wait()  # the previous save is complete before it counts for pruning
    if self._lock is not None:
      self._verify_lock()  # nothing is written or pruned by a run that lost the workdir
    self._prune()
    saved = _to_saved(state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(saved),
        meta=ocp.args.JsonSave({"step": int(step), "metrics": _finite_metrics(metrics),
                                **self._selection(), **(meta or {}),
                                FINGERPRINTS: integrity.fingerprints(saved)}))
    try:
      return self._manager.save(step, args=args, force=True)
    except Exception as e:  # Orbax/tensorstore raise bare exceptions
      raise self._save_error(step, e) from e

  def _verify_lock(self) -> None:
    """Raises on every process when process 0 (the lock's holder) lost the
    lock: a save is collective, so the others must stop with it."""
    lost = None
    try:
      self._lock.verify()
    except CheckpointError as e:
      lost = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.broadcast_one_to_all(np.int32(lost is not None)) and lost is None:
        lost = CheckpointError(f"Process 0 no longer holds the lock of {self.directory.parent}:"
                               " this run stops without saving (process 0 says why).")
    if lost is not None:
      raise lost

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
      unread = []
      for s in steps:
        if s not in self._step_scores:
          meta = _read_meta(self.directory / str(s))
          if meta:
            self._step_scores[s] = _score(meta, self.best_metric)
          else:
            unread.append(s)
      if unread:  # a failed read (a timeout) must not cost the best: no deletion now
        log.warning("Keeping every checkpoint for now: the meta of step(s) %s could not be "
                    "read, and one of them may be the best.", unread)
        return
      scores = {s: self._step_scores[s] for s in steps if self._step_scores[s] is not None}
      if scores:
        kept.add((max if self.best_mode == "max" else min)(scores, key=scores.get))
    for step in steps:
      if step not in kept:
        self._manager.delete(step)
        self._problems.pop(step, None)
        self._step_scores.pop(step, None)

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON saved with `step` (default: the newest intact step)."""
    if step is None:
      step = self.latest_step()
    return _read_meta(self.directory / str(self._resolve(step)))

  def _resolve(self, step: int | str | None) -> int:
    return select_step(self.directory, step, metric=self.best_metric, mode=self.best_mode)

  def restore(self, target: TrainState, labels: PyTree, step: int | str | None = None) -> TrainState:
    """Restores a full TrainState shaped (and sharded) like `target`.

    The params are split again by `labels`; the target's shardings decide
    where arrays go, so a run saved on 8 devices restores onto 1 and back.
    """
    step = self._resolve(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saved(target))
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
    _check_restored(restored, abstract, self.directory / str(step))
    step_dir = self.directory / str(step)
    _check_fingerprints(step_dir, _read_meta(step_dir), integrity.fingerprints(restored))
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
    reads back, the newest one's error is raised (e.g. a different model).
    """
    errors: list[tuple[int, CheckpointError]] = []
    for step in reversed(self._step_dirs()):
      problem = self._problem(step)
      try:
        if problem is not None:
          raise CheckpointError(f"{self.directory / str(step)}: {problem}")
        state = self.restore(*make_target(step), step=step)
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


def restore_variables(workdir: str | os.PathLike, *, step: int | str | None = "latest",
                      metric: str | None = None, mode: str | None = None, ema: bool = True
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Restores {"params": ..., **model_state} as host numpy arrays, for evaluation.

  A run trained with weight EMA (`fit(ema_decay=...)`) gives its EMA params
  as "params" (what it evaluated and is exported with); `ema=False` gives the
  raw weights instead.

  Reads only the params and model statistics (never the optimizer state), so
  it needs no optimizer and works on any number of devices. `step` is a step
  number, "latest", or "best" (highest `metric` among the kept checkpoints,
  or lowest with mode="min", the default for a loss or error; by default the
  metric and mode the run picked its best checkpoint by, recorded in each
  step's meta). For "latest" and
  "best", a damaged step is skipped with a warning and the next one (newest,
  or next best) is read.

  Returns:
    (variables, meta) where meta is the JSON saved with the checkpoint.
  """
  directory = checkpoint_dir(workdir)
  if step == "best" and metric is None:
    metric, mode = recorded_metric(directory, mode or "max")
  mode = mode or default_mode(metric)
  first = select_step(directory, step, metric=metric, mode=mode)
  candidates = [first]
  if step in (None, "latest", "best"):
    candidates += [s for s in _ranked(directory, step, metric, mode) if s != first]
  failures = []
  for chosen in candidates:
    step_dir = directory / str(chosen)
    try:
      problem = step_problem(step_dir)
      if problem is not None:
        raise CheckpointError(f"{step_dir}: {problem}")
      variables = {}
      parts = _nonempty_branches(step_dir / "state", ("ema_params", "params", "model_state"))
      if "params" not in parts and "ema_params" not in parts:
        raise CheckpointError(f"{step_dir}: its metadata lists no params (damaged)")
      drop = "params" if ema and "ema_params" in parts else "ema_params"
      meta = _read_meta(step_dir)  # once: a round trip per read in a bucket
      for part in (p for p in parts if p != drop):
        flat = read(step_dir / "state", format="orbax", subtree=part)
        _check_fingerprints(step_dir, meta, {f"{part}/{path}": integrity.host_fingerprint(x)
                                             for path, x in flat.items()})
        tree = jtree.unflatten(flat)
        variables.update({"params": tree} if part.endswith("params") else tree)
    except CheckpointError as e:
      failures.append(e)
      log.warning("Checkpoint step %d cannot be read, trying the next: %s", chosen, e)
      continue
    return variables, meta
  raise failures[0]


def _unused_name(directory: epath.Path, name: str) -> str:
  """`name`, or `name-2`, `name-3`, ... when taken (a step damaged twice)."""
  candidate, n = name, 1
  while (directory / candidate).exists():
    n += 1
    candidate = f"{name}-{n}"
  return candidate


# The meta key of the arrays' fingerprints (`jtl.checkpoint.integrity`).
FINGERPRINTS = "fingerprints"


def _check_fingerprints(step_dir: epath.Path, meta: dict[str, Any],
                        actual: dict[str, int]) -> None:
  """A CheckpointError naming the arrays of `step_dir` read back other than
  they were saved (Orbax keeps no checksum: a flipped bit loads silently)."""
  changed = integrity.differing(meta.get(FINGERPRINTS), actual)
  if changed:
    raise CheckpointError(
        f"{step_dir}: the data of {len(changed)} array(s) differ from what was saved (a "
        "flipped bit or a damaged chunk on the storage):\n" + bullet_list(changed, limit=10)
        + "\nThe checkpoint is damaged; an earlier one is used where there is one.")


def _nonempty_branches(state_dir: epath.Path, names: tuple[str, ...]) -> list[str]:
  """Those of `names` that hold arrays in the saved state (a model without
  BatchNorm saves an empty model_state)."""
  try:
    tree = metadata_tree(state_dir)
  except CheckpointError:
    raise
  except Exception as e:  # Orbax's own KeyError/ValueError on damaged metadata
    raise CheckpointError(f"{state_dir}: its metadata cannot be read ({type(e).__name__}: "
                          f"{str(e)[:200]})") from e
  return [n for n in names if isinstance(tree, dict) and jax.tree.leaves(tree.get(n))]


def step_numbers(directory: epath.Path) -> list[int]:
  """The numbered step folders in `directory`, ascending."""
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def finished_steps(workdir: str | os.PathLike) -> list[int]:
  """The complete, readable checkpoint steps of a run's workdir, ascending.

  An unfinished save (Orbax's `<step>.orbax-checkpoint-tmp*` folder, left by
  a kill during the save) or a damaged step is not a checkpoint: a run
  that finds only such folders starts from the beginning.
  """
  directory = checkpoint_dir(workdir)
  return [s for s in step_numbers(directory) if step_problem(directory / str(s)) is None]


def latest_meta(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The meta saved with a workdir's newest complete checkpoint step (what a
  resume starts from); None when it has none."""
  steps = finished_steps(workdir)
  return _read_meta(checkpoint_dir(workdir) / str(steps[-1])) if steps else None


def recorded_metric(directory: epath.Path, mode: str = "max") -> tuple[str | None, str]:
  """(metric, mode) the run picked its best checkpoint by, from the newest
  step's meta that records it (`best_metric`, or an app run's saved config);
  (None, mode) when no step does."""
  for s in reversed(step_numbers(directory)):
    meta = _read_meta(directory / str(s))
    metric = meta.get("best_metric") or (meta.get("config") or {}).get("best_metric")
    if metric:
      return metric, meta.get("best_mode", mode)
  return None, mode


def _score(meta: dict[str, Any], metric: str | None) -> float | None:
  """A step's finite `metric` from its meta, else None."""
  value = (meta.get("metrics") or {}).get(metric) if metric else None
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _scores(directory: epath.Path, steps: list[int], metric: str | None) -> dict[int, float]:
  scores = {s: _score(_read_meta(directory / str(s)), metric) for s in steps}
  return {s: v for s, v in scores.items() if v is not None}


def _best(directory: epath.Path, steps: list[int], metric: str, mode: str) -> int | None:
  scores = _scores(directory, steps, metric)
  return (max if mode == "max" else min)(scores, key=scores.get) if scores else None


def _ranked(directory: epath.Path, step: int | str | None, metric: str | None,
            mode: str) -> list[int]:
  """Fallback order: newest first for "latest", best first for "best"."""
  steps = step_numbers(directory)
  if step != "best":
    return steps[::-1]
  scores = _scores(directory, steps, metric)
  return sorted(scores, key=scores.get, reverse=mode == "max")


def select_step(directory: epath.Path, step: int | str | None, *, metric: str | None = None,
                mode: str = "max") -> int:
  """Resolves "latest", "best" (by a finite `metric` in the saved meta) or a
  step number to a checkpoint step in `directory`."""
  steps = step_numbers(directory)
  if not steps:
    raise CheckpointError(
        f"{directory}: no checkpoints. Train first (scripts/finetune.py --workdir "
        f"{directory.parent}).")
  if step in (None, "latest"):
    return steps[-1]
  if step == "best":
    best = _best(directory, steps, metric, mode) if metric else None
    if best is None and not metric:
      raise CheckpointError(
          f"{directory}: step='best' needs a metric and none is recorded with the saved steps "
          f"{steps} (the run had no best_metric); pass metric='accuracy' (or another metric "
          "the run evaluated), or use step='latest'.")
    if best is None:
      raise CheckpointError(
          f"{directory}: no checkpoint has a finite metric {metric!r}; saved steps {steps}. "
          "Use step='latest', or evaluate during training so checkpoints carry metrics.")
    return best
  if isinstance(step, str) and not step.isdigit():
    raise CheckpointError(f"step must be 'latest', 'best' or a step number, got {step!r}.")
  if int(step) not in steps:
    raise CheckpointError(f"{directory}: no checkpoint at step {step}; saved steps: {steps}.")
  return int(step)


def _read_meta(step_dir: epath.Path) -> dict[str, Any]:
  path = step_dir / "meta" / "metadata"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
