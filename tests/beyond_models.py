"""A tiny zoo-style CNN (features + "head" made in setup) for the tests of
distillation, domain adaptation, adversarial training and quantization."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TinyCNN(nn.Module):
  num_classes: int = 4
  width: int = 8

  def setup(self):
    self.conv0 = nn.Conv(self.width, (3, 3))
    self.bn0 = nn.BatchNorm(momentum=0.9)
    self.conv1 = nn.Conv(2 * self.width, (3, 3), strides=(2, 2))
    self.bn1 = nn.BatchNorm(momentum=0.9)
    self.head = nn.Dense(self.num_classes)

  def features(self, x, *, train: bool = False):
    x = nn.relu(self.bn0(self.conv0(x), use_running_average=not train))
    x = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x, *, train: bool = False):
    return self.head(self.features(x, train=train))


def init(module, x, seed: int = 0):
  # jit: op-by-op init compiles every op on its own, which is slow on CPU.
  return jax.jit(lambda r, x: module.init(r, x, train=False))(jax.random.PRNGKey(seed), x)


def images(n: int = 8, size: int = 8, seed: int = 0, shift: float = 0.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, size, size, 3)) + shift).astype(np.float32)


def labels(n: int = 8, classes: int = 4, seed: int = 1):
  return np.random.default_rng(seed).integers(0, classes, n).astype(np.int32)
