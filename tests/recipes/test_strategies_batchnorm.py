"""BatchNorm modes of the strategies: frozen whole, statistics only, trained."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from strategies_helpers import SPEC, batch, changed, tiny

import jtl
from jtl.errors import ConfigError
from jtl.recipes import strategies
from jtl.recipes.strategies import batchnorm

BN_PARAMS = {"stem/bn/scale", "stem/bn/bias"}


def one_step(strategy):
  tx = strategy.make_optimizer(learning_rate=0.1, optimizer="sgd")
  state = jtl.create_train_state(strategy.variables, strategy.labels, tx)
  step = jax.jit(jtl.make_train_step(strategy.module, tx, labels=strategy.labels))
  return step(state, batch(seed=0))[0]


@pytest.mark.parametrize("name", ["full", "bitfit"])
@pytest.mark.parametrize("mode, bn_params_train, stats_move", [
    (True, False, False), ("statistics", True, False), (False, True, True)])
def test_batchnorm_modes(name, mode, bn_params_train, stats_move):
  module, variables = tiny()
  strategy = strategies.build({"name": name, "freeze_batchnorm": mode}, module, variables, SPEC)
  state = one_step(strategy)
  moved = changed(variables["params"], state.params)
  assert (BN_PARAMS <= moved) == bn_params_train and (BN_PARAMS & moved == set()) != bn_params_train
  assert "head/kernel" in moved
  assert bool(changed(variables["batch_stats"], state.model_state["batch_stats"])) == stats_move


def test_frozen_statistics_trains_on_the_evaluated_network():
  """With stored statistics the training forward pass is the evaluation one
  (the tiny model has no dropout), which batch statistics are not."""
  module, variables = tiny()
  x = batch(seed=3)["inputs"]
  evaluated = module.apply(variables, x, train=False)
  wrapped = batchnorm.FrozenStatistics(module, batchnorm.batchnorm_paths(variables))
  trained, _ = wrapped.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(trained, evaluated, rtol=1e-6, atol=1e-6)
  batch_mode, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
  assert np.abs(np.asarray(batch_mode) - np.asarray(evaluated)).max() > 1e-3
  assert wrapped.features is not None  # other attributes pass through to the module


def test_measured_defaults_and_bad_mode():
  module, variables = tiny()
  expected = {"scratch": False, "lora": False, "lp_ft": True, "partial": False,
              "full": False, "llrd": "statistics", "bitfit": "statistics"}
  assert strategies.FREEZE_BATCHNORM["gradual"] is False
  assert {k: strategies.FREEZE_BATCHNORM.get(k, False) for k in expected} == expected
  for name, mode in expected.items():
    config = {"name": name, **({"num_blocks": 2} if name == "partial" else {})}  # 3 groups here
    assert strategies.build(config, module, variables, SPEC).options["freeze_batchnorm"] == mode
  with pytest.raises(ConfigError, match=r"freeze_batchnorm='stats'.*'statistics'"):
    strategies.build({"name": "full", "freeze_batchnorm": "stats"}, module, variables, SPEC)


def test_precise_batchnorm_is_on_where_statistics_train():
  resolve = lambda **o: strategies.resolve_options({"name": "llrd", **o})["precise_batchnorm"]
  assert strategies.PRECISE_BATCHNORM_IMAGES == 2048
  assert resolve(freeze_batchnorm=False) == 2048
  assert resolve(freeze_batchnorm=False, precise_batchnorm=0) == 0
  assert resolve(freeze_batchnorm=False, precise_batchnorm=500) == 500
  assert resolve() == 0 and resolve(freeze_batchnorm=True) == 0  # statistics stored
  for name in ("scratch", "full", "partial"):
    assert strategies.resolve_options(name)["precise_batchnorm"] == 2048
  assert strategies.resolve_options("linear_probe")["precise_batchnorm"] == 0  # backbone frozen
  with pytest.raises(ConfigError, match=r"precise_batchnorm=500 .*freeze_batchnorm='statistics'"):
    resolve(precise_batchnorm=500)
  with pytest.raises(ConfigError, match=r"precise_batchnorm=-1: expected a number"):
    resolve(freeze_batchnorm=False, precise_batchnorm=-1)
