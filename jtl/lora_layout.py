"""The LoRA leaf layout and the merge (core: checkpoints and exports need it).

An adapted layer holds two extra leaves next to its "kernel": "lora_a"
[fan_in, r] and "lora_b" [r, out], where fan_in * out is the kernel's size
(fan_in the product of the kernel's leading axes, out of the others), and
computes with kernel + alpha / r * (lora_a @ lora_b) reshaped to the kernel.
`jtl.recipes.strategies.lora` trains such adapters (`LoraModel`, `LoraWeights`);
`jtl.export.peft` / `hf_export` write them out. The functions here work
on numpy and jax arrays alike (the training step merges under jit).

>>> import numpy as np
>>> params = {"d": {"kernel": np.zeros((3, 2)), "lora_a": np.ones((3, 1)),
...                 "lora_b": np.ones((1, 2))}}
>>> merge_lora(params, alpha=2.0)["d"]["kernel"].tolist()
[[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from jtl import tree as jtree
from jtl.tree import PyTree

LORA_A, LORA_B = "lora_a", "lora_b"
LORA_LEAF = r"(?:.*/)?lora_[ab]"


def delta(a: Any, b: Any, kernel_shape: Sequence[int], alpha: float) -> Any:
  """alpha / r * (a @ b) in the kernel's shape (r = a's last axis)."""
  return ((a @ b) * (alpha / a.shape[-1])).reshape(kernel_shape)


def adapted_modules(flat: Mapping[str, Any]) -> list[str]:
  """Module paths (sorted) that hold a "lora_a" leaf in the flat params."""
  return sorted(p[: -len(LORA_A) - 1] for p in flat if p.endswith("/" + LORA_A))


def merge_lora(params: PyTree, alpha: float) -> dict[str, Any]:
  """Folds every adapter into its kernel and drops the adapter leaves.

  The result is a plain params tree for the unwrapped module.
  """
  flat = dict(jtree.flatten(params))
  for m in adapted_modules(flat):
    a, b = flat.pop(f"{m}/{LORA_A}"), flat.pop(f"{m}/{LORA_B}")
    kernel = flat[f"{m}/kernel"]
    flat[f"{m}/kernel"] = (kernel + delta(a, b, kernel.shape, alpha)).astype(kernel.dtype)
  return jtree.unflatten(flat)


def adapter_params(params: PyTree, *, include: str | None = None) -> dict[str, Any]:
  """Flat {path: array} of the adapters, plus leaves matching `include`."""
  pattern = re.compile(include) if include else None
  return {p: v for p, v in jtree.flatten(params).items()
          if re.fullmatch(LORA_LEAF, p) or (pattern and pattern.fullmatch(p))}
