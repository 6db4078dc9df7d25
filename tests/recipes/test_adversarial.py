"""FGSM / PGD: inside the eps-ball and the bounds, loss goes up; adversarial
training step and robust evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beyond_models import TinyCNN, images, init, labels

import jtl
from jtl.recipes import adversarial


@pytest.fixture(scope="module")
def setup():
  model = TinyCNN(4)
  x = np.clip(images(8) * 0.3 + 0.5, 0, 1)
  v = init(model, x)
  return model, v, x, labels(8)


def test_pgd_and_fgsm_stay_in_ball_and_raise_loss(setup):
  model, v, x, y = setup
  batch = {"inputs": x, "label": y}
  eps = 0.05
  attack = jax.jit(lambda v, x, rng: adversarial.pgd(
      adversarial.model_loss(model, v, batch), x, eps=eps, step_size=0.02, steps=5,
      rng=rng, bounds=(0.0, 1.0)))
  x_adv = np.asarray(attack(v, x, jax.random.PRNGKey(0)))
  assert np.abs(x_adv - x).max() <= eps + 1e-6
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.abs(x_adv - x).max() > 0.9 * eps  # it actually moved
  loss = jax.jit(lambda v, x: adversarial.model_loss(model, v, batch)(x))
  clean, adv = float(loss(v, x)), float(loss(v, x_adv))
  x_fgsm = np.asarray(jax.jit(lambda v, x: adversarial.fgsm(
      adversarial.model_loss(model, v, batch), x, eps=eps))(v, x))
  assert adv > clean and float(loss(v, x_fgsm)) > clean
  np.testing.assert_allclose(np.abs(x_fgsm - x), eps, rtol=1e-5)  # every pixel moves by eps
  with pytest.raises(jtl.errors.ConfigError, match="step_size"):
    adversarial.pgd(lambda x: jnp.sum(x), x, eps=0.1, step_size=0.0, steps=3)


def test_adversarial_train_step_and_robust_eval(setup):
  model, v, x, y = setup
  lab = jtl.label_params(v["params"], [("head/.*", "head"), (".*", "frozen")])
  tx = jtl.make_optimizer(lab, learning_rate=0.05, optimizer="sgd")
  opts = dict(eps=0.1, steps=3, bounds=(0.0, 1.0))
  step = jax.jit(adversarial.make_adversarial_train_step(
      model, tx, labels=lab, clean_fraction=0.5, **opts))
  state = jtl.create_train_state(v, lab, tx)
  state2, m = step(state, {"inputs": x, "label": y})
  # The update equals the core step's on [clean; adversarial] rows, so the
  # frozen backbone and its statistics are untouched.
  jax.tree.map(np.testing.assert_array_equal, state2.frozen, state.frozen)
  jax.tree.map(np.testing.assert_array_equal, state2.model_state, state.model_state)
  assert not np.allclose(state2.params["head"]["kernel"], v["params"]["head"]["kernel"])
  robust = jax.jit(adversarial.make_robust_eval_step(model, **opts))
  clean = jax.jit(jtl.make_eval_step(model))
  batch = {"inputs": x, "label": y, "mask": np.array([True] * 6 + [False] * 2)}
  summarize = jtl.eval_steps.summarize_eval
  r, c = summarize(robust(v, batch)), summarize(clean(v, batch))
  assert r["count"] == c["count"] == 6
  assert r["loss"] > c["loss"] and r["accuracy"] <= c["accuracy"]
  again = jtl.eval_steps.summarize_eval(robust(v, batch))
  assert again == r  # deterministic


def test_attack_by_name_and_input_scale():
  loss = lambda x: jnp.sum(x * jnp.array([1.0, -1.0]))
  run = adversarial.make_attack(attack="pgd", eps=2.0, steps=4, random_start=False,
                                input_scale=0.5)
  np.testing.assert_allclose(run(loss, jnp.zeros(2), None), [1.0, -1.0])
  with pytest.raises(jtl.errors.ConfigError, match="attack='cw'"):
    adversarial.make_attack(attack="cw", eps=0.1)


def test_robust_eval_draws_the_same_random_start_on_a_mesh(setup):
  """The random start's seed comes from the batch's inputs as integer bits:
  a float sum of them rounded differently when a mesh split the batch."""
  model, v, _, _ = setup
  x = np.clip(images(16, seed=3) * 0.3 + 0.5, 0, 1)
  batch = {"inputs": x, "label": labels(16), "mask": np.arange(16) % 5 != 3}
  robust = adversarial.make_robust_eval_step(model, eps=0.1, steps=2, bounds=(0.0, 1.0))
  mesh = jtl.parallel.make_mesh()
  assert mesh.size > 1  # conftest's host devices
  one = jax.jit(robust)(v, batch)
  meshed = jtl.parallel.jit_eval_step(robust, mesh)(v, jtl.parallel.shard_batch(batch, mesh))
  np.testing.assert_allclose(float(meshed["loss"]), float(one["loss"]), rtol=1e-6)
