"""A fine-tuning experiment from an ml_collections config: the library side of
`scripts/finetune.py`, `scripts/evaluate.py` and `scripts/convert.py`.

Config keys (see configs/default.py for a complete one): model, pretrained,
num_classes, dataset, data_dir, train_split, eval_split, image_size,
batch_size, num_steps (or num_epochs: see `resolve_schedule`), eval_every,
checkpoint_every, keep, best_metric, test_split,
optimizer, learning_rate, warmup_steps, schedule, weight_decay, clip_norm,
rules, lr_multipliers, strategy, method (see jtl.app.methods), eval_dataset,
model_kwargs (options for the model's constructor, e.g. drop_path_rate),
augment, microbatches, compute_dtype, seed, log_every, distributed.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from jtl import adapter, data, models, parallel, partition, paths
from jtl.app import keys, methods, model_choice, workdirs
from jtl.checkpoint import manager
from jtl.data import folder, sources
from jtl.errors import ConfigError, JtlError, bullet_list
from jtl.optim import make_optimizer
from jtl.recipes import strategies
from jtl.recipes.strategies import features
from jtl.train import FitResult, fit

REQUIRED = tuple(k.name for k in keys.KEYS if k.default is keys.REQUIRED)
# What every evaluation reports (`jtl.train.evaluate`) and could pick the best
# checkpoint by (the highest value wins).
BEST_METRICS = ("accuracy", "top5_accuracy")
# The config keys that shape the learning-rate schedule (`learning_rate_schedule`).
SCHEDULE_KEYS = ("num_steps", "warmup_steps", "learning_rate", "schedule")


# Keys of earlier configs and where their meaning lives now (one key per idea).
MOVED_KEYS = {"rules": "strategy.rules (with strategy.name='rules')",
              "precise_batchnorm": "strategy.precise_batchnorm"}


def strategy_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's `strategy` as a dict; no name (or "") is the "rules"
  strategy, whose default rules train every parameter. Its `seed` (LoRA's
  init, scratch's re-init) is the run's `seed`: one knob for every draw.
  Options left unset (None) are dropped: None is the strategy's default
  (`strategies.resolve_options` fills it in), and a config declares every
  strategy's options (`keys.strategy_options`) so that
  `--config.strategy.name=lp_ft --config.strategy.probe_steps=500` parses
  whatever strategy the file names. A set option that the named strategy
  does not take stays, an error (`resolve_options` names it)."""
  raw = config.strategy or {}
  options = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
  name = options.get("name") or "rules"
  options = {k: v for k, v in options.items() if v is not None}
  seed = config.seed if "seed" in config else 0
  return {**options, "name": name, "seed": seed}


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of the config's own keys and values (no data or weights read)."""
  problems = [f"missing key {k!r}" for k in REQUIRED if k not in config]
  if problems:
    return problems
  config = keys.complete(config)
  devices = jax.device_count()
  if not config.dataset:
    problems.append("dataset is empty: pass --config.dataset=folder:/path/to/images (class "
                    "folders, or train/ and test/ folders of class folders) or a TFDS name")
  if config.batch_size < 1 or config.batch_size % devices:
    problems.append(f"batch_size must be a positive multiple of the {devices} devices, got "
                    f"{config.batch_size}")
  epochs = config.num_epochs or 0
  if epochs < 0 or (epochs and config.warmup_epochs < 0):
    problems.append(f"num_epochs must be >= 0 (0: num_steps counts) and warmup_epochs >= 0, got "
                    f"{epochs} and {config.warmup_epochs}")
  elif not epochs and config.num_steps < 1:
    problems.append(f"num_steps must be >= 1 (or num_epochs >= 1), got {config.num_steps}")
  problems += schedule_conflicts(config)
  if not config.learning_rate > 0:
    problems.append(f"learning_rate must be > 0, got {config.learning_rate}")
  for key in ("eval_every", "checkpoint_every", "warmup_steps"):
    if config[key] < 0:
      problems.append(f"{key} must be >= 0, got {config[key]}")
  problems += _training_value_problems(config)
  if config.keep < 1:
    problems.append(f"keep must be >= 1 (checkpoints kept), got {config.keep}")
  if config.num_classes and config.num_classes < 2:
    problems.append(f"num_classes must be >= 2 (or 0: from the dataset), got {config.num_classes}")
  if config.compute_dtype not in (None, "float32", "bfloat16"):
    problems.append(f"compute_dtype must be None, 'float32' or 'bfloat16', got "
                    f"{config.compute_dtype!r}")
  if config.schedule not in ("cosine", "constant", "linear"):
    problems.append(f"schedule must be 'cosine', 'constant' or 'linear', got {config.schedule!r}")
  if config.resume_schedule not in (None, "new", "old"):
    problems.append(f"resume_schedule must be None (a changed schedule is an error), 'new' or "
                    f"'old', got {config.resume_schedule!r}")
  if config.on_nonfinite not in ("stop", "skip"):
    problems.append(f"on_nonfinite must be 'stop' or 'skip', got {config.on_nonfinite!r}")
  ema = config.ema_decay
  if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float))
                          or not 0 <= ema < 1):
    problems.append(f"ema_decay must be a number in [0, 1) (e.g. 0.999) or None (no weight "
                    f"EMA), got {ema!r}")
  problems += cached_probe_problems(config) or []
  problems += precise_batchnorm_problems(config)
  problems += [f"{old} is no key: set {new}" for old, new in MOVED_KEYS.items() if old in config]
  if "seed" in (config.strategy or {}):
    problems.append("strategy.seed is no key: set seed (the run's one seed: head, data order, "
                    "dropout, LoRA's init and scratch's re-init)")
  if config.model == model_choice.AUTO:
    return problems + model_choice.problems(config, model_problems)
  try:
    spec = models.get_spec(config.model)
  except ConfigError as e:
    return problems + [str(e)]
  return problems + model_problems(config, spec)


def model_problems(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> list[str]:
  """Problems of `image_size` and `model_kwargs` for the config's model."""
  problems = []
  size = config.image_size
  if spec.input_kind == "image" and size is not None and size < spec.min_image_size:
    problems.append(f"image_size must be >= {spec.min_image_size} for {config.model} (or None "
                    f"for its native {spec.image_size}), got {size}")
  return problems + patch_size_problems(config, spec) + model_kwargs_problems(config, spec)


def patch_size_problems(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> list[str]:
  """An `image_size` that is no multiple of a patch model's (ViT, DINOv2)
  patch size: the strided patch embedding would drop the pixels past the
  last full patch (at 40 px with 16 px patches, 36% of them), silently."""
  size = config.image_size
  if spec.input_kind != "image" or not isinstance(size, int) or size < 1:
    return []  # None: the model's native size; < 1 is min_image_size's problem
  try:
    patch = getattr(spec.build(num_classes=0, **workdirs.model_kwargs(config)), "patch_size", None)
  except Exception:  # noqa: BLE001 - model_kwargs_problems reports what does not build
    return []
  if not isinstance(patch, int) or patch < 2 or size % patch == 0:
    return []
  below, above = size // patch * patch, (size // patch + 1) * patch
  nearest = f"{below} or {above}" if below >= spec.min_image_size else f"{above}"
  dropped = 1 - (below / size) ** 2
  return [f"image_size={size} is not a multiple of {config.model}'s patch size {patch}: "
          f"{dropped:.0%} of the pixels (past the last full patch) would be dropped; "
          f"set image_size to {nearest}"]


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _training_value_problems(config: ml_collections.ConfigDict) -> list[str]:
  """log_every, weight_decay, clip_norm and best_metric, which the loop would
  otherwise reject late (a ZeroDivisionError, the first save) or not at all."""
  problems = []
  log_every = config.log_every
  if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
    problems.append(f"log_every must be an integer >= 1 (training metrics are logged every "
                    f"that many steps), got {log_every!r}")
  decay = config.weight_decay
  if not (_is_number(decay) and decay >= 0):
    problems.append(f"weight_decay must be a number >= 0 (0: none), got {decay!r}")
  clip = config.clip_norm
  if clip is not None and not (_is_number(clip) and clip > 0):
    problems.append(f"clip_norm must be > 0 or None (no clipping), got {clip!r}")
  best = config.best_metric
  if best not in (None, "", *BEST_METRICS):
    hint = (" (the best checkpoint is the one with the highest value, so a loss would keep "
            "the worst)" if isinstance(best, str) and "loss" in best else "")
    problems.append(f"best_metric must be one of {list(BEST_METRICS)} (what each evaluation "
                    f"reports) or None (keep only the latest), got {best!r}{hint}")
  return problems


def model_options(spec: models.ModelSpec) -> list[str]:
  """The constructor options `model_kwargs` may set for this model: the
  keywords of `spec.build` and, when it passes **kwargs on, the fields of the
  module it builds (num_classes excluded: it is a config key of its own)."""
  params = inspect.signature(spec.build).parameters.values()
  names = {p.name for p in params
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  if any(p.kind is p.VAR_KEYWORD for p in params):
    module = spec.build(num_classes=0)
    names |= {f.name for f in dataclasses.fields(module) if f.init}
  return sorted(names - {"num_classes", "parent", "name"})


def model_kwargs_problems(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> list[str]:
  """Why `model_kwargs` do not build the model ([] when they do): an option
  its constructor does not take, or a value its init rejects (checked on
  shapes only: `jax.eval_shape`, no weights)."""
  raw = config.model_kwargs or {}
  if not hasattr(raw, "items"):
    return [f"model_kwargs must be a dict of {config.model} constructor options, got {raw!r}"]
  kwargs = workdirs.model_kwargs(config)
  if not kwargs:
    return []
  accepted = model_options(spec)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    return [f"model_kwargs {unknown}: not options of model {config.model!r}; it takes "
            f"{accepted or 'none'}"]
  try:
    models.registry.abstract_variables(spec, spec.build(num_classes=2, **kwargs))
  except Exception as e:  # noqa: BLE001 - any constructor/init failure is the config's
    return [f"model_kwargs {kwargs} do not build model {config.model!r}: "
            f"{type(e).__name__}: {e}"]
  return []


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks required keys and value ranges, reporting every problem at once."""
  problems = config_problems(config)
  if problems:
    raise ConfigError("Invalid config:\n" + bullet_list(problems))


def data_problems(config: ml_collections.ConfigDict) -> tuple[list[str], int]:
  """Checks both datasets, their splits and (for folders) every image file.

  Returns (problems, number of classes of the training data, 0 if unknown).
  Classes of the eval split absent from the train split are warned about.
  """
  problems, found = [], {}
  uses = {"train_split": (config.dataset, config.train_split),
          "eval_split": (config.eval_dataset or config.dataset,
                         config.eval_split)}
  for key, (dataset, split) in uses.items():
    try:
      source = sources.resolve_source(dataset, config.data_dir)
      sources.split_size(source, split)
      found[key] = source
    except JtlError as e:
      problems.append(f"{key}={split!r} of dataset {dataset!r}: {e}")
  classes = found["train_split"].info().num_classes if "train_split" in found else 0
  if "train_split" in found and classes < 2 and not config.num_classes:
    problems.append(f"dataset {config.dataset!r} has {classes} class(es); fine-tuning a "
                    "classifier needs at least 2")
  problems += num_classes_problems(config, found, classes)
  problems += image_file_problems(config, found)
  if len(found) == 2:
    _warn_unseen_classes(config, found["train_split"], found["eval_split"])
  return problems, classes


def num_classes_problems(config: ml_collections.ConfigDict, found: dict[str, Any],
                         classes: int) -> list[str]:
  """`num_classes` below a dataset's class count: the labels at or above it
  would have no output (zero loss, never predicted), so it is refused."""
  outputs = int(config.num_classes or classes)
  datasets = {"train_split": config.dataset,
              "eval_split": config.eval_dataset or config.dataset}
  problems, seen = [], set()
  for key, source in found.items():
    dataset, n = datasets[key], source.info().num_classes
    if outputs and n > outputs and dataset not in seen:
      seen.add(dataset)
      given = (f"num_classes={outputs}" if config.num_classes else
               f"num_classes=0 (the {outputs} classes of dataset {config.dataset!r})")
      problems.append(f"{given} is smaller than the {n} classes of dataset {dataset!r} "
                      f"({key}; labels 0..{n - 1}): labels {outputs}..{n - 1} would have no "
                      f"output. Set num_classes={n} (or 0: from the dataset)")
  return problems


def image_file_problems(config: ml_collections.ConfigDict, found: dict[str, Any]) -> list[str]:
  """Image folders: every file decoded as the input pipeline decodes it
  (`folder.verify`: PIL, EXIF orientation applied) and hashed. A file that
  does not decode is a problem (it would stop the run at its first
  evaluation); evaluation files with the same bytes as a training file are
  warned about (`_warn_duplicates`)."""
  sources = {s.name: s for s in found.values() if getattr(s, "kind", None) == "file"}
  problems, digests = [], {}
  for source in sources.values():
    paths = [p for files in source.inputs.values() for p in files]
    bad, hashes = folder.verify(paths)
    if bad:
      problems.append(f"{len(bad)} file(s) of image folder {source.name!r} do not decode "
                      "(delete or replace them):\n" + bullet_list(bad, limit=20).replace(
                          "  - ", "      - "))
    digests.update(zip(paths, hashes))
  if not problems and "train_split" in found and found["train_split"].name in sources:
    _warn_duplicates(config, found, digests)
  return problems


def _warn_duplicates(config: ml_collections.ConfigDict, found: dict[str, Any],
                     digests: dict[str, str]) -> None:
  """Warns, with the count, when evaluation files (eval_split, test_split)
  have the same bytes as a training file: they are not held out."""
  train = found["train_split"]
  name, idx = train.indices(config.train_split)
  seen = {digests[train.inputs[name][i]]: train.inputs[name][i] for i in idx}
  evals = {"eval_split": (found.get("eval_split"), config.eval_split)}
  if config.test_split and config.test_split.split("[")[0] in train.labels:
    evals["test_split"] = (train, config.test_split)
  for key, (source, split) in evals.items():
    if source is None or getattr(source, "kind", None) != "file":
      continue
    name, idx = source.indices(split)
    copies = [(f, seen[digests[f]]) for f in source.inputs[name][idx]
              if digests.get(f) in seen]
    if copies:
      example = ", ".join(f"{folder_name(a)} = {folder_name(b)}" for a, b in copies[:3])
      logging.warning("%d image(s) of %s=%r have the same content as a training image of %r "
                      "(e.g. %s): they are not held out, so their accuracy overstates the "
                      "model's. Remove the copies from one side.", len(copies), key, split,
                      config.train_split, example)


def folder_name(path: str) -> str:
  """"<split>/<class>/<file>" of an image folder's file, printable."""
  return folder.shown("/".join(os.path.normpath(path).split(os.sep)[-3:]))


def _warn_unseen_classes(config: ml_collections.ConfigDict, train: Any, test: Any) -> None:
  labels = lambda src, split: getattr(src, "labels", {}).get(split.split("[")[0])
  seen = labels(train, config.train_split)
  wanted = labels(test, config.eval_split)
  if seen is None or wanted is None:
    return
  # Soft labels [N, classes]: a class is seen where it has weight.
  classes = lambda y: np.flatnonzero(y.sum(0)) if y.ndim == 2 else np.unique(y)
  unseen = sorted(set(classes(wanted).tolist()) - set(classes(seen).tolist()))
  if unseen:
    names = [test.class_names[i] if i < len(test.class_names) else i for i in unseen]
    logging.warning("Eval classes %s have no training examples in %s of %s: they cannot be "
                    "learned.", names, config.train_split, config.dataset)


def rule_problems(config: ml_collections.ConfigDict, classes: int) -> list[str]:
  """Rules that label no parameter, or parameters no rule labels; checked on
  the model's parameter shapes (no weights are loaded)."""
  strategy = strategy_config(config)
  rules = [tuple(r) for r in strategy.get("rules") or ()]
  if strategy["name"] != "rules" or not rules:
    return []
  if config.model == model_choice.AUTO:  # the rules must fit every candidate
    return [p for name, skip in model_choice.candidates(config)[0] if skip is None
            for p in rule_problems(model_choice.with_model(config, name), classes)]
  spec = models.get_spec(config.model)
  # The model as the run builds it: model_kwargs change its layers (depth, blocks).
  module = spec.build(num_classes=int(config.num_classes or classes or 2),
                      **workdirs.model_kwargs(config))
  shapes = jax.eval_shape(
      lambda: module.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                          spec.example_input(1), train=False))
  try:
    partition.label_params(shapes["params"], rules)
  except JtlError as e:
    return [f"strategy.rules: {e}"]
  return [f"strategy.rules: rule {rule!r} labels no parameter of {config.model} (a typo, or "
          "every match is taken by an earlier rule)"
          for rule in partition.unused_rules(shapes["params"], rules)]


def preflight(config: ml_collections.ConfigDict, workdir: Any = None) -> None:
  """Everything that can be checked before loading weights and training:
  config values, datasets, splits, image files, classes and rules, and (given)
  that `workdir` is a folder the run can write. Raises one ConfigError listing
  every problem."""
  config = keys.complete(config)
  problems = config_problems(config)
  if workdir is not None:
    problems += [p for p in [workdirs.writable_problem(workdir)] if p]
  if "dataset" in config:
    data, classes = data_problems(config)
    problems += data
    if not data and "model" in config and not problems:  # the rules need a model that builds
      problems += rule_problems(config, classes)
  if problems:
    raise ConfigError("Invalid config:\n" + bullet_list(problems))


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """All "a.b" keys of a config (for error messages listing valid keys)."""
  keys = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(flat_keys(v, f"{prefix}{k}."))
    else:
      keys.append(prefix + k)
  return sorted(keys)


def schedule_conflicts(config: ml_collections.ConfigDict) -> list[str]:
  """Keys in steps set together with their counterpart in epochs: the run
  would have to drop one of the user's values, so both are named instead."""
  epochs = config.num_epochs or 0
  if not epochs:
    return []
  pairs = [("num_steps", "num_epochs", epochs),
           ("warmup_steps", "warmup_epochs", config.warmup_epochs or 0)]
  return [f"{steps_key}={config[steps_key]} and {epochs_key}={value} are both set: set "
          f"{steps_key}=0 to count in epochs, or {epochs_key}=0 to count in steps"
          for steps_key, epochs_key, value in pairs if value and config[steps_key]]


def resolve_schedule(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config in epochs made concrete: with `num_epochs` > 0, a copy whose
  num_steps = num_epochs x steps per epoch (training examples // batch_size),
  warmup_steps = warmup_epochs x steps per epoch, and eval_every /
  checkpoint_every one epoch where they are 0 (a value the user set, in
  steps, is kept); batch_size shrinks to the training split when that is
  smaller. Other configs are returned unchanged. A step count set with its
  epoch counterpart is a ConfigError naming both (`schedule_conflicts`)."""
  epochs = config.num_epochs or 0
  if not epochs:
    return config
  conflicts = schedule_conflicts(config)
  if conflicts:
    raise ConfigError("Invalid config:\n" + bullet_list(conflicts))
  n = sources.split_size(config.dataset, config.train_split, config.data_dir)
  devices = jax.device_count()
  c = ml_collections.ConfigDict(config.to_dict())
  if n < c.batch_size:
    c.batch_size = max(devices, n // devices * devices)
  per_epoch = max(1, n // c.batch_size)
  c.num_steps = int(epochs * per_epoch)
  c.eval_every = config.eval_every or per_epoch
  c.checkpoint_every = config.checkpoint_every or per_epoch
  c.warmup_steps = int(round(config.warmup_epochs * per_epoch))
  return c


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  lr, steps_, warmup = config.learning_rate, config.num_steps, config.warmup_steps
  kind = config.schedule
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, 0.0, max(steps_ - warmup, 1))
  else:
    decay = optax.cosine_decay_schedule(lr, max(steps_ - warmup, 1))
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def schedule_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                    ) -> ml_collections.ConfigDict:
  """The config whose schedule keys (`SCHEDULE_KEYS`) build the optimizers of
  a run in `workdir`: `config` itself for a fresh workdir or an unchanged
  schedule. When the workdir's checkpoints were trained with another
  schedule (e.g. more `num_steps` asked on resume), `resume_schedule` decides:
  "new" rebuilds it from this config (the rate jumps at the resume step),
  "old" keeps the saved one (a copy with its keys); None raises a
  ConfigError showing both rates at the resume step."""
  meta = manager.latest_meta(workdir)
  saved = (meta or {}).get("config")
  if not saved:
    return config
  changed = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != config[k]]
  choice = config.resume_schedule
  if not changed or choice == "new":
    return config
  old = ml_collections.ConfigDict(config.to_dict())
  for k in changed:
    old[k] = saved[k]
  if choice == "old":
    return old
  step = int(meta.get("step", 0))
  rate = lambda c: float(learning_rate_schedule(c)(step))
  raise ConfigError(
      f"{workdir} holds a run trained to step {step} with "
      + ", ".join(f"{k}={saved[k]!r}" for k in changed) + "; this config has "
      + ", ".join(f"{k}={config[k]!r}" for k in changed) + f". Resuming with it rebuilds "
      f"the learning-rate schedule: the rate at step {step} would be {rate(config):.3g} "
      f"instead of {rate(old):.3g}. Choose: --config.resume_schedule=new (this config's "
      f"schedule from step {step} on), --config.resume_schedule=old (the run's own schedule "
      "continues; a finished cosine stays at its end), or a new --workdir.")


def num_classes(config: ml_collections.ConfigDict) -> int:
  if config.num_classes:
    return int(config.num_classes)
  return data.dataset_info(config.dataset, config.data_dir).num_classes


def build_model(config: ml_collections.ConfigDict, *, pretrained: Any = None) -> models.CreatedModel:
  """The zoo model with `num_classes` outputs and pretrained weights merged."""
  pretrained = config.pretrained if pretrained is None else pretrained
  created = models.create(config.model, num_classes=num_classes(config), pretrained=pretrained,
                          seed=config.seed, **workdirs.model_kwargs(config))
  return created


def _pipeline_kwargs(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> dict[str, Any]:
  kwargs: dict[str, Any] = {"data_dir": config.data_dir, "seed": config.seed}
  if spec.input_kind == "image":
    kwargs.update(image_size=config.image_size or spec.image_size,
                  normalize=spec.normalization)
  else:
    kwargs.update(max_length=config.max_length)
  return kwargs


def train_batches(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                  dataset: str | None = None, split: str | None = None):
  """`start_step -> iterator` over global training batches (this process's part);
  `dataset` / `split` default to the config's training data."""
  aug = config.augment
  kwargs = _pipeline_kwargs(config, spec)
  if spec.input_kind == "image":
    kwargs.update(augment=aug.crop, flip=aug.flip, crop_scale=tuple(aug.crop_scale),
                  mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha,
                  randaugment=(aug.randaugment_n, aug.randaugment_m))

  def make(start_step: int) -> Iterator[dict[str, Any]]:
    return iter(data.make_dataset(dataset or config.dataset,
                                  split=split or config.train_split,
                                  batch_size=config.batch_size, train=True,
                                  start_step=start_step, **kwargs))
  return make


def eval_batches(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                 split: str | None = None, dataset: str | None = None):
  """`() -> one padded, masked, unaugmented pass` over `split` of `dataset`
  (default: the config's eval split of its eval dataset)."""
  kwargs = _pipeline_kwargs(config, spec)
  split = split or config.eval_split
  batch_size = config.eval_batch_size or config.batch_size
  # Eval batches are padded and masked, so rounding up to fill every device is free.
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  dataset = dataset or config.eval_dataset or config.dataset
  return lambda: data.make_dataset(dataset, split=split, batch_size=batch_size,
                                   train=False, **kwargs)


def optimizer_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(learning_rate=learning_rate_schedule(config),
              optimizer=config.optimizer,
              weight_decay=config.weight_decay, clip_norm=config.clip_norm,
              lr_multipliers=dict(config.lr_multipliers or {}))


def build_optimizer(config: ml_collections.ConfigDict, labels: Any) -> optax.GradientTransformation:
  return make_optimizer(labels, **optimizer_kwargs(config))


def build_training(config: ml_collections.ConfigDict, created: models.CreatedModel
                   ) -> tuple[Any, Any, list[tuple[int, Any, optax.GradientTransformation]]]:
  """(module, variables, phases) from the config's strategy (`strategy_config`).

  `phases` is [(start_step, labels, tx)], one entry unless the strategy
  changes the partition during training (LP-FT, gradual unfreezing).
  """
  strategy = strategies.build(strategy_config(config), created.module, created.variables,
                              created.spec, verbose=False)
  phases = []
  for phase in strategy.phases:
    labels = partition.label_params(strategy.variables["params"], list(phase.rules))
    kwargs = optimizer_kwargs(config)
    if phase.learning_rate is not None:  # e.g. LP-FT's probe: its own constant rate
      kwargs["learning_rate"] = phase.learning_rate
    phases.append((phase.start, labels, strategy.make_optimizer(labels, **kwargs)))
  return strategy.module, strategy.variables, phases


def precise_batchnorm_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of the strategy's options that the config alone shows (their
  names and values, `strategies.resolve_options`), and precise BatchNorm
  set with a method (methods train through their own wrappers: off for them)."""
  try:
    strategies.resolve_options(strategy_config(config))
  except ConfigError as e:
    return [str(e).rstrip(".")]
  given = strategy_config(config).get("precise_batchnorm")
  if given and methods.method_name(config):
    return [f"strategy.precise_batchnorm={given} is not supported with method "
            f"{methods.method_name(config)!r}: set it to 0"]
  return []


def precise_batchnorm_images(config: ml_collections.ConfigDict, variables: Any) -> int:
  """How many training images precise BatchNorm recomputes the statistics on
  before each evaluation and save (0: off): the strategy's resolved
  `strategy.precise_batchnorm` (by default on where its statistics train),
  0 when the model has no BatchNorm statistics and the option is left at
  None, and off for methods."""
  problems = precise_batchnorm_problems(config)
  if problems:
    raise ConfigError("; ".join(problems) + ".")
  if methods.method_name(config):
    return 0
  images = strategies.resolve_options(strategy_config(config))["precise_batchnorm"]
  # Linen keeps the statistics in "batch_stats", the app's NNX form (as_api) in "state".
  if variables.get("batch_stats") or variables.get("state"):
    return images
  given = strategy_config(config).get("precise_batchnorm")
  if given:
    raise ConfigError(f"strategy.precise_batchnorm={given}: model {config.model!r} has no "
                      "BatchNorm statistics (variables['batch_stats'] or ['state']); set "
                      "strategy.precise_batchnorm=0.")
  return 0


def precise_batchnorm_batches(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                              variables: Any) -> Callable[[], Iterator[Any]] | None:
  """`fit`'s `batchnorm_batches`: `precise_batchnorm_images` unaugmented
  training images, or None when that is 0."""
  images = precise_batchnorm_images(config, variables)
  if not images:
    return None
  batches = eval_batches(config, spec, config.train_split, config.dataset)
  count = -(-images // (config.eval_batch_size or config.batch_size))
  return lambda: itertools.islice(batches(), count)


def cached_probe_problems(config: ml_collections.ConfigDict) -> list[str] | None:
  """None: the run does not train its head on cached features; []: it does
  (`features.cached_head_phase`: the whole run for a linear probe, LP-FT's
  probe phase before its steps); otherwise why `strategy.cache_features=True`
  cannot be honoured. Whether and how a strategy caches is its own
  (`strategies.cached_probe`); with the default (None) it caches exactly when
  nothing prevents it."""
  strategy = strategy_config(config)
  option = strategy.get("cache_features")
  try:
    plan = strategies.cached_probe(strategies.resolve_options(strategy))
  except ConfigError:  # reported by precise_batchnorm_problems, with the strategy's options
    plan = None
  if plan is None:
    names = " or ".join(repr(n) for n in strategies.CACHED_PROBES)
    unsupported = strategy["name"] not in strategies.CACHED_PROBES and option is not None
    return [f"strategy.cache_features applies to strategy.name={names} only"] \
        if unsupported else None
  problems = []
  if plan.whole_run:  # the cache replaces every training step: nothing may be random
    aug = config.augment
    problems += [f"augment.{k} is on: cached features need an unaugmented pipeline"
                 for k in ("crop", "flip") if aug[k]]
    problems += [f"augment.{k} > 0: cached features need an unaugmented pipeline"
                 for k in ("mixup_alpha", "cutmix_alpha", "randaugment_n") if aug[k]]
    if config.ema_decay is not None:
      problems.append("ema_decay is set: weight EMA runs in the train step, not on the cache")
  if methods.method_name(config):
    problems.append(f"strategy {strategy['name']} with cache_features: method "
                    f"{methods.method_name(config)!r} trains through its own step; set "
                    "strategy.cache_features=False")
  return None if problems and not plan.required else problems


def cached_probe_phase(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                       module: Any, variables: Any, phases: list, workdir: epath.Path,
                       train_features: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[Any, list]:
  """(`fit`'s first_phase, the phases `fit` steps through) of the run: the
  head on cached features when `cached_probe_problems` says so (first phase:
  the whole run, or before the later phases, which then start at step 0),
  else (None, `phases`). `train_features`: this model's features over the
  training pass below, already extracted (`model="auto"`'s selection,
  `model_choice.Choice`); then the probe makes no backbone pass."""
  if cached_probe_problems(config) != []:
    return None, phases
  plan = strategies.cached_probe(strategies.resolve_options(strategy_config(config)))
  head_labels = jax.tree.map(lambda _: "head", {"head": variables["params"]["head"]})
  head_tx = head_optimizer(config, plan, head_labels)
  head_steps = config.num_steps if plan.whole_run else plan.head_steps
  # The same pass as model_choice._candidate's: given features are of this one.
  train_pass = None if train_features is not None else eval_batches(
      config, spec, config.train_split, config.dataset)()
  first = features.cached_head_phase(
      module, train_pass, head_tx, head_steps=head_steps,
      steps=config.num_steps if plan.whole_run else 0, batch_size=config.batch_size,
      seed=config.seed, train_features=train_features)
  if plan.whole_run:
    source = ("the training features of the model='auto' selection (no backbone pass)"
              if train_features is not None else "one backbone pass over the training split")
    print(f"Linear probe on cached features: {source}, then the head trains on the cache.\n",
          flush=True)
    return first, phases
  rest = [(start - phases[1][0], labels, tx) for start, labels, tx in phases[1:]]
  run = _probe_before_run(first.run, config, head_steps, plan, workdir)
  return dataclasses.replace(first, run=run), rest


def head_optimizer(config: ml_collections.ConfigDict, plan: Any, head_labels: Any
                   ) -> optax.GradientTransformation:
  """The optimizer of a cached probe (`strategies.CachedProbe`): the run's
  own (its schedule) for a linear probe, the probe's constant rate for LP-FT."""
  if plan.learning_rate is None:
    return build_optimizer(config, head_labels)
  return make_optimizer(head_labels, learning_rate=plan.learning_rate,
                        optimizer=config.optimizer)


def _probe_before_run(run: Callable, config: ml_collections.ConfigDict, head_steps: int,
                      plan: Any, workdir: epath.Path) -> Callable:
  """`run` of a probe before the run's steps, printing what it did and saving
  the probe (WiSE-FT's other end, `evaluate.py --wise`)."""
  def told(variables: Any, stop_point: Callable[[str], None]) -> tuple[Any, dict[str, float]]:
    variables, info = run(variables, stop_point)
    workdirs.save_probe(workdir, variables)
    lr = plan.learning_rate if plan.learning_rate is not None else config.learning_rate
    source = ("reused from the model='auto' selection" if info["reused_features"]
              else f"extracted in {info['extract_seconds']:.1f}s")
    print(f"LP-FT probe phase on cached features: {info['cached_examples']} examples' features "
          f"{source}, {head_steps} head steps at learning rate "
          f"{lr:g} in {info['head_seconds']:.1f}s; now fine-tuning (the partition below) at "
          f"{config.learning_rate:g} for {config.num_steps} steps.\n", flush=True)
    return variables, info
  return told


def run_meta(config: ml_collections.ConfigDict, classes: int) -> dict[str, Any]:
  """What each checkpoint records of the run: the model, its classes, the
  config and, for a model registered outside jtl (a config file, the user's
  package), where the registration was made (`workdirs.model_spec` redoes it).
  The config's strategy is saved resolved (its options' values, not None for
  "the default"), so a later jtl with other defaults restores the same model."""
  saved = config.to_dict()
  if config.get("strategy"):
    resolved = strategies.resolve_options(strategy_config(config))
    saved["strategy"] = {k: v for k, v in resolved.items() if k != "seed"}  # seed: top level
  meta = {"model": config.model, "num_classes": classes, "config": saved}
  origin = models.registry.origin(config.model)
  return {**meta, "model_origin": origin} if origin else meta


def finetune(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             *, progress: bool = True) -> FitResult:
  """Runs the whole fine-tuning job described by `config` in `workdir`
  (keys it leaves out at their defaults, `jtl.app.keys`)."""
  config = keys.complete(config)
  if config.distributed:  # before anything asks JAX for its devices
    parallel.initialize_distributed()
  preflight(config, workdir="" if workdir is None else workdir)
  config = resolve_schedule(config)
  workdir = paths.path(workdir)  # a local folder or a bucket URL (gs://...)
  train_features = None
  if config.model == model_choice.AUTO:  # then the run is the chosen model's, as if named
    choice = model_choice.choose(config, workdir)
    config = choice.config
    # The selection's features come from the Linen module (a FrozenStatistics wrapper is
    # the same in inference); an NNX module's pass is other code, so it extracts its own.
    if (config.get("api") or "linen") == "linen":
      train_features = choice.train_features
  sched = schedule_config(config, workdir)  # before any weights load
  created = build_model(config)
  module, variables, phases = build_training(sched, created)
  module, variables = as_api(config, module, variables)
  first_phase, phases = cached_probe_phase(config, created.spec, module, variables, phases,
                                           workdir, train_features)
  method = methods.build(config, module, variables, created.spec,
                         train_batches(config, created.spec),
                         lambda ds, split: train_batches(config, created.spec, ds, split))
  if method.name in methods.DOMAIN_METHODS:
    phases = [(start, method.labels(labels), build_optimizer(sched, method.labels(labels)))
              for start, labels, _ in phases]
  module, variables = method.module, method.variables
  summary = _print_partition(created, method, variables, phases)
  compute_dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else None
  result = fit(
      module=module, variables=variables, labels=phases[0][1], tx=phases[0][2],
      later_phases=phases[1:], first_phase=first_phase,
      train_batches=method.train_batches,
      batch_transform=logging_learning_rate(method.batch_transform,
                                            learning_rate_schedule(sched)),
      **({"loss_fn": method.loss_fn} if method.loss_fn else {}),
      num_steps=config.num_steps,
      workdir=workdir, eval_batches=eval_batches(config, created.spec),
      eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
      keep=config.keep, best_metric=config.best_metric,
      microbatches=config.microbatches, compute_dtype=compute_dtype,
      seed=config.seed, meta=run_meta(config, num_classes(config)),
      on_nonfinite=config.on_nonfinite, ema_decay=config.ema_decay,
      batchnorm_batches=precise_batchnorm_batches(config, created.spec, variables),
      log_every=config.log_every, progress=progress)
  return _write_report(config, workdir, result, summary)


def logging_learning_rate(batch_transform: Any, schedule: optax.Schedule) -> Any:
  """`batch_transform` that also reports the schedule's learning rate at the
  step ("learning_rate" in the train metrics; parameters with an
  `lr_multipliers` entry train at that multiple of it)."""
  def transform(state: Any, batch: Any, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
    batch, metrics = (batch, {}) if batch_transform is None else batch_transform(state, batch,
                                                                                    rng)
    return batch, {**metrics, "learning_rate": jnp.asarray(schedule(state.step), jnp.float32)}
  return transform


def _print_partition(created: models.CreatedModel, method: Any, variables: Any,
                     phases: list) -> partition.Summary:
  """Prints the load report and each phase's trainable / frozen split;
  returns the first phase's."""
  summary = partition.summarize(variables["params"], phases[0][1])
  print(f"Pretrained load report:\n{created.report}\n\nTrainable / frozen:\n{summary}\n",
        flush=True)
  if method.describe:
    print(f"Method {method.name}: {method.describe}\n", flush=True)
  for start, labels, _ in phases[1:]:
    print(f"From step {start}:\n{partition.summarize(variables['params'], labels)}\n", flush=True)
  return summary


def as_api(config: ml_collections.ConfigDict, module: Any, variables: Any) -> tuple[Any, Any]:
  """The model to train in the config's `api`: the Linen module as built, or
  for "nnx" the same model as an NNX module (`models.to_nnx`, the Linen
  parameter paths, BatchNorm statistics as its "state") with its variables.
  Checkpoints then hold "state" for "batch_stats" (`workdirs.restore` maps
  them back). A `FrozenStatistics` module (freeze_batchnorm="statistics")
  becomes the NNX module in a `FrozenStatisticsModel` of the same layers."""
  api = config.get("api") or "linen"
  if api == "linen":
    return module, variables
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  if api != "nnx":
    raise ConfigError(f"api={api!r}: expected 'linen' or 'nnx'.")
  kept = module.paths if isinstance(module, strategies.FrozenStatistics) else None
  base = module.base if kept is not None else module
  if not isinstance(base, nn.Module):  # a strategy's wrapper (LoRA) or a method's
    strategy = (config.get("strategy") or {}).get("name")
    raise ConfigError(f"api='nnx' with strategy.name={strategy!r}: its model wrapper "
                      f"({type(module).__name__}) is Linen only; set api='linen'.")
  model = models.registry.to_nnx(base, variables, seed=config.get("seed", 0))
  nnx_variables = adapter.variables_of(model)
  if kept is not None:  # the same BatchNorm layers keep their statistics in training
    return strategies.FrozenStatisticsModel(model, kept), nnx_variables
  return model, nnx_variables


def _write_report(config: ml_collections.ConfigDict, workdir: epath.Path, result: FitResult,
                  summary: partition.Summary) -> FitResult:
  report = {"workdir": str(workdir), "start_step": result.start_step,
            "num_steps": config.num_steps, "eval": result.eval_metrics,
            "steps_per_second": result.steps_per_second,
            "input_wait_fraction": result.input_wait_fraction,
            "trainable_params": summary.trainable_params, "total_params": summary.total_params}
  if jax.process_index() == 0:
    paths.write_atomic(workdir / "final_report.json", json.dumps(report, indent=2).encode())
  return result
