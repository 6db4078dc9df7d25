"""TrainState: the whole state of a fine-tuning run as one immutable pytree.

`trainable` and `frozen` are the two halves of the params (see
`jtl.partition.split`); `model_state` holds the model's mutable collections
(e.g. {"batch_stats": ...}); `rng` feeds dropout; `ema`, when weight EMA is
on (`fit(ema_decay=...)`), is the exponential moving average of `trainable`
(same structure), which evaluation and export use instead of the raw weights.
Change it with `.replace()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jtl import partition
from jtl.adapter import is_nnx_module, variables_of
from jtl.errors import PartitionError
from jtl.tree import PyTree


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: PyTree
  frozen: PyTree
  opt_state: optax.OptState
  model_state: dict[str, PyTree]
  rng: jax.Array
  ema: PyTree = None  # EMA of `trainable` (same tree), or None: weight EMA off

  @property
  def params(self) -> PyTree:
    """The full params (trainable and frozen merged)."""
    return partition.merge(self.trainable, self.frozen)

  @property
  def ema_params(self) -> PyTree:
    """The full params with the EMA in place of the trainable ones (frozen
    leaves never change, so they are their own average); `params` without EMA."""
    return self.params if self.ema is None else partition.merge(self.ema, self.frozen)

  @property
  def eval_variables(self) -> dict[str, PyTree]:
    """`variables` with the EMA weights when weight EMA is on: what evaluation
    and export use."""
    return {"params": self.ema_params, **self.model_state}

  @property
  def variables(self) -> dict[str, PyTree]:
    """{"params": ..., **model_state}: what `module.apply` takes."""
    return {"params": self.params, **self.model_state}


def _with_params(variables: Any, labels: PyTree) -> dict[str, PyTree]:
  """A copy of the variables dict, a bare params tree (the structure of
  `labels`) wrapped as {"params": ...}; an error naming both otherwise."""
  if not isinstance(variables, Mapping):
    raise PartitionError(f"create_train_state: variables must be a dict, got "
                         f"{type(variables).__name__}.")
  if "params" in variables:
    return dict(variables)
  same = lambda t: jax.tree.structure(t, is_leaf=lambda x: x is None)
  if same(variables) == same(labels):
    return {"params": variables}
  raise PartitionError(
      f"create_train_state: variables have keys {sorted(variables)}, no 'params', and are "
      f"not a params tree shaped like the labels (top-level keys "
      f"{sorted(labels) if isinstance(labels, Mapping) else type(labels).__name__}). Pass "
      "{'params': params, ...} (Flax variables) or the params tree the labels were made from.")


def create_train_state(variables: dict[str, PyTree], labels: PyTree,
                       tx: optax.GradientTransformation, *,
                       rng: jax.Array | int = 0, ema: bool = False,
                       copy: bool = True) -> TrainState:
  """Splits `variables["params"]` by `labels` and initialises the optimizer.

  Args:
    variables: a Flax variables dict: {"params": ..., "batch_stats": ...},
      a bare params tree shaped like `labels` (an `apply_fn(params, x)`'s
      params: taken as {"params": variables}), or a Flax NNX module (its
      variables, `jtl.adapter.variables_of(module)`).
    labels: label tree of `variables["params"]`.
    tx: the optimizer (see `jtl.optim.make_optimizer`), applied to the
      trainable partition only.
    rng: a PRNG key or an int seed, for dropout.
    ema: keep an exponential moving average of the trainable params (for a
      step made with `make_train_step(..., ema_decay=...)`); it starts at
      the initial params.
    copy: copy the jax arrays of `variables` and `rng` into the state: a train
      step that donates the state (`jit_train_step`'s default) then never
      deletes arrays the caller still holds (the pretrained variables, for
      WiSE-FT or L2-SP). False: reuse them (for a state that `place_state`,
      which copies, puts on the mesh next).
  """
  if is_nnx_module(variables):
    variables = variables_of(variables)
  variables = _with_params(variables, labels)
  if copy:  # numpy leaves need none: device_put copies them
    variables = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, variables)
    rng = jnp.copy(rng) if isinstance(rng, jax.Array) else rng
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
      # A copy: the train step donates the state, and one buffer cannot be donated twice.
      ema=jax.tree.map(jnp.array, trainable) if ema else None,
  )
