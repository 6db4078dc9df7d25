"""Partition rules built from a model's named layer groups.

A zoo model's `spec.groups` lists (name, regex) layer groups from the stem to
the head. The rule builders here turn a choice of groups into ordered
(regex, label) rules for `jtl.label_params`. Trainable leaves are labelled by
their group's name, so every strategy composes with per-group learning rates
(see `jtl.recipes.strategies.llrd`); frozen leaves get None.

>>> groups = [("stem", r"stem/.*"), ("block_0", r"block_0/.*"),
...           ("block_1", r"block_1/.*"), ("head", r"head/.*")]
>>> partial_rules(groups, num_blocks=1)[2:]
[('block_1/.*', 'block_1'), ('head/.*', 'head')]
>>> import re
>>> pattern, label = bitfit_rules(groups)[0]
>>> bool(re.fullmatch(pattern, "stem/bn/bias")), bool(re.fullmatch(pattern, "stem/conv/kernel"))
(True, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from jtl import tree as jtree
from jtl.errors import ConfigError, bullet_list

Groups = Sequence[tuple[str, str]]
Rules = list[tuple[str, str | None]]

# Leaves BitFit trains outside the head: biases and norm scales/offsets.
BITFIT_LEAVES = r"(?:.*/)?(?:bias|scale)"


def check_groups(groups: Groups) -> list[str]:
  """Returns the group names, or raises ConfigError for a malformed list."""
  problems, names = [], []
  for i, group in enumerate(groups):
    if not (isinstance(group, (tuple, list)) and len(group) == 2
            and all(isinstance(g, str) for g in group)):
      problems.append(f"groups[{i}] = {group!r} is not a (name, regex) pair of strings")
      continue
    names.append(group[0])
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    problems.append(f"group names appear more than once: {dupes}")
  if not groups:
    problems.append("the list of groups is empty")
  if problems:
    raise ConfigError("Layer groups (bottom to top (name, regex) pairs, e.g. "
                      "spec.groups of a zoo model) are invalid:\n" + bullet_list(problems))
  jtree.compile_rules([(regex, name) for name, regex in groups])
  return names


def head_group(groups: Groups, head: str | None = "head") -> str:
  """Name of the head group: `head` if given, else the top (last) group."""
  names = check_groups(groups)
  if head is None:
    return names[-1]
  if head not in names:
    raise ConfigError(f"No layer group named {head!r}; the groups are {names}. "
                      "Pass head= the name of the classifier's group.")
  return head


def group_rules(groups: Groups, trainable: Iterable[str], *,
                leaf_pattern: str | None = None) -> Rules:
  """Rules that train the named groups fully and freeze the rest.

  Args:
    groups: bottom-to-top (name, regex) layer groups.
    trainable: names of the groups to train (labelled by their name).
    leaf_pattern: if given, leaves of the *other* groups whose path fully
      matches this regex are trained too, labelled by their group (BitFit).
  """
  names = check_groups(groups)
  trainable = list(trainable)
  unknown = [t for t in trainable if t not in names]
  if unknown:
    raise ConfigError(f"Unknown layer group(s) {unknown}; the groups are {names}.")
  rules: Rules = []
  for name, regex in groups:
    if name in trainable:
      rules.append((regex, name))
    elif leaf_pattern is not None:
      # The lookahead requires the whole path to lie in the group as well.
      rules.append((f"(?=(?:{regex})$)(?:{leaf_pattern})", name))
      rules.append((regex, None))
    else:
      rules.append((regex, None))
  return rules


def full_rules(groups: Groups) -> Rules:
  """Every group trainable (full fine-tuning, or training from scratch)."""
  return group_rules(groups, [n for n, _ in groups])


def linear_probe_rules(groups: Groups, *, head: str | None = "head") -> Rules:
  """Only the head trains; the backbone is frozen."""
  return group_rules(groups, [head_group(groups, head)])


def top_groups(groups: Groups, num_blocks: int, *, head: str | None = "head") -> list[str]:
  """The head plus the `num_blocks` groups just below it (bottom to top order)."""
  head = head_group(groups, head)
  others = [n for n, _ in groups if n != head]
  if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) \
      or not 0 <= num_blocks <= len(others):
    raise ConfigError(f"num_blocks={num_blocks!r}: expected an int in 0..{len(others)} (the model has "
                      f"{len(others)} groups below the head: {others}).")
  return others[len(others) - num_blocks:] + [head]


def partial_rules(groups: Groups, num_blocks: int, *, head: str | None = "head") -> Rules:
  """The last `num_blocks` groups below the head, and the head, train."""
  return group_rules(groups, top_groups(groups, num_blocks, head=head))


def bitfit_rules(groups: Groups, *, head: str | None = "head",
                 leaf_pattern: str = BITFIT_LEAVES) -> Rules:
  """BitFit: the head, and every bias and norm scale/offset, train."""
  return group_rules(groups, [head_group(groups, head)], leaf_pattern=leaf_pattern)
