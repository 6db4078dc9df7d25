"""`build`: one transfer strategy from a config, over the partition core.

    strategy = jtl.recipes.strategies.build(config.strategy, module, variables, spec)
    tx = strategy.make_optimizer(learning_rate=1e-3, weight_decay=1e-4)
    # train strategy.module from strategy.variables with strategy.labels, tx;
    # every phase (lp_ft, gradual) in jtl.train.fit's form:
    labels, tx, later_phases = strategy.fit_phases(learning_rate=1e-3)
    jtl.train.fit(module=strategy.module, variables=strategy.variables, labels=labels,
                  tx=tx, later_phases=later_phases, ...)
    # (or without checkpoints and evaluation: jtl.recipes.strategies.train_phases).

`config` is a strategy name or a mapping / ConfigDict {"name": ..., options}.
Strategies: "rules" (the config's own ordered (regex, label) rules; the
default: every parameter trains), "full", "scratch", "linear_probe",
"partial", "bitfit", "lora", "lp_ft", "gradual", "llrd" (= "full" with
layer_decay). Options every
strategy takes: head, layer_decay, stacked, freeze_batchnorm,
precise_batchnorm, l2sp, l2sp_head, seed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import optax

from jtl import optim, partition
from jtl.adapter import is_nnx_module
from jtl.errors import ConfigError, bullet_list
from jtl.models import registry
from jtl.recipes.strategies import batchnorm, llrd, lora, schedules
from jtl.recipes.strategies import l2sp as l2sp_lib
from jtl.recipes.strategies import rules as rules_lib
from jtl.tree import PyTree

# Learning rates (Adam, warmup then cosine decay), chosen per strategy on a
# validation split (never the test split) by
# scripts/benchmarks/benchmark_strategies.py: EfficientNet-Lite0 (ImageNet
# weights) on CIFAR-10 at 128 px, 100 labels per class, 60 steps, each
# strategy at its FREEZE_BATCHNORM mode. lp_ft's is its fine-tuning phase's
# (the probe phase takes PROBE_LEARNING_RATE): the best mean validation
# accuracy on the digits and CIFAR-10, 3 seeds each, of 1e-5..3e-4 (1e-5, 1e-4
# and 3e-4 within 1.2 points; about 300x below the probe's, cf. Kumar et al.
# 2022). The sweeps behind these constants, LAYER_DECAY, PROBE_STEPS,
# FREEZE_BATCHNORM and LoRA's rank and alpha: BENCHMARKS.md, "Strategies:
# learning rates and options" and "Strategies: BatchNorm modes".
LEARNING_RATES = {"scratch": 3e-3, "linear_probe": 1e-2, "partial": 3e-3, "full": 1e-3,
                  "lp_ft": 3e-5, "llrd": 1e-3, "bitfit": 1e-2, "lora": 3e-3, "gradual": 3e-3}
PROBE_LEARNING_RATE = 1e-2
# llrd's decay per group (0.7 and 0.8 tie; the rates were swept at 0.8).
LAYER_DECAY = 0.8
# Head steps of the cached probe (linear probe, LP-FT's probe phase): validation
# accuracy plateaus from 300 on.
PROBE_STEPS = 300

# freeze_batchnorm defaults (True: BatchNorm frozen whole; "statistics":
# stored statistics, scale and offset train; False: statistics re-estimated
# from the batches, then recomputed on the training images before each
# evaluation and save: precise BatchNorm, PRECISE_BATCHNORM_IMAGES; see
# strategies/batchnorm.py and jtl/batchnorm.py), each the best mode on the
# mean of the validation accuracies on the sklearn digits and CIFAR-10. lp_ft
# keeps its probe's pretrained statistics; lora, scratch and linear_probe take
# False (LoRA and the probe freeze every BatchNorm parameter anyway; scratch
# needs precise BatchNorm).
FREEZE_BATCHNORM: dict[str, bool | str] = {
    "full": False, "partial": False, "gradual": False, "llrd": "statistics",
    "bitfit": "statistics", "lp_ft": True}
# Precise BatchNorm (`jtl.train.fit(batchnorm_batches=...)`): with freeze_batchnorm
# False, the statistics of the layers that train are recomputed on up to this
# many unaugmented training images before each evaluation and save, instead of
# the moving averages that trail the weights of a short run (Wu & Johnson,
# 2021, use a few thousand images). precise_batchnorm=0 turns it off.
PRECISE_BATCHNORM_IMAGES = 2048
# A later phase as `jtl.train.fit(later_phases=)` takes it: (start_step, labels, tx).
_FitPhase = tuple[int, PyTree, optax.GradientTransformation]
_COMMON = {"name": None, "head": "head", "layer_decay": None, "stacked": None,
           "freeze_batchnorm": None, "precise_batchnorm": None,
           "l2sp": 0.0, "l2sp_head": 0.0, "seed": 0}
_OPTIONS: dict[str, dict[str, Any]] = {
    # Ordered (regex, label) rules, first match wins; "frozen" (or None) freezes.
    "rules": {"rules": ((".*", "all"),)},
    "full": {}, "scratch": {}, "llrd": {}, "bitfit": {},
    # None: cache when the run allows it (scripts/finetune.py); True: require it.
    "linear_probe": {"cache_features": None},
    "partial": {"num_blocks": 4},
    # rank 8, alpha 16: chosen on validation (BENCHMARKS.md). dora: weight-
    # decomposed LoRA (Liu et al. 2024): a trained magnitude per output column.
    "lora": {"rank": 8, "alpha": 16.0, "targets": None, "dora": False},
    # probe_steps: head steps of the probe phase. cache_features (None: when
    # the run allows it): the probe trains on cached features, then all
    # parameters fine-tune from step 0 of the run. probe_learning_rate: the
    # probe's (the run's learning_rate is the fine-tuning phase's, 100-1000x
    # lower, Kumar et al. 2022); None: PROBE_LEARNING_RATE.
    "lp_ft": {"probe_steps": PROBE_STEPS, "cache_features": None, "probe_learning_rate": None},
    "gradual": {"steps_per_stage": None, "blocks_per_stage": 1, "max_blocks": None},
}


@dataclasses.dataclass(frozen=True)
class CachedProbe:
  """How a strategy trains its head on cached features (one unaugmented
  backbone pass, then the head alone: `features.cached_head_phase`).

  Attributes:
    whole_run: the probe is the whole run (its num_steps head steps replace
      every training step, so it needs an unaugmented pipeline); False: it
      runs before the run's steps (LP-FT's probe), which then train the
      strategy's later phases from step 0 with the config's augmentation.
    head_steps: head steps when not the whole run.
    learning_rate: the probe's constant learning rate (None: the run's).
    required: cache_features=True (else None: when nothing prevents it).
  """
  whole_run: bool
  head_steps: int | None
  learning_rate: float | None
  required: bool


# The strategies whose first phase trains the head alone, so that it can train on cached features.
CACHED_PROBES = ("linear_probe", "lp_ft")


def cached_probe(options: Mapping[str, Any]) -> CachedProbe | None:
  """The resolved `options`' cached probe, or None (a strategy without one,
  or cache_features=False)."""
  name, option = options["name"], options.get("cache_features")
  if name not in CACHED_PROBES or option is False:
    return None
  if name == "lp_ft":
    return CachedProbe(False, options["probe_steps"], options["probe_learning_rate"],
                       option is True)
  return CachedProbe(True, None, None, option is True)


def _prefixed(prefix: str, regex: str) -> str:
  return f"{prefix}(?:{regex})" if prefix else regex


def _only_under(key: str | None, inner: optax.GradientTransformation
                ) -> optax.GradientTransformation:
  """`inner` on the subtree {key: tree[key]} of a dict tree (None: the whole
  tree); the other keys' updates pass through unchanged."""
  if key is None:
    return inner

  def init_fn(params):
    return inner.init({key: params[key]})

  def update_fn(updates, state, params=None):
    sub = None if params is None else {key: params[key]}
    out, state = inner.update({key: updates[key]}, state, sub)
    return {**updates, **out}, state

  return optax.GradientTransformation(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class Strategy:
  """What a strategy hands the training loop.

  Attributes:
    name: the strategy's name.
    module: the model to train (for LoRA a wrapper that adds the adapters:
      `lora.LoraModel` around a Linen module, `lora.LoraWeights` around an
      NNX one).
    variables: its initial variables (with adapters for LoRA; re-initialised
      for "scratch").
    phases: one or more `schedules.Phase`; `phases[0].rules` is the partition
      of a single-phase strategy.
    labels: labels of the first phase over `variables["params"]`.
    options: the resolved options (defaults filled in).
    groups: the model's layer groups.
    head_level: the groups layer-wise decay puts at the head's level
      (`ModelSpec.head_level`: a final norm).
  """
  name: str
  module: Any
  variables: dict[str, Any]
  phases: tuple[schedules.Phase, ...]
  labels: PyTree
  options: dict[str, Any]
  groups: tuple[tuple[str, str], ...]
  head_level: tuple[str, ...] = ()

  @property
  def rules(self) -> list[tuple[str, str | None]]:
    return list(self.phases[0].rules)

  @property
  def head_pattern(self) -> str:
    return dict(self.groups)[self.options["head"]]

  @property
  def cache_features(self) -> bool:
    return bool(self.options.get("cache_features"))

  def summary(self, labels: PyTree | None = None) -> partition.Summary:
    """Trainable/frozen counts of `labels` (default: the first phase's)."""
    return partition.summarize(self.variables["params"],
                               self.labels if labels is None else labels)

  def make_optimizer(self, labels: PyTree | None = None, *, under: str | None = None,
                     **kwargs: Any) -> optax.GradientTransformation:
    """`jtl.make_optimizer(labels, **kwargs)` plus this strategy's pieces:
    layer-wise decay scales after it and L2-SP before it.

    `under`: the key of `labels` under which this strategy's params sit in a
    wrapping model's tree (a domain method's "model"); the pieces act on that
    subtree, their paths and the L2-SP reference keeping the key, and the
    wrapper's own params (the domain classifier) get the optimizer alone.
    """
    labels = self.labels if labels is None else labels
    tx = optim.make_optimizer(labels, **kwargs)
    own = labels if under is None else labels[under]
    prefix = "" if under is None else f"{under}/"
    nest = (lambda t: t) if under is None else (lambda t: {under: t})  # noqa: E731
    o = self.options
    if o["layer_decay"] is not None:
      trainable, _ = partition.split(self.variables["params"], own)
      groups = tuple((n, _prefixed(prefix, r)) for n, r in self.groups)
      tx = optax.chain(tx, _only_under(under, llrd.layer_decay(
          nest(trainable), groups, o["layer_decay"], stacked=o["stacked"],
          head_level=self.head_level)))
    if o["l2sp"] or o["l2sp_head"]:
      tx = optax.chain(_only_under(under, l2sp_lib.l2sp(
          o["l2sp"], exclude=_prefixed(prefix, self.head_pattern),
          head_strength=o["l2sp_head"])), tx)
    return tx

  def fit_phases(self, *, under: str | None = None,
                 wrap_labels: Callable[[PyTree], PyTree] | None = None,
                 **optimizer_kwargs: Any) -> tuple[PyTree, optax.GradientTransformation,
                                                   list[_FitPhase]]:
    """Every phase in the form `jtl.train.fit` takes: (labels, tx, later_phases),
    the first phase's labels and optimizer and the later phases' (start_step,
    labels, tx), for `fit(labels=, tx=, later_phases=)`.

    Each phase's labels are its rules over `variables["params"]`, its
    optimizer `make_optimizer(labels, **optimizer_kwargs)` (this strategy's
    layer-wise decay and L2-SP included), at the phase's own constant
    `learning_rate` where it has one (LP-FT's probe) and the given one else.

    `wrap_labels`, `under`: for a model wrapping this one (a domain method),
    `wrap_labels(labels)` gives the wrapper's labels, which hold this
    strategy's under the key `under` (`make_optimizer(under=)`); both or neither.
    """
    if (wrap_labels is None) != (under is None):
      raise ConfigError(f"Strategy.fit_phases: under={under!r} and wrap_labels={wrap_labels!r} "
                        "go together (the wrapper's labels and the key of this strategy's "
                        "params in them): give both or neither.")
    wrap = wrap_labels or (lambda labels: labels)
    phases = []
    for phase in self.phases:
      labels = wrap(partition.label_params(self.variables["params"], list(phase.rules),
                                           warn_unused=False))
      kwargs = dict(optimizer_kwargs)
      if phase.learning_rate is not None:  # e.g. LP-FT's probe: its own constant rate
        kwargs["learning_rate"] = phase.learning_rate
      phases.append((phase.start, labels, self.make_optimizer(labels, under=under, **kwargs)))
    (_, labels, tx), *later = phases
    return labels, tx, later

  def export_params(self, params: PyTree) -> PyTree:
    """Params for the plain model: LoRA adapters merged into their kernels."""
    if self.name == "lora":
      return lora.merge_lora(params, self.options["alpha"])
    return params

  def __str__(self) -> str:
    opts = {k: v for k, v in self.options.items() if k != "name"}
    lines = [f"strategy {self.name} {opts}", str(self.summary())]
    if len(self.phases) > 1:
      lines.append("phases:\n" + schedules.describe(self.phases))
    return "\n".join(lines)


def default_options(name: str) -> dict[str, Any]:
  """Every option of strategy `name` with its default (None: resolved by
  `resolve_options`, or required): the one table `configs/strategy.py` reads."""
  if name not in _OPTIONS:
    raise ConfigError(f"strategy.name={name!r}: expected one of {sorted(_OPTIONS)}.")
  return {**_COMMON, **_OPTIONS[name], "name": name}


def option_defaults() -> dict[str, dict[str, Any]]:
  """Every option of every strategy, {option: {strategy: its default}} over
  the strategies that take it (the name and seed aside): the keys a config's
  `strategy` declares (`jtl.app.keys.strategy_options`)."""
  table: dict[str, dict[str, Any]] = {}
  for name in _OPTIONS:
    for option, value in default_options(name).items():
      if option not in ("name", "seed"):
        table.setdefault(option, {})[name] = value
  return table


def resolve_options(config: str | Mapping[str, Any]) -> dict[str, Any]:
  """Fills in defaults and checks the keys of a strategy config. An option
  given as None takes the strategy's default (where that default is None, the
  strategy resolves it below, or it is required); a set option the strategy
  does not take is an error naming it."""
  if isinstance(config, str):
    config = {"name": config}
  elif hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ConfigError(f"strategy config must be a name or a mapping with 'name'; "
                      f"got {type(config).__name__}.")
  name = config.get("name")
  if name not in _OPTIONS:
    raise ConfigError(f"strategy.name={name!r}: expected one of {sorted(_OPTIONS)}.")
  # None: the default, so an unset option of another strategy is no error (a
  # config declares every strategy's options: `jtl.app.keys.strategy_options`).
  config = {k: v for k, v in config.items() if v is not None}
  allowed = {**_COMMON, **_OPTIONS[name]}
  unknown = sorted(set(config) - set(allowed))
  if unknown:
    hint = ("\nThe rules are the 'rules' strategy's: set strategy.rules=None "
            "(--config.strategy.rules=None) to use another strategy." if "rules" in unknown else "")
    # A run config sets the seed as its own `seed` key (no strategy.seed).
    takes = [f"{k} (in a run config: its `seed` key)" if k == "seed" else k
             for k in sorted(allowed)]
    raise ConfigError(f"Unknown option(s) for strategy {name!r}: {unknown}. It takes:\n"
                      + bullet_list(takes) + hint)
  options = {**allowed, **config}
  missing = [k for k, v in options.items() if v is None and k in _OPTIONS[name]
             and k not in ("targets", "max_blocks", "cache_features", "probe_learning_rate")]
  if missing:
    raise ConfigError(f"strategy {name!r} needs {missing} (steps counted from the start).")
  if options["freeze_batchnorm"] is None:
    options["freeze_batchnorm"] = FREEZE_BATCHNORM.get(name, False)
  mode = options["freeze_batchnorm"]
  if not (mode is True or mode is False or mode == "statistics"):
    raise ConfigError(f"strategy.freeze_batchnorm={mode!r}: expected "
                      "True (BatchNorm frozen whole), 'statistics' (stored statistics, scale "
                      "and offset train) or False (statistics re-estimated from the batches).")
  options["precise_batchnorm"] = _precise_batchnorm_images(name, options)
  if name == "lp_ft" and options["probe_learning_rate"] is None:
    options["probe_learning_rate"] = PROBE_LEARNING_RATE
  rate = options.get("probe_learning_rate")
  if rate is not None and not (isinstance(rate, (int, float)) and not isinstance(rate, bool)
                               and rate > 0):
    raise ConfigError(f"strategy.probe_learning_rate={rate!r}: expected a positive number "
                      f"(default {PROBE_LEARNING_RATE}).")
  if name == "llrd" and options["layer_decay"] is None:
    options["layer_decay"] = LAYER_DECAY
  if options["stacked"] is not None:
    options["stacked"] = dict(options["stacked"])
  return options


def _precise_batchnorm_images(name: str, options: dict[str, Any]) -> int:
  """The resolved `precise_batchnorm`: images to recompute the statistics on
  (0: off); by default PRECISE_BATCHNORM_IMAGES when the statistics train."""
  images, mode = options["precise_batchnorm"], options["freeze_batchnorm"]
  if images is None:
    return PRECISE_BATCHNORM_IMAGES if mode is False and name != "linear_probe" else 0
  if isinstance(images, bool) or not isinstance(images, int) or images < 0:
    raise ConfigError(f"strategy.precise_batchnorm={images!r}: expected a number of training "
                      "images >= 0 (0: off).")
  if images and mode is not False:
    raise ConfigError(f"strategy.precise_batchnorm={images} recomputes BatchNorm statistics "
                      f"that train, but freeze_batchnorm={mode!r} keeps them stored: set "
                      "freeze_batchnorm=False, or precise_batchnorm=0.")
  return images


def build(config: str | Mapping[str, Any], module: Any, variables: PyTree, spec: Any, *,
          verbose: bool = False) -> Strategy:
  """Builds a transfer strategy for a model.

  Args:
    config: strategy name, or a mapping / ConfigDict {"name", options...}.
    module: the Flax module (e.g. `jtl.models.create(...).module`), Linen or NNX.
    variables: its pretrained variables.
    spec: its ModelSpec (for `groups`, and `example_input` for LoRA/scratch).
    verbose: also print the trainable/frozen summary (it is always logged
      at INFO level).
  """
  o = resolve_options(config)
  name = o["name"]
  # The blocks of the model as built: model_kwargs may give it another depth.
  groups = tuple(registry.layer_groups(spec, variables["params"]))
  # The rules name their own labels: a model without a "head" group takes them too.
  head = o["head"] if name == "rules" else rules_lib.head_group(groups, o["head"])
  o["head"] = head
  if name == "scratch":
    variables = registry.init_variables(spec, module, seed=o["seed"])
  if name == "rules":
    phases = (schedules.Phase(0, tuple(tuple(r) for r in o["rules"]), name),)
  elif name in ("full", "scratch", "llrd"):
    phases = (schedules.Phase(0, tuple(rules_lib.full_rules(groups)), name),)
  elif name == "linear_probe":
    phases = (schedules.Phase(0, tuple(rules_lib.linear_probe_rules(groups, head=head)), name),)
  elif name == "partial":
    phases = (schedules.Phase(0, tuple(rules_lib.partial_rules(groups, o["num_blocks"],
                                                               head=head)), name),)
  elif name == "bitfit":
    phases = (schedules.Phase(0, tuple(rules_lib.bitfit_rules(groups, head=head)), name),)
  elif name == "lp_ft":
    probe, finetune = schedules.lp_ft_phases(groups, o["probe_steps"], head=head)
    # The probe at its own constant rate; the run's, 100-1000x lower, fine-tunes.
    phases = (dataclasses.replace(probe, learning_rate=o["probe_learning_rate"]), finetune)
  elif name == "gradual":
    phases = schedules.gradual_unfreezing_phases(
        groups, o["steps_per_stage"], head=head, blocks_per_stage=o["blocks_per_stage"],
        max_blocks=o["max_blocks"])
  else:  # lora
    head_regex = dict(groups)[head]
    targets = o["targets"]
    example = None if is_nnx_module(module) else spec.example_input(1)  # NNX: not traced
    layers = lora.adaptable_layers(module, variables, example)
    if targets is None:  # the attention projections, or every layer but the head
      targets = lora.default_targets(layers, head_regex)
    variables = lora.add_lora(module, variables, example, targets=targets,
                              rank=o["rank"], seed=o["seed"], layers=layers, dora=o["dora"])
    # LoraModel intercepts Linen calls; an NNX module (no `apply`) folds the
    # adapters into its kernels inside each step instead.
    module = (lora.LoraWeights(module, o["alpha"]) if is_nnx_module(module)
              else lora.LoraModel(module, o["alpha"]))
    phases = (schedules.Phase(0, tuple(lora.lora_rules(head_regex)), name),)
  module, phases = _with_batchnorm_mode(o, module, variables, phases)
  labels = partition.label_params(variables["params"], list(phases[0].rules),
                                  warn_unused=False)
  head_level = tuple(n for n, _ in groups if n in getattr(spec, "head_level", ()))
  strategy = Strategy(name, module, dict(variables), phases, labels, o, groups, head_level)
  logging.getLogger(__name__).info("%s", strategy)
  if verbose:
    print(strategy)
  return strategy


def _with_batchnorm_mode(o: dict[str, Any], module: Any, variables: PyTree,
                         phases: tuple[schedules.Phase, ...]
                         ) -> tuple[Any, tuple[schedules.Phase, ...]]:
  """Applies the resolved `freeze_batchnorm` mode."""
  mode = o["freeze_batchnorm"]
  if mode is True and (rule := batchnorm.batchnorm_rule(variables, module)) is not None:
    phases = tuple(dataclasses.replace(p, rules=(rule,) + tuple(p.rules)) for p in phases)
  elif mode == "statistics" and (paths := batchnorm.batchnorm_paths(variables, module)):
    # A Linen module is wrapped around its apply; an NNX module or a jtl
    # adapter (LoraWeights) through the step's frozen paths.
    linen = not (is_nnx_module(module) or getattr(module, "jtl_adapter", False))
    wrapper = batchnorm.FrozenStatistics if linen else batchnorm.FrozenStatisticsModel
    module = wrapper(module, paths)
  return module, phases
