"""Transfer strategies as composable pure functions over the partition core.

Linear probe (optionally on cached features), partial fine-tuning of the top
groups, gradual unfreezing and LP-FT phases, layer-wise learning-rate decay,
BitFit, LoRA and L2-SP; WiSE-FT weight interpolation after LP-FT. `build(config, module, variables, spec)` picks one
from a config (its `Strategy.fit_phases`: the phases as `jtl.train.fit` takes them); the
modules below are usable on their own.
"""

from __future__ import annotations

from jtl.recipes.strategies.batchnorm import (FrozenStatistics, FrozenStatisticsModel,
                                              batchnorm_paths, batchnorm_rule)
from jtl.recipes.strategies.builder import (
  FREEZE_BATCHNORM,
  LAYER_DECAY,
  LEARNING_RATES,
  PRECISE_BATCHNORM_IMAGES,
  PROBE_LEARNING_RATE,
  PROBE_STEPS,
  CACHED_PROBES,
  CachedProbe,
  Strategy,
  build,
  cached_probe,
  default_options,
  option_defaults,
  resolve_options,
)
from jtl.recipes.strategies.features import (
  Head,
  cache_problems,
  cached_head_phase,
  extract_features,
  feature_batches,
  head_trainer,
  probe_head,
  train_head,
  with_head,
)
from jtl.recipes.strategies.l2sp import l2sp, l2sp_penalty
from jtl.recipes.strategies.llrd import (
  layer_decay,
  layer_decay_multipliers,
  layer_decay_scales,
  layer_depths,
)
from jtl.recipes.strategies.lora import (
  LoraModel,
  LoraWeights,
  adaptable_layers,
  default_targets,
  adapter_params,
  add_lora,
  load_adapters,
  lora_rules,
  merge_lora,
  save_adapters,
  unmerge_lora,
)
from jtl.recipes.strategies.rules import (
  bitfit_rules,
  full_rules,
  group_rules,
  linear_probe_rules,
  partial_rules,
  top_groups,
)
from jtl.recipes.strategies.schedules import (
  Phase,
  PhasedResult,
  gradual_unfreezing_phases,
  lp_ft_phases,
  phase_index,
  switch_phase,
  train_phases,
  transfer_opt_state,
)
from jtl.recipes.strategies.wise import WISE_ALPHAS, choose_alpha, wise_ft

__all__ = [
    "FREEZE_BATCHNORM", "FrozenStatistics", "FrozenStatisticsModel", "LAYER_DECAY", "LEARNING_RATES", "PRECISE_BATCHNORM_IMAGES", "PROBE_LEARNING_RATE", "PROBE_STEPS", "Head", "LoraModel", "LoraWeights", "Phase", "PhasedResult", "Strategy", "CACHED_PROBES", "CachedProbe", "cached_probe", "cached_head_phase", "adaptable_layers", "add_lora", "default_targets",
    "adapter_params", "batchnorm_paths", "batchnorm_rule", "bitfit_rules", "build", "cache_problems", "default_options", "extract_features", "option_defaults",
    "feature_batches", "head_trainer", "full_rules", "gradual_unfreezing_phases", "group_rules", "l2sp",
    "l2sp_penalty", "layer_decay", "layer_decay_multipliers", "layer_decay_scales",
    "layer_depths", "linear_probe_rules", "load_adapters", "lora_rules", "lp_ft_phases",
    "merge_lora", "partial_rules", "phase_index", "probe_head", "resolve_options", "save_adapters",
    "switch_phase", "top_groups", "train_head", "train_phases", "transfer_opt_state",
    "unmerge_lora", "with_head", "WISE_ALPHAS", "choose_alpha", "wise_ft",
]
