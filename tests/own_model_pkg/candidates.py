"""Two tiny backbones for `model="auto"` (own_model_pkg.candidates:COLOUR / BLIND):
the same layers, but BLIND's features ignore the image, so a probe on them
can only predict one class."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl.models import registry
from jtl.models.preprocessing import model_normalization


class Backbone(nn.Module):
  """Channel means and a 3x3 conv's mean activations; a "head" Dense."""
  num_classes: int = 3
  blind: bool = False

  def setup(self) -> None:
    self.conv = nn.Conv(4, (3, 3))
    if self.num_classes:
      self.head = nn.Dense(self.num_classes)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    x = jnp.zeros_like(x) if self.blind else x
    return jnp.concatenate([x.mean((1, 2)), nn.relu(self.conv(x)).mean((1, 2))], -1)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    f = self.features(x, train=train)
    return self.head(f) if self.num_classes else f


def _spec(blind: bool) -> registry.ModelSpec:
  return registry.ModelSpec(
      name="blind" if blind else "colour",
      build=lambda num_classes=3, **kw: Backbone(num_classes=num_classes, blind=blind, **kw),
      **registry.image_inputs(model_normalization("unit", image_size=16, crop_fraction=1.0)),
      groups=[("body", r"conv/.*"), ("head", r"head/.*")], default_num_classes=3,
      min_image_size=8)


COLOUR = _spec(False)
BLIND = _spec(True)
