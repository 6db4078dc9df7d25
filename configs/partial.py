"""Partial fine-tuning of the last N blocks (+ top conv + head) of
EfficientNet-Lite0: `--config configs/partial.py:N` (default N=4, of 16)."""

from configs import default

NUM_BLOCKS = 16


def get_config(arg=None):
  n = int(arg) if arg else 4
  c = default.get_config()
  trainable = "|".join(f"blocks_{i}" for i in range(NUM_BLOCKS - n, NUM_BLOCKS))
  c.strategy.rules = ((rf"({trainable}|top)/.*", "backbone_top"), (r"head/.*", "head"),
                      (r".*", "frozen"))
  return c
