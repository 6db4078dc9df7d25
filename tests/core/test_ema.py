"""Weight EMA (`fit(ema_decay=...)`): the average itself, its exact resume
across a phase boundary, and evaluation/restore with the EMA weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_for_tests import batch, phased_mlp

import jtl
from jtl.checkpoint.restore import restore_variables
from jtl.errors import ConfigError, StepError

DECAY = 0.75


def setup():
  return phased_mlp(learning_rate=5e-2)


def test_ema_equals_the_hand_computed_average_over_3_steps():
  module, variables, probe, _, make, data = setup()
  tx = make(probe)
  state = jtl.create_train_state(variables, probe, tx, ema=True)
  step = jax.jit(jtl.make_train_step(module, tx, labels=probe, ema_decay=DECAY))
  expected = np.asarray(variables["params"]["head"]["kernel"])
  for b in list(data(0))[:3]:
    state, _ = step(state, b)
    expected = DECAY * expected + (1 - DECAY) * np.asarray(state.trainable["head"]["kernel"])
  got = np.asarray(state.ema["head"]["kernel"])
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(got, state.trainable["head"]["kernel"])  # an average, not the weights
  assert state.ema["body"]["kernel"] is None  # frozen: not averaged, it is its own average
  np.testing.assert_array_equal(state.ema_params["body"]["kernel"],
                                variables["params"]["body"]["kernel"])
  np.testing.assert_array_equal(state.eval_variables["params"]["head"]["kernel"], got)

  # A skipped (non-finite) update leaves the average as it was.
  nan_batch = {**batch(8, classes=4), "inputs": jnp.full((8, 8, 8, 3), jnp.nan)}
  skipped, metrics = jax.jit(jtl.steps.skip_nonfinite(
      jtl.make_train_step(module, tx, labels=probe, ema_decay=DECAY)))(state, nan_batch)
  assert float(metrics["skipped"]) == 1.0
  np.testing.assert_array_equal(skipped.ema["head"]["kernel"], got)


def test_ema_needs_both_the_state_and_the_decay():
  module, variables, probe, _, make, data = setup()
  tx = make(probe)
  plain = jtl.create_train_state(variables, probe, tx)
  with pytest.raises(StepError, match="ema=True"):
    jtl.make_train_step(module, tx, labels=probe, ema_decay=0.9)(plain, next(data(0)))
  with pytest.raises(StepError, match=r"ema_decay must be in \[0, 1\)"):
    jtl.make_train_step(module, tx, ema_decay=1.0)
  with pytest.raises(ConfigError, match="ema_decay"):
    jtl.train.fit(module=module, variables=variables, labels=probe, tx=tx, train_batches=data,
                  num_steps=1, ema_decay=-0.1, progress=False)


def test_resume_with_ema_is_bit_equal_across_a_phase_boundary(tmp_path):
  module, variables, probe, full, make, data = setup()
  kwargs = dict(module=module, variables=variables, labels=probe, tx=make(probe),
                later_phases=[(2, full, make(full))], train_batches=data, progress=False,
                ema_decay=DECAY)
  straight = jtl.train.fit(num_steps=5, **kwargs).state
  # The body turned trainable at step 2; its average starts from the value it kept until then.
  assert not np.allclose(straight.ema["body"]["kernel"], variables["params"]["body"]["kernel"])
  assert not np.allclose(straight.ema["body"]["kernel"], straight.trainable["body"]["kernel"])

  jtl.train.fit(num_steps=3, workdir=tmp_path, checkpoint_every=1, async_checkpoints=False,
                **kwargs)
  resumed = jtl.train.fit(num_steps=5, workdir=tmp_path, checkpoint_every=1,
                          async_checkpoints=False, **kwargs)
  assert resumed.start_step == 3
  for a, b in zip(jax.tree.leaves((straight.params, straight.ema)),
                  jax.tree.leaves((resumed.state.params, resumed.state.ema)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_evaluation_and_restore_use_the_ema_weights(tmp_path):
  module, variables, probe, _, make, data = setup()
  evals = [batch(8, classes=4, seed=50 + i) for i in range(2)]
  result = jtl.train.fit(module=module, variables=variables, labels=probe, tx=make(probe),
                         train_batches=data, num_steps=4, eval_batches=lambda: evals,
                         workdir=tmp_path, async_checkpoints=False, progress=False,
                         ema_decay=DECAY)
  state = result.state
  eval_step = jax.jit(jtl.eval_steps.make_eval_step(module))
  with_ema = jtl.train.evaluate(eval_step, state.eval_variables, evals)
  raw = jtl.train.evaluate(eval_step, state.variables, evals)
  assert result.eval_metrics["loss"] == pytest.approx(with_ema["loss"], rel=1e-6)
  assert abs(with_ema["loss"] - raw["loss"]) > 1e-4  # the two weight sets do differ here

  restored, _ = restore_variables(tmp_path)
  np.testing.assert_array_equal(restored["params"]["head"]["kernel"], state.ema["head"]["kernel"])
  np.testing.assert_array_equal(restored["params"]["body"]["kernel"],
                                variables["params"]["body"]["kernel"])
  raw_restored, _ = restore_variables(tmp_path, ema=False)
  np.testing.assert_array_equal(raw_restored["params"]["head"]["kernel"],
                                state.trainable["head"]["kernel"])
