"""Partial fine-tuning of the last N blocks (+ top conv + head) of
EfficientNet-Lite0: `--config configs/partial.py:N` (default N=4, of 16).

The rules name Lite0's blocks. Another model whose parameters have none of
those names is refused before training; MobileNetV2 (blocks_0..16) has them
all, so there they train its blocks_12..15 and top while its last block,
blocks_16, stays frozen. For the last N blocks of any zoo model, use
`configs/strategy.py:partial` (`--config.strategy.num_blocks=N`), which
counts each model's own layer groups."""

from configs import default

NUM_BLOCKS = 16


def get_config(arg=None):
  n = int(arg) if arg else 4
  c = default.get_config()
  trainable = "|".join(f"blocks_{i}" for i in range(NUM_BLOCKS - n, NUM_BLOCKS))
  c.strategy.rules = ((rf"({trainable}|top)/.*", "backbone_top"), (r"head/.*", "head"),
                      (r".*", "frozen"))
  return c
