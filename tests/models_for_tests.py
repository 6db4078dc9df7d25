"""Small Flax models shared by the core tests (random init, tiny shapes)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jtl


class ConvNet(nn.Module):
  """A conv backbone with BatchNorm and a dense head named like zoo models."""
  num_classes: int = 10
  width: int = 16
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    for i in range(3):
      x = nn.Conv(self.width * (i + 1), (3, 3), strides=(2, 2) if i else (1, 1),
                  name=f"backbone_conv{i}")(x)
      x = nn.BatchNorm(momentum=0.9, name=f"backbone_bn{i}")(x, use_running_average=not train)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(self.num_classes, name="head")(x)


class MLP(nn.Module):
  """A BatchNorm-free model whose gradients do not depend on the batch split."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.tanh(nn.Dense(32, name="body")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def init(module: nn.Module, x: jax.Array, seed: int = 0):
  return module.init(jax.random.PRNGKey(seed), x, train=False)


def batch(n: int = 16, size: int = 8, channels: int = 3, classes: int = 10, seed: int = 0):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return {"inputs": jax.random.normal(kx, (n, size, size, channels)),
          "label": jax.random.randint(ky, (n,), 0, classes)}


def mlp_setup(learning_rate=0.1):
  """An MLP for 4 classes, every leaf trained by SGD: (module, variables, labels, tx)."""
  module = MLP()
  variables = init(module, batch(8, classes=4)["inputs"])
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=learning_rate, optimizer="sgd")
  return module, variables, labels, tx


class Probed(nn.Module):
  """A body with a `features` method and a head: what a cached probe needs."""

  def setup(self):
    self.body, self.head = nn.Dense(8), nn.Dense(4)

  def features(self, x, *, train=False):
    del train
    return nn.tanh(self.body(x.reshape((x.shape[0], -1))))

  def __call__(self, x, *, train=False):
    return self.head(self.features(x))


def cached_probe_kwargs(**extra):
  """`features.fit_cached_probe`'s model arguments for `Probed` (the head
  trains, the body is frozen; SGD 0.1), plus `extra`."""
  module = Probed()
  variables = init(module, batch(8, classes=4)["inputs"])
  labels = jtl.label_params(variables["params"],
                            [("head/.*", "head"), (".*", jtl.partition.FROZEN)])
  head = {"head": jax.tree.map(lambda _: "head", variables["params"]["head"])}
  return {"module": module, "variables": variables, "labels": labels,
          "tx": jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd"),
          "head_tx": jtl.make_optimizer(head, learning_rate=0.1, optimizer="sgd"), **extra}


def phased_mlp(learning_rate):
  """The MLP with two partitions for a two-phase run (probe: the head alone;
  full: head and body) and Adam at `learning_rate`:
  (module, variables, probe, full, make_optimizer(labels), batches from a step)."""
  module = MLP()
  variables = init(module, batch(8, classes=4)["inputs"])
  probe = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "frozen")])
  full = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "body")])
  make = lambda labels: jtl.make_optimizer(labels, learning_rate=learning_rate, optimizer="adam")
  data = lambda start: iter([batch(8, classes=4, seed=i) for i in range(start, 100)])
  return module, variables, probe, full, make, data


def fit_kwargs(workdir, learning_rate=0.1, **extra):
  """`jtl.train.fit` arguments for the MLP run (checkpoints and evals every 2
  steps, 100 distinct batches), with `extra` on top."""
  module, variables, labels, tx = mlp_setup(learning_rate)
  data = lambda start: iter([batch(8, classes=4, seed=i) for i in range(start, 100)])
  evals = lambda: [{**batch(8, classes=4, seed=99), "mask": np.ones(8, bool)}]
  kwargs = dict(module=module, variables=variables, labels=labels, tx=tx, train_batches=data,
                eval_batches=evals, workdir=workdir, checkpoint_every=2, eval_every=2, keep=1,
                progress=False, async_checkpoints=False, log_every=1,
                meta={"model": "mlp", "num_classes": 4})
  return {**kwargs, **extra}
