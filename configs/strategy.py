"""Any jtl.recipes.strategies strategy on the default job (EfficientNet-Lite0 on
MNIST digits): `--config configs/strategy.py:NAME`, NAME one of full,
scratch, linear_probe, partial, bitfit, lora, lp_ft, gradual, llrd.
Strategy options are config keys too, e.g. --config.strategy.rank=4 (every
strategy's, None: its default, so --config.strategy.name=... switches strategy).

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
`learning_rate`, 300x lower (cf. Kumar et al. 2022), BatchNorm frozen.
"""

from configs import default
from jtl.app import keys
from jtl.recipes import strategies

# What this job sets beyond the strategies' defaults (`strategies.default_options`).
# gradual: one more group every 10% of the run (30 of the default 300 steps)
# up to partial's four: the shortest stage of 10 / 20 / 30% scored best on
# validation (digits 90.5 / 85.0 / 72.5, CIFAR-10 70.0 / 70.5 / 68.5;
# BENCHMARKS.md, "Strategies: learning rates and options"). Scale
# steps_per_stage with num_steps.
JOB = {"gradual": {"steps_per_stage": 30, "max_blocks": 4}}


def get_config(arg=None):
  name = arg or "lora"
  c = default.get_config()
  c.strategy = keys.strategy_options(name, **JOB.get(name, {}))
  c.learning_rate = strategies.LEARNING_RATES[name]
  if name == "linear_probe":  # a frozen backbone: fixed features, cached once
    c.augment.crop = False
  return c
