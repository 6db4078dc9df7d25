"""One optax transformation over a label tree; frozen leaves get no state.

The transformation built here runs on the *trainable* partition (see
`jtl.partition.split`), where frozen leaves are None. So clipping by global
norm, weight decay and every optimizer buffer see trainable leaves only, and
the optimizer state costs exactly what the trainable leaves need.

>>> import numpy as np, jax.numpy as jnp
>>> from jtl import partition
>>> params = {"body": {"kernel": jnp.ones((8, 8))}, "head": {"kernel": jnp.ones((8, 2))}}
>>> labels = partition.label_params(params, [("head/.*", "head"), (".*", "frozen")])
>>> tx = make_optimizer(labels, learning_rate=1e-3, optimizer="adam")
>>> trainable, frozen = partition.split(params, labels)
>>> tree_bytes(tx.init(trainable)) == 2 * tree_bytes(trainable) + 4
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtl import partition
from jtl.errors import OptimizerError
from jtl.tree import PyTree

ScalarOrSchedule = float | optax.Schedule

# Optimizers whose own update applies decoupled weight decay.
_DECOUPLED_DECAY = ("adamw", "lamb", "lion", "adan")


def tree_bytes(tree: PyTree) -> int:
  """Total bytes of the array leaves of `tree` (None and empty nodes are free)."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def default_decay_mask(params: PyTree) -> PyTree:
  """Decay matrices and kernels, not biases or norm scales (ndim >= 2)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def trainable_label_set(labels: PyTree) -> list[str]:
  """Sorted distinct labels of trainable leaves."""
  return sorted({l for l in jax.tree.leaves(partition.as_labels(labels))
                 if not partition.is_frozen(l)})


def _check_keys(given: Mapping[str, Any], labels: list[str], what: str, *, require_all: bool) -> None:
  unknown = sorted(set(given) - set(labels))
  missing = sorted(set(labels) - set(given)) if require_all else []
  if unknown or missing:
    msg = [f"{what} does not fit the trainable labels {labels}."]
    if unknown:
      msg.append(f"Keys with no trainable leaf: {unknown} (misspelt, or frozen?)")
    if missing:
      msg.append(f"Trainable labels with no entry: {missing}")
    raise OptimizerError("\n".join(msg))


def base_optimizer(name: str | Callable[..., optax.GradientTransformation], *,
                   learning_rate: ScalarOrSchedule, weight_decay: float = 0.0,
                   decay_mask: Any = default_decay_mask,
                   **kwargs: Any) -> optax.GradientTransformation:
  """An optax optimizer by name ("sgd", "adam", "adamw", "lion", ...).

  Weight decay is decoupled for optimizers that support it (adamw, lamb,
  lion) and added to the gradient (classic L2) otherwise, masked by
  `decay_mask` (default: leaves with ndim >= 2).
  """
  if callable(name):
    if weight_decay:
      raise OptimizerError(
          f"weight_decay={weight_decay} with the optimizer factory {name!r}: jtl cannot tell "
          "whether it decays decoupled or as L2, so give the decay to the factory itself, "
          "e.g. optimizer=functools.partial(optax.adamw, weight_decay=1e-4), or pass the "
          "optimizer by name ('adamw', 'sgd', ...).")
    return name(learning_rate=learning_rate, **kwargs)
  factory = getattr(optax, name, None)
  if factory is None or not callable(factory):
    raise OptimizerError(
        f"Unknown optimizer {name!r}: expected the name of an optax optimizer "
        "such as 'sgd', 'adam', 'adamw', 'lion', 'lamb', or a callable.")
  if weight_decay and name in _DECOUPLED_DECAY:
    return factory(learning_rate=learning_rate, weight_decay=weight_decay,
                   mask=decay_mask, **kwargs)
  tx = factory(learning_rate=learning_rate, **kwargs)
  if weight_decay:
    tx = optax.chain(optax.add_decayed_weights(weight_decay, decay_mask), tx)
  return tx


def scale_by_tree(scales: PyTree) -> optax.GradientTransformation:
  """Multiplies each update by its leaf of `scales` (scalars or broadcastable
  arrays, e.g. a per-layer (L, 1, 1) scale for a scanned stack of layers)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    labels: PyTree,
    *,
    learning_rate: ScalarOrSchedule = 1e-3,
    optimizer: str | Callable[..., optax.GradientTransformation] = "adamw",
    weight_decay: float = 0.0,
    decay_mask: Any = default_decay_mask,
    clip_norm: float | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
    per_label: Mapping[str, optax.GradientTransformation] | None = None,
    **optimizer_kwargs: Any,
) -> optax.GradientTransformation:
  """Builds the optimizer for the trainable partition from a label tree.

  Args:
    labels: label tree from `jtl.partition.label_params` (full, with frozen).
    learning_rate: base learning rate or optax schedule.
    optimizer: optax optimizer name or factory, used for every label unless
      `per_label` is given.
    weight_decay: decay strength, masked by `decay_mask`.
    decay_mask: bool tree or callable over the trainable params.
    clip_norm: clip the global norm of the trainable gradients to this.
    lr_multipliers: {label: factor} scaling the update (so the learning rate)
      of each label; labels not listed keep factor 1.
    per_label: {label: transformation}, one optax transformation per
      trainable label (every trainable label needs one); replaces `optimizer`.
    **optimizer_kwargs: passed to the optimizer factory (b1, momentum, ...).

  Returns:
    An optax transformation to apply to the trainable partition.
  """
  if isinstance(learning_rate, (int, float)) and not learning_rate >= 0:
    raise OptimizerError(f"learning_rate={learning_rate!r}: expected a number >= 0 (or an "
                         "optax schedule); a negative rate climbs the loss.")
  names = trainable_label_set(labels)
  if not names:
    raise OptimizerError(
        "Every parameter is frozen, so there is nothing to optimize. Give at "
        "least one rule a label other than 'frozen'.")
  tlabels = partition.trainable_labels(labels)
  if per_label is not None:
    ignored = [f"{k}={v!r}" for k, v in (("weight_decay", weight_decay),
                                          ("optimizer_kwargs", optimizer_kwargs)) if v]
    if ignored:
      raise OptimizerError(
          f"make_optimizer(per_label=...) builds each label's transformation itself, so "
          f"{', '.join(ignored)} would be ignored; put them into the per_label "
          "transformations (e.g. optax.adamw(1e-3, weight_decay=1e-4)).")
    _check_keys(per_label, names, "per_label", require_all=True)
    core = optax.partition(dict(per_label), tlabels)
  else:
    core = base_optimizer(optimizer, learning_rate=learning_rate,
                          weight_decay=weight_decay, decay_mask=decay_mask,
                          **optimizer_kwargs)
  parts = []
  if clip_norm is not None:
    if clip_norm <= 0:
      raise OptimizerError(f"clip_norm must be positive, got {clip_norm}.")
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(core)
  if lr_multipliers:
    _check_keys(lr_multipliers, names, "lr_multipliers", require_all=False)
    factors = {n: float(lr_multipliers.get(n, 1.0)) for n in names}
    parts.append(optax.partition(
        {n: optax.scale(f) for n, f in factors.items()}, tlabels))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]
