"""Rules -> labels; split into trainable/frozen; merge back; a summary table.

Labels are a tree of strings with the structure of the params. The label
"frozen" (or a rule value of None) freezes a leaf. `split` puts None where a
leaf belongs to the other side, so the trainable tree holds only trainable
arrays: gradients, optimizer state and weight decay never see a frozen leaf.

>>> import numpy as np
>>> params = {"backbone": {"kernel": np.ones((3, 4))}, "head": {"kernel": np.ones((4, 2))}}
>>> labels = label_params(params, [("head/.*", "head"), (".*", None)])
>>> labels
{'backbone': {'kernel': 'frozen'}, 'head': {'kernel': 'head'}}
>>> trainable, frozen = split(params, labels)
>>> trainable["backbone"]["kernel"] is None, frozen["head"]["kernel"] is None
(True, True)
>>> merged = merge(trainable, frozen)
>>> float(merged["backbone"]["kernel"].sum())
12.0
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jtl import tree as jtree
from jtl.adapter import is_nnx_module, variables_of
from jtl.errors import PartitionError, bullet_list
from jtl.tree import PyTree

FROZEN = "frozen"


def _is_none(x: Any) -> bool:
  return x is None


def _params_of(params: PyTree) -> PyTree:
  """The params pytree, also when given an NNX module, an `nnx.State` or Flax
  variables (a dict with a "params" key, as `create_train_state` reads it)."""
  if is_nnx_module(params):
    return variables_of(params)["params"]
  params = as_labels(params)
  if isinstance(params, Mapping) and "params" in params:
    return params["params"]
  return params


def _labels_like(params: PyTree, labels: PyTree) -> PyTree:
  """`labels` in the form of `params`: an `nnx.State` for a State (its leaves
  end in "/value"), else the pure tree (`as_labels`)."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(params, nnx.State):
    if isinstance(labels, nnx.State):
      return labels
    like = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(like, labels)
    return like
  return as_labels(labels)


class UnusedRuleWarning(UserWarning):
  """A partition rule that labels no parameter (`label_params`)."""


def as_labels(tree: PyTree) -> PyTree:
  """A label (or params) tree as the pure nested dict jtl uses: an
  `nnx.State`, such as `label_params(nnx.state(model, nnx.Param), rules)`'s
  input or `jax.tree.map(f, nnx.state(model, nnx.Param))`, becomes its
  `to_pure_dict()` (the paths of `label_params(model, rules)`); any other
  tree is returned as it is."""
  nnx = sys.modules.get("flax.nnx")  # an nnx.State exists only once flax.nnx is imported
  if nnx is not None and isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree) if hasattr(nnx, "to_pure_dict") else tree.to_pure_dict()
  return tree


def label_params(params: PyTree, rules: jtree.Rules, *, warn_unused: bool = True) -> PyTree:
  """Labels every leaf by the first (regex, label) rule that fully matches.

  Args:
    params: any pytree of arrays (Flax Linen dicts, a pure dict of NNX
      params), a Flax NNX module (its `nnx.Param` leaves are labelled, as
      `jtl.adapter.variables_of(module)["params"]`), or Flax variables, a
      dict with a "params" key ({"params": ..., "batch_stats": ...}, what
      `create_train_state` takes): its "params" are labelled, as there.
    rules: ordered (regex, label) pairs over "/"-joined paths; a label of
      None or "frozen" freezes. First match wins; every leaf must match.
    warn_unused: warn (`UnusedRuleWarning`) about rules that label no leaf
      (`unused_rules`: a typo such as "haed/.*", or "head" where "head/.*"
      was meant); False for rule sets written for many models.

  Returns:
    A tree of string labels with the structure of the params labelled
    (`variables["params"]` for Flax variables).
  """
  params = _params_of(params)
  compiled = jtree.compile_rules(rules)  # the rules' own form first
  bad = [f"{pattern.pattern!r}: {label!r}" for pattern, label in compiled
         if label is not None and not isinstance(label, str)]
  if bad:
    raise PartitionError(
        "Rule labels must be strings or None (None means frozen); got:\n"
        + bullet_list(bad))
  labels = jtree.match_rules(params, rules, what="label")
  unused = unused_rules(params, rules) if warn_unused else []
  paths = jtree.leaves_with_paths(params)
  if unused and paths:
    warnings.warn(
        f"{len(unused)} rule(s) label no parameter (nothing matches them fully, or only "
        f"leaves an earlier rule took): {unused}. Paths look like "
        f"{paths[0][0]!r}; a rule must match the whole path "
        "(e.g. 'head/.*', not 'head').", UnusedRuleWarning, stacklevel=2)
  return jax.tree.map(lambda label: FROZEN if label is None else label, labels,
                      is_leaf=_is_none)


def unused_rules(params: PyTree, rules: jtree.Rules) -> list[tuple[str, Any]]:
  """The rules that label no leaf: nothing matches them, or only leaves that
  an earlier rule already took (a typo, or a rule after a catch-all).

  >>> params = {"head": {"kernel": 0}, "body": {"kernel": 0}}
  >>> unused_rules(params, [("head/.*", "head"), ("haed/.*", "x"), (".*", "frozen")])
  [('haed/.*', 'x')]
  """
  patterns = [pattern for pattern, _ in rules]
  used = {jtree.first_match(path, patterns) for path, _ in jtree.leaves_with_paths(params)}
  return [tuple(rule) for i, rule in enumerate(rules) if i not in used]


def is_frozen(label: Any) -> bool:
  """Whether a label means frozen."""
  return label is None or label == FROZEN


def _check_same_structure(a: PyTree, b: PyTree, a_name: str, b_name: str) -> None:
  a_paths = {p for p, _ in jtree.leaves_with_paths(
      jax.tree.map(lambda x: 0, a, is_leaf=_is_none))}
  b_paths = {p for p, _ in jtree.leaves_with_paths(
      jax.tree.map(lambda x: 0, b, is_leaf=_is_none))}
  if a_paths != b_paths:
    only_a, only_b = sorted(a_paths - b_paths), sorted(b_paths - a_paths)
    raise PartitionError(
        f"{a_name} and {b_name} have different tree structures.\n"
        f"Paths only in {a_name}:\n{bullet_list(only_a) or '  (none)'}\n"
        f"Paths only in {b_name}:\n{bullet_list(only_b) or '  (none)'}\n"
        f"Build {b_name} from the same tree as {a_name} (e.g. label_params(params, rules)).")
  if jax.tree.structure(a, is_leaf=_is_none) != jax.tree.structure(b, is_leaf=_is_none):
    raise PartitionError(
        f"{a_name} and {b_name} have the same paths but different container "
        f"types:\n  {a_name}: {jax.tree.structure(a, is_leaf=_is_none)}\n"
        f"  {b_name}: {jax.tree.structure(b, is_leaf=_is_none)}")


def split(params: PyTree, labels: PyTree) -> tuple[PyTree, PyTree]:
  """Splits params into (trainable, frozen) trees, None marking the other side.

  Works for any pytree; `merge(*split(params, labels))` rebuilds `params`
  exactly (same structure, same leaf objects).
  """
  labels = _labels_like(params, labels)
  _check_same_structure(params, labels, "params", "labels")
  trainable = jax.tree.map(lambda p, l: None if is_frozen(l) else p, params, labels)
  frozen = jax.tree.map(lambda p, l: p if is_frozen(l) else None, params, labels)
  return trainable, frozen


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `split`: takes each leaf from whichever side is not None."""
  _check_same_structure(trainable, frozen, "trainable", "frozen")
  clashes: list[str] = []

  def pick(path: str, t: Any, f: Any) -> Any:
    if (t is None) == (f is None):
      clashes.append(path)
    return f if t is None else t

  merged = jtree.map_with_path(pick, trainable, frozen, keep_none=True)
  if clashes:
    raise PartitionError(
        "merge needs each leaf on exactly one side (the other None); these "
        "paths are set on both sides or on neither:\n" + bullet_list(clashes)
        + "\nPass the two halves returned by one call to split().")
  return merged


def trainable_labels(labels: PyTree) -> PyTree:
  """The labels of trainable leaves, None where frozen (matches `split`)."""
  labels = as_labels(labels)
  return jax.tree.map(lambda l: None if is_frozen(l) else l, labels, is_leaf=_is_none)


def frozen_module_paths(labels: PyTree, state: PyTree | None = None) -> frozenset[str]:
  """Module paths all of whose params are frozen ("backbone/bn0", ...).

  Used to run frozen BatchNorm layers with their stored statistics. With
  the model's `state` (its variables other than "params", such as
  `TrainState.model_state`: {"batch_stats": ...} for Linen, {"state": ...}
  for NNX; a "params" entry is ignored), also the modules that hold state
  but no params of their own (a BatchNorm without scale and offset) whose
  nearest ancestor with params has all of them frozen: "backbone/bn" of a
  frozen "backbone". One at the top level beside a trained head has the
  root as that ancestor and stays unfrozen (nothing tells which side it is
  on): `strategies.FrozenStatistics` keeps any layer's statistics by path.

  >>> labels = {"backbone": {"conv": {"kernel": "frozen"}}, "head": {"kernel": "head"}}
  >>> state = {"batch_stats": {"backbone": {"bn": {"mean": 0.0, "var": 1.0}}}}
  >>> sorted(frozen_module_paths(labels)), sorted(frozen_module_paths(labels, state))
  (['backbone/conv'], ['backbone/bn', 'backbone/conv'])
  """
  by_module: dict[str, list[bool]] = {}
  under: dict[str, bool] = {}  # every ancestor ("" the root): all params under it frozen
  for path, label in jtree.leaves_with_paths(as_labels(labels)):
    module = path.rsplit("/", 1)[0] if "/" in path else ""
    by_module.setdefault(module, []).append(is_frozen(label))
    parts = path.split("/")
    for i in range(len(parts)):
      prefix = "/".join(parts[:i])
      under[prefix] = under.get(prefix, True) and is_frozen(label)
  frozen = {m for m, flags in by_module.items() if all(flags)}
  for module in _state_modules(state) - set(by_module):
    parts = module.split("/")  # the module's own subtree first, then its ancestors'
    ancestor = next(("/".join(parts[:i]) for i in range(len(parts), -1, -1)
                     if "/".join(parts[:i]) in under), None)
    if ancestor is not None and under[ancestor]:
      frozen.add(module)
  return frozenset(frozen)


def _state_modules(state: PyTree | None) -> set[str]:
  """The module paths of a model state's leaves, in every collection but "params"."""
  state = as_labels(state)
  if not isinstance(state, Mapping):
    return set()
  modules = set()
  for name, collection in state.items():
    if name == "params":
      continue
    for path, _ in jtree.leaves_with_paths(as_labels(collection)):
      modules.add(path.rsplit("/", 1)[0] if "/" in path else "")
  return modules


@dataclasses.dataclass(frozen=True)
class LabelStats:
  label: str
  leaves: int
  params: int
  bytes: int


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-label counts of leaves, parameters and bytes; prints as a table."""
  rows: tuple[LabelStats, ...]

  @property
  def total_params(self) -> int:
    return sum(r.params for r in self.rows)

  @property
  def trainable_params(self) -> int:
    return sum(r.params for r in self.rows if not is_frozen(r.label))

  @property
  def trainable_fraction(self) -> float:
    return self.trainable_params / max(self.total_params, 1)

  def as_dict(self) -> dict[str, Any]:
    return {
        "labels": {r.label: dataclasses.asdict(r) for r in self.rows},
        "total_params": self.total_params,
        "trainable_params": self.trainable_params,
        "trainable_percent": 100.0 * self.trainable_fraction,
    }

  def __str__(self) -> str:
    header = f"{'label':<20} {'leaves':>7} {'params':>13} {'bytes':>11}"
    lines = [header, "-" * len(header)]
    for r in self.rows:
      lines.append(f"{r.label:<20} {r.leaves:>7} {r.params:>13,} {_human(r.bytes):>11}")
    lines.append("-" * len(header))
    total_bytes = sum(r.bytes for r in self.rows)
    lines.append(f"{'total':<20} {sum(r.leaves for r in self.rows):>7} "
                 f"{self.total_params:>13,} {_human(total_bytes):>11}")
    lines.append(f"trainable: {self.trainable_params:,} params "
                 f"({100.0 * self.trainable_fraction:.2f}%)")
    return "\n".join(lines)


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def summarize(params: PyTree, labels: PyTree) -> Summary:
  """Counts leaves, parameters and bytes per label (frozen listed last).

  `params` may be a Flax NNX module or Flax variables, as for `label_params`."""
  params, labels = _params_of(params), as_labels(labels)
  _check_same_structure(params, labels, "params", "labels")
  stats: dict[str, list[int]] = {}
  for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
    s = stats.setdefault(l, [0, 0, 0])
    s[0] += 1
    s[1] += int(np.prod(np.shape(p)))
    s[2] += int(np.prod(np.shape(p))) * np.dtype(p.dtype).itemsize
  order = sorted(stats, key=lambda l: (is_frozen(l), l))
  return Summary(tuple(LabelStats(l, *stats[l]) for l in order))
