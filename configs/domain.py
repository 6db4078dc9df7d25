"""Unsupervised domain adaptation: labelled MNIST digits (source) to
scikit-learn's 8x8 digits laid out as MNIST in 28x28 (target, labels never read).

  python scripts/finetune.py --config configs/domain.py:dann --workdir runs/dann
  python scripts/evaluate.py --workdir runs/dann --split test              # target test accuracy
  python scripts/evaluate.py --workdir runs/coral --split test --adabn     # + AdaBN

`:NAME` is dann (gradient reversal + domain classifier), coral (feature
covariance alignment) or source_only (the baseline: source labels only).
During training, the best checkpoint is chosen on 100 labelled target images
(`eval_split`, "train[:100]"), kept out of the unlabelled adaptation pool
(`target_split`, "train[100:]"); the target's test split is only scored at the
end (`test_split`) and by scripts/evaluate.py.

The options are those chosen on a labelled target validation split by
scripts/benchmarks/benchmark_domain.py (1,000 steps, AdamW 2e-3 with cosine
decay, DANN head 2x1024 with dropout 0.5 and the paper's reversal schedule,
DANN batchnorm "separate"; CORAL weight 1). DANN with batchnorm "separate"
keeps the source's running BatchNorm statistics, so its evaluations during
training are with those, and scripts/evaluate.py evaluates its target after
AdaBN by itself. jtl_digits (2.0.0) lays the 8x8 digits out as MNIST does
(20x20 box, centred by mass), as that benchmark does; see BENCHMARKS.md,
"Domain adaptation". The benchmark's own training loop (batches of 64 + 64,
no augmentation, AdamW) is not this config's, so accuracies can differ.
"""

import ml_collections

from configs import small_cnn


def get_config(arg=None):
  name = arg or "dann"
  c = small_cnn.get_config()
  c.num_steps = 1000  # the DANN schedules are functions of num_steps
  c.augment.crop = False
  c.train_split = "train"  # every labelled source digit: the target picks the checkpoint
  c.eval_dataset = "jtl_digits"
  c.eval_split = "train[:100]"  # labelled target validation: picks the best checkpoint
  c.test_split = "test"
  options = {"dann": {"weight": 1.0, "domain_hidden": 1024, "grl_gamma": 10.0,
                      "batchnorm": "separate"},
             "coral": {"weight": 1.0}, "source_only": {}}[name]
  if name == "source_only":
    c.method = ml_collections.ConfigDict({"name": ""})
  else:
    c.method = ml_collections.ConfigDict({
        "name": name, "target_dataset": "jtl_digits", "target_split": "train[100:]", **options})
  return c
