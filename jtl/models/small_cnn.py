"""A small CNN trained from scratch: the student of distillation recipes and
the fast model of the domain-adaptation and adversarial configs.

Three 3x3 conv + BatchNorm + ReLU stages (the last two with stride 2), global
average pooling and a "head" Dense; `features()` gives the pooled features.
Inputs are images scaled to 0..1 (`NORMALIZATION`: "unit"), so attack radii are in
pixel units. It has no pretrained weights.

>>> import numpy as np
>>> m = SmallCNN(num_classes=10)
>>> v = m.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 3), np.float32))
>>> m.apply(v, np.zeros((2, 28, 28, 3), np.float32)).shape
(2, 10)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl.models import registry, wgrad
from jtl.models.layers import BatchNorm
from jtl.models.preprocessing import model_normalization

# Pixels scaled to 0..1 at 28 x 28, the whole image (no crop).
NORMALIZATION = model_normalization("unit", image_size=28, crop_fraction=1.0)


class SmallCNN(nn.Module):
  """Attributes: num_classes (0: pooled features), width of the first stage."""
  num_classes: int = 10
  width: int = 32

  def setup(self) -> None:
    self.convs = [wgrad.Conv(self.width * 2 ** i, (3, 3), strides=(1, 1) if i == 0 else (2, 2),
                          name=f"stage{i}_conv") for i in range(3)]
    self.bns = [BatchNorm(momentum=0.9, name=f"stage{i}_bn") for i in range(3)]
    if self.num_classes:
      self.head = wgrad.Dense(self.num_classes)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for conv, bn in zip(self.convs, self.bns):
      x = nn.relu(bn(conv(x), use_running_average=not train))
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    feats = self.features(x, train=train)
    return self.head(feats) if self.num_classes else feats


def _register(name: str, width: int) -> None:
  registry.register(registry.ModelSpec(
      name=name,
      # `width` is this name's default; model_kwargs may still set it (model_options lists it).
      build=lambda num_classes=10, **kw: SmallCNN(num_classes=num_classes,
                                                  **{"width": width, **kw}),
      **registry.image_inputs(NORMALIZATION),
      groups=[(f"stage{i}", rf"stage{i}_.*") for i in range(3)] + [("head", r"head/.*")],
      default_num_classes=10,
      min_image_size=8,
  ))


_register("small_cnn", 32)
_register("small_cnn_w16", 16)
