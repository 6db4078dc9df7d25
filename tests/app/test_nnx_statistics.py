"""api="nnx" with freeze_batchnorm="statistics" (bitfit, llrd; issue 27): the
app's NNX form (`experiment.as_api`) keeps BatchNorm statistics as the Linen
form (`strategies.FrozenStatistics`) does, and trains to the same params."""

import jax
import ml_collections
import numpy as np
import pytest

import jtl
from jtl import models
from jtl.app import experiment
from jtl.errors import ConfigError
from jtl.models import resnet
from jtl.recipes import strategies


def _train(model, variables, strategy, batches):
  tx = strategy.make_optimizer(learning_rate=0.05, optimizer="sgd")
  state = jtl.create_train_state(variables, strategy.labels, tx)
  step = jax.jit(jtl.make_train_step(model, tx, labels=strategy.labels))
  for b in batches:
    state, _ = step(state, b)
  return jax.device_get(state)


def _random_variables(module, x, rng):
  """Variables of `module`'s shapes, drawn with numpy: no init to compile
  (most of this test's time), and statistics far from init's 0 and 1."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  draw = lambda s: (rng.uniform(0.5, 2.0, s.shape) if s.ndim == 1 else
                    rng.normal(0, 0.2, s.shape)).astype(np.float32)
  return jax.tree.map(draw, shapes)


def test_nnx_bitfit_keeps_batchnorm_statistics_and_trains_as_linen():
  module = resnet.ResNet(num_classes=3, stage_sizes=(1,))  # stem + one BasicBlock
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(4, 16, 16, 3)).astype(np.float32)
  variables = _random_variables(module, x, rng)
  strategy = strategies.build("bitfit", module, variables, models.get_spec("resnet18"))
  assert isinstance(strategy.module, strategies.FrozenStatistics)
  config = ml_collections.ConfigDict({"api": "nnx", "seed": 0})
  model, nnx_variables = experiment.as_api(config, strategy.module, strategy.variables)
  assert isinstance(model, strategies.FrozenStatisticsModel)
  assert model.paths == strategy.module.paths and len(model.paths) == 3

  batches = [{"inputs": rng.uniform(size=(4, 16, 16, 3)).astype(np.float32),
              "label": rng.integers(0, 3, 4).astype(np.int32)} for _ in range(2)]
  linen = _train(strategy.module, strategy.variables, strategy, batches)
  nnx = _train(model, nnx_variables, strategy, batches)
  before = jtl.tree.flatten(variables["batch_stats"])
  for state, stats in ((linen, "batch_stats"), (nnx, "state")):
    after = jtl.tree.flatten(state.model_state[stats])
    assert after.keys() == before.keys()
    for path, value in before.items():  # bit-identical, not merely close
      np.testing.assert_array_equal(after[path], value, err_msg=f"{stats}/{path}")
  moved = 0
  for path, value in jtl.tree.flatten(linen.params).items():
    np.testing.assert_allclose(jtl.tree.flatten(nnx.params)[path], value, atol=1e-6,
                               err_msg=path)
    moved += not np.array_equal(value, jtl.tree.flatten(variables["params"])[path])
  assert moved > 3  # BatchNorm offsets, scales and the head trained

  # The NNX module unwrapped, in training, would move them (batch statistics).
  _, moved_state = jax.jit(lambda v: model.model.apply(
      v["params"], {"state": v["state"]}, x, train=True, rng=None))(nnx_variables)
  assert not np.array_equal(moved_state["state"]["stem"]["bn"]["mean"],
                            variables["batch_stats"]["stem"]["bn"]["mean"])


def test_frozen_statistics_model_refuses_what_it_cannot_freeze():
  with pytest.raises(ConfigError, match="apply function has no BatchNorm"):
    strategies.FrozenStatisticsModel(lambda params, x: x, ["bn"])
  module = resnet.ResNet(num_classes=3, stage_sizes=(1,))
  config = ml_collections.ConfigDict({"api": "nnx", "seed": 0})
  variables = _random_variables(module, np.zeros((1, 8, 8, 3), np.float32),
                               np.random.default_rng(0))
  model, _ = experiment.as_api(config, module, variables)
  with pytest.raises(ConfigError, match="use FrozenStatisticsModel"):
    strategies.FrozenStatistics(model, ["stem/bn"])


def test_precise_batchnorm_recomputes_with_api_nnx_as_with_linen():
  """The NNX form keeps its statistics under "state": precise BatchNorm was
  silently off for it (it looked for "batch_stats" only)."""
  from jtl.app import keys  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  module = resnet.ResNet(num_classes=3, stage_sizes=(1,))
  rng = np.random.default_rng(1)
  variables = _random_variables(module, np.zeros((1, 16, 16, 3), np.float32), rng)
  config = default.get_config()
  config.model, config.api, config.strategy = "resnet18", "nnx", keys.strategy_options("full")
  model, nnx_variables = experiment.as_api(config, module, variables)
  images = experiment.precise_batchnorm_images(config, variables)
  assert images > 0 and experiment.precise_batchnorm_images(config, nnx_variables) == images
  batches = [{"inputs": rng.uniform(size=(4, 16, 16, 3)).astype(np.float32)} for _ in range(2)]
  linen = jtl.recompute_batchnorm(module, variables, batches)["batch_stats"]
  nnx = jtl.recompute_batchnorm(model, nnx_variables, batches)["state"]
  for path, value in jtl.tree.flatten(linen).items():
    np.testing.assert_allclose(jtl.tree.flatten(nnx)[path], value, rtol=1e-5, atol=1e-6,
                               err_msg=path)
