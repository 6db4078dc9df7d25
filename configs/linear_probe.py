"""Linear probe: EfficientNet-Lite0 frozen entirely (BatchNorm statistics too);
only a new 10-class head trains, without random augmentation."""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rules = ((r"head/.*", "head"), (r".*", "frozen"))
  c.learning_rate = 1e-2
  c.weight_decay = 0.0
  c.augment.crop = False
  return c
