"""Gradient checkpointing of a stack of identical blocks, as one scanned loop.

`nn.remat` around each block asks XLA to recompute the block's activations in
the backward pass; XLA:CPU drops those requests (its optimization barriers)
and keeps every activation anyway (BENCHMARKS.md, "Gradient checkpointing").
A `lax.scan` over the blocks whose body is `jax.checkpoint`ed cannot be undone
that way: the loop keeps only each block's input for the backward pass on
every backend, and compiles one block instead of `depth`. The parameter tree
is untouched (`encoderblock_0`, `encoderblock_1`, ...: checkpoints, rules and
pretrained weights as without remat); the blocks' variables are stacked per
step. `scan_blocks` returns None where they cannot be (blocks of different
shapes, e.g. LoRA on some blocks only): the caller then runs its blocks one
by one with `nn.remat`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def can_scan(module: nn.Module, train: bool) -> bool:
  """Whether `module` (bound, inside its `__call__`) may scan its blocks: only
  in training (nothing is differentiated otherwise), after init, and when no
  collection is being written (BatchNorm statistics, sown intermediates)."""
  if not train or module.is_initializing():
    return False
  written = ("intermediates", "batch_stats", *module.variables.keys())
  return not any(module.is_mutable_collection(c) for c in written)


def scan_blocks(template: nn.Module, names: Sequence[str], variables: Mapping[str, Any],
                x: jax.Array, *args: Any, rng: jax.Array | None = None,
                per_block: Mapping[str, Sequence[float]] | None = None) -> jax.Array | None:
  """x through the blocks `names` of `variables`, each applied as `template`
  (unbound; its attributes in `per_block` set per block, as traced values),
  under `lax.scan` with a checkpointed body; None if their variables differ
  in structure or shape.

  rng: the step's dropout key, split into one key per block (the draws differ
  from the unrolled model's, which derives them from module names).

  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> dense = nn.Dense(4)
  >>> v = {"params": {f"b{i}": dense.init(jax.random.PRNGKey(i), jnp.ones((1, 4)))["params"]
  ...                 for i in range(3)}}
  >>> x = jnp.ones((2, 4))
  >>> y = scan_blocks(dense, ["b0", "b1", "b2"], v, x)
  >>> loop = x
  >>> for i in range(3):
  ...   loop = dense.apply({"params": v["params"][f"b{i}"]}, loop)
  >>> bool(jnp.allclose(y, loop, atol=1e-6))
  True
  """
  trees = [{c: tree[name] for c, tree in variables.items() if name in tree} for name in names]
  layout = [jax.tree.map(lambda a: (a.shape, a.dtype), t) for t in trees]
  if any(l != layout[0] for l in layout[1:]):
    return None
  xs: dict[str, Any] = {"variables": jax.tree.map(lambda *a: jnp.stack(a), *trees)}
  if rng is not None:
    xs["rng"] = jax.random.split(rng, len(names))
  if per_block:
    xs["attrs"] = {k: jnp.asarray(v, jnp.float32) for k, v in per_block.items()}

  def body(carry, step):
    block = template.clone(**step.get("attrs", {}))
    rngs = {"dropout": step["rng"]} if "rng" in step else None
    return block.apply(step["variables"], carry, *args, rngs=rngs), None

  # A block that changes its input's type (a float32 layer on bfloat16 inputs:
  # mixed precision) runs before the loop, whose carry keeps one type.
  first = 0
  while first < len(names):
    step = jax.tree.map(lambda a: a[first], xs)
    out = jax.eval_shape(lambda c, s: body(c, s)[0], x, step)
    if (out.shape, out.dtype) == (x.shape, x.dtype):
      break
    x, _ = jax.checkpoint(body)(x, step)
    first += 1
  if first == len(names):
    return x
  if first:
    xs = jax.tree.map(lambda a: a[first:], xs)
  y, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), x, xs)
  return y


def traced_drop_path(module: nn.Module, rate: Any, y: jax.Array, deterministic: bool) -> jax.Array:
  """Stochastic depth with a traced `rate` (a scanned block's): the residual
  branch `y` dropped for whole examples, kept ones scaled by 1 / (1 - rate),
  as `nn.Dropout(rate, broadcast_dims=(1, ..., ndim-1))` does for a Python
  rate. Draws from `module`'s "dropout" stream."""
  if deterministic:
    return y
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep,
                              (y.shape[0],) + (1,) * (y.ndim - 1))
  return jnp.where(mask, y / jnp.maximum(keep, 1e-12).astype(y.dtype), jnp.zeros_like(y))
