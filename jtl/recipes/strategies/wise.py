"""WiSE-FT (Wortsman et al. 2022): interpolate the probe and the fine-tuned weights.

After LP-FT, `theta(alpha) = (1 - alpha) * theta_probe + alpha * theta_ft`
often beats both ends, in distribution and under a shift. `wise_ft` builds
one point of the line; `choose_alpha` evaluates a grid of alphas with the
caller's evaluation (on the validation split) and picks the best.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jtl import partition
from jtl.errors import ConfigError
from jtl.tree import PyTree

WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def wise_ft(probe_params: PyTree, ft_params: PyTree, alpha: float, *,
            labels: PyTree | None = None) -> PyTree:
  """`(1 - alpha) * probe_params + alpha * ft_params`, leaf by leaf.

  alpha 0 gives `probe_params` and 1 `ft_params`, exactly. Leaves frozen by
  `labels` (when given; the label tree of `ft_params`), the same object in
  both trees, or not floating point (step counters) are `ft_params`' own,
  bit for bit. Any pytree (params, or whole variables with BatchNorm
  statistics) of one structure.

  >>> wise_ft({"w": np.array([0., 4.])}, {"w": np.array([2., 0.])}, 0.25)["w"].tolist()
  [0.5, 3.0]
  """
  if not 0.0 <= alpha <= 1.0:
    raise ConfigError(f"WiSE-FT alpha must be in [0, 1] (0: the probe, 1: the fine-tuned "
                      f"model), got {alpha!r}.")
  frozen = (jax.tree.map(partition.is_frozen, labels) if labels is not None
            else jax.tree.map(lambda _: False, ft_params))

  def mix(p: Any, f: Any, is_frozen: bool) -> Any:
    dtype = np.dtype(f.dtype if hasattr(f, "dtype") else np.result_type(f))
    if is_frozen or not np.issubdtype(dtype, np.floating) or p is f:
      return f
    if alpha in (0.0, 1.0):
      return p if alpha == 0.0 else f
    return ((1.0 - alpha) * p + alpha * f).astype(dtype)
  return jax.tree.map(mix, probe_params, ft_params, frozen)


def choose_alpha(evaluate: Callable[[PyTree], dict[str, float]], probe: PyTree, ft: PyTree,
                 alphas: Sequence[float] = WISE_ALPHAS, *, metric: str = "accuracy",
                 labels: PyTree | None = None) -> tuple[float, list[dict[str, float]]]:
  """The alpha of `alphas` whose `wise_ft(probe, ft, alpha)` scores best by
  `evaluate(params)[metric]` (higher wins; a tie goes to the larger alpha,
  the fine-tuned end), and one row per alpha: {"alpha", **metrics}."""
  if not alphas:
    raise ConfigError("WiSE-FT needs at least one alpha to evaluate.")
  rows = [{"alpha": float(a), **evaluate(wise_ft(probe, ft, float(a), labels=labels))}
          for a in alphas]
  best = max(rows, key=lambda r: (r[metric], r["alpha"]))
  return best["alpha"], rows
