"""Fine-tune a zoo model on your image folder, one command:

  python scripts/finetune.py --config configs/folder.py --workdir runs/photos \
      --config.dataset=folder:/path/to/photos

The folder holds class folders (`photos/<class>/*.jpg`), or `train/` and
`test/` folders of class folders. What runs:

- the backbone chosen by measurement (`model="auto"`; `--config.model=...`
  names one instead): the cached linear probe below on each of
  EfficientNet-Lite0/1/2 with its ImageNet weights (`model_candidates`; each
  at its native resolution and preprocessing: `image_size` None), the best
  on the validation split wins (table in the workdir's model_selection.md)
  within `model_budget_seconds`, and the run trains it as if named
  (`--config.model_candidates=efficientnet_lite0,hf-hub:timm/resnet50.a1_in1k`
  tries your own list: zoo names, Hub repos, local Hub-layout folders). At
  native resolution on CIFAR-10 (30 images per class, this config's 10
  epochs, 3 seeds) it chose Lite2 each time: +1.8 points of test accuracy
  over the fixed Lite0 (within one standard deviation) at 1.8x its wall time
  (the selection costs about one epoch of Lite0 here); on the sklearn digits
  (the same size) it chose Lite0 each time: the same accuracy at 1.4x
  (BENCHMARKS.md, "model=auto");
- LP-FT (Kumar et al. 2022): a linear probe on cached features first (one
  backbone pass over the unaugmented training images, then `probe_steps`
  head steps at `probe_learning_rate`: seconds), then every parameter but
  BatchNorm's (kept with their pretrained statistics: `freeze_batchnorm`)
  fine-tunes at `learning_rate`, 300x lower, with augmentation on (random
  resized crops, horizontal flips);
- a schedule in epochs (`num_epochs`; steps per epoch = training images //
  batch_size), cosine decay, an evaluation and a checkpoint every epoch on a
  validation split: about 10% of every class of the training images
  ("train[val10%]", each file's side fixed by a hash of its path, so adding
  photos moves no other file; training sees "train[-val10%]");
  the best checkpoint by validation accuracy is kept;
- at the end, the best checkpoint is evaluated on the folder's `test/` split
  (`test_split`; skipped when the folder has none): eval_test.json and
  confusion_test.png in the workdir.

Defaults chosen on a validation split (never the test split) of the CIFAR-10
folder by `scripts/benchmarks/benchmark_strategies.py` (two sweep rounds, 20 and 60
steps, EfficientNet-Lite0 at 128 px, 100 labelled images per class; table in
BENCHMARKS.md, "Strategies: learning rates and options" and "BatchNorm
modes"): the probe's learning rate (1e-2 of 3e-3..1e-1), the fine-tuning
phase's (3e-5 of 1e-5..3e-4: the best mean over CIFAR-10 and the sklearn
digits, 3 seeds each), the probe's head steps (`strategies.PROBE_STEPS`,
300: validation accuracy plateaus from 300 on, on CIFAR-10 and the sklearn
digits) and frozen BatchNorm (LP-FT 67.5% on validation against 55.5% with
statistics re-estimated; the probe alone 67.0%).
"""

import ml_collections

from configs import default
from jtl.app import keys
from jtl.recipes import strategies


def get_config(arg=None):
  c = default.get_config(arg)
  c.dataset = ""  # --config.dataset=folder:/path/to/images
  c.model = "auto"  # the best EfficientNet-Lite by its probe on the validation split
  c.train_split = "train[-val10%]"
  c.eval_split = "train[val10%]"
  c.test_split = "test"
  c.image_size = ml_collections.config_dict.placeholder(int)  # None: the model's native size
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 10
  c.num_steps = 0  # derived from num_epochs
  c.warmup_epochs = 0.0
  c.eval_every = 0  # every epoch
  c.checkpoint_every = 0  # every epoch
  c.keep = 1  # the last checkpoint, and the best by validation accuracy
  c.optimizer = "adamw"
  c.learning_rate = strategies.LEARNING_RATES["lp_ft"]  # the fine-tuning phase's
  c.schedule = "cosine"
  c.warmup_steps = 0
  c.weight_decay = 1e-4
  # probe_steps, probe_learning_rate: the library's (strategies.PROBE_STEPS, PROBE_LEARNING_RATE).
  c.strategy = keys.strategy_options("lp_ft")
  c.augment.crop = True
  c.augment.crop_scale = (0.35, 1.0)
  c.augment.flip = True
  return c
