"""BatchNorm modes of the strategies: frozen whole, statistics only, trained."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from strategies_helpers import SPEC, batch, changed, tiny

import jtl
from jtl import models
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


class OwnNnx(nnx.Module):
  """An own NNX model: statistics under "state", a BatchNorm in a list too."""

  def __init__(self, rngs):
    self.stem = nnx.Linear(4, 8, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(8, rngs=rngs)
    self.blocks = nnx.List([nnx.BatchNorm(8, use_scale=False, use_bias=False, rngs=rngs)])
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.blocks[0](self.stem_bn(self.stem(x))))


def test_batchnorm_layers_of_nnx_models():
  model = OwnNnx(nnx.Rngs(0))
  variables = jtl.adapter.variables_of(model)
  layers = ("blocks/0", "stem_bn")
  assert batchnorm.batchnorm_paths(variables) == layers  # from "state" alone
  assert batchnorm.batchnorm_paths(variables, model) == layers  # asked of the module
  assert batchnorm.batchnorm_paths(variables, jtl.NnxModel(model)) == layers
  assert batchnorm.batchnorm_rule(variables, model) == (r"(blocks/0|stem_bn)/.*", None)
  # LP-FT's fine-tuning phase keeps BatchNorm's scale and offset frozen.
  spec = SimpleNamespace(groups=[("stem", r"(stem|stem_bn|blocks)/.*"), ("head", r"head/.*")])
  finetune = strategies.build("lp_ft", model, variables, spec).phases[1]
  labels = jtl.label_params(variables, list(finetune.rules), warn_unused=False)
  assert labels["stem_bn"] == {"scale": "frozen", "bias": "frozen"}
  assert labels["stem"]["kernel"] == "stem"
  # The zoo's NNX form (a Linen module in nnx.bridge.ToNNX) has its Linen form's layers.
  module, linen_variables = tiny()
  bridged = models.creation.to_nnx(module, linen_variables)
  bridged_variables = jtl.adapter.variables_of(bridged)
  assert (batchnorm.batchnorm_paths(bridged_variables, bridged)
          == batchnorm.batchnorm_paths(bridged_variables)
          == batchnorm.batchnorm_paths(linen_variables) == ("stem/bn",))


def test_frozen_statistics_model_keeps_an_nnx_models_statistics():
  model = OwnNnx(nnx.Rngs(0))
  variables = jtl.adapter.variables_of(model)
  wrapped = batchnorm.FrozenStatisticsModel(model, batchnorm.batchnorm_paths(variables, model))
  x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32) + 3.0
  state = {"state": variables["state"]}
  _, kept = wrapped.apply(variables["params"], state, x, train=True, rng=None)
  _, moved = wrapped.model.apply(variables["params"], state, x, train=True, rng=None)
  assert not changed(variables["state"], kept["state"])  # bit-identical
  assert changed(variables["state"], moved["state"]) == {
      "stem_bn/mean", "stem_bn/var", "blocks/0/mean", "blocks/0/var"}


def test_bitfit_on_an_own_nnx_model_keeps_its_statistics():
  model = OwnNnx(nnx.Rngs(0))
  variables = jtl.adapter.variables_of(model)
  spec = SimpleNamespace(groups=[("stem", r"(stem|stem_bn|blocks)/.*"), ("head", r"head/.*")])
  s = strategies.build("bitfit", model, variables, spec, verbose=False)  # "statistics" mode
  tx = jtl.make_optimizer(s.labels, learning_rate=0.1)
  state = jtl.create_train_state(variables, s.labels, tx)
  x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32) + 3.0
  new, _ = jtl.make_train_step(s.module, tx, labels=s.labels)(
      state, {"inputs": x, "label": np.arange(8) % 3})
  assert not changed(state.model_state["state"], new.model_state["state"])
  assert changed(state.trainable, new.trainable) >= {"stem_bn/scale", "stem_bn/bias"}
