"""Any jtl.strategies strategy on the default job (EfficientNet-Lite0 on
MNIST digits): `--config configs/strategy.py:NAME`, NAME one of full,
scratch, linear_probe, partial, bitfit, lora, lp_ft, gradual, llrd.
Strategy options are config keys too, e.g. --config.strategy.rank=4.
"""

import ml_collections

from configs import default

OPTIONS = {
    "full": {}, "scratch": {}, "bitfit": {},
    # None: features cached when nothing prevents it (no augmentation, no method).
    "linear_probe": {"cache_features": ml_collections.config_dict.placeholder(bool)},
    "llrd": {"layer_decay": 0.8},
    "partial": {"num_blocks": 4},
    "lora": {"rank": 8, "alpha": 16.0},
    "lp_ft": {"probe_steps": 100},
    "gradual": {"steps_per_stage": 50, "blocks_per_stage": 2},
}


def get_config(arg=None):
  name = arg or "lora"
  c = default.get_config()
  c.rules = ()
  c.strategy = ml_collections.ConfigDict({"name": name, **OPTIONS[name]})
  if name in ("linear_probe", "bitfit", "lora"):
    c.learning_rate = 5e-3
  if name == "linear_probe":  # a frozen backbone: fixed features, cached once
    c.augment.crop = False
  return c
