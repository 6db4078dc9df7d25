"""Full fine-tuning: every parameter of EfficientNet-Lite0 trains (head at 10x lr)."""

import ml_collections

from configs import default  # noqa: F401  (configs are plain modules)


def get_config(arg=None):
  c = default.get_config(arg)
  c.strategy.rules = ((r"head/.*", "head"), (r".*", "backbone"))
  c.lr_multipliers = ml_collections.ConfigDict({"backbone": 0.1})
  c.learning_rate = 3e-3
  return c
