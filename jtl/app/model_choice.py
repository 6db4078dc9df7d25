"""`model="auto"`: the config keys of the backbone chosen by measurement.

The candidates are `model_candidates` (zoo names, "hf-hub:<owner>/<name>"
repos, local folders in the Hub layout, "package.module:Name"; empty: the
zoo's image models whose weights ship in an installed pip package,
EfficientNet-Lite0/1/2);
`jtl.recipes.selection.select_backbone` fits the cached probe on each
within `model_budget_seconds` and picks the best on the validation split.
The table goes to the log and to the workdir (`model_selection.json`,
`model_selection.md`); the run then trains the chosen model exactly as a
config naming it would, so its checkpoints record that model and
`evaluate.py` / `convert.py` need nothing else. `choose` also hands the run
the chosen model's training features from the selection (`Choice`): its
cached probe (LP-FT's probe phase, a linear probe) trains on them instead of
a second backbone pass over the same training split, and gives the same
head. Resuming the workdir keeps its choice (and extracts again).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from jtl import models, paths, preemption
from jtl.app import keys
from jtl.checkpoint import layout
from jtl.data import sources
from jtl.errors import ConfigError, JtlError, bullet_list
from jtl.recipes import selection, strategies
from jtl.weights import hub
from jtl.weights import sources as weight_sources

AUTO = "auto"
TABLE_JSON = "model_selection.json"
TABLE_MD = "model_selection.md"


@dataclasses.dataclass(frozen=True)
class Choice:
  """What `choose` hands the run.

  Attributes:
    config: the config naming the chosen model.
    train_features: (features, labels) of the chosen model over the run's
      training split, the unaugmented pass of its cached probe
      (`experiment.eval_batches(config, spec, config.train_split,
      config.dataset)`), extracted with the Linen module; None when the
      workdir already chose (a resumed run).
  """
  config: ml_collections.ConfigDict
  train_features: tuple[np.ndarray, np.ndarray] | None = None


def default_candidates() -> list[str]:
  """The registered image models whose default weights ship in a pip package
  (found by `jtl.weights.sources` without the network when installed)."""
  names = []
  for name in models.list_models():
    spec = models.get_spec(name)
    source = weight_sources.get_source(spec.pretrained) if spec.pretrained else None
    if spec.input_kind == "image" and source is not None and source.package is not None:
      names.append(name)
  return names


def candidate_names(config: ml_collections.ConfigDict) -> tuple[list[str], bool]:
  """(the names to try, whether the user listed them): `model_candidates`,
  names or comma-separated names (`--config.model_candidates=a,b` arrives as
  ("a,b",)), else `default_candidates()`."""
  given = config.model_candidates or ()
  given = [given] if isinstance(given, str) else given
  split = [n.strip() for entry in given for n in str(entry).split(",") if n.strip()]
  names = list(dict.fromkeys(split))  # in order, once each
  return (names, True) if names else (default_candidates(), False)


def candidates(config: ml_collections.ConfigDict) -> tuple[list[tuple[str, str | None]], list[str]]:
  """([(name, why it is skipped or None)], problems): every candidate must be
  a known image model, and one the user listed must have its weights on this
  machine or reachable (with `pretrained`; a Hub repo's are downloaded now,
  `weights_problem`); a default one without them is skipped."""
  names, listed = candidate_names(config)
  entries, problems = [], []
  for name in names:
    try:
      if name == AUTO:
        raise ConfigError("'auto' chooses among the candidates; it is none of them")
      spec = models.get_spec(name)
    except JtlError as e:
      problems.append(f"model_candidates: {name!r}: {e}")
      continue
    if spec.input_kind != "image":
      problems.append(f"model_candidates: {name!r} takes {spec.input_kind}; model='auto' "
                      "chooses among image models")
      continue
    missing = weights_problem(spec) if config.pretrained else None
    if missing and listed:
      problems.append(f"model_candidates: {name!r}: {missing}")
    entries.append((name, missing))
  if not problems and not any(skip is None for _, skip in entries):
    why = "; ".join(f"{n}: {s}" for n, s in entries) or "the zoo lists none"
    problems.append(f"model='auto' has no candidate with its weights on this machine ({why}): "
                    "install one, or list models in model_candidates")
  return entries, problems


def weights_problem(spec: models.ModelSpec) -> str | None:
  """Why the pretrained weights of `spec` cannot be loaded here (None: they can).

  A Hub repo's ("hf-hub:...") are fetched now into the Hub cache (or found
  there), as its feature pass would fetch them, so that an unreachable repo
  or file is a config problem before any candidate runs; a local Hub-layout
  folder must hold a weights file next to its config.json."""
  if not spec.pretrained:
    return "it has no pretrained weights (spec.pretrained is None)"
  if hub.is_hub(spec.pretrained) or hub.local_repo(spec.pretrained) is not None:
    try:
      hub.resolve(spec.pretrained)
    except JtlError as e:
      return str(e)
    return None
  return weight_sources.offline_problem(spec.pretrained)


def problems(config: ml_collections.ConfigDict, model_problems: Any) -> list[str]:
  """The config problems of `model="auto"`: the candidates (`candidates`),
  `model_budget_seconds`, and `model_problems(config, spec)` (image size,
  model_kwargs) for each candidate that would run."""
  budget = config.model_budget_seconds
  found = []
  if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                             or not budget > 0):
    found.append(f"model_budget_seconds must be > 0 or None (no limit), got {budget!r}")
  entries, trouble = candidates(config)
  found += trouble
  for name, skip in entries:
    if skip is None:
      found += model_problems(with_model(config, name), models.get_spec(name))
  return found


def with_model(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `config` naming model `name`."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model = name
  return c


def previous_choice(workdir: epath.Path) -> str | None:
  """The model a run in `workdir` already trains (its checkpoints' meta),
  or chose (its `model_selection.json`); None for a fresh workdir."""
  meta = layout.latest_meta(workdir) or {}
  if meta.get("model"):
    return str(meta["model"])
  table = workdir / TABLE_JSON
  return json.loads(table.read_text()).get("choice") if table.exists() else None


def choose(config: ml_collections.ConfigDict, workdir: epath.Path) -> Choice:
  """The config with `model` set to the best candidate (a resumed workdir's
  own choice) and, for a fresh choice, the chosen model's training features
  (`Choice`); writes and prints the table. A resolved config (steps, not
  epochs) is expected."""
  previous = previous_choice(workdir)
  if previous is not None:
    print(f"model='auto': {workdir} already chose {previous}; resuming with it.\n", flush=True)
    return Choice(with_model(config, previous))
  entries, trouble = candidates(config)
  if trouble:
    raise ConfigError("Invalid config:\n" + bullet_list(trouble))
  images = sum(sources.split_size(d, s, config.data_dir) for d, s in (
      (config.dataset, config.train_split),
      (config.eval_dataset or config.dataset, config.eval_split)))
  head_steps, head_tx = _probe(config)
  print(f"model='auto': a cached linear probe on each of {len(entries)} candidates "
        f"({head_steps} head steps), the best on {config.eval_split} wins.", flush=True)
  t0 = time.perf_counter()
  with preemption.stop_at_once("model='auto' selection", f"Run again with --workdir {workdir} "
                               "to redo the selection (nothing of it is kept)."):
    chosen = selection.select_backbone(
        [_candidate(config, name, skip) for name, skip in entries], head_tx=head_tx,
        head_steps=head_steps, batch_size=config.batch_size, num_images=images,
        seed=config.seed, budget_seconds=config.model_budget_seconds,
        log=lambda line: print("  " + line, flush=True))
  _write(workdir, chosen, time.perf_counter() - t0, config)
  print(f"\n{chosen.markdown()}\n", flush=True)
  if chosen.choice is None:
    raise ConfigError(f"model='auto': no candidate fits model_budget_seconds="
                      f"{config.model_budget_seconds} (table above and in {workdir / TABLE_MD})"
                      ": raise it, or name a model.")
  print(f"model='auto' chose {chosen.choice}; the run trains it as if named.\n", flush=True)
  return Choice(with_model(config, chosen.choice), chosen.train_features)


def _experiment() -> Any:
  """`jtl.app.experiment`, imported on first use."""
  # In the function: experiment imports this module at its top (an import cycle).
  from jtl.app import experiment  # pylint: disable=g-import-not-at-top
  return experiment


def _probe(config: ml_collections.ConfigDict) -> tuple[int, Any]:
  """(head steps, head labels -> optimizer) of the run's own cached probe
  (LP-FT's probe phase, a linear probe), or of LP-FT's defaults for a
  strategy without one."""
  experiment = _experiment()
  plan = strategies.cached_probe(strategies.resolve_options(keys.strategy_config(config)))
  if plan is None:
    plan = strategies.cached_probe(strategies.resolve_options("lp_ft"))
  steps = config.num_steps if plan.whole_run else plan.head_steps
  return steps, lambda labels: experiment.head_optimizer(config, plan, labels)


def _candidate(config: ml_collections.ConfigDict, name: str, skip: str | None) -> Any:
  """The `selection.Candidate` of model `name` in this run's data and
  preprocessing: its train pass is the one the run's cached probe makes
  (`experiment.cached_probe_phase`), so that it can reuse the features."""
  experiment = _experiment()
  c = with_model(config, name)
  spec = models.get_spec(name)

  def load() -> tuple[Any, Any]:
    created = experiment.build_model(c)
    return created.module, created.variables
  return selection.Candidate(name, load, experiment.eval_batches(c, spec, c.train_split, c.dataset),
                             experiment.eval_batches(c, spec), skip)


def _write(workdir: epath.Path, chosen: Any, seconds: float,
           config: ml_collections.ConfigDict) -> None:
  """The table as JSON and Markdown in the workdir (process 0)."""
  if jax.process_index() != 0:
    return
  record = {**chosen.to_dict(), "seconds": seconds, "split": config.eval_split,
            "budget_seconds": config.model_budget_seconds}
  workdir.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(workdir / TABLE_JSON, json.dumps(record, indent=2).encode())
  text = (f"# model='auto': the cached probe of each candidate on {config.eval_split}\n\n"
          f"{chosen.markdown()}\n\nSelection time: {seconds:.1f} s.\n")
  paths.write_atomic(workdir / TABLE_MD, text.encode())
