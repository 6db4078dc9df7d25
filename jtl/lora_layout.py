"""The LoRA leaf layout and the merge (core: checkpoints and exports need it).

An adapted layer holds two extra leaves next to its "kernel": "lora_a"
[fan_in, r] and "lora_b" [r, out], where fan_in * out is the kernel's size
(fan_in the product of the kernel's leading axes, out of the others), and
computes with kernel + alpha / r * (lora_a @ lora_b) reshaped to the kernel.
DoRA (Liu et al. 2024) adds a third leaf, "lora_magnitude" [out]: the layer
then computes with m * V / ||V||_c, V = kernel + alpha / r * (lora_a @ lora_b),
||V||_c the norm of each output column of V as a [fan_in, out] matrix (the
direction of V, rescaled to the learned magnitude m; m starts at ||kernel||_c).
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

LORA_A, LORA_B, LORA_M = "lora_a", "lora_b", "lora_magnitude"
LORA_LEAF = r"(?:.*/)?lora_(?:[ab]|magnitude)"


def delta(a: Any, b: Any, kernel_shape: Sequence[int], alpha: float) -> Any:
  """alpha / r * (a @ b) in the kernel's shape (r = a's last axis)."""
  return ((a @ b) * (alpha / a.shape[-1])).reshape(kernel_shape)


def column_norms(matrix: Any, fan_in: int) -> Any:
  """Norms of the output columns of `matrix` seen as [fan_in, out] (DoRA's ||.||_c)."""
  flat = matrix.reshape(fan_in, -1)
  return (flat * flat).sum(axis=0) ** 0.5


def dora_kernel(kernel: Any, a: Any, b: Any, magnitude: Any, alpha: float) -> Any:
  """DoRA's kernel m * V / ||V||_c with V = kernel + alpha / r * (a @ b)."""
  v = kernel + delta(a, b, kernel.shape, alpha)
  scale = magnitude / column_norms(v, a.shape[0])
  return (v.reshape(a.shape[0], -1) * scale[None, :]).reshape(kernel.shape)


def adapted_modules(flat: Mapping[str, Any]) -> list[str]:
  """Module paths (sorted) that hold a "lora_a" leaf in the flat params."""
  return sorted(p[: -len(LORA_A) - 1] for p in flat if p.endswith("/" + LORA_A))


def merge_lora(params: PyTree, alpha: float) -> dict[str, Any]:
  """Folds every adapter into its kernel and drops the adapter leaves (a
  DoRA layer's kernel becomes `dora_kernel`: the magnitude is folded in too).

  The result is a plain params tree for the unwrapped module.
  """
  flat = dict(jtree.flatten(params))
  for m in adapted_modules(flat):
    a, b = flat.pop(f"{m}/{LORA_A}"), flat.pop(f"{m}/{LORA_B}")
    magnitude = flat.pop(f"{m}/{LORA_M}", None)
    kernel = flat[f"{m}/kernel"]
    if magnitude is None:
      merged = kernel + delta(a, b, kernel.shape, alpha)
    else:
      merged = dora_kernel(kernel, a, b, magnitude, alpha)
    flat[f"{m}/kernel"] = merged.astype(kernel.dtype)
  return jtree.unflatten(flat)


def adapter_params(params: PyTree, *, include: str | None = None) -> dict[str, Any]:
  """Flat {path: array} of the adapters, plus leaves matching `include`."""
  pattern = re.compile(include) if include else None
  return {p: v for p, v in jtree.flatten(params).items()
          if re.fullmatch(LORA_LEAF, p) or (pattern and pattern.fullmatch(p))}
