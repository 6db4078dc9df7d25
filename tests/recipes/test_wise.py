"""WiSE-FT: the interpolation itself and the choice of alpha."""

import jax
import numpy as np
import pytest
from models_for_tests import MLP, batch, init

import jtl
from jtl.errors import ConfigError
from jtl.recipes.strategies import choose_alpha, wise_ft


def endpoints():
  variables = init(MLP(), batch(4, classes=4)["inputs"])
  probe = variables["params"]
  ft = jax.tree.map(lambda x: x + 0.5 + np.arange(x.size).reshape(x.shape) / x.size, probe)
  labels = jtl.label_params(probe, [("head/.*", "head"), (".*", "frozen")])
  return probe, ft, labels


def test_alpha_0_and_1_are_the_endpoints_exactly():
  probe, ft, _ = endpoints()
  for alpha, end in ((0.0, probe), (1.0, ft)):
    for a, b in zip(jax.tree.leaves(wise_ft(probe, ft, alpha)), jax.tree.leaves(end), strict=True):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
    wise_ft(probe, ft, 1.5)


def test_the_interpolation_is_linear_in_every_leaf():
  probe, ft, _ = endpoints()
  for alpha in (0.3, 0.5, 0.8):
    mixed = wise_ft(probe, ft, alpha)
    for m, p, f in zip(*(jax.tree.leaves(t) for t in (mixed, probe, ft)), strict=True):
      np.testing.assert_allclose(m, (1 - alpha) * np.asarray(p) + alpha * np.asarray(f),
                                 rtol=1e-6)
      assert m.dtype == f.dtype
  # theta(a) - theta(0) = a (theta(1) - theta(0)), on the line between the two.
  a, b = wise_ft(probe, ft, 0.25), wise_ft(probe, ft, 0.75)
  for x, y, p, f in zip(*(jax.tree.leaves(t) for t in (a, b, probe, ft)), strict=True):
    np.testing.assert_allclose(np.asarray(y) - x, 0.5 * (np.asarray(f) - p), rtol=1e-5, atol=1e-6)


def test_frozen_leaves_are_the_fine_tuned_ones_unchanged():
  probe, ft, labels = endpoints()
  mixed = wise_ft(probe, ft, 0.4, labels=labels)
  np.testing.assert_array_equal(mixed["body"]["kernel"], ft["body"]["kernel"])
  np.testing.assert_array_equal(mixed["body"]["bias"], ft["body"]["bias"])
  np.testing.assert_allclose(mixed["head"]["kernel"],
                             0.6 * probe["head"]["kernel"] + 0.4 * ft["head"]["kernel"], rtol=1e-6)


def test_choose_alpha_picks_the_best_on_the_given_evaluation():
  probe, ft = {"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}
  # A score that peaks at w = 0.6: the grid point nearest is alpha 0.5.
  score = lambda params: {"accuracy": -float(np.sum((params["w"] - 0.6) ** 2))}
  alpha, rows = choose_alpha(score, probe, ft, (0.0, 0.25, 0.5, 0.75, 1.0))
  assert alpha == 0.5
  assert [r["alpha"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert rows[2]["accuracy"] == pytest.approx(-3 * 0.01)
