"""Parameter-tree paths: "/"-joined names, flatten/unflatten, regex rules.

A leaf's path is the "/"-joined list of its keys, e.g.
"backbone/block3/conv/kernel". The same names work for nested dicts from Flax
Linen, `nnx.State`, plain dicts, lists and dataclasses.

>>> import numpy as np
>>> params = {"head": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}}
>>> sorted(flatten(params))
['head/bias', 'head/kernel']
>>> unflatten(flatten(params))["head"]["bias"].shape
(3,)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jtl.errors import PartitionError, StepError, bullet_list

PyTree = Any
Rules = Sequence[tuple[str, Any]]


def cast_floats(tree: PyTree, dtype: Any) -> PyTree:
  """Floating leaves cast to `dtype` (numpy stays numpy, jax stays jax);
  integer and other leaves unchanged; `dtype` None returns the tree as is.

  >>> import numpy as np
  >>> t = cast_floats({"w": np.ones(2, np.float32), "n": np.arange(2)}, np.float16)
  >>> str(t["w"].dtype), str(t["n"].dtype)
  ('float16', 'int64')
  """
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jax.numpy.issubdtype(jax.numpy.result_type(x),
                                                         jax.numpy.floating) else x, tree)


def check_compute_dtype(compute_dtype: Any) -> Any:
  """`compute_dtype` as a dtype (None stays None), a StepError unless it is a
  floating one: an integer dtype would cast every weight to an integer.

  >>> check_compute_dtype("bfloat16")
  dtype(bfloat16)
  """
  if compute_dtype is None:
    return None
  try:
    dtype = jnp.dtype(compute_dtype)
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    shown = repr(compute_dtype) if dtype is None else dtype.name
    raise StepError(
        f"compute_dtype={shown} is not a floating dtype: expected None (float32 "
        "throughout) or one such as jnp.bfloat16, jnp.float16 or 'bfloat16' (the forward "
        "and backward passes run in it; the params stay float32).")
  return dtype


def key_name(key: Any) -> str:
  """Returns the plain name of one jax key-path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(key_path: Sequence[Any]) -> str:
  """Returns the "/"-joined name of a jax key path."""
  return "/".join(key_name(k) for k in key_path)


def _is_none(x: Any) -> bool:
  return x is None


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """Returns [(path, leaf)] in tree-flatten order (None entries skipped)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_name(kp), leaf) for kp, leaf in flat]


def flatten(tree: PyTree) -> dict[str, Any]:
  """Returns {path: leaf} for every leaf of `tree`."""
  return dict(leaves_with_paths(tree))


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Builds nested dicts from {"a/b/c": leaf}; inverse of `flatten` for dicts."""
  tree: dict[str, Any] = {}
  conflicts = []
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split("/")
    for name in parents:
      child = node.setdefault(name, {})
      if not isinstance(child, dict):
        conflicts.append(path)
        break
      node = child
    else:
      if last in node:
        conflicts.append(path)
      node[last] = leaf
  if conflicts:
    raise PartitionError(
        "Cannot unflatten: these paths clash with a leaf of the same prefix:\n"
        + bullet_list(conflicts))
  return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree,
                  keep_none: bool = False) -> PyTree:
  """Like `jax.tree.map`, but `fn` gets the "/"-joined path first.

  With `keep_none=True`, None entries of `tree` are passed to `fn` as leaves.
  """
  is_leaf = _is_none if keep_none else None
  return jax.tree_util.tree_map_with_path(
      lambda kp, *xs: fn(path_name(kp), *xs), tree, *rest, is_leaf=is_leaf)


def first_match(path: str, patterns: Sequence[str]) -> int | None:
  """Index of the first regex in `patterns` that fully matches `path`."""
  for i, pattern in enumerate(patterns):
    if re.fullmatch(pattern, path):
      return i
  return None


def compile_rules(rules: Rules) -> list[tuple[re.Pattern[str], Any]]:
  """Compiles (regex, value) rules, reporting every invalid regex at once."""
  if isinstance(rules, Mapping):
    raise PartitionError(
        f"Rules are an ordered list of (regex, value) pairs (the first match wins), got a "
        f"{type(rules).__name__}; write list(rules.items()) if its order is the one meant.")
  compiled, bad = [], []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      bad.append(f"rule {i}: {rule!r} is not a (regex, value) pair")
      continue
    pattern, value = rule
    try:
      compiled.append((re.compile(pattern), value))
    except (re.error, TypeError) as e:
      bad.append(f"rule {i}: {pattern!r} is not a valid regex ({e})")
  if bad:
    raise PartitionError("Invalid rules:\n" + bullet_list(bad))
  return compiled


def match_rules(tree: PyTree, rules: Rules, *, what: str = "value") -> PyTree:
  """Maps each leaf to the value of the first rule whose regex fully matches.

  Every leaf must match some rule; otherwise one error lists every unmatched
  path, together with the rules that were tried.
  """
  compiled = compile_rules(rules)
  unmatched: list[str] = []

  def lookup(path: str, leaf: Any) -> Any:
    del leaf
    for pattern, value in compiled:
      if pattern.fullmatch(path):
        return value
    unmatched.append(path)
    return None

  result = map_with_path(lookup, tree)
  if unmatched:
    patterns = [p.pattern for p, _ in compiled]
    raise PartitionError(
        f"{len(unmatched)} parameter path(s) match no rule, so no {what} can "
        "be given to them:\n" + bullet_list(unmatched) +
        f"\nRules tried, in order: {patterns}\n"
        "Add a rule for these paths (a catch-all last rule such as "
        "('.*', 'frozen') is common).")
  return result
