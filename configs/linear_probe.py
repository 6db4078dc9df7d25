"""Linear probe: EfficientNet-Lite0 frozen entirely (BatchNorm statistics too);
only a new 10-class head trains, without random augmentation.

The backbone is frozen and nothing is augmented, so every epoch would feed
the head the same features: they are extracted once (one pass over the
training split, on all devices) and the head trains on the cache
(`strategy.cache_features`; None: cached whenever nothing prevents it, e.g.
augmentation turned back on or a method; False: the plain training step).
"""

from configs import default
from jtl.app import keys


def get_config(arg=None):
  c = default.get_config(arg)
  c.strategy = keys.strategy_options("linear_probe")
  c.learning_rate = 1e-2
  c.weight_decay = 0.0
  c.augment.crop = False
  return c
