r"""Torch state dicts -> jtl variables: one tensor's layout, and rules that name
where each torch module goes (the zoo's converters are lists of such rules).

>>> convert_with_rules({"features.0.weight": np.zeros((8, 3, 3, 3))},
...                    [(r"features\.0", "stem")])["params/stem/kernel"].shape
(3, 3, 3, 8)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

_BN_LEAVES = {"weight": "params/{}/scale", "bias": "params/{}/bias",
              "running_mean": "batch_stats/{}/mean",
              "running_var": "batch_stats/{}/var"}


def torch_to_flax(path: str, leaf: str, value: np.ndarray
                  ) -> tuple[str, np.ndarray] | None:
  """One torch tensor -> (flat variable path, array), given its module's jtl path.

  Paths ending in "bn" (or "bn1", "bn2", ...) are BatchNorms (weight/bias/running_mean/running_var ->
  params scale/bias, batch_stats mean/var). Conv weights OIHW -> HWIO, which
  also maps a depthwise (C, 1, kh, kw) weight to `DepthwiseConv`'s
  (kh, kw, 1, C); Linear (out, in) -> (in, out). None for an unknown leaf.

  >>> torch_to_flax("blocks_2/dw", "weight", np.zeros((96, 1, 3, 3)))[1].shape
  (3, 3, 1, 96)
  """
  kind = path.rsplit("/", 1)[-1]
  if re.fullmatch(r"bn\d*|.*_bn", kind):
    return (_BN_LEAVES[leaf].format(path), value) if leaf in _BN_LEAVES else None
  if leaf == "weight" and value.ndim == 4:
    return f"params/{path}/kernel", np.transpose(value, (2, 3, 1, 0))
  if leaf == "weight" and value.ndim == 2:
    return f"params/{path}/kernel", value.T
  if leaf == "bias" and value.ndim == 1:
    return f"params/{path}/bias", value
  return None


def convert_with_rules(state_dict: Mapping[str, np.ndarray],
                       rules: Sequence[tuple[str, str | Callable[[re.Match], str]]]
                       ) -> dict[str, np.ndarray]:
  """Converts a torch state dict with (module regex, jtl path) rules.

  The path is a `re.Match.expand` template or a function of the match; the
  first fully matching rule wins and `torch_to_flax` does the rest.
  num_batches_tracked is dropped; keys no rule converts pass through unchanged
  so that a strict load reports them as unexpected.
  """
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    value = np.asarray(value)
    converted = None
    for pattern, target in rules:
      m = re.fullmatch(pattern, module)
      if m is not None:
        path = target(m) if callable(target) else m.expand(target)
        converted = torch_to_flax(path, leaf, value)
        break
    if converted is None:
      out[key] = value
    else:
      out[converted[0]] = converted[1]
  return out
