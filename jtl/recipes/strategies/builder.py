"""`build`: one transfer strategy from a config, over the partition core.

    strategy = jtl.recipes.strategies.build(config.strategy, module, variables, spec)
    tx = strategy.make_optimizer(learning_rate=1e-3, weight_decay=1e-4)
    # train strategy.module from strategy.variables with strategy.labels, tx;
    # several phases (lp_ft, gradual): jtl.recipes.strategies.train_phases.

`config` is a strategy name or a mapping / ConfigDict {"name": ..., options}.
Strategies: "full", "scratch", "linear_probe", "partial", "bitfit", "lora",
"lp_ft", "gradual", "llrd" (= "full" with layer_decay). Options every
strategy takes: head, layer_decay, stacked, freeze_batchnorm,
precise_batchnorm, l2sp, l2sp_head, seed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import optax

from jtl import optim, partition
from jtl.errors import ConfigError, bullet_list
from jtl.recipes.strategies import batchnorm, llrd, lora, schedules
from jtl.recipes.strategies import l2sp as l2sp_lib
from jtl.recipes.strategies import rules as rules_lib
from jtl.tree import PyTree

# Learning rates (Adam, warmup then cosine decay) chosen per strategy on a
# validation split (20% of each class of the labelled images, never the test
# split) by scripts/benchmarks/benchmark_strategies.py: EfficientNet-Lite0 with
# ImageNet weights, CIFAR-10 at 128 px, 100 labelled images per class, 60
# steps of 32, each strategy with its default BatchNorm mode below (the
# sweeps and tables: BENCHMARKS.md, issue 15, sections 3, 3d and 3e). full
# 1e-3 with precise BatchNorm (65.5% vs 47.0% at 3e-4; the digits' pick too,
# 89.5% vs 62.5%), llrd 1e-3 (73.0% vs 55.5% at 3e-3), partial 3e-3 with
# precise BatchNorm (70.5% vs 64.0% at 1e-3; digits 92.0% vs 88.0%), bitfit
# 1e-2 (71.5% vs 70.5% at 3e-3), lora 3e-3 (71.0% vs 10.0% at 1e-2, diverged).
# lp_ft's is its fine-tuning phase's (its probe phase takes PROBE_LEARNING_RATE
# on cached features, as the linear probe does): with BatchNorm frozen 3e-4
# scored 69.0% against 67.5% on the 200 validation images, 0.85 against 0.90
# on a 20-image-per-class folder at 224 px (configs/folder.py), and on the
# sklearn digits 3e-5 92.5%, 1e-4 90.5%, 3e-4 86.5%: 1e-4, 100x below the
# probe's (Kumar et al.), stays. gradual 3e-3 with precise BatchNorm (one
# block more every 12 of 60 steps up to partial's 4: 70.5% vs 63.5% at 1e-3;
# digits, every 4 of 20 steps, 85.0% vs 66.5%).
LEARNING_RATES = {"scratch": 3e-3, "linear_probe": 1e-2, "partial": 3e-3, "full": 1e-3,
                  "lp_ft": 1e-4, "llrd": 1e-3, "bitfit": 1e-2, "lora": 3e-3, "gradual": 3e-3}
PROBE_LEARNING_RATE = 1e-2
# llrd's decay per group: validation accuracy on the digits (20 steps) / CIFAR-10
# (60 steps) at lr 1e-3, BatchNorm statistics frozen: 0.6 80.5 / 70.5, 0.7 83.0 /
# 73.5, 0.8 83.5 / 73.0, 0.9 61.0 / 65.5 (BENCHMARKS.md, issue 15, section 3d).
# 0.7 and 0.8 tie; 0.8 is the decay the learning rates were swept at.
LAYER_DECAY = 0.8
# Head steps of the cached probe (linear probe, LP-FT's probe phase). Validation
# accuracy (seed 0, best head lr of 3e-3/1e-2/3e-2) on the digits / CIFAR-10
# (section 3d): 100 steps 92.0 / 65.0, 300 92.5 / 67.0, 1000 93.0 / 67.0, 3000
# 93.0 / 67.5: a plateau from 300 on (0.5 points = one of 200 images).
PROBE_STEPS = 300

# freeze_batchnorm defaults (True: BatchNorm frozen whole; "statistics":
# stored statistics, scale and offset train; False: statistics re-estimated
# from the batches, then recomputed on the training images before each
# evaluation and save: precise BatchNorm, PRECISE_BATCHNORM_IMAGES; see
# strategies/batchnorm.py and jtl/batchnorm.py). Chosen by the mean of the
# validation accuracies (seed 0, each mode at its best learning rate) on the
# sklearn digits (Lite0, 128 px, 100/class, 20 steps) and CIFAR-10 (Lite0,
# 128 px, 100/class, 60 steps); BENCHMARKS.md, issue 15, sections 3d and 3e:
#   full    precise 89.5 / 65.5, statistics 64.0 / 66.0, frozen 64.0 / 62.5
#   partial precise 92.0 / 70.5, frozen 80.0 / 68.0, running averages 73.5 / 67.5
#   gradual precise 85.0 / 70.5, frozen 80.5 / 65.0
#   llrd    precise 89.5 / 61.0, statistics 83.5 / 73.0, frozen 84.0 / 72.5
#   bitfit  precise 77.0 / 54.0, statistics 84.5 / 71.5, running averages 21.5 / 48.0
# lp_ft: frozen (with precise BatchNorm its probe head, fitted to features
# under the pretrained statistics, fails: 14.5-19.5% on the digits). lora, scratch
# and linear_probe take False: LoRA and the probe freeze every BatchNorm
# parameter, so its statistics stay; scratch needs precise BatchNorm (10% ->
# 64.7% on the digits).
FREEZE_BATCHNORM: dict[str, bool | str] = {
    "full": False, "partial": False, "gradual": False, "llrd": "statistics",
    "bitfit": "statistics", "lp_ft": True}
# Precise BatchNorm (`jtl.train.fit(batchnorm_batches=...)`): with freeze_batchnorm
# False, the statistics of the layers that train are recomputed on up to this
# many unaugmented training images before each evaluation and save, instead of
# the moving averages that trail the weights of a short run (Wu & Johnson,
# 2021, use a few thousand images). precise_batchnorm=0 turns it off.
PRECISE_BATCHNORM_IMAGES = 2048
_COMMON = {"name": None, "head": "head", "layer_decay": None, "stacked": None,
           "freeze_batchnorm": None, "precise_batchnorm": None,
           "l2sp": 0.0, "l2sp_head": 0.0, "seed": 0}
_OPTIONS: dict[str, dict[str, Any]] = {
    "full": {}, "scratch": {}, "llrd": {}, "bitfit": {},
    # None: cache when the run allows it (scripts/finetune.py); True: require it.
    "linear_probe": {"cache_features": None},
    "partial": {"num_blocks": 2},
    # rank 8, alpha 16: validation accuracy at each setting's best lr on
    # CIFAR-10 / the digits (sections 3d, 3e): alpha = 2 rank: rank 4 70.5 /
    # 82.0, 8 71.0 / 85.0, 16 71.0 / 84.5, 32 69.0 / 90.0 (rank 32's digits
    # test run at that rate diverged, 10%); rank 8: alpha 8 71.5 / 85.5, 16
    # 71.0 / 85.0, 32 73.0 / 83.5 (means within 0.5 points): 8 and 16 stay.
    "lora": {"rank": 8, "alpha": 16.0, "targets": None},
    # probe_steps: head steps of the probe phase. cache_features (None: when
    # the run allows it): the probe trains on cached features, then all
    # parameters fine-tune from step 0 of the run. probe_learning_rate: the
    # probe's (the run's learning_rate is the fine-tuning phase's, 10-100x
    # lower, Kumar et al. 2022); None: PROBE_LEARNING_RATE.
    "lp_ft": {"probe_steps": PROBE_STEPS, "cache_features": None, "probe_learning_rate": None},
    "gradual": {"steps_per_stage": None, "blocks_per_stage": 1, "max_blocks": None},
}


@dataclasses.dataclass(frozen=True)
class Strategy:
  """What a strategy hands the training loop.

  Attributes:
    name: the strategy's name.
    module: the model to train (a `lora.LoraModel` wrapper for LoRA).
    variables: its initial variables (with adapters for LoRA; re-initialised
      for "scratch").
    phases: one or more `schedules.Phase`; `phases[0].rules` is the partition
      of a single-phase strategy.
    labels: labels of the first phase over `variables["params"]`.
    options: the resolved options (defaults filled in).
    groups: the model's layer groups.
  """
  name: str
  module: Any
  variables: dict[str, Any]
  phases: tuple[schedules.Phase, ...]
  labels: PyTree
  options: dict[str, Any]
  groups: tuple[tuple[str, str], ...]

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

  def make_optimizer(self, labels: PyTree | None = None, **kwargs: Any
                     ) -> optax.GradientTransformation:
    """`jtl.make_optimizer(labels, **kwargs)` plus this strategy's pieces:
    layer-wise decay scales after it and L2-SP before it."""
    labels = self.labels if labels is None else labels
    tx = optim.make_optimizer(labels, **kwargs)
    o = self.options
    if o["layer_decay"] is not None:
      trainable, _ = partition.split(self.variables["params"], labels)
      tx = optax.chain(tx, llrd.layer_decay(trainable, self.groups, o["layer_decay"],
                                            stacked=o["stacked"]))
    if o["l2sp"] or o["l2sp_head"]:
      tx = optax.chain(l2sp_lib.l2sp(o["l2sp"], exclude=self.head_pattern,
                                     head_strength=o["l2sp_head"]), tx)
    return tx

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


def resolve_options(config: str | Mapping[str, Any]) -> dict[str, Any]:
  """Fills in defaults and checks the keys of a strategy config."""
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
  allowed = {**_COMMON, **_OPTIONS[name]}
  unknown = sorted(set(config) - set(allowed))
  if unknown:
    raise ConfigError(f"Unknown option(s) for strategy {name!r}: {unknown}. It takes:\n"
                      + bullet_list(sorted(allowed)))
  options = {**allowed, **dict(config)}
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
    module: the Flax module (e.g. `jtl.models.create(...).module`).
    variables: its pretrained variables.
    spec: its ModelSpec (for `groups`, and `example_input` for LoRA/scratch).
    verbose: also print the trainable/frozen summary (it is always logged
      at INFO level).
  """
  o = resolve_options(config)
  name = o["name"]
  groups = tuple(tuple(g) for g in spec.groups)
  head = rules_lib.head_group(groups, o["head"])
  o["head"] = head
  if name == "scratch":
    from jtl.models import registry  # pylint: disable=g-import-not-at-top
    variables = registry.init_variables(spec, module, seed=o["seed"])
  if name in ("full", "scratch", "llrd"):
    phases = (schedules.Phase(0, tuple(rules_lib.full_rules(groups)), name),)
  elif name == "linear_probe":
    phases = (schedules.Phase(0, tuple(rules_lib.linear_probe_rules(groups, head=head)), name),)
  elif name == "partial":
    phases = (schedules.Phase(0, tuple(rules_lib.partial_rules(groups, o["num_blocks"],
                                                               head=head)), name),)
  elif name == "bitfit":
    phases = (schedules.Phase(0, tuple(rules_lib.bitfit_rules(groups, head=head)), name),)
  elif name == "lp_ft":
    phases = schedules.lp_ft_phases(groups, o["probe_steps"], head=head)
  elif name == "gradual":
    phases = schedules.gradual_unfreezing_phases(
        groups, o["steps_per_stage"], head=head, blocks_per_stage=o["blocks_per_stage"],
        max_blocks=o["max_blocks"])
  else:  # lora
    head_regex = dict(groups)[head]
    targets = o["targets"]
    example = spec.example_input(1)
    layers = lora.adaptable_layers(module, variables, example)
    if targets is None:
      import re  # pylint: disable=g-import-not-at-top
      targets = [re.escape(p) for p in layers if not re.fullmatch(head_regex, p + "/kernel")]
    variables = lora.add_lora(module, variables, example, targets=targets,
                              rank=o["rank"], seed=o["seed"], layers=layers)
    module = lora.LoraModel(module, o["alpha"])
    phases = (schedules.Phase(0, tuple(lora.lora_rules(head_regex)), name),)
  module, phases = _with_batchnorm_mode(o, module, variables, phases)
  labels = partition.label_params(variables["params"], list(phases[0].rules))
  strategy = Strategy(name, module, dict(variables), phases, labels, o, groups)
  logging.getLogger(__name__).info("%s", strategy)
  if verbose:
    print(strategy)
  return strategy


def _with_batchnorm_mode(o: dict[str, Any], module: Any, variables: PyTree,
                         phases: tuple[schedules.Phase, ...]
                         ) -> tuple[Any, tuple[schedules.Phase, ...]]:
  """Applies the resolved `freeze_batchnorm` mode."""
  mode = o["freeze_batchnorm"]
  if mode is True and (rule := batchnorm.batchnorm_rule(variables)) is not None:
    phases = tuple(dataclasses.replace(p, rules=(rule,) + tuple(p.rules)) for p in phases)
  elif mode == "statistics" and (paths := batchnorm.batchnorm_paths(variables)):
    module = batchnorm.FrozenStatistics(module, paths)
  return module, phases
