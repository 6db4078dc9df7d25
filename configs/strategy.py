"""Any jtl.recipes.strategies strategy on the default job (EfficientNet-Lite0 on
MNIST digits): `--config configs/strategy.py:NAME`, NAME one of full,
scratch, linear_probe, partial, bitfit, lora, lp_ft, gradual, llrd.
Strategy options are config keys too, e.g. --config.strategy.rank=4.

Learning rates are `jtl.recipes.strategies.LEARNING_RATES`: each strategy's best on a
validation split in the sweep of scripts/benchmarks/benchmark_strategies.py
(EfficientNet-Lite0, CIFAR-10 at 128 px, 100 labelled images per class).
BatchNorm while fine-tuning (`strategies.FREEZE_BATCHNORM`, measured): full,
partial and gradual re-estimate its statistics and recompute them on up to 2,048
unaugmented training images before each evaluation and checkpoint (precise
BatchNorm, `strategy.precise_batchnorm`; scratch too); llrd and bitfit keep
the pretrained statistics and train its scale and offset
(`freeze_batchnorm="statistics"`); lp_ft freezes it whole.
lp_ft trains its probe phase on cached features (`probe_steps` head steps at
`probe_learning_rate`), then fine-tunes every parameter at the run's
`learning_rate`, 100x lower (Kumar et al. 2022), BatchNorm frozen.
"""

import ml_collections

from configs import default
from jtl.recipes import strategies

OPTIONS = {
    "full": {}, "scratch": {}, "bitfit": {},
    # None: features cached when nothing prevents it (no augmentation, no method).
    "linear_probe": {"cache_features": ml_collections.config_dict.placeholder(bool)},
    "llrd": {"layer_decay": strategies.LAYER_DECAY},
    "partial": {"num_blocks": 4},
    "lora": {"rank": 8, "alpha": 16.0},
    # None: the probe phase trains on cached features unless a method prevents it.
    "lp_ft": {"probe_steps": strategies.PROBE_STEPS,
              "probe_learning_rate": strategies.PROBE_LEARNING_RATE,
              "cache_features": ml_collections.config_dict.placeholder(bool)},
    # One more group every 10% of the run (30 of the default 300 steps) up to
    # partial's four: the shortest stage of 10 / 20 / 30% scored best on
    # validation (digits 90.5 / 85.0 / 72.5, CIFAR-10 70.0 / 70.5 / 68.5;
    # BENCHMARKS.md, "Strategies: learning rates and options"). Scale
    # steps_per_stage with num_steps.
    "gradual": {"steps_per_stage": 30, "blocks_per_stage": 1, "max_blocks": 4},
}


def get_config(arg=None):
  name = arg or "lora"
  c = default.get_config()
  c.rules = ()
  # None: the strategy's measured default (strategies.FREEZE_BATCHNORM); or True,
  # "statistics", False. precise_batchnorm None: recompute the statistics on
  # strategies.PRECISE_BATCHNORM_IMAGES training images before each evaluation
  # and save when they train (freeze_batchnorm False); 0: off.
  c.strategy = ml_collections.ConfigDict({
      "name": name, "freeze_batchnorm": ml_collections.config_dict.placeholder(object),
      "precise_batchnorm": ml_collections.config_dict.placeholder(int),
      **OPTIONS[name]})
  c.learning_rate = strategies.LEARNING_RATES[name]
  if name == "linear_probe":  # a frozen backbone: fixed features, cached once
    c.augment.crop = False
  return c
