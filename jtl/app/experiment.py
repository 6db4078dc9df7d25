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
What can be checked before weights load is `jtl.app.preflight`'s.
"""

from __future__ import annotations

import dataclasses
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
from jtl.app import keys, methods, model_choice, preflight, resume, workdirs
from jtl.checkpoint import layout
from jtl.data import sources
from jtl.errors import ConfigError, bullet_list
from jtl.optim import make_optimizer
from jtl.recipes import strategies
from jtl.recipes.strategies import features
from jtl.train import FitResult, fit

# The config keys that shape the learning-rate schedule (`learning_rate_schedule`).
SCHEDULE_KEYS = ("num_steps", "warmup_steps", "learning_rate", "schedule")


def resolve_schedule(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None
                     ) -> ml_collections.ConfigDict:
  """A config in epochs made concrete: with `num_epochs` > 0, a copy whose
  num_steps = num_epochs x steps per epoch (training examples // batch_size),
  warmup_steps = warmup_epochs x steps per epoch, and eval_every /
  checkpoint_every one epoch where they are 0 (a value the user set, in
  steps, is kept); batch_size shrinks to the training split when that is
  smaller (`_small_split_batch`: in `workdir`'s run, the batch it trained with).
  Other configs are returned unchanged. A step count set with its epoch
  counterpart is a ConfigError naming both (`preflight.schedule_conflicts`)."""
  epochs = config.num_epochs or 0
  if not epochs:
    return config
  conflicts = preflight.schedule_conflicts(config)
  if conflicts:
    raise ConfigError("Invalid config:\n" + bullet_list(conflicts))
  n = sources.split_size(config.dataset, config.train_split, config.data_dir)
  c = ml_collections.ConfigDict(config.to_dict())
  if n < c.batch_size:
    c.batch_size = _small_split_batch(config, n, workdir)
  per_epoch = max(1, n // c.batch_size)
  c.num_steps = int(epochs * per_epoch)
  c.eval_every = config.eval_every or per_epoch
  c.checkpoint_every = config.checkpoint_every or per_epoch
  c.warmup_steps = int(round(config.warmup_epochs * per_epoch))
  return c


def _small_split_batch(config: ml_collections.ConfigDict, n: int,
                       workdir: str | os.PathLike | None) -> int:
  """The batch size of a run whose training split has `n` < batch_size
  examples: the most that fill every device evenly. On resume, the one
  `workdir`'s checkpoints record: the same on another device count, as the
  data position (steps x batch) and the steps per epoch count in it; a
  ConfigError when these devices do not divide it."""
  devices = jax.device_count()
  saved = ((layout.latest_meta(workdir) or {}).get("config") or {}) if workdir else {}
  batch = saved.get("batch_size")
  if not isinstance(batch, int) or not 0 < batch <= n:  # a fresh run (or no such record)
    return max(devices, n // devices * devices)
  if batch % devices:
    fitting = [d for d in range(1, batch + 1) if batch % d == 0]
    raise ConfigError(
        f"{workdir} holds a run trained with batch_size={batch} (its training split has {n} "
        f"examples, fewer than batch_size={config.batch_size}, so the batch was made a multiple "
        f"of the devices it ran on), and this machine has {devices} devices, which do not "
        f"divide {batch}: resuming with {max(devices, n // devices * devices)} would change "
        f"the batch and the data order. Resume on a number of devices that divides {batch} "
        f"({', '.join(map(str, fitting))}), or use a new --workdir.")
  return batch


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
  meta = layout.latest_meta(workdir)
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
  new_rate, old_rate = rate(config), rate(old)
  at_step = (f"the rate at step {step} would be {new_rate:.3g} instead of {old_rate:.3g}"
             if f"{new_rate:.3g}" != f"{old_rate:.3g}" else
             f"the same rate at step {step} ({new_rate:.3g}), another one after it")
  raise ConfigError(
      f"{workdir} holds a run trained to step {step} with "
      + ", ".join(f"{k}={saved[k]!r}" for k in changed) + "; this config has "
      + ", ".join(f"{k}={config[k]!r}" for k in changed) + f". Resuming with it rebuilds "
      f"the learning-rate schedule: {at_step}. Choose: --config.resume_schedule=new (this "
      f"config's schedule from step {step} on), --config.resume_schedule=old (the run's own "
      "schedule continues; a finished cosine stays at its end), or a new --workdir.")


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
  elif spec.input_kind == "text":
    kwargs.update(tokenizer=text_tokenizer(config, spec))
  else:
    kwargs.update(max_length=config.max_length)
  return kwargs


def text_tokenizer(config: ml_collections.ConfigDict, spec: models.ModelSpec) -> Any:
  """The text model's own tokenizer (`spec.tokenizer_file()`, MiniLM's when the
  spec has none), padding to `config.max_length` and truncating at the
  model's positions; a ConfigError when its vocabulary outgrows the model's."""
  path = spec.tokenizer_file() if spec.tokenizer_file else None
  sizes = models.bert.text_config(spec)
  max_position = sizes.max_position if sizes else None
  tokenizer = data.text.load_tokenizer(path, max_length=config.max_length,
                                       max_position=max_position)
  if sizes and tokenizer.get_vocab_size() > sizes.vocab_size:
    raise ConfigError(
        f"The tokenizer {path} of model {config.model!r} has {tokenizer.get_vocab_size()} "
        f"tokens but the model's vocab_size is {sizes.vocab_size}: ids past it would "
        "give NaN. Use the model's own tokenizer.json (the one its weights were "
        "trained with) beside its config.json.")
  return tokenizer


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
  batch_size = _eval_batch_size(config)
  dataset = dataset or config.eval_dataset or config.dataset
  return lambda: data.make_dataset(dataset, split=split, batch_size=batch_size,
                                   train=False, **kwargs)


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """eval_batch_size (or batch_size) rounded up to a multiple of the devices:
  eval batches are padded and masked, so filling every device is free."""
  batch_size = config.eval_batch_size or config.batch_size
  return -(-batch_size // jax.device_count()) * jax.device_count()


def optimizer_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(learning_rate=learning_rate_schedule(config),
              optimizer=config.optimizer,
              weight_decay=config.weight_decay, clip_norm=config.clip_norm,
              lr_multipliers=dict(config.lr_multipliers or {}))


def build_optimizer(config: ml_collections.ConfigDict, labels: Any) -> optax.GradientTransformation:
  return make_optimizer(labels, **optimizer_kwargs(config))


def build_strategy(config: ml_collections.ConfigDict, created: models.CreatedModel
                   ) -> strategies.Strategy:
  """The config's strategy (`keys.strategy_config`) over the created model."""
  return strategies.build(keys.strategy_config(config), created.module, created.variables,
                          created.spec, verbose=False)


def build_training(config: ml_collections.ConfigDict, created: models.CreatedModel,
                   strategy: strategies.Strategy | None = None
                   ) -> tuple[Any, Any, list[tuple[int, Any, optax.GradientTransformation]]]:
  """(module, variables, phases) from the config's strategy (`build_strategy`,
  unless given).

  `phases` is [(start_step, labels, tx)], one entry unless the strategy
  changes the partition during training (LP-FT, gradual unfreezing).
  """
  strategy = strategy or build_strategy(config, created)
  labels, tx, later = strategy.fit_phases(**optimizer_kwargs(config))
  return strategy.module, strategy.variables, [(0, labels, tx), *later]


def wrapped_phases(config: ml_collections.ConfigDict, strategy: strategies.Strategy,
                   method: methods.Method) -> list:
  """The strategy's phases over a domain method's wrapped model (its params
  under "model/"): labels wrapped (`method.labels`), each optimizer the
  strategy's with its L2-SP and layer-wise decay on the "model" subtree, and
  a phase's own learning rate (LP-FT's probe) kept (`Strategy.fit_phases`)."""
  labels, tx, later = strategy.fit_phases(under="model", wrap_labels=method.labels,
                                          **optimizer_kwargs(config))
  return [(0, labels, tx), *later]


def precise_batchnorm_images(config: ml_collections.ConfigDict, variables: Any) -> int:
  """How many training images precise BatchNorm recomputes the statistics on
  before each evaluation and save (0: off): the strategy's resolved
  `strategy.precise_batchnorm` (by default on where its statistics train),
  0 when the model has no BatchNorm statistics and the option is left at
  None (a `freeze_batchnorm` set for such a model is warned about), and off
  for methods."""
  problems = preflight.precise_batchnorm_problems(config)
  if problems:
    raise ConfigError("; ".join(problems) + ".")
  if methods.method_name(config):
    return 0
  images = strategies.resolve_options(keys.strategy_config(config))["precise_batchnorm"]
  # Linen keeps the statistics in "batch_stats", the app's NNX form (as_api) in "state".
  if variables.get("batch_stats") or variables.get("state"):
    return images
  frozen = keys.strategy_config(config).get("freeze_batchnorm")
  if frozen is not None:  # set by hand, yet nothing for it to act on
    logging.warning("strategy.freeze_batchnorm=%r has no effect: model %r has no BatchNorm "
                    "layers.", frozen, config.model)
  given = keys.strategy_config(config).get("precise_batchnorm")
  if given:
    raise ConfigError(f"strategy.precise_batchnorm={given}: model {config.model!r} has no "
                      "BatchNorm statistics (variables['batch_stats'] or ['state']); set "
                      "strategy.precise_batchnorm=0.")
  return 0


def precise_batchnorm_batches(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                              variables: Any) -> Callable[[], Iterator[Any]] | None:
  """`fit`'s `batchnorm_batches`: the first `precise_batchnorm_images`
  unaugmented training images (each process its share), or None when that
  is 0. The rows past them are masked out, so the set is the same whatever
  the eval batch is rounded up to on these devices."""
  images = precise_batchnorm_images(config, variables)
  if not images:
    return None
  batches = eval_batches(config, spec, config.train_split, config.dataset)
  share = -(-images // jax.process_count())  # the same batch count on every process
  local_batch = _eval_batch_size(config) // jax.process_count()
  return lambda: _first_rows(batches(), share, local_batch)


def _first_rows(batches: Iterator[dict[str, Any]], rows: int, local_batch: int
                ) -> Iterator[dict[str, Any]]:
  """The batches of a padded, masked pass that hold its first `rows` real
  rows, the real rows past them masked out (mask=False: not counted)."""
  seen = 0
  for batch in itertools.islice(batches, -(-rows // local_batch)):
    mask = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
    keep = mask & (seen + np.cumsum(mask) <= rows)
    seen += int(mask.sum())
    yield {**batch, "mask": keep}


def cached_probe_phase(config: ml_collections.ConfigDict, spec: models.ModelSpec,
                       module: Any, variables: Any, phases: list, workdir: epath.Path,
                       train_features: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[Any, list]:
  """(`fit`'s first_phase, the phases `fit` steps through) of the run: the
  head on cached features when `preflight.cached_probe_problems` says so (first phase:
  the whole run, or before the later phases, which then start at step 0),
  else (None, `phases`). `train_features`: this model's features over the
  training pass below, already extracted (`model="auto"`'s selection,
  `model_choice.Choice`); then the probe makes no backbone pass."""
  if preflight.cached_probe_problems(config) != []:
    return None, phases
  plan = strategies.cached_probe(strategies.resolve_options(keys.strategy_config(config)))
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
    resolved = strategies.resolve_options(keys.strategy_config(config))
    saved["strategy"] = {k: v for k, v in resolved.items() if k != "seed"}  # seed: top level
  meta = {"model": config.model, "num_classes": classes, "config": saved,
          "class_names": resume.dataset_classes(config)}
  origin = models.registry.origin(config.model)
  return {**meta, "model_origin": origin} if origin else meta


def finetune(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             *, progress: bool = True) -> FitResult:
  """Runs the whole fine-tuning job described by `config` in `workdir`
  (keys it leaves out at their defaults, `jtl.app.keys`)."""
  config = keys.complete(config)
  if config.distributed:  # before anything asks JAX for its devices
    parallel.initialize_distributed()
  preflight.preflight(config, workdir="" if workdir is None else workdir)
  if workdir is not None:
    resume.check_same_run(config, workdir)  # before anything is built or loaded
  config = resolve_schedule(config, workdir)
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
  strategy = build_strategy(sched, created)
  module, variables, phases = build_training(sched, created, strategy)
  module, variables = as_api(config, module, variables)
  first_phase, phases = cached_probe_phase(config, created.spec, module, variables, phases,
                                           workdir, train_features)
  method = methods.build(config, module, variables, created.spec,
                         train_batches(config, created.spec),
                         lambda ds, split: train_batches(config, created.spec, ds, split))
  if method.name in methods.DOMAIN_METHODS:
    # A domain method has no cached probe (preflight), so these are all the phases.
    phases = wrapped_phases(sched, strategy, method)
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
  for "nnx" the same model as an NNX module (`models.creation.to_nnx`, the Linen
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
  model = models.creation.to_nnx(base, variables, seed=config.get("seed", 0))
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
  report_path = workdir / "final_report.json"
  if result.start_step >= config.num_steps and report_path.exists():
    # A finished run started again: its report stays the one of its training.
    print(f"{workdir} holds a finished run (step {result.start_step}); its final_report.json "
          "is kept.", flush=True)
  elif jax.process_index() == 0:
    paths.write_atomic(report_path, json.dumps(report, indent=2).encode())
  return result
