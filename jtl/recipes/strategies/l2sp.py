"""L2-SP: regularise toward the pretrained weights instead of toward zero.

Li, Grandvalet and Davoine (2018): the penalty
`strength/2 * ||w - w0||^2` over the pretrained (backbone) weights w0, and
plain L2 `head_strength/2 * ||w||^2` over the new head, whose weights have no
pretrained value. `l2sp` is an optax transformation that adds the penalty's
gradient to the updates; its state keeps the reference weights, taken from
the params `init` sees (the pretrained ones), so checkpoints and resumes
carry it. Put it first in the chain, before the optimizer.

>>> import jax.numpy as jnp
>>> tx = l2sp(0.5, exclude="head/.*", head_strength=0.1)
>>> w0 = {"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
>>> state = tx.init(w0)
>>> zeros = {"body": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(2)}}
>>> w = {"body": {"w": jnp.full(2, 3.0)}, "head": {"w": jnp.full(2, 3.0)}}
>>> updates, _ = tx.update(zeros, state, w)
>>> updates["body"]["w"].tolist(), [round(v, 4) for v in updates["head"]["w"].tolist()]
([1.0, 1.0], [0.3, 0.3])
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jtl import tree as jtree
from jtl.errors import ConfigError, OptimizerError
from jtl.tree import PyTree


class L2SPState(NamedTuple):
  reference: PyTree


def _excluded_tree(params: PyTree, exclude: str | None) -> PyTree:
  pattern = re.compile(exclude) if exclude else None
  return jtree.map_with_path(lambda p, _: bool(pattern and pattern.fullmatch(p)), params)


def _check(strength: float, head_strength: float) -> None:
  bad = [f"{n}={v!r}" for n, v in (("strength", strength), ("head_strength", head_strength))
         if not (isinstance(v, (int, float)) and v >= 0)]
  if bad:
    raise ConfigError(f"L2-SP needs non-negative numbers; got {', '.join(bad)}.")


def l2sp(strength: float, *, exclude: str | None = r"head/.*",
         head_strength: float = 0.0) -> optax.GradientTransformation:
  """Adds `strength * (w - w0)` (and `head_strength * w` on excluded leaves).

  Args:
    strength: weight of the pull toward the reference weights w0.
    exclude: regex over "/"-joined paths of leaves with no meaningful
      reference (the new head); they get plain L2 with `head_strength`.
    head_strength: plain L2 weight of the excluded leaves.
  """
  _check(strength, head_strength)

  def init_fn(params):
    # A copy, so that donating the params buffer does not free the reference.
    return L2SPState(reference=jax.tree.map(jnp.array, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise OptimizerError("l2sp needs the params: call tx.update(grads, state, params).")
    excluded = _excluded_tree(params, exclude)

    def add(u, p, w0, ex):
      pull = head_strength * p if ex else strength * (p - w0)
      return (u + pull).astype(u.dtype)

    return jax.tree.map(add, updates, params, state.reference, excluded), state

  return optax.GradientTransformation(init_fn, update_fn)


def l2sp_penalty(params: PyTree, reference: PyTree, strength: float, *,
                 exclude: str | None = r"head/.*", head_strength: float = 0.0) -> jax.Array:
  """The L2-SP loss term, for adding to a loss by hand (same gradient as `l2sp`).

  `reference` must have the structure of `params` (None where `params` is).
  """
  _check(strength, head_strength)
  excluded = _excluded_tree(params, exclude)
  terms = jax.tree.map(
      lambda p, w0, ex: (head_strength * jnp.sum(p ** 2) if ex
                         else strength * jnp.sum((p - w0) ** 2)),
      params, reference, excluded)
  return 0.5 * sum(jax.tree.leaves(terms), jnp.zeros(()))
