"""A run config checked before any weights load or training starts, every
problem reported at once: `preflight` raises one `ConfigError` listing them
(`jtl.app.experiment.finetune` calls it first).

`config_problems`: the config's own keys and values (ranges, the strategy's
options, the model with its `image_size` and `model_kwargs`, on shapes only);
the data checks (`data_problems`: both datasets and splits, class counts and,
for image folders, every file decoded and hashed; a workdir inside the data)
are `jtl.app.preflight_data`'s; `rule_problems`: `strategy.rules` that label
nothing. `validate` checks the config alone.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jtl import eval_steps, models, partition
from jtl.app import keys, methods, model_choice, preflight_data, workdirs
from jtl.errors import ConfigError, JtlError, bullet_list
from jtl.recipes import strategies

REQUIRED = tuple(k.name for k in keys.KEYS if k.default is keys.REQUIRED)
# What every evaluation reports (`jtl.train.evaluate`) and could pick the best
# checkpoint by (the highest value wins).
BEST_METRICS = ("accuracy", "top5_accuracy")

# Keys of earlier configs and where their meaning lives now (one key per idea).
MOVED_KEYS = {"rules": "strategy.rules (with strategy.name='rules')",
              "precise_batchnorm": "strategy.precise_batchnorm"}


def preflight(config: ml_collections.ConfigDict, workdir: Any = None) -> None:
  """Everything that can be checked before loading weights and training:
  config values, datasets, splits, image files, classes and rules, and (given)
  that `workdir` is a folder the run can write. Raises one ConfigError listing
  every problem."""
  config = keys.complete(config)
  problems = config_problems(config)
  if workdir is not None:
    problems += [p for p in [workdirs.writable_problem(workdir)] if p]
    problems += preflight_data.workdir_in_data_problems(config, workdir)
  if "dataset" in config:
    data, classes = preflight_data.data_problems(config)
    problems += data + best_metric_problems(config, classes)
    if not data and "model" in config and not problems:  # the rules need a model that builds
      problems += rule_problems(config, classes)
  if problems:
    raise ConfigError("Invalid config:\n" + bullet_list(problems))
  _warn_warmup(config)


def _warn_warmup(config: ml_collections.ConfigDict) -> None:
  """Warmup as long as the run: the learning rate never reaches its peak."""
  if not config.num_epochs and 0 < config.num_steps <= config.warmup_steps:
    logging.warning("warmup_steps=%d >= num_steps=%d: the learning rate rises for the whole "
                    "run and never reaches learning_rate=%g; set warmup_steps below num_steps "
                    "(e.g. %d).", config.warmup_steps, config.num_steps, config.learning_rate,
                    config.num_steps // 10)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks required keys and value ranges, reporting every problem at once."""
  problems = config_problems(config)
  if problems:
    raise ConfigError("Invalid config:\n" + bullet_list(problems))


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
  problems += batch_size_problems(config, devices)
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


def batch_size_problems(config: ml_collections.ConfigDict, devices: int) -> list[str]:
  """batch_size, and eval_batch_size (None or 0: batch_size; evaluation pads
  its batches, so it is rounded up to a multiple of the devices), which the
  first evaluation would otherwise refuse, after training steps."""
  problems = []
  if config.batch_size < 1 or config.batch_size % devices:
    problems.append(f"batch_size must be a positive multiple of the {devices} devices, got "
                    f"{config.batch_size}")
  size = config.eval_batch_size
  if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
    problems.append(f"eval_batch_size must be an integer >= 1 (rounded up to a multiple of the "
                    f"{devices} devices) or None or 0 (batch_size), got {size!r}")
  return problems


def best_metric_problems(config: ml_collections.ConfigDict, classes: int) -> list[str]:
  """A best_metric that no evaluation of this run will report: top-5 accuracy
  is reported only for more than `eval_steps.TOP_K` outputs (with fewer, every
  label is in the top 5); found otherwise at the first save, after training."""
  outputs = int(config.num_classes or classes)
  if config.best_metric != "top5_accuracy" or not 0 < outputs <= eval_steps.TOP_K:
    return []
  return [f"best_metric='top5_accuracy' is reported only for more than {eval_steps.TOP_K} classes, "
          f"and this run has {outputs} (dataset {config.dataset!r}): set best_metric="
          "'accuracy' (or None: keep only the latest)"]


def model_problems(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> list[str]:
  """Problems of `image_size` and `model_kwargs` for the config's model."""
  problems = []
  size = config.image_size
  if spec.input_kind == "image" and size is not None and size < spec.min_image_size:
    problems.append(f"image_size must be >= {spec.min_image_size} for {config.model} (or None "
                    f"for its native {spec.image_size}), got {size}")
  return (problems + max_length_problems(config, spec) + patch_size_problems(config, spec)
          + model_kwargs_problems(config, spec))


def max_length_problems(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> list[str]:
  """A text model's `max_length` below 2 (no room for [CLS] and [SEP]) or
  above its position count (the position lookup would give NaN)."""
  length = config.max_length
  if spec.input_kind != "text" or length is None:
    return []
  if isinstance(length, bool) or not isinstance(length, int) or length < 2:
    return [f"max_length must be an integer >= 2 (tokens per text, [CLS] and [SEP] "
            f"included) or None (the tokenizer's own), got {length!r}"]
  sizes = models.bert.text_config(spec)
  if sizes is not None and length > sizes.max_position:
    return [f"max_length={length} is more than {config.model}'s {sizes.max_position} "
            f"positions (max_position_embeddings); set max_length <= {sizes.max_position}"]
  return []


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


def precise_batchnorm_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of the strategy's options that the config alone shows (their
  names and values, `strategies.resolve_options`), and precise BatchNorm
  set with a method (methods train through their own wrappers: off for them)."""
  try:
    strategies.resolve_options(keys.strategy_config(config))
  except ConfigError as e:
    return [str(e).rstrip(".")]
  given = keys.strategy_config(config).get("precise_batchnorm")
  if given and methods.method_name(config):
    return [f"strategy.precise_batchnorm={given} is not supported with method "
            f"{methods.method_name(config)!r}: set it to 0"]
  return []


def cached_probe_problems(config: ml_collections.ConfigDict) -> list[str] | None:
  """None: the run does not train its head on cached features; []: it does
  (`features.cached_head_phase`: the whole run for a linear probe, LP-FT's
  probe phase before its steps); otherwise why `strategy.cache_features=True`
  cannot be honoured. Whether and how a strategy caches is its own
  (`strategies.cached_probe`); with the default (None) it caches exactly when
  nothing prevents it."""
  strategy = keys.strategy_config(config)
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


def rule_problems(config: ml_collections.ConfigDict, classes: int) -> list[str]:
  """Rules that label no parameter, or parameters no rule labels; checked on
  the model's parameter shapes (no weights are loaded)."""
  strategy = keys.strategy_config(config)
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
    partition.label_params(shapes["params"], rules, warn_unused=False)
  except JtlError as e:
    return [f"strategy.rules: {e}"]
  return [f"strategy.rules: rule {rule!r} labels no parameter of {config.model} (a typo, or "
          "every match is taken by an earlier rule)"
          for rule in partition.unused_rules(shapes["params"], rules)]
