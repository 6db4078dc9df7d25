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
