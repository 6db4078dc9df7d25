"""TPU VM: ViT-B/16 (ImageNet-21k AugReg weights, big_vision npz) fine-tuned on
CIFAR-10 at 224 px, data parallel over every TPU core (bf16 compute).

Needs network access for the weights and `tfds build cifar10`.
  python scripts/finetune.py --config configs/tpu_vit_b16_cifar10.py \\
      --workdir gs://BUCKET/vit_b16_cifar10 --config.data_dir gs://BUCKET/tfds
"""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.model = "vit_b16"
  c.dataset = "cifar10"
  c.image_size = 224
  c.batch_size = 512
  c.eval_batch_size = 512
  c.num_steps = 10_000
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.optimizer = "sgd"
  c.learning_rate = 0.03
  c.warmup_steps = 500
  c.weight_decay = 0.0
  c.strategy.rules = ((r"head/.*", "head"), (r".*", "backbone"))
  c.lr_multipliers = ml_collections.ConfigDict()
  c.augment.flip = True
  c.augment.crop_scale = (0.08, 1.0)
  c.compute_dtype = "bfloat16"
  return c
