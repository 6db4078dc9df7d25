"""Unsupervised domain adaptation: labelled MNIST digits (source) to
scikit-learn's 8x8 digits upsampled to 28x28 (target, labels never read).

  python scripts/finetune.py --config configs/domain.py:dann --workdir runs/dann
  python scripts/evaluate.py --workdir runs/dann              # target test accuracy
  python scripts/evaluate.py --workdir runs/dann --adabn      # + AdaBN

`:NAME` is dann (gradient reversal + domain classifier), coral (feature
covariance alignment) or source_only (the baseline: source labels only).
Evaluation is on the target's held-out test split (`eval_dataset`).
"""

import ml_collections

from configs import small_cnn


def get_config(arg=None):
  name = arg or "dann"
  c = small_cnn.get_config()
  c.num_steps = 400
  c.augment.crop = False
  c.eval_dataset = "jtl_digits"
  options = {"dann": {"weight": 1.0, "domain_hidden": 256, "grl_gamma": 10.0},
             "coral": {"weight": 1.0}, "source_only": {}}[name]
  if name == "source_only":
    c.method = ml_collections.ConfigDict({"name": ""})
  else:
    c.method = ml_collections.ConfigDict({
        "name": name, "target_dataset": "jtl_digits", "target_split": "train", **options})
  return c
