"""TrainState: the whole state of a fine-tuning run as one immutable pytree.

`trainable` and `frozen` are the two halves of the params (see
`jtl.partition.split`); `model_state` holds the model's mutable collections
(e.g. {"batch_stats": ...}); `rng` feeds dropout. Change it with `.replace()`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jtl import partition
from jtl.adapter import is_nnx_module, variables_of
from jtl.tree import PyTree


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: PyTree
  frozen: PyTree
  opt_state: optax.OptState
  model_state: dict[str, PyTree]
  rng: jax.Array

  @property
  def params(self) -> PyTree:
    """The full params (trainable and frozen merged)."""
    return partition.merge(self.trainable, self.frozen)

  @property
  def variables(self) -> dict[str, PyTree]:
    """{"params": ..., **model_state}: what `module.apply` takes."""
    return {"params": self.params, **self.model_state}


def create_train_state(variables: dict[str, PyTree], labels: PyTree,
                       tx: optax.GradientTransformation, *,
                       rng: jax.Array | int = 0) -> TrainState:
  """Splits `variables["params"]` by `labels` and initialises the optimizer.

  Args:
    variables: a Flax variables dict: {"params": ..., "batch_stats": ...},
      or a Flax NNX module (its variables, `jtl.adapter.variables_of(module)`).
    labels: label tree of `variables["params"]`.
    tx: the optimizer (see `jtl.optim.make_optimizer`), applied to the
      trainable partition only.
    rng: a PRNG key or an int seed, for dropout.
  """
  if is_nnx_module(variables):
    variables = variables_of(variables)
  variables = dict(variables)
  params = variables.pop("params")
  trainable, frozen = partition.split(params, labels)
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      trainable=trainable,
      frozen=frozen,
      opt_state=tx.init(trainable),
      model_state=variables,
      rng=rng,
  )
