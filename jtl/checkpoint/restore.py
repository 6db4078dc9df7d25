"""A run's variables read back from its checkpoints without a manager, and
the check every restore makes: the arrays are the ones saved.

`restore_variables` gives the params and model state of a step as host
numpy arrays, for evaluation and export (no optimizer, any number of
devices). Each save records a fingerprint per array in the step's meta
(`FINGERPRINTS`, `jtl.checkpoint.integrity`); `check_fingerprints` compares
them with the arrays read, here and in `CheckpointManager.restore`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from etils import epath

from jtl import lora_layout
from jtl import tree as jtree
from jtl.checkpoint import integrity
from jtl.checkpoint.layout import (
  ranked_steps,
  read_meta,
  checkpoint_dir,
  default_mode,
  recorded_metric,
  select_step,
  step_problem,
)
from jtl.errors import CheckpointError, bullet_list
from jtl.weights.orbax_reader import metadata_tree
from jtl.weights.readers import read

log = logging.getLogger(__name__)


def restore_variables(workdir: str | os.PathLike, *, step: int | str | None = "latest",
                      metric: str | None = None, mode: str | None = None, ema: bool = True,
                      warn_lora: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
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
  or next best) is read; the meta returned says so (`REQUESTED`: the step
  asked for, `SKIPPED`: the damaged steps skipped, [] when none;
  `fallback_note` words it for a script's last lines). An explicit step
  number that is damaged is a CheckpointError, with nothing else tried.

  A LoRA run's params hold its adapters unmerged ("lora_a", "lora_b", as it
  trained them), which the plain module ignores: a warning says so and how to
  fold them in (`merge_lora`); `warn_lora=False` when the caller does that.

  Returns:
    (variables, meta) where meta is the JSON saved with the checkpoint, plus
    `REQUESTED` and `SKIPPED`.
  """
  directory = checkpoint_dir(workdir)
  if step == "best" and metric is None:
    metric, mode = recorded_metric(directory, mode or "max")
  mode = mode or default_mode(metric)
  first = select_step(directory, step, metric=metric, mode=mode)
  candidates = [first]
  if step in (None, "latest", "best"):
    candidates += [s for s in ranked_steps(directory, step, metric, mode) if s != first]
  failures = []
  for i, chosen in enumerate(candidates):
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
      meta = read_meta(step_dir)  # once: a round trip per read in a bucket
      for part in (p for p in parts if p != drop):
        flat = read(step_dir / "state", format="orbax", subtree=part)
        check_fingerprints(step_dir, meta, {f"{part}/{path}": integrity.host_fingerprint(x)
                                             for path, x in flat.items()})
        tree = jtree.unflatten(flat)
        variables.update({"params": tree} if part.endswith("params") else tree)
    except CheckpointError as e:
      failures.append((chosen, e))
      if i + 1 < len(candidates):  # an explicit step has no next to try: its error is raised
        log.warning("Checkpoint step %d cannot be read, trying step %d (%s): %s", chosen,
                    candidates[i + 1], "next best" if step == "best" else "next newest", e)
      elif i:
        log.warning("Checkpoint step %d cannot be read either: %s", chosen, e)
      continue
    if warn_lora:
      _warn_unmerged_lora(step_dir, variables["params"], meta)
    skipped = [s for s, _ in failures]
    return variables, {**meta, REQUESTED: step if step is not None else "latest",
                       SKIPPED: skipped}
  raise failures[0][1]


# What `restore_variables` adds to a step's meta: the step asked for ("best",
# "latest" or a number) and the damaged steps it skipped to reach the one read.
REQUESTED = "requested_step"
SKIPPED = "skipped_damaged"


def step_record(meta: dict[str, Any]) -> dict[str, Any]:
  """The step read, the step asked for and the damaged steps skipped, for a
  result file or an export's sidecar (from `restore_variables`' meta).

  >>> step_record({"step": 4, "requested_step": "best", "skipped_damaged": [2]})
  {'step': 4, 'requested_step': 'best', 'skipped_damaged': [2]}
  """
  return {"step": meta.get("step"), REQUESTED: meta.get(REQUESTED),
          SKIPPED: list(meta.get(SKIPPED) or [])}


def fallback_note(meta: dict[str, Any]) -> str | None:
  """A sentence saying which step was read instead of a damaged one asked for
  (None when the step asked for was read).

  >>> fallback_note({"step": 4, "requested_step": "best", "skipped_damaged": [2]})
  'The best checkpoint (step 2) is damaged: step 4, the next best, was used instead.'
  """
  skipped = meta.get(SKIPPED)
  if not skipped:
    return None
  requested = meta.get(REQUESTED)
  steps = ", ".join(str(s) for s in skipped)
  what = "best" if requested == "best" else "newest"
  return (f"The {what} checkpoint (step {steps}) is damaged: step {meta.get('step')}, the next "
          f"{what}, was used instead." if len(skipped) == 1 else
          f"The {what} checkpoints (steps {steps}) are damaged: step {meta.get('step')}, the "
          f"next {what}, was used instead.")


def _warn_unmerged_lora(step_dir: epath.Path, params: Any, meta: dict[str, Any]) -> None:
  """Logs how to use the LoRA adapters `params` hold, if any: a plain Linen
  module's apply ignores the extra leaves and gives the un-adapted outputs."""
  layers = lora_layout.adapted_modules(jtree.flatten(params))
  if not layers:
    return
  strategy = (meta.get("config") or {}).get("strategy") or {}
  alpha = (f"the run's alpha={strategy['alpha']!r} (its config's strategy.alpha)"
           if strategy.get("name") == "lora" and "alpha" in strategy else
           "the alpha the run's LoraModel / LoraWeights had (the checkpoint does not record it)")
  shown = ", ".join(layers[:10]) + (" ..." if len(layers) > 10 else "")
  log.warning(
      "%s: the params hold the LoRA adapters (%s, %s) of %d layer(s) unmerged: %s. The "
      "plain module does not use them (a Linen module.apply(variables, x) ignores them and "
      "gives the model without its adapters; an NNX module has no place for them). Call it "
      "through the LoRA wrapper it trained with (jtl.recipes.strategies.LoraModel(module, "
      "alpha) for a Linen module, LoraWeights(model, alpha) for any model), or fold them "
      "into the kernels for the plain module: variables[\"params\"] = "
      "jtl.recipes.strategies.merge_lora(variables[\"params\"], alpha), with %s.",
      step_dir, lora_layout.LORA_A, lora_layout.LORA_B, len(layers), shown, alpha)


# The meta key of the arrays' fingerprints (`jtl.checkpoint.integrity`).
FINGERPRINTS = "fingerprints"


def check_fingerprints(step_dir: epath.Path, meta: dict[str, Any],
                       actual: dict[str, int]) -> None:
  """A CheckpointError naming the arrays of `step_dir` read back other than
  they were saved (Orbax keeps no checksum: a flipped bit loads silently)."""
  changed = integrity.differing(meta.get(FINGERPRINTS), actual)
  if changed:
    raise CheckpointError(
        f"{step_dir}: the data of {len(changed)} array(s) differ from what was saved (a "
        "flipped bit or a damaged chunk on the storage):\n" + bullet_list(changed, limit=10)
        + "\nThe checkpoint is damaged; an earlier one is used where there is one.")


def _saved_tree(state_dir: epath.Path) -> Any:
  """The metadata tree of a step's state/ folder (what Orbax saved: each
  array's path and shape); a CheckpointError when it cannot be read."""
  try:
    return metadata_tree(state_dir)
  except CheckpointError:
    raise
  except Exception as e:  # Orbax's own KeyError/ValueError on damaged metadata
    raise CheckpointError(f"{state_dir}: its metadata cannot be read ({type(e).__name__}: "
                          f"{str(e)[:200]})") from e


def saved_shapes(state_dir: epath.Path) -> dict[str, tuple[int, ...] | None]:
  """{"/"-joined path: shape (None: not recorded)} of every array a step's
  state/ folder holds (a leaf saved as None, e.g. a frozen parameter's
  optimizer state, is none), from its metadata alone; a CheckpointError when
  that cannot be read."""
  tree = _saved_tree(state_dir)
  if not isinstance(tree, dict):
    raise CheckpointError(f"{state_dir}: its metadata lists no saved state (damaged)")
  shape = lambda leaf: None if getattr(leaf, "shape", None) is None else tuple(leaf.shape)
  return {path: shape(leaf) for path, leaf in jtree.leaves_with_paths(tree) if leaf is not None}


def _nonempty_branches(state_dir: epath.Path, names: tuple[str, ...]) -> list[str]:
  """Those of `names` that hold arrays in the saved state (a model without
  BatchNorm saves an empty model_state)."""
  tree = _saved_tree(state_dir)
  return [n for n in names if isinstance(tree, dict) and jax.tree.leaves(tree.get(n))]
