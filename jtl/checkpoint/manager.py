"""Orbax training checkpoints in a run's workdir: save, keep, resume, restore.

A checkpoint holds everything a run needs to continue exactly: the step (which
is also the input position: the pipeline restarts at `start_step=step`), the
full params, the model's mutable collections (BatchNorm statistics), the
optimizer state of the trainable leaves and the rng. Orbax writes each step to
a temporary directory and renames it when complete, so a process killed during
a save leaves the last good checkpoint untouched; the next start uses it.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`, where `meta` is JSON
(model name, number of classes, metrics, anything the caller adds).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jtl import partition
from jtl import tree as jtree
from jtl.errors import CheckpointError
from jtl.state import TrainState

PyTree = Any
CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  path = epath.Path(workdir)
  # Orbax refuses relative paths; "runs/x" means relative to the cwd.
  return (path if path.is_absolute() else epath.Path(os.path.abspath(workdir))) / CHECKPOINT_DIR


def _to_saved(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "model_state": state.model_state,
          "opt_state": state.opt_state, "rng": state.rng}


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
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise CheckpointError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if keep < 1:
      raise CheckpointError(f"keep must be >= 1 (checkpoints to keep), got {keep}.")
    self.directory = checkpoint_dir(workdir)
    self.save_every = save_every
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies: list[Any] = [pp.LatestN(n=keep)]
    if best_metric:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric],
                               reverse=best_mode == "min", n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None if none has it)."""
    if not self.best_metric:
      return None
    try:
      return self._resolve("best")
    except CheckpointError:
      return None

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: TrainState, *, metrics: dict[str, float] | None = None,
           meta: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` at `step` if due (or `force`); returns whether it saved."""
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    if self.best_metric and metrics is not None and self.best_metric not in metrics:
      raise CheckpointError(
          f"best_metric {self.best_metric!r} is not among the metrics given to save(): "
          f"{sorted(metrics)}.")
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saved(state)),
        meta=ocp.args.JsonSave({"step": int(step), "metrics": metrics, **(meta or {})}))
    return self._manager.save(step, args=args, metrics=metrics, force=True)

  def meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._resolve(step)
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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
          f"(different model, partition or optimizer?): {e}") from e
    trainable, frozen = partition.split(restored["params"], labels)
    return TrainState(step=restored["step"], trainable=trainable, frozen=frozen,
                      opt_state=restored["opt_state"], model_state=restored["model_state"],
                      rng=restored["rng"])

  def restore_or(self, target: TrainState, labels: PyTree) -> TrainState:
    """Restores the latest checkpoint if there is one, else returns `target`."""
    return target if self.latest_step() is None else self.restore(target, labels)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_variables(workdir: str | os.PathLike, *, step: int | str | None = "latest",
                      metric: str | None = None, mode: str = "max") -> tuple[dict[str, Any], dict[str, Any]]:
  """Restores {"params": ..., **model_state} as host numpy arrays, for evaluation.

  Reads only the params and model statistics (never the optimizer state), so
  it needs no optimizer and works on any number of devices. `step` is a step
  number, "latest", or "best" (highest `metric` among the kept checkpoints,
  or lowest with mode="min").

  Returns:
    (variables, meta) where meta is the JSON saved with the checkpoint.
  """
  directory = checkpoint_dir(workdir)
  chosen = select_step(directory, step, metric=metric, mode=mode)
  from jtl.checkpoint.readers import read  # pylint: disable=g-import-not-at-top
  variables = {}
  for part in ("params", "model_state"):
    flat = read(directory / str(chosen) / "state", format="orbax", subtree=part)
    tree = jtree.unflatten(flat) if flat else {}
    variables.update({"params": tree} if part == "params" else tree)
  return variables, _read_meta(directory / str(chosen))


def select_step(directory: epath.Path, step: int | str | None, *, metric: str | None = None,
                mode: str = "max") -> int:
  """Resolves "latest", "best" (by `metric` in the saved meta) or a step number
  to a finished checkpoint step in `directory`."""
  steps = sorted(int(p.name) for p in directory.iterdir()
                 if p.is_dir() and p.name.isdigit()) if directory.exists() else []
  if not steps:
    raise CheckpointError(
        f"{directory}: no checkpoints. Train first (scripts/finetune.py --workdir "
        f"{directory.parent}).")
  if step in (None, "latest"):
    return steps[-1]
  if step == "best":
    metas = {s: _read_meta(directory / str(s)) for s in steps}
    scored = {s: m["metrics"][metric] for s, m in metas.items()
              if metric and m.get("metrics") and metric in m["metrics"]}
    if not scored:
      raise CheckpointError(
          f"{directory}: no checkpoint has metric {metric!r}; saved steps {steps}. "
          "Use step='latest', or evaluate during training so checkpoints carry metrics.")
    return (max if mode == "max" else min)(scored, key=scored.get)
  if int(step) not in steps:
    raise CheckpointError(f"{directory}: no checkpoint at step {step}; saved steps: {steps}.")
  return int(step)


def _read_meta(step_dir: epath.Path) -> dict[str, Any]:
  import json  # pylint: disable=g-import-not-at-top
  path = step_dir / "meta" / "metadata"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def export_orbax(variables: PyTree, path: str | os.PathLike) -> epath.Path:
  """Writes variables as an Orbax checkpoint directory (readable by `read`,
  and with `read(path, subtree="params")` for the params alone)."""
  path = epath.Path(os.path.abspath(path)) if not epath.Path(path).is_absolute() else epath.Path(path)
  if path.exists():
    raise CheckpointError(f"{path} exists; Orbax does not overwrite. Choose a new --out.")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, jax.tree.map(np.asarray, variables))
  checkpointer.wait_until_finished()
  return path
