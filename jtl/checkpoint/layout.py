"""What a run's checkpoint folder holds, and which step a reader picks.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`, where `meta` is JSON
(model name, number of classes, metrics, anything the caller adds). Read
only, without a manager: the numbered step folders, whether a step is
complete and readable (`step_problem`), a step's meta, the metric the run
picked its best checkpoint by, and "latest" / "best" / a number resolved to
a step (`select_step`). The manager (`jtl.checkpoint.manager`) writes and
prunes; `jtl.checkpoint.restore` reads a step's arrays back.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from jtl import paths
from jtl.errors import CheckpointError
from jtl.weights import orbax_verify

CHECKPOINT_DIR = "checkpoints"


def default_mode(metric: str | None) -> str:
  """Which way a metric improves: "min" for a loss or error, else "max".

  >>> default_mode("loss"), default_mode("top5_error"), default_mode("accuracy")
  ('min', 'min', 'max')
  """
  return "min" if metric and ("loss" in metric or "error" in metric) else "max"


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`, local or in a bucket (`jtl.paths`; a bucket that
  cannot be reached is a CheckpointError saying what to check)."""
  path = paths.path(workdir)
  paths.check_reachable(path)
  # Orbax refuses relative paths; "runs/x" means relative to the cwd.
  return (path if path.is_absolute() else paths.path(os.path.abspath(workdir))) / CHECKPOINT_DIR


def step_problem(step_dir: epath.Path) -> str | None:
  """Why `step_dir` is not a complete, readable checkpoint (None if it is).

  Cheap: reads metadata only (see `orbax_verify.verify_orbax`), never arrays.
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
  verify = getattr(orbax_verify, "verify_orbax", None)
  if verify is not None:
    try:
      verify(step_dir / "state")
    except CheckpointError as e:
      return str(e)
  return None


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
  return read_meta(checkpoint_dir(workdir) / str(steps[-1])) if steps else None


def recorded_metric(directory: epath.Path, mode: str = "max") -> tuple[str | None, str]:
  """(metric, mode) the run picked its best checkpoint by, from the newest
  step's meta that records it (`best_metric`, or an app run's saved config);
  (None, mode) when no step does."""
  for s in reversed(step_numbers(directory)):
    meta = read_meta(directory / str(s))
    metric = meta.get("best_metric") or (meta.get("config") or {}).get("best_metric")
    if metric:
      return metric, meta.get("best_mode", mode)
  return None, mode


def score(meta: dict[str, Any], metric: str | None) -> float | None:
  """A step's finite `metric` from its meta, else None."""
  value = (meta.get("metrics") or {}).get(metric) if metric else None
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _scores(directory: epath.Path, steps: list[int], metric: str | None) -> dict[int, float]:
  scores = {s: score(read_meta(directory / str(s)), metric) for s in steps}
  return {s: v for s, v in scores.items() if v is not None}


def best_scored(directory: epath.Path, steps: list[int], metric: str, mode: str) -> int | None:
  scores = _scores(directory, steps, metric)
  return (max if mode == "max" else min)(scores, key=scores.get) if scores else None


def ranked_steps(directory: epath.Path, step: int | str | None, metric: str | None,
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
    best = best_scored(directory, steps, metric, mode) if metric else None
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


def read_meta(step_dir: epath.Path) -> dict[str, Any]:
  path = step_dir / "meta" / "metadata"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
