"""A user's own Linen classifier (not in jtl's zoo)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl.models.preprocessing import model_normalization


class TinyNet(nn.Module):
  """Conv, BatchNorm, mean pool and a "head" Dense; `num_classes=0`: features."""
  num_classes: int = 3
  width: int = 8
  # What `model="own_model_pkg.models:TinyNet"` feeds it: pixels / 255 at 16 px.
  normalization = model_normalization("unit", image_size=16, crop_fraction=1.0)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = nn.Conv(self.width, (3, 3), strides=(2, 2), name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x) if self.num_classes else x
