"""Layer-wise learning-rate decay (LLRD), as in BEiT/ELECTRA fine-tuning.

The learning rate of a layer group scales as `decay ** depth`, where depth
counts groups down from the top (the head has depth 0, the group below it 1,
...), the rule of timm's `param_groups_layer_decay`. A group whose blocks are
stacked along a leading layer axis of one parameter (a scanned model) spans as
many depths as it has layers, and its leaves get a per-slice scale of shape
(L, 1, ..., 1), applied with `jtl.optim.scale_by_tree`.

>>> groups = [("embed", "embed/.*"), ("blocks", "blocks/.*"), ("head", "head/.*")]
>>> layer_depths(groups, stacked={"blocks": 3})
{'embed': 4, 'blocks': [3, 2, 1], 'head': 0}
>>> import numpy as np
>>> params = {"embed": {"w": np.ones(2)}, "blocks": {"w": np.ones((3, 2, 2))},
...           "head": {"w": np.ones(2)}}
>>> s = layer_decay_scales(params, groups, 0.5, stacked={"blocks": 3})
>>> s["embed"]["w"], s["blocks"]["w"].ravel().tolist(), s["head"]["w"]
(0.0625, [0.125, 0.25, 0.5], 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optax

from jtl import optim
from jtl import tree as jtree
from jtl.errors import ConfigError, PartitionError, bullet_list
from jtl.recipes.strategies.rules import Groups, check_groups
from jtl.tree import PyTree


def layer_depths(groups: Groups, *, stacked: Mapping[str, int] | None = None,
                 head_level: Sequence[str] = ()) -> dict[str, int | list[int]]:
  """Depth from the top of every group; a stacked group gets one per layer;
  the groups named in `head_level` (a final norm) share the top group's
  depth 0 (timm's, BEiT's and MAE's rule: the encoder's last norm learns at
  the head's rate).

  >>> layer_depths([("a", "a/.*"), ("norm", "norm/.*"), ("head", "head/.*")],
  ...              head_level=["norm"])
  {'a': 1, 'norm': 0, 'head': 0}
  """
  names = check_groups(groups)
  stacked = dict(stacked or {})
  unknown = sorted((set(stacked) | set(head_level)) - set(names))
  bad = [f"{k}: {v!r}" for k, v in stacked.items() if not (isinstance(v, int) and v >= 1)]
  if unknown or bad:
    raise ConfigError(
        "stacked must map group names to their number of stacked layers (int >= 1), "
        "head_level must name groups."
        + (f"\nUnknown groups: {unknown}; the groups are {names}." if unknown else "")
        + (f"\nBad counts:\n{bullet_list(bad)}" if bad else ""))
  counted = [n for n in names if n not in head_level]
  sizes = [stacked.get(n, 0) for n in counted]
  total = sum(max(s, 1) for s in sizes)
  depths: dict[str, int | list[int]] = {n: 0 for n in names if n in head_level}
  layer = 0
  for name, size in zip(counted, sizes):
    if size:
      depths[name] = [total - 1 - (layer + i) for i in range(size)]
      layer += size
    else:
      depths[name] = total - 1 - layer
      layer += 1
  return {n: depths[n] for n in names}


def layer_decay_multipliers(groups: Groups, decay: float, *,
                            head_level: Sequence[str] = ()) -> dict[str, float]:
  """{group: decay ** depth} for groups without stacked layers (lr_multipliers);
  `head_level`: see `layer_depths`.

  >>> layer_decay_multipliers([("a", "a/.*"), ("b", "b/.*"), ("head", "head/.*")], 0.5)
  {'a': 0.25, 'b': 0.5, 'head': 1.0}
  """
  _check_decay(decay)
  return {n: float(decay) ** d for n, d in layer_depths(groups, head_level=head_level).items()}


def _check_decay(decay: float) -> None:
  if not (isinstance(decay, (int, float)) and 0.0 < decay <= 1.0):
    raise ConfigError(f"layer_decay={decay!r}: expected a number in (0, 1], e.g. 0.75.")


def layer_decay_scales(params: PyTree, groups: Groups, decay: float, *,
                       stacked: Mapping[str, int] | None = None,
                       head_level: Sequence[str] = ()) -> PyTree:
  """A tree of update scales, one per leaf of `params` (None entries kept).

  Leaves are assigned to groups by the groups' regexes (first match), so the
  scales hold for any labelling (LoRA adapters inside block 3 get block 3's
  scale). A leaf of a stacked group must have that many layers on axis 0 and
  gets an array scale of shape (L, 1, ..., 1). `head_level`: see
  `layer_depths`.
  """
  _check_decay(decay)
  depths = layer_depths(groups, stacked=stacked, head_level=head_level)
  group_of = jtree.match_rules(params, [(regex, name) for name, regex in groups],
                               what="layer group")
  problems: list[str] = []

  def scale(path: str, leaf: Any, name: str) -> Any:
    depth = depths[name]
    if isinstance(depth, int):
      return float(decay) ** depth
    shape = np.shape(leaf)
    if not shape or shape[0] != len(depth):
      problems.append(f"{path}: shape {shape}, but group {name!r} stacks {len(depth)} layers "
                      "on axis 0")
      return None
    per_layer = np.asarray([float(decay) ** d for d in depth], np.float32)
    return per_layer.reshape((len(depth),) + (1,) * (len(shape) - 1))

  scales = jtree.map_with_path(scale, params, group_of)
  if problems:
    raise PartitionError("Stacked layer groups do not fit these leaves:\n"
                         + bullet_list(problems))
  return scales


def layer_decay(trainable: PyTree, groups: Groups, decay: float, *,
                stacked: Mapping[str, int] | None = None,
                head_level: Sequence[str] = ()) -> optax.GradientTransformation:
  """`scale_by_tree` of `layer_decay_scales` over the trainable partition.

  Chain it after the optimizer: `optax.chain(tx, layer_decay(...))`, so the
  whole update (weight decay included) scales, as a per-group learning rate.
  """
  return optim.scale_by_tree(layer_decay_scales(trainable, groups, decay, stacked=stacked,
                                                head_level=head_level))
