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
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from jtl import data, models, parallel, partition, steps
from jtl.app import methods, workdirs
from jtl.batchnorm import recompute_batchnorm
from jtl.errors import ConfigError, JtlError, bullet_list
from jtl.optim import make_optimizer, tree_bytes
from jtl.recipes import quantize
from jtl.train import FitResult, fit

REQUIRED = ("model", "dataset", "batch_size", "num_steps", "learning_rate")


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of the config's own keys and values (no data or weights read)."""
  problems = [f"missing key {k!r}" for k in REQUIRED if k not in config]
  if problems:
    return problems
  devices = jax.device_count()
  if not config.dataset:
    problems.append("dataset is empty: pass --config.dataset=folder:/path/to/images (class "
                    "folders, or train/ and test/ folders of class folders) or a TFDS name")
  if config.batch_size < 1 or config.batch_size % devices:
    problems.append(f"batch_size must be a positive multiple of the {devices} devices, got "
                    f"{config.batch_size}")
  epochs = config.get("num_epochs") or 0
  if epochs < 0 or (epochs and config.get("warmup_epochs", 0) < 0):
    problems.append(f"num_epochs must be >= 0 (0: num_steps counts) and warmup_epochs >= 0, got "
                    f"{epochs} and {config.get('warmup_epochs')}")
  elif not epochs and config.num_steps < 1:
    problems.append(f"num_steps must be >= 1 (or num_epochs >= 1), got {config.num_steps}")
  if not config.learning_rate > 0:
    problems.append(f"learning_rate must be > 0, got {config.learning_rate}")
  for key in ("eval_every", "checkpoint_every", "warmup_steps"):
    if config.get(key, 0) < 0:
      problems.append(f"{key} must be >= 0, got {config.get(key)}")
  if config.get("keep", 2) < 1:
    problems.append(f"keep must be >= 1 (checkpoints kept), got {config.keep}")
  if config.get("num_classes") and config.num_classes < 2:
    problems.append(f"num_classes must be >= 2 (or 0: from the dataset), got {config.num_classes}")
  if config.get("compute_dtype") not in (None, "float32", "bfloat16"):
    problems.append(f"compute_dtype must be None, 'float32' or 'bfloat16', got "
                    f"{config.compute_dtype!r}")
  if config.get("schedule", "cosine") not in ("cosine", "constant", "linear"):
    problems.append(f"schedule must be 'cosine', 'constant' or 'linear', got {config.schedule!r}")
  if config.get("on_nonfinite", "stop") not in ("stop", "skip"):
    problems.append(f"on_nonfinite must be 'stop' or 'skip', got {config.on_nonfinite!r}")
  problems += cached_probe_problems(config) or []
  if config.get("rules") and (config.get("strategy") or {}).get("name"):
    problems.append(f"rules and strategy.name={config.strategy.name!r} are both set; the "
                    "strategy makes its own rules: set rules=() or strategy.name=''")
  try:
    spec = models.get_spec(config.model)
  except ConfigError as e:
    return problems + [str(e)]
  size = config.get("image_size")
  if spec.input_kind == "image" and size is not None and size < spec.min_image_size:
    problems.append(f"image_size must be >= {spec.min_image_size} for {config.model} (or None "
                    f"for its native {spec.image_size}), got {size}")
  return problems + model_kwargs_problems(config, spec)


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
  raw = config.get("model_kwargs") or {}
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
  from jtl.data import sources  # pylint: disable=g-import-not-at-top
  problems, found = [], {}
  uses = {"train_split": (config.dataset, config.get("train_split", "train")),
          "eval_split": (config.get("eval_dataset") or config.dataset,
                         config.get("eval_split", "test"))}
  for key, (dataset, split) in uses.items():
    try:
      source = sources.resolve_source(dataset, config.get("data_dir"))
      sources.split_size(source, split)
      found[key] = source
    except JtlError as e:
      problems.append(f"{key}={split!r} of dataset {dataset!r}: {e}")
  classes = found["train_split"].info().num_classes if "train_split" in found else 0
  if "train_split" in found and classes < 2 and not config.get("num_classes"):
    problems.append(f"dataset {config.dataset!r} has {classes} class(es); fine-tuning a "
                    "classifier needs at least 2")
  if len(found) == 2:
    _warn_unseen_classes(config, found["train_split"], found["eval_split"])
  return problems, classes


def _warn_unseen_classes(config: ml_collections.ConfigDict, train: Any, test: Any) -> None:
  labels = lambda src, split: getattr(src, "labels", {}).get(split.split("[")[0])
  seen = labels(train, config.get("train_split", "train"))
  wanted = labels(test, config.get("eval_split", "test"))
  if seen is None or wanted is None:
    return
  unseen = sorted(set(np.unique(wanted).tolist()) - set(np.unique(seen).tolist()))
  if unseen:
    names = [test.class_names[i] if i < len(test.class_names) else i for i in unseen]
    logging.warning("Eval classes %s have no training examples in %s of %s: they cannot be "
                    "learned.", names, config.get("train_split", "train"), config.dataset)


def rule_problems(config: ml_collections.ConfigDict, classes: int) -> list[str]:
  """Rules that label no parameter, or parameters no rule labels; checked on
  the model's parameter shapes (no weights are loaded)."""
  rules = [tuple(r) for r in config.get("rules") or ()]
  if not rules or (config.get("strategy") or {}).get("name"):
    return []
  spec = models.get_spec(config.model)
  module = spec.build(num_classes=int(config.get("num_classes") or classes or 2))
  shapes = jax.eval_shape(
      lambda: module.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                          spec.example_input(1), train=False))
  try:
    partition.label_params(shapes["params"], rules)
  except JtlError as e:
    return [f"rules: {e}"]
  return [f"rule {rule!r} labels no parameter of {config.model} (a typo, or every match "
          "is taken by an earlier rule)" for rule in partition.unused_rules(shapes["params"], rules)]


def preflight(config: ml_collections.ConfigDict) -> None:
  """Everything that can be checked before loading weights and training:
  config values, datasets, splits, image files, classes and rules. Raises one
  ConfigError listing every problem."""
  problems = config_problems(config)
  if "dataset" in config:
    data, classes = data_problems(config)
    problems += data
    if not data and "model" in config and not any("Unknown model" in p for p in problems):
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


def resolve_schedule(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config in epochs made concrete: with `num_epochs` > 0, a copy whose
  num_steps = num_epochs x steps per epoch (training examples // batch_size),
  eval_every = checkpoint_every = one epoch, warmup_steps = warmup_epochs x
  steps per epoch; batch_size shrinks to the training split when that is
  smaller. Other configs are returned unchanged."""
  epochs = config.get("num_epochs") or 0
  if not epochs:
    return config
  from jtl.data import sources  # pylint: disable=g-import-not-at-top
  n = sources.split_size(config.dataset, config.get("train_split", "train"), config.get("data_dir"))
  devices = jax.device_count()
  c = ml_collections.ConfigDict(config.to_dict())
  if n < c.batch_size:
    c.batch_size = max(devices, n // devices * devices)
  per_epoch = max(1, n // c.batch_size)
  c.num_steps = int(epochs * per_epoch)
  c.eval_every = c.checkpoint_every = per_epoch
  c.warmup_steps = int(round(config.get("warmup_epochs", 0) * per_epoch))
  return c


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  lr, steps_, warmup = config.learning_rate, config.num_steps, config.get("warmup_steps", 0)
  kind = config.get("schedule", "cosine")
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, 0.0, max(steps_ - warmup, 1))
  else:
    decay = optax.cosine_decay_schedule(lr, max(steps_ - warmup, 1))
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def num_classes(config: ml_collections.ConfigDict) -> int:
  if config.get("num_classes"):
    return int(config.num_classes)
  return data.dataset_info(config.dataset, config.get("data_dir")).num_classes


def build_model(config: ml_collections.ConfigDict, *, pretrained: Any = None) -> models.CreatedModel:
  """The zoo model with `num_classes` outputs and pretrained weights merged."""
  pretrained = config.get("pretrained", True) if pretrained is None else pretrained
  created = models.create(config.model, num_classes=num_classes(config), pretrained=pretrained,
                          seed=config.get("seed", 0), **workdirs.model_kwargs(config))
  return created


def _pipeline_kwargs(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> dict[str, Any]:
  kwargs: dict[str, Any] = {"data_dir": config.get("data_dir"), "seed": config.get("seed", 0)}
  if spec.input_kind == "image":
    kwargs.update(image_size=config.get("image_size") or spec.image_size,
                  normalize=spec.normalization)
  else:
    kwargs.update(max_length=config.get("max_length"))
  return kwargs


def train_batches(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                  dataset: str | None = None, split: str | None = None):
  """`start_step -> iterator` over global training batches (this process's part);
  `dataset` / `split` default to the config's training data."""
  aug = config.get("augment", ml_collections.ConfigDict())
  kwargs = _pipeline_kwargs(config, spec)
  if spec.input_kind == "image":
    kwargs.update(augment=aug.get("crop", True), flip=aug.get("flip", True),
                  crop_scale=tuple(aug.get("crop_scale", (0.08, 1.0))),
                  mixup_alpha=aug.get("mixup_alpha", 0.0))

  def make(start_step: int) -> Iterator[dict[str, Any]]:
    return iter(data.make_dataset(dataset or config.dataset,
                                  split=split or config.get("train_split", "train"),
                                  batch_size=config.batch_size, train=True,
                                  start_step=start_step, **kwargs))
  return make


def eval_batches(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                 split: str | None = None, dataset: str | None = None):
  """`() -> one padded, masked, unaugmented pass` over `split` of `dataset`
  (default: the config's eval split of its eval dataset)."""
  kwargs = _pipeline_kwargs(config, spec)
  split = split or config.get("eval_split", "test")
  batch_size = config.get("eval_batch_size") or config.batch_size
  # Eval batches are padded and masked, so rounding up to fill every device is free.
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  dataset = dataset or config.get("eval_dataset") or config.dataset
  return lambda: data.make_dataset(dataset, split=split, batch_size=batch_size,
                                   train=False, **kwargs)


def optimizer_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(learning_rate=learning_rate_schedule(config),
              optimizer=config.get("optimizer", "adamw"),
              weight_decay=config.get("weight_decay", 0.0), clip_norm=config.get("clip_norm"),
              lr_multipliers=dict(config.get("lr_multipliers") or {}))


def build_optimizer(config: ml_collections.ConfigDict, labels: Any) -> optax.GradientTransformation:
  return make_optimizer(labels, **optimizer_kwargs(config))


def build_training(config: ml_collections.ConfigDict, created: models.CreatedModel
                   ) -> tuple[Any, Any, list[tuple[int, Any, optax.GradientTransformation]]]:
  """(module, variables, phases) from the config's strategy or its rules.

  `phases` is [(start_step, labels, tx)], one entry unless the strategy
  changes the partition during training (LP-FT, gradual unfreezing).
  """
  strategy_config = config.get("strategy")
  if strategy_config and strategy_config.get("name"):
    from jtl.recipes import strategies  # pylint: disable=g-import-not-at-top
    strategy = strategies.build(strategy_config, created.module, created.variables, created.spec,
                                verbose=False)
    phases = []
    for phase in strategy.phases:
      labels = partition.label_params(strategy.variables["params"], list(phase.rules))
      kwargs = optimizer_kwargs(config)
      if strategy.name == "lp_ft" and phase.name == "linear_probe":
        # The probe phase at its own learning rate (constant); the run's
        # learning_rate, 10-100x lower, is the fine-tuning phase's.
        kwargs["learning_rate"] = strategy.options["probe_learning_rate"]
      phases.append((phase.start, labels, strategy.make_optimizer(labels, **kwargs)))
    return strategy.module, strategy.variables, phases
  rules = config.get("rules") or [(".*", "all")]
  labels = partition.label_params(created.variables["params"], [tuple(r) for r in rules])
  return created.module, created.variables, [(0, labels, build_optimizer(config, labels))]


def precise_batchnorm_images(config: ml_collections.ConfigDict, variables: Any) -> int:
  """How many training images precise BatchNorm recomputes the statistics on
  before each evaluation and save (0: off). A strategy resolves its own
  `strategy.precise_batchnorm` (on where its statistics train). A rules
  config reads the top-level `precise_batchnorm`: None means
  `strategies.PRECISE_BATCHNORM_IMAGES` when the model has BatchNorm
  statistics (`fit` recomputes only the layers that train). Methods train
  through their own wrappers: off for them."""
  from jtl.recipes import strategies  # pylint: disable=g-import-not-at-top
  strategy = config.get("strategy")
  method = methods.method_name(config)
  top = config.get("precise_batchnorm")
  if strategy and strategy.get("name"):
    if top is not None:
      raise ConfigError(f"precise_batchnorm={top!r} is the rules' option; with strategy "
                        f"{strategy.name!r} set strategy.precise_batchnorm instead.")
    explicit, images = "strategy.precise_batchnorm", strategies.resolve_options(strategy)[
        "precise_batchnorm"]
    given = strategy.get("precise_batchnorm")
  else:
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
      raise ConfigError(f"precise_batchnorm={top!r}: expected a number of training images "
                        ">= 0 (0: off), or None (on when the model has BatchNorm).")
    has_statistics = bool(variables.get("batch_stats"))
    if top and not has_statistics:
      raise ConfigError(f"precise_batchnorm={top}: model {config.model!r} has no BatchNorm "
                        "statistics (variables['batch_stats']); set precise_batchnorm=0.")
    explicit, given = "precise_batchnorm", top
    images = strategies.PRECISE_BATCHNORM_IMAGES if top is None and has_statistics else top or 0
  if images and method:
    if given:
      raise ConfigError(f"{explicit}={images} is not supported with method {method!r}: "
                        "set it to 0.")
    return 0
  return images


def precise_batchnorm_batches(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                              variables: Any) -> Callable[[], Iterator[Any]] | None:
  """`fit`'s `batchnorm_batches`: `precise_batchnorm_images` unaugmented
  training images, or None when that is 0."""
  images = precise_batchnorm_images(config, variables)
  if not images:
    return None
  batches = eval_batches(config, spec, config.get("train_split", "train"), config.dataset)
  count = -(-images // (config.get("eval_batch_size") or config.batch_size))
  return lambda: itertools.islice(batches(), count)


def cached_probe_problems(config: ml_collections.ConfigDict) -> list[str] | None:
  """None: the run is not a cached linear probe; []: it is (features are
  extracted once, the head trains on the cache); otherwise why
  `strategy.cache_features=True` cannot be honoured. With the default
  (None) the probe is cached exactly when nothing prevents it."""
  strategy = config.get("strategy") or {}
  option = strategy.get("cache_features")
  if strategy.get("name") == "lp_ft":
    return lp_ft_cache_problems(config) if option else None  # lp_ft is no linear probe
  if strategy.get("name") != "linear_probe":
    return (["strategy.cache_features applies to strategy.name='linear_probe' or 'lp_ft' only"]
            if option is not None else None)
  if option is False:
    return None
  aug = config.get("augment") or {}
  problems = [f"augment.{k} is on: cached features need an unaugmented pipeline"
              for k in ("crop", "flip") if aug.get(k, True)]
  if aug.get("mixup_alpha"):
    problems.append("augment.mixup_alpha > 0: cached features need an unaugmented pipeline")
  if methods.method_name(config):
    problems.append(f"method {methods.method_name(config)!r} trains through its own step")
  return None if problems and option is None else problems


def lp_ft_cache_problems(config: ml_collections.ConfigDict) -> list[str] | None:
  """For strategy lp_ft: None when its probe phase trains on cached features
  (one unaugmented backbone pass, then the head; fine-tuning then runs with
  the config's augmentation), [] when the option is off, else why
  `cache_features=True` cannot be honoured."""
  strategy = config.get("strategy") or {}
  if strategy.get("name") != "lp_ft" or strategy.get("cache_features") is False:
    return []
  if methods.method_name(config):
    return [f"strategy lp_ft with cache_features: method {methods.method_name(config)!r} "
            "trains through its own step; set strategy.cache_features=False"]
  return None


def run_meta(config: ml_collections.ConfigDict, classes: int) -> dict[str, Any]:
  return {"model": config.model, "num_classes": classes, "config": config.to_dict()}


def finetune(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             *, progress: bool = True) -> FitResult:
  """Runs the whole fine-tuning job described by `config` in `workdir`."""
  if config.get("distributed"):  # before anything asks JAX for its devices
    parallel.initialize_distributed()
  preflight(config)
  config = resolve_schedule(config)
  workdir = epath.Path(workdir)
  created = build_model(config)
  module, variables, phases = build_training(config, created)
  cached_lp_ft = (config.get("strategy") or {}).get("name") == "lp_ft" and \
      lp_ft_cache_problems(config) is None
  if cached_lp_ft:
    variables, phases = _cached_probe_phase(config, created.spec, module, variables, phases,
                                            workdir)
  method = methods.build(config, module, variables, created.spec,
                         train_batches(config, created.spec),
                         lambda ds, split: train_batches(config, created.spec, ds, split))
  if method.name in methods.DOMAIN_METHODS:
    phases = [(start, method.labels(labels), build_optimizer(config, method.labels(labels)))
              for start, labels, _ in phases]
  module, variables = method.module, method.variables
  summary = partition.summarize(variables["params"], phases[0][1])
  print(f"Pretrained load report:\n{created.report}\n\nTrainable / frozen:\n{summary}\n", flush=True)
  if method.describe:
    print(f"Method {method.name}: {method.describe}\n", flush=True)
  for start, labels, _ in phases[1:]:
    print(f"From step {start}:\n{partition.summarize(variables['params'], labels)}\n", flush=True)
  classes = num_classes(config)
  if cached_probe_problems(config) == []:
    from jtl.recipes.strategies import features  # pylint: disable=g-import-not-at-top
    head_labels = jax.tree.map(lambda _: "head", {"head": variables["params"]["head"]})
    print("Linear probe on cached features: one backbone pass over the training split, "
          "then the head trains on the cache.\n", flush=True)
    result = features.fit_cached_probe(
        module=module, variables=variables, labels=phases[0][1], tx=phases[0][2],
        head_tx=build_optimizer(config, head_labels),
        train_pass=eval_batches(config, created.spec, config.get("train_split", "train"),
                                config.dataset)(),
        num_steps=config.num_steps, batch_size=config.batch_size, workdir=workdir,
        eval_batches=eval_batches(config, created.spec), keep=config.get("keep", 2),
        best_metric=config.get("best_metric", "accuracy"), meta=run_meta(config, classes),
        seed=config.get("seed", 0))
    return _write_report(config, workdir, result, summary)
  compute_dtype = jnp.bfloat16 if config.get("compute_dtype") == "bfloat16" else None
  result = fit(
      module=module, variables=variables, labels=phases[0][1], tx=phases[0][2],
      later_phases=phases[1:],
      train_batches=method.train_batches, batch_transform=method.batch_transform,
      **({"loss_fn": method.loss_fn} if method.loss_fn else {}),
      num_steps=config.num_steps,
      workdir=workdir, eval_batches=eval_batches(config, created.spec),
      eval_every=config.get("eval_every", 0), checkpoint_every=config.get("checkpoint_every", 0),
      keep=config.get("keep", 2), best_metric=config.get("best_metric", "accuracy"),
      microbatches=config.get("microbatches", 1), compute_dtype=compute_dtype,
      seed=config.get("seed", 0), meta=run_meta(config, classes),
      on_nonfinite=config.get("on_nonfinite", "stop"),
      batchnorm_batches=precise_batchnorm_batches(config, created.spec, variables),
      log_every=config.get("log_every", 10), progress=progress)
  return _write_report(config, workdir, result, summary)


def _cached_probe_phase(config: ml_collections.ConfigDict, spec: models.ModelSpec, module: Any,
                        variables: Any, phases: list, workdir: epath.Path) -> tuple[Any, list]:
  """LP-FT's probe phase on cached features (skipped when `workdir` already
  holds checkpoints: the run resumes its fine-tuning phase). Returns the
  variables with the probed head and the one fine-tuning phase from step 0."""
  from jtl.recipes.strategies import features  # pylint: disable=g-import-not-at-top
  o = config.strategy
  ft_labels = phases[-1][1]
  ft_phase = [(0, ft_labels, build_optimizer(config, ft_labels))]
  if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
    print("LP-FT: checkpoints found, resuming the fine-tuning phase.\n", flush=True)
    return variables, ft_phase
  head_labels = jax.tree.map(lambda _: "head", {"head": variables["params"]["head"]})
  from jtl.recipes import strategies  # pylint: disable=g-import-not-at-top
  probe_lr = o.get("probe_learning_rate") or strategies.PROBE_LEARNING_RATE
  probe_steps = o.get("probe_steps") or strategies.PROBE_STEPS
  head_tx = make_optimizer(head_labels, learning_rate=probe_lr,
                           optimizer=config.get("optimizer", "adamw"))
  variables, info = features.probe_head(
      module, variables, eval_batches(config, spec, config.get("train_split", "train"),
                                      config.dataset)(),
      head_tx, num_steps=probe_steps, batch_size=config.batch_size, seed=config.get("seed", 0))
  print(f"LP-FT probe phase on cached features: {info['cached_examples']} examples extracted in "
        f"{info['extract_seconds']:.1f}s, {probe_steps} head steps at learning rate "
        f"{probe_lr:g} in {info['head_seconds']:.1f}s; now fine-tuning (the partition below) at "
        f"{config.learning_rate:g} for {config.num_steps} steps.\n", flush=True)
  return variables, ft_phase


def evaluate_test_split(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                        ) -> dict[str, Any] | None:
  """After a run: the best checkpoint evaluated on `config.test_split` (if the
  key is set and the dataset has that split), written as eval_<split>.json
  and confusion_<split>.png; None otherwise."""
  split = config.get("test_split")
  if not split:
    return None
  from jtl.data import sources  # pylint: disable=g-import-not-at-top
  dataset = config.get("eval_dataset") or config.dataset
  try:
    sources.split_size(dataset, split, config.get("data_dir"))
  except JtlError as e:
    print(f"No final evaluation on test_split={split!r}: {e}", flush=True)
    return None
  return evaluate_workdir(workdir, split=split, step="best")


def _write_report(config: ml_collections.ConfigDict, workdir: epath.Path, result: FitResult,
                  summary: partition.Summary) -> FitResult:
  report = {"workdir": str(workdir), "start_step": result.start_step,
            "num_steps": config.num_steps, "eval": result.eval_metrics,
            "steps_per_second": result.steps_per_second,
            "input_wait_fraction": result.input_wait_fraction,
            "trainable_params": summary.trainable_params, "total_params": summary.total_params}
  if jax.process_index() == 0:
    (workdir / "final_report.json").write_text(json.dumps(report, indent=2))
  return result


def evaluate_workdir(workdir: str | os.PathLike, *, split: str | None = None,
                     step: int | str = "latest", out_dir: str | os.PathLike | None = None,
                     precision: str = "float32", save_quantized: str | os.PathLike | None = None,
                     adabn: bool = False, attack: str | None = None, eps: float = 0.1,
                     attack_steps: int = 20) -> dict[str, Any]:
  """Restores a checkpoint (params only, any device count), evaluates it on
  `split`, and writes eval_<split>.json and confusion_<split>.png.

  Post-training options (their results go into the same JSON):
    precision: "float32", "bfloat16", "int8" or "int8_bfloat16"
      (`jtl.recipes.quantize`; int8 = per-channel weight quantization); the report
      adds the stored model size.
    save_quantized: also write the variables at `precision` to this
      safetensors file (`jtl.recipes.quantize.load` reads it back).
    adabn: first re-estimate BatchNorm statistics on the unlabelled
      training split of the evaluated dataset (AdaBN, `jtl.recipes.domain`). Always
      done for a domain run with batchnorm "separate" (`methods.needs_adabn`):
      its running statistics are the source's.
    attack, eps, attack_steps: also report accuracy under "pgd" / "fgsm"
      with radius eps in pixel units ("adv_accuracy").
  """
  run = workdirs.restore(workdir, step=step)
  variables = run.merged_variables()  # the plain model, LoRA adapters folded in
  split = split or run.config.get("eval_split", "test")
  variables, extra = _post_training(run, variables, adabn=adabn, precision=precision,
                                    save_quantized=save_quantized)
  robust_step = _robust_eval_step(run, attack, eps, attack_steps) if attack else None
  metrics, robust, confusion = _eval_pass(run, variables, split, precision, robust_step)
  if robust is not None:
    extra["adv_accuracy"] = robust["accuracy"]
    extra["attack"] = {"name": attack, "eps": eps, "steps": attack_steps}
  names = _class_names(run.config, run.meta["num_classes"])
  per_class = (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist()
  result = {"workdir": str(workdir), "step": run.meta.get("step"), "split": split, **metrics,
            **extra, "class_names": names, "per_class_accuracy": per_class,
            "per_class_accuracy_by_name": dict(zip(names, per_class)),
            "confusion_matrix": confusion.tolist()}
  _write_eval(epath.Path(out_dir or workdir), split, result, confusion, names,
              title=f"{run.config.model} {split}")
  return result


def _post_training(run: workdirs.Restored, variables: Any, *, adabn: bool, precision: str,
                   save_quantized: str | os.PathLike | None) -> tuple[Any, dict[str, Any]]:
  """`evaluate_workdir`'s variables after AdaBN (when asked, or when the method
  needs it) and quantization to `precision` (also saved when asked), and what
  was done, for the report."""
  extra: dict[str, Any] = {}
  config = run.config
  if adabn or methods.needs_adabn(config):
    # One unaugmented pass over the unlabelled train split of the evaluated data.
    target = eval_batches(config, run.spec, config.get("train_split", "train"))
    variables = recompute_batchnorm(run.module, variables, target())
    extra["adabn"] = {"dataset": config.get("eval_dataset") or config.dataset,
                      "split": config.get("train_split", "train"),
                      "why": "asked" if adabn else "method.batchnorm='separate'"}
  variables = quantize.prepare(variables, precision)
  extra["precision"] = precision
  extra["model_bytes"] = tree_bytes(variables)
  if save_quantized:
    extra["saved_quantized"] = {"path": str(save_quantized), "bytes": quantize.save(
        save_quantized, variables, meta={"model": config.model,
                                          "num_classes": run.meta["num_classes"],
                                          "precision": precision})}
  return variables, extra


def _robust_eval_step(run: workdirs.Restored, attack: str, eps: float,
                      attack_steps: int) -> Callable:
  """The jitted eval step under a "pgd" / "fgsm" attack of radius `eps` in
  pixel units (on float variables)."""
  from jtl.recipes import adversarial  # pylint: disable=g-import-not-at-top
  mul, add = methods.pixel_affine(run.spec.normalization)
  return jax.jit(adversarial.make_robust_eval_step(
      run.module, attack=attack, eps=eps, steps=attack_steps, input_scale=float(np.mean(mul)),
      bounds=(float(np.min(add)), float(np.max(mul + add)))))


def _eval_pass(run: workdirs.Restored, variables: Any, split: str, precision: str,
               robust_step: Callable | None
               ) -> tuple[dict[str, float], dict[str, float] | None, np.ndarray]:
  """One pass over `split` at `precision`: the eval metrics, those under attack
  (None without `robust_step`) and the confusion matrix (true classes down)."""
  predict = quantize.make_inference_fn(run.module, variables, precision=precision)
  eval_step = jax.jit(quantize.make_quantized_eval_step(run.module, precision=precision))
  if robust_step is not None:
    float_variables = quantize.dequantize(variables, jnp.float32)
  classes = run.meta["num_classes"]
  confusion = np.zeros((classes, classes), np.int64)
  sums: dict[str, float] = {}
  robust_sums: dict[str, float] = {}
  for batch in eval_batches(run.config, run.spec, split)():
    logits = np.asarray(predict(batch["inputs"]))
    mask = np.asarray(batch["mask"], bool)
    np.add.at(confusion, (np.asarray(batch["label"])[mask], logits.argmax(-1)[mask]), 1)
    _add_sums(sums, eval_step(variables, batch))
    if robust_step is not None:
      _add_sums(robust_sums, robust_step(float_variables, batch))
  robust = steps.summarize_eval(robust_sums) if robust_step is not None else None
  return steps.summarize_eval(sums), robust, confusion


def _add_sums(total: dict[str, float], sums: dict[str, Any]) -> None:
  """Adds one batch's eval sums (device arrays) to `total`."""
  for k, v in jax.device_get(sums).items():
    total[k] = total.get(k, 0.0) + float(v)


def _write_eval(out: epath.Path, split: str, result: dict[str, Any], confusion: np.ndarray,
                names: list[str], *, title: str) -> None:
  """Writes eval_<split>.json and confusion_<split>.png into `out`."""
  out.mkdir(parents=True, exist_ok=True)
  (out / f"eval_{file_safe(split)}.json").write_text(json.dumps(result, indent=2))
  _plot_confusion(confusion, out / f"confusion_{file_safe(split)}.png", names, title=title)

def file_safe(split: str) -> str:
  """A split name for file names: "test[:64]" -> "test_64", "train[10%:]" -> "train_10pct".

  >>> file_safe("test[:64]"), file_safe("train[10%:]"), file_safe("test")
  ('test_64', 'train_10pct', 'test')
  """
  return re.sub(r"[^\w.-]+", "_", split.replace("%", "pct")).strip("_")


def _class_names(config: ml_collections.ConfigDict, classes: int) -> list[str]:
  """The evaluated dataset's class names (their indices if it has none)."""
  try:
    names = data.dataset_info(config.get("eval_dataset") or config.dataset,
                              config.get("data_dir")).class_names
  except JtlError:
    names = []
  return [str(n) for n in names] if len(names) == classes else [str(i) for i in range(classes)]


def _plot_confusion(confusion: np.ndarray, path: epath.Path, names: list[str], *,
                    title: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = confusion_figure(confusion, names, title=title)
  fig.savefig(str(path), dpi=100)
  plt.close(fig)


def confusion_figure(confusion: np.ndarray, names: list[str], *, title: str = "") -> Any:
  """The confusion matrix as a matplotlib figure: true classes down, predicted
  across, labelled with the class names (up to 50 classes), counts written in
  each cell (up to 20 classes), white on dark cells and black on light ones."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(confusion)
  side = min(4 + 0.45 * n, 24)
  fig, ax = plt.subplots(figsize=(side + 1, side))
  image = ax.imshow(confusion, cmap="Blues")
  fig.colorbar(image)
  ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
  if n <= 50:  # class names on the axes; integer ticks only where they would not fit
    ax.set_xticks(range(n), names, rotation=90 if n > 5 else 0)
    ax.set_yticks(range(n), names)
  if n <= 20:
    dark = confusion.max() / 2 if confusion.size else 0
    for (i, j), v in np.ndenumerate(confusion):  # white on dark cells, black on light ones
      ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
              color="white" if v > dark else "black")
  fig.tight_layout()
  return fig
