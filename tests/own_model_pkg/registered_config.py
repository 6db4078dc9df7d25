"""A config file that defines and registers its own model ("tiny_registered"):
scripts/evaluate.py and convert.py run this file again to rebuild it."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from configs import default
from jtl import models
from jtl.models.preprocessing import model_normalization


class TinyRegistered(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), name="conv")(x))
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


models.register(models.ModelSpec(
    name="tiny_registered",
    build=lambda num_classes=3, **kw: TinyRegistered(num_classes=num_classes, **kw),
    **models.image_inputs(model_normalization("unit", image_size=16, crop_fraction=1.0)),
    default_num_classes=3, min_image_size=8))


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  c = default.get_config()
  c.model, c.pretrained, c.image_size = "tiny_registered", False, 16
  c.strategy.rules = ((".*", "all"),)
  c.batch_size, c.eval_batch_size, c.num_steps, c.warmup_steps = 8, 16, 3, 0
  c.eval_every = c.checkpoint_every = 3
  c.log_every, c.learning_rate = 1, 0.05
  c.train_split, c.eval_split = "train", "test"
  return c
