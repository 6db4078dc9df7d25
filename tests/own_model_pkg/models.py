"""A user's own Linen and NNX classifiers (not in jtl's zoo)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

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


class TinyNnxNet(nnx.Module):
  """The same network as an NNX module: `model="own_model_pkg.models:TinyNnxNet"`."""
  normalization = model_normalization("unit", image_size=16, crop_fraction=1.0)

  def __init__(self, num_classes: int = 3, width: int = 8, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, width, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn(self.conv(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


def tiny_nnx(num_classes: int = 3, width: int = 8, *, rngs: nnx.Rngs) -> TinyNnxNet:
  """A factory of one: `model="own_model_pkg.models:tiny_nnx"`."""
  return TinyNnxNet(num_classes, width, rngs=rngs)


tiny_nnx.normalization = TinyNnxNet.normalization
