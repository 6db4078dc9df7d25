"""Strategy and method options are checked before a step, naming the option;
a phase's own learning rate (LP-FT's probe) is the one it trains at."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtl
from jtl.errors import ConfigError, OptimizerError
from jtl.recipes import adversarial, strategies
from jtl.recipes.strategies import rules, schedules

GROUPS = [("stem", r"stem/.*"), ("block", r"block/.*"), ("head", r"head/.*")]


@pytest.mark.parametrize("options, match", [
    ({"name": "lp_ft", "probe_learning_rate": -1.0}, "probe_learning_rate=-1.0: expected a "
                                                     "positive number"),
    ({"name": "lp_ft", "probe_learning_rate": 0.0}, "probe_learning_rate=0.0"),
    ({"name": "lp_ft", "probe_steps": 2.5}, r"probe_steps=2\.5: expected an int >= 1"),
    ({"name": "gradual", "steps_per_stage": 2.5}, r"steps_per_stage=2\.5 must be an int"),
])
def test_strategy_options_of_the_wrong_kind_are_config_errors(options, match):
  with pytest.raises(ConfigError, match=match):
    strategies.resolve_options(options)
    schedules.lp_ft_phases(GROUPS, options.get("probe_steps", 1))
    schedules.gradual_unfreezing_phases(GROUPS, options.get("steps_per_stage", 1))


def test_counts_must_be_ints():
  with pytest.raises(ConfigError, match=r"num_blocks='2'"):
    rules.partial_rules(GROUPS, "2")
  with pytest.raises(ConfigError, match=r"steps=0: expected an int >= 1"):
    adversarial.make_attack(eps=0.1, steps=0)  # not a ZeroDivisionError of its default step
  with pytest.raises(ConfigError, match="input_scale=-1.0"):
    adversarial.make_attack(eps=0.1, input_scale=-1.0)
  with pytest.raises(ConfigError, match=r"input_scale=\[1.0, 0.0\].*one per channel"):
    adversarial.make_attack(eps=0.1, input_scale=[1.0, 0.0])
  with pytest.raises(OptimizerError, match="learning_rate=-0.1"):
    jtl.make_optimizer({"w": "all"}, learning_rate=-0.1)


def test_a_phase_trains_at_its_own_learning_rate():
  """LP-FT's probe at its rate (SGD: the head moves rate x gradient), then
  fine-tuning at make_tx's."""
  params = {"body": {"w": jnp.ones((3, 3))}, "head": {"w": jnp.ones((3, 2))}}
  apply = lambda p, x: jnp.tanh(x @ p["body"]["w"]) @ p["head"]["w"]  # noqa: E731
  batch = {"inputs": jnp.linspace(-1, 1, 24).reshape(8, 3), "label": jnp.arange(8) % 2}
  phases = (schedules.Phase(0, (("head/.*", "head"), (".*", None)), "probe", learning_rate=0.5),
            schedules.Phase(1, ((".*", "all"),), "full"))
  make_tx = functools.partial(jtl.make_optimizer, optimizer="sgd", learning_rate=1e-4)
  result = strategies.train_phases(apply, {"params": params}, phases, make_tx,
                                   iter([batch] * 2), num_steps=1)
  grad = jax.grad(lambda h: jtl.losses.cross_entropy_loss(
      apply({**params, "head": {"w": h}}, batch["inputs"]), batch))(params["head"]["w"])
  np.testing.assert_allclose(result.state.params["head"]["w"], params["head"]["w"] - 0.5 * grad,
                             rtol=1e-6)
  with pytest.raises(ConfigError, match="make_tx takes no learning_rate="):
    strategies.train_phases(apply, {"params": params}, phases,
                            lambda labels: optax.sgd(1e-4), iter([batch]), num_steps=1)
