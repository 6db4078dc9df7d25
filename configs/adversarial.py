"""Adversarial fine-tuning (Madry et al.): train on PGD inputs, then measure
clean accuracy and accuracy under a stronger PGD.

  python scripts/finetune.py --config configs/adversarial.py --workdir runs/adv
  python scripts/evaluate.py --workdir runs/adv --attack pgd --eps 0.1 --attack_steps 20

`:standard` trains the same model on clean inputs (the baseline). eps and
step_size are in pixel units (0..1); SmallCNN on MNIST digits by default.
"""

import ml_collections

from configs import small_cnn


def get_config(arg=None):
  c = small_cnn.get_config()
  c.augment.crop = False
  if arg == "standard":
    c.method = ml_collections.ConfigDict({"name": ""})
  else:
    c.method = ml_collections.ConfigDict({
        "name": "adversarial", "attack": "pgd", "eps": 0.1, "step_size": 0.025, "steps": 7,
        "clean_fraction": 0.0})
  return c
