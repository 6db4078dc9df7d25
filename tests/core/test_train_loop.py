"""The fit loop: phases that change the partition, and resume across them."""

import jax
import numpy as np
from models_for_tests import phased_mlp

import jtl


def setup():
  return phased_mlp(learning_rate=1e-2)


def test_phases_switch_partition_and_resume_across_the_boundary(tmp_path):
  module, variables, probe, full, make, data = setup()
  kwargs = dict(module=module, variables=variables, labels=probe, tx=make(probe),
                later_phases=[(3, full, make(full))], train_batches=data, progress=False)

  at3 = jtl.train.fit(num_steps=3, **kwargs).state
  np.testing.assert_array_equal(at3.params["body"]["kernel"], variables["params"]["body"]["kernel"])
  assert not np.allclose(at3.params["head"]["kernel"], variables["params"]["head"]["kernel"])

  straight = jtl.train.fit(num_steps=6, **kwargs).state
  assert not np.allclose(straight.params["body"]["kernel"], variables["params"]["body"]["kernel"])

  # Stop at step 4 (inside phase 2), resume to 6: same params as straight through.
  jtl.train.fit(num_steps=4, workdir=tmp_path, checkpoint_every=1, async_checkpoints=False, **kwargs)
  resumed = jtl.train.fit(num_steps=6, workdir=tmp_path, checkpoint_every=1,
                          async_checkpoints=False, **kwargs)
  assert resumed.start_step == 4
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_phase_switch_keeps_the_state_on_the_devices(monkeypatch):
  """LP-FT's switch re-splits the params and carries the optimizer state over
  on the devices: the state is not fetched to the host and sent back (on a
  GPU or TPU, the whole model twice per phase)."""
  from jtl import fit_phases
  module, variables, probe, full, make, _ = setup()
  mesh = jtl.make_mesh()
  state = jtl.place_state(jtl.create_train_state(variables, probe, make(probe)), mesh)
  fetched, device_get = [], jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: fetched.append(x) or device_get(x))
  switched, _ = fit_phases.enter_phase(state, (3, full, make(full)), lambda *a: None, mesh)
  monkeypatch.undo()
  assert sum(np.size(x) for x in jax.tree.leaves(fetched)) == 0
  assert set(jtl.tree.flatten(switched.trainable)) == set(jtl.tree.flatten(variables["params"]))
  for a, b in zip(jax.tree.leaves(switched.params), jax.tree.leaves(state.params), strict=True):
    assert a.sharding.mesh.devices.size == mesh.devices.size
    np.testing.assert_array_equal(a, b)


def test_the_next_batch_is_on_its_way_while_a_step_computes_and_eval_waits_once(monkeypatch):
  module, variables, probe, _, make, data = setup()
  read = []

  def batches(start):
    for i, b in enumerate(data(start)):
      read.append(start + i + 1)  # the step this batch trains
      yield b

  seen = {}
  jtl.train.fit(module=module, variables=variables, labels=probe, tx=make(probe),
                train_batches=batches, num_steps=4, log_every=1, progress=False,
                on_log=lambda step, row: seen.setdefault(step, list(read)))
  # At each step's log line the batch of the step after it was already read
  # (and sent to the devices); none past the last step.
  assert {step: max(r) for step, r in seen.items()} == {1: 2, 2: 3, 3: 4, 4: 4}

  fetches = []
  device_get = jax.device_get
  monkeypatch.setattr(jtl.train.jax, "device_get", lambda x: fetches.append(1) or device_get(x))
  eval_step = jax.jit(jtl.make_eval_step(module))
  eval_batches = [{**b, "mask": np.ones(8, bool)} for b in list(data(0))[:5]]
  metrics = jtl.train.evaluate(eval_step, variables, eval_batches)
  assert len(fetches) == 1 and metrics["count"] == 40  # one wait for 5 batches
  one_by_one = [jtl.train.evaluate(eval_step, variables, [b])["loss"] for b in eval_batches]
  np.testing.assert_allclose(metrics["loss"], np.mean(one_by_one), rtol=1e-6)


def test_a_batch_that_fails_to_load_raises_after_the_step_before_it_is_saved(tmp_path):
  module, variables, probe, _, make, data = setup()

  def batches(start):
    for i, b in enumerate(data(start)):
      if start + i + 1 == 5:  # the batch of step 5: a file that cannot be decoded
        raise jtl.errors.DataError("broken.jpg cannot be decoded")
      yield b

  import pytest
  with pytest.raises(jtl.errors.DataError, match="broken.jpg"):
    jtl.train.fit(module=module, variables=variables, labels=probe, tx=make(probe),
                  train_batches=batches, num_steps=8, workdir=tmp_path, checkpoint_every=4,
                  async_checkpoints=False, progress=False)
  from jtl.checkpoint import CheckpointManager
  assert CheckpointManager(tmp_path).all_steps() == [4]  # step 4's save came first
