"""TPU VM: ResNet-50 (torchvision ImageNet weights) fine-tuned on
oxford_flowers102 at 224 px, with the head at 10x the backbone's learning rate.

Needs network access for the weights and `tfds build oxford_flowers102`.
  python scripts/finetune.py --config configs/tpu_resnet50_flowers.py \\
      --workdir gs://BUCKET/r50_flowers --config.data_dir gs://BUCKET/tfds
"""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.model = "resnet50"
  c.dataset = "oxford_flowers102"
  c.train_split = "train"
  c.eval_split = "validation"  # picks the best checkpoint; test scores it after training
  c.test_split = "test"
  c.image_size = 224
  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_steps = 5_000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.optimizer = "sgd"
  c.learning_rate = 0.01
  c.warmup_steps = 200
  c.weight_decay = 1e-4
  c.strategy.rules = ((r"head/.*", "head"), (r".*", "backbone"))
  c.lr_multipliers = ml_collections.ConfigDict({"head": 10.0})
  c.augment.flip = True
  c.compute_dtype = "bfloat16"
  return c
