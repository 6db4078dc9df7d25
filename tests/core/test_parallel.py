import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_for_tests import MLP, batch, init

import jtl
from jtl.errors import DeviceError

STEPS = 4


def make(seed=0):
  model = MLP()
  b = batch(16, classes=4)
  variables = init(model, b["inputs"], seed)
  labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "body")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2, optimizer="adam", clip_norm=1.0,
                          lr_multipliers={"body": 0.5})
  state = jtl.create_train_state(variables, labels, tx, rng=3)
  return model, tx, labels, state


def batches():
  return [jax.tree.map(np.asarray, batch(16, classes=4, seed=i)) for i in range(STEPS)]


def run_jit(devices):
  model, tx, labels, state = make()
  mesh = jtl.make_mesh(devices)
  state = jtl.place_state(state, mesh)
  step = jtl.jit_train_step(jtl.make_train_step(model, tx, labels=labels), mesh)
  for b in batches():
    state, metrics = step(state, jtl.shard_batch(b, mesh))
  return jax.device_get(state.params), float(metrics["loss"])


def run_pmap():
  model, tx, labels, state = make()
  step = jtl.parallel.pmap_train_step(jtl.make_train_step(model, tx, labels=labels, axis_name="batch"))
  state = jtl.parallel.replicate(state)
  for b in batches():
    state, metrics = step(state, jtl.parallel.shard_for_pmap(b))
  return jax.device_get(jtl.parallel.unreplicate(state).params), float(jtl.parallel.unreplicate(metrics)["loss"])


def test_one_device_eight_devices_jit_and_pmap_agree():
  assert jax.device_count() == 8
  one, loss1 = run_jit(jax.devices()[:1])
  eight, loss8 = run_jit(jax.devices())
  pm, lossp = run_pmap()
  for a, b, c in zip(jax.tree.leaves(one), jax.tree.leaves(eight), jax.tree.leaves(pm)):
    # Tolerance: only the order of the fp32 sums over the batch differs.
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)
  np.testing.assert_allclose([loss8, lossp], loss1, rtol=1e-5)


def test_a_masked_training_batch_gives_one_gradient_on_the_mesh_pmap_and_microbatches():
  """The last 6 of 16 rows masked (whole devices among them; micro-batches
  with 3, 3, 2 and 2 real rows): every path trains on the masked mean of the
  10 real rows."""
  masked = {**batches()[0], "mask": np.arange(16) < 10}

  def one_step(devices=None, pmap=False, microbatches=1):
    model, tx, labels, state = make()
    step = jtl.make_train_step(model, tx, labels=labels, microbatches=microbatches,
                               axis_name="batch" if pmap else None)
    if pmap:
      state, metrics = jtl.parallel.pmap_train_step(step)(
          jtl.parallel.replicate(state), jtl.parallel.shard_for_pmap(masked))
      state, metrics = jtl.parallel.unreplicate(state), jtl.parallel.unreplicate(metrics)
    else:
      mesh = jtl.make_mesh(devices)
      step = jtl.jit_train_step(step, mesh)
      state, metrics = step(jtl.place_state(state, mesh), jtl.shard_batch(masked, mesh))
    return jax.device_get(state.params), float(metrics["loss"])

  reference, loss = one_step(jax.devices()[:1])
  for params, other in (one_step(), one_step(pmap=True), one_step(jax.devices()[:1],
                                                                  microbatches=4)):
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params)):
      np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(other, loss, rtol=1e-5)


def test_batch_is_split_over_all_devices():
  mesh = jtl.make_mesh()
  sharded = jtl.shard_batch(batches()[0], mesh)
  assert len(sharded["inputs"].addressable_shards) == 8
  assert sharded["inputs"].addressable_shards[0].data.shape == (2, 8, 8, 3)


def test_indivisible_batch_is_a_clear_error():
  mesh = jtl.make_mesh()
  bad = jax.tree.map(lambda x: x[:12], batches()[0])
  with pytest.raises(DeviceError, match=r"'inputs' has shape \(12, 8, 8, 3\).*divisible by 8"):
    jtl.shard_batch(bad, mesh)
  with pytest.raises(DeviceError, match="divisible by 8"):
    jtl.parallel.shard_for_pmap(bad)
  with pytest.raises(DeviceError, match="fsdp=3"):
    jtl.make_mesh(fsdp=3)


def test_fsdp_sharding_of_large_params_gives_the_same_result():
  model, tx, labels, state = make()
  mesh = jtl.make_mesh(fsdp=4)
  shardings = jtl.parallel.state_shardings(state, mesh, fsdp_rules=[r"body/kernel"], min_size=64)
  placed = jtl.place_state(state, mesh, shardings)
  kernel = placed.trainable["body"]["kernel"]  # (192, 32): split 4 ways on dim 0
  assert kernel.addressable_shards[0].data.shape == (48, 32)
  step = jtl.jit_train_step(jtl.make_train_step(model, tx, labels=labels), mesh, shardings)
  for b in batches():
    placed, _ = step(placed, jtl.shard_batch(b, mesh))
  reference, _ = run_jit(jax.devices()[:1])
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(jax.device_get(placed.params))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_weight_ema_is_sharded_like_the_params():
  model, tx, labels, _ = make()
  variables = init(model, batch(16, classes=4)["inputs"])
  state = jtl.create_train_state(variables, labels, tx, rng=3, ema=True)
  mesh = jtl.make_mesh(fsdp=4)
  shardings = jtl.parallel.state_shardings(state, mesh, fsdp_rules=[r"body/kernel"], min_size=64)
  placed = jtl.place_state(state, mesh, shardings)
  assert placed.ema["body"]["kernel"].sharding == placed.trainable["body"]["kernel"].sharding
  assert placed.ema["body"]["kernel"].addressable_shards[0].data.shape == (48, 32)
  step = jtl.jit_train_step(jtl.make_train_step(model, tx, labels=labels, ema_decay=0.5),
                            mesh, shardings)
  placed, _ = step(placed, jtl.shard_batch(batches()[0], mesh))
  assert placed.ema["body"]["kernel"].addressable_shards[0].data.shape == (48, 32)


def _all_reduced(text: str) -> tuple[int, int]:
  """(elements of non-scalar arrays, scalars) that a compiled module's
  all-reduces sum over devices."""
  arrays = scalars = 0
  for line in text.splitlines():
    shape = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) all-reduce(?:-start)?\(", line)
    for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", shape.group(1) if shape else ""):
      if dims:
        arrays += math.prod(int(d) for d in dims.split(","))
      else:
        scalars += 1
  return arrays, scalars


@pytest.mark.parametrize("rules,trained", [
    ([("head/.*", "head"), (".*", "frozen")], ["head"]),
    ([(".*", "all")], ["head", "body"]),
])
def test_data_parallel_step_sums_only_the_trained_gradients_over_devices(rules, trained):
  """Frozen weights cost no communication either: the step compiled for the
  8-device mesh all-reduces the trained parameters' gradients (and the loss's
  scalars), nothing of the frozen ones."""
  model = MLP()
  b = jax.tree.map(np.asarray, batch(16, classes=4))
  variables = init(model, b["inputs"])
  labels = jtl.label_params(variables["params"], rules)
  tx = jtl.make_optimizer(labels, learning_rate=1e-2)
  mesh = jtl.make_mesh()
  state = jtl.place_state(jtl.create_train_state(variables, labels, tx), mesh)
  step = jtl.jit_train_step(jtl.make_train_step(model, tx, labels=labels), mesh)
  text = step.lower(state, jtl.shard_batch(b, mesh)).compile().as_text()
  arrays, scalars = _all_reduced(text)
  assert arrays == sum(np.size(p) for name in trained
                       for p in jax.tree.leaves(variables["params"][name]))
  assert 1 <= scalars <= 4


def test_microbatches_on_a_mesh_stay_data_parallel():
  """Gradient accumulation on a 4-device mesh: each device runs its own 64 /
  (4 micro-batches x 4 devices) = 4 rows per micro-batch, nothing of the batch
  is gathered across devices, and the update is the whole batch's."""
  model = MLP()
  b = {**jax.tree.map(np.asarray, batch(64, classes=4)), "mask": np.arange(64) < 50}
  variables = init(model, b["inputs"])
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=0.5, optimizer="sgd")
  mesh = jtl.make_mesh(jax.devices()[:4])

  def one_step(microbatches):
    state = jtl.place_state(jtl.create_train_state(variables, labels, tx), mesh)
    step = jtl.jit_train_step(jtl.make_train_step(model, tx, labels=labels,
                                                  microbatches=microbatches), mesh)
    sharded = jtl.shard_batch(b, mesh)
    text = step.lower(state, sharded).compile().as_text()
    state, metrics = step(state, sharded)
    return text, jax.device_get(state.params), float(metrics["loss"])

  text, micro, loss = one_step(4)
  assert "all-gather" not in text
  # The hidden layer's activations [rows, 32] on a device (not the [192, 32] kernel).
  assert {int(r) for r in re.findall(r"f32\[(\d+),32\]", text)} - {192} == {4}
  _, whole, whole_loss = one_step(1)
  for a, c in zip(jax.tree.leaves(whole), jax.tree.leaves(micro)):
    np.testing.assert_allclose(a, c, atol=1e-6)  # tolerance: fp32 summation order
  np.testing.assert_allclose(loss, whole_loss, rtol=1e-6)
  assert np.abs(whole["head"]["kernel"] - variables["params"]["head"]["kernel"]).max() > 1e-3


def test_pmap_and_jit_refuse_a_step_built_for_the_other():
  """pmap needs the step's axis_name (without it the replicas diverge and an
  eval counts one device's rows); jit on a mesh needs none."""
  model, tx, labels, state = make()
  for_jit = jtl.make_train_step(model, tx, labels=labels)
  for_pmap = jtl.make_train_step(model, tx, labels=labels, axis_name="batch")
  with pytest.raises(DeviceError, match=r"axis_name='batch'.*was built with axis_name=None"):
    jtl.parallel.pmap_train_step(for_jit)
  with pytest.raises(DeviceError, match="axis_name=None"):
    jtl.parallel.pmap_train_step(jtl.steps.skip_nonfinite(for_jit))
  with pytest.raises(DeviceError, match="was built with axis_name='other'"):
    jtl.parallel.pmap_train_step(jtl.make_train_step(model, tx, labels=labels, axis_name="other"))
  with pytest.raises(DeviceError, match="without axis_name.*axis_name='batch', for jax.pmap"):
    jtl.jit_train_step(for_pmap, jtl.make_mesh())
  with pytest.raises(DeviceError, match="pmap_eval_step needs"):
    jtl.parallel.pmap_eval_step(jtl.make_eval_step(model))
  with pytest.raises(DeviceError, match="jit_eval_step takes"):
    jtl.jit_eval_step(jtl.make_eval_step(model, axis_name="batch"), jtl.make_mesh())
  # The steps built for each run as before; the pmapped eval counts every device's rows.
  evals = {**batches()[0], "mask": np.arange(16) < 13}
  sums = jtl.parallel.pmap_eval_step(jtl.make_eval_step(model, axis_name="batch"))(
      jtl.parallel.replicate(state.variables), jtl.parallel.shard_for_pmap(evals))
  assert float(jtl.parallel.unreplicate(sums)["count"]) == 13.0
  metrics = jtl.parallel.pmap_train_step(jtl.steps.skip_nonfinite(for_pmap))(
      jtl.parallel.replicate(state), jtl.parallel.shard_for_pmap(batches()[0]))[1]
  assert np.ptp(np.asarray(metrics["loss"])) == 0.0  # averaged: every replica's the same


def test_a_mesh_with_other_axes_is_a_clear_error():
  """A mesh without jtl's ("data", "fsdp") axes is refused where it enters
  (not a KeyError 'fsdp' from place_state, nor jax's error from shard_batch)."""
  model, tx, labels, state = make()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  message = r"axes \{'data': 4\}; jtl expects the axes \('data', 'fsdp'\).*jtl.make_mesh"
  with pytest.raises(DeviceError, match=message):
    jtl.place_state(state, mesh)
  with pytest.raises(DeviceError, match=message):
    jtl.shard_batch(batches()[0], mesh)
  with pytest.raises(DeviceError, match=message):
    jtl.train.fit(module=model, variables=state.variables, labels=labels, tx=tx, mesh=mesh,
                  train_batches=lambda start: iter(batches()), num_steps=1, progress=False)
  # The same devices as jtl.make_mesh builds them: an axis order of one's own is fine.
  grid = np.asarray(jax.devices()[:4]).reshape(4, 1)
  for axes in (("data", "fsdp"), ("fsdp", "data")):
    own = jax.sharding.Mesh(grid if axes[0] == "data" else grid.T, axes)
    sharded = jtl.shard_batch(batches()[0], own)
    assert sharded["inputs"].addressable_shards[0].data.shape == (4, 8, 8, 3)


def test_pmap_trains_a_state_with_a_typed_key():
  """A typed PRNG key (jax.random.key) replicates like the rest of the state,
  and the pmapped step trains as the mesh does."""
  model, tx, labels, _ = make()
  variables = init(model, batch(16, classes=4)["inputs"])
  state = jtl.create_train_state(variables, labels, tx, rng=jax.random.key(3))
  replicated = jtl.parallel.replicate(state)
  assert replicated.rng.shape == (8,)
  assert jnp.issubdtype(replicated.rng.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(replicated.rng)[5],
                                jax.random.key_data(state.rng))
  step = jtl.parallel.pmap_train_step(jtl.make_train_step(model, tx, labels=labels,
                                                          axis_name="batch"))
  pmapped, _ = step(replicated, jtl.parallel.shard_for_pmap(batches()[0]))
  mesh = jtl.make_mesh()
  on_mesh, _ = jtl.jit_train_step(jtl.make_train_step(model, tx, labels=labels), mesh)(
      jtl.place_state(state, mesh), jtl.shard_batch(batches()[0], mesh))
  for a, b in zip(jax.tree.leaves(jax.device_get(on_mesh.params)),
                  jax.tree.leaves(jax.device_get(jtl.parallel.unreplicate(pmapped).params))):
    np.testing.assert_allclose(a, b, atol=1e-5)
