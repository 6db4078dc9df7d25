"""A tiny model with the zoo's conventions, for the strategy tests."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import numpy as np

from jtl import tree as jtree


class ConvBlock(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(momentum=0.9, name="bn")(x, use_running_average=not train)
    return nn.relu(x)


class DenseBlock(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    del train
    y = nn.Dense(8, name="dense")(x)
    return nn.LayerNorm(name="norm")(nn.relu(y))


class Tiny(nn.Module):
  num_classes: int = 3

  def setup(self):
    self.stem = ConvBlock()
    self.block_0 = DenseBlock()
    self.block_1 = DenseBlock()
    self.head = nn.Dense(self.num_classes)

  def features(self, x, *, train=False):
    x = jax.numpy.mean(self.stem(x, train=train), axis=(1, 2))
    return self.block_1(self.block_0(x, train=train), train=train)

  def __call__(self, x, *, train=False):
    return self.head(self.features(x, train=train))


GROUPS = [("stem", r"stem/.*"), ("block_0", r"block_0/.*"), ("block_1", r"block_1/.*"),
          ("head", r"head/.*")]


def example_input(batch_size):
  return np.zeros((batch_size, 6, 6, 3), np.float32)


SPEC = types.SimpleNamespace(name="tiny", groups=GROUPS, example_input=example_input)


def tiny(seed=0):
  module = Tiny()
  variables = module.init(jax.random.PRNGKey(seed), example_input(1), train=False)
  return module, jax.tree.map(np.asarray, dict(variables))


def batch(n=8, seed=0, classes=3):
  rng = np.random.default_rng(seed)
  return {"inputs": rng.normal(size=(n, 6, 6, 3)).astype(np.float32),
          "label": rng.integers(0, classes, n).astype(np.int32)}


def changed(before, after, atol=0.0):
  """Paths whose values differ between two trees with the same paths."""
  a, b = jtree.flatten(before), jtree.flatten(after)
  assert sorted(a) == sorted(b), (sorted(a), sorted(b))
  return {p for p in a if not np.allclose(np.asarray(a[p]), np.asarray(b[p]), atol=atol, rtol=0)}
