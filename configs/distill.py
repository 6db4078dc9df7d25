"""Knowledge distillation: a fine-tuned teacher's soft targets train a small student.

First train the teacher (EfficientNet-Lite0, real ImageNet weights, on the
MNIST digits), then the student (SmallCNN from scratch, 28 px) from it:

  python scripts/finetune.py --config configs/default.py --workdir runs/default
  python scripts/finetune.py --config configs/distill.py --workdir runs/distill \
      --config.method.teacher_workdir=runs/default

The teacher runs on the fly on each student batch, converted to its own
image size and normalisation. `--config configs/distill.py:labels` is the
same student trained on labels alone (alpha = 0, no teacher), the baseline.
"""

import ml_collections

from configs import small_cnn


def get_config(arg=None):
  c = small_cnn.get_config()
  c.learning_rate = 3e-3
  c.augment.crop_scale = (0.8, 1.0)
  if arg == "labels":
    c.method = ml_collections.ConfigDict({"name": ""})
  else:
    c.method = ml_collections.ConfigDict({
        "name": "distill", "teacher_workdir": "runs/default", "teacher_step": "best",
        "temperature": 4.0, "alpha": 0.9})
  return c
