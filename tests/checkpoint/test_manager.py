import contextlib
import logging

import jax
import numpy as np
import pytest
from models_for_tests import ConvNet, batch, init

import jtl
from jtl.checkpoint import CheckpointManager, restore_variables
from jtl.errors import CheckpointError


def setup():
  model = ConvNet(width=8)
  b = batch(8)
  variables = init(model, b["inputs"])
  labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "frozen")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2, optimizer="adam")
  state = jtl.create_train_state(variables, labels, tx)
  step = jax.jit(jtl.make_train_step(model, tx, labels=labels))
  state, _ = step(state, b)
  return variables, labels, tx, state


@contextlib.contextmanager
def compiled_programs():
  """The names of the programs XLA compiles inside the block."""
  names = []

  class Names(logging.Handler):
    def emit(self, record):
      if record.getMessage().startswith("Compiling "):
        names.append(record.getMessage().split()[1])

  handler, logger = Names(), logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield names
  finally:
    logger.removeHandler(handler)


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keeps_last_k_plus_best(tmp_path):
  variables, labels, tx, state = setup()
  mngr = CheckpointManager(tmp_path, save_every=1, keep=2, best_metric="accuracy",
                           async_save=False)
  for step, acc in zip(range(1, 7), [0.1, 0.9, 0.2, 0.3, 0.4, 0.5]):
    assert mngr.save(step, state.replace(step=np.int32(step)), metrics={"accuracy": acc})
  mngr.close()
  assert CheckpointManager(tmp_path).all_steps() == [2, 5, 6]
  assert CheckpointManager(tmp_path, best_metric="accuracy").best_step() == 2
  _, meta = restore_variables(tmp_path, step="best", metric="accuracy")
  assert meta["step"] == 2 and meta["metrics"] == {"accuracy": 0.9}


def test_restore_onto_other_device_counts(tmp_path):
  variables, labels, tx, state = setup()
  mesh8 = jtl.make_mesh()
  mesh1 = jtl.make_mesh(jax.devices()[:1])
  mngr = CheckpointManager(tmp_path / "on8", save_every=1, async_save=False)
  replicated = jtl.place_state(state, mesh8)
  with compiled_programs() as compiled:
    mngr.save(1, replicated)
  # One process writes each replicated array whole: no slice program per leaf
  # shape and device (Orbax's replica-parallel writes compiled 8 per shape).
  # The NaN check and the fingerprints run on the host here (the CPU's arrays
  # are in host memory): nothing compiles at all.
  assert compiled == []
  mngr.close()
  target1 = jtl.place_state(jtl.create_train_state(variables, labels, tx), mesh1)
  on1 = CheckpointManager(tmp_path / "on8").restore(target1, labels)
  assert len(jax.tree.leaves(on1.trainable)[0].sharding.device_set) == 1
  assert_same(on1, state)

  mngr = CheckpointManager(tmp_path / "on1", save_every=1, async_save=False)
  mngr.save(1, on1)
  mngr.close()
  target8 = jtl.place_state(jtl.create_train_state(variables, labels, tx), mesh8)
  on8 = CheckpointManager(tmp_path / "on1").restore(target8, labels)
  assert len(jax.tree.leaves(on8.trainable)[0].sharding.device_set) == 8
  assert_same(on8, state)


def test_restore_variables_reads_params_and_stats_only(tmp_path, monkeypatch):
  variables, labels, tx, state = setup()
  monkeypatch.chdir(tmp_path.parent)  # a relative workdir, as on the command line
  mngr = CheckpointManager(tmp_path.name, save_every=1, async_save=False)
  mngr.save(1, state, meta={"model": "convnet"})
  mngr.close()
  restored, meta = restore_variables(tmp_path)
  assert set(restored) == {"params", "batch_stats"} and meta["model"] == "convnet"
  assert_same(restored["params"], jax.device_get(state.params))
  assert_same(restored["batch_stats"], jax.device_get(state.model_state["batch_stats"]))


def test_unfinished_save_is_ignored(tmp_path):
  variables, labels, tx, state = setup()
  mngr = CheckpointManager(tmp_path, save_every=1, async_save=False)
  mngr.save(1, state)
  mngr.close()
  # What a process killed in the middle of a save leaves behind.
  partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
  again = CheckpointManager(tmp_path, save_every=1)
  assert again.latest_step() == 1
  restored = again.restore(jtl.create_train_state(variables, labels, tx), labels)
  assert_same(restored, state)
  again.close()


def test_mismatched_target_and_missing_checkpoints_are_clear(tmp_path):
  variables, labels, tx, state = setup()
  with pytest.raises(CheckpointError, match="no checkpoints"):
    restore_variables(tmp_path)
  mngr = CheckpointManager(tmp_path, save_every=1, async_save=False)
  mngr.save(1, state)
  mngr.close()
  other = ConvNet(width=4)
  v2 = init(other, batch(8)["inputs"])
  l2 = jtl.label_params(v2["params"], [("head/.*", "head"), (".*", "frozen")])
  target = jtl.create_train_state(v2, l2, jtl.make_optimizer(l2, learning_rate=0.1))
  with pytest.raises(CheckpointError, match="does not fit"):
    CheckpointManager(tmp_path).restore(target, l2)
  with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
    restore_variables(tmp_path, step=7)


def test_a_meta_that_cannot_be_read_once_never_costs_the_best(tmp_path, monkeypatch):
  from jtl.checkpoint import layout, manager
  _, _, _, state = setup()
  mngr = CheckpointManager(tmp_path, save_every=1, keep=2, best_metric="accuracy",
                           async_save=False)
  read, failing = layout.read_meta, {"1"}
  for module in (layout, manager):  # where it is defined, and where pruning looks it up
    monkeypatch.setattr(module, "read_meta", lambda d: {} if d.name in failing else read(d))
  for step, acc in zip(range(1, 5), [0.9, 0.1, 0.2, 0.3]):
    mngr.save(step, state.replace(step=np.int32(step)), metrics={"accuracy": acc})
    if step == 4:  # step 1's meta unreadable (a timeout) while it fell out of the last 2
      failing.clear()
  mngr.save(5, state.replace(step=np.int32(5)), metrics={"accuracy": 0.4})
  mngr.close()
  assert CheckpointManager(tmp_path).all_steps() == [1, 4, 5]  # the last 2 and the best


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4", "uint4", "bool",
                                   "float8_e4m3fn"])
def test_fingerprints_agree_on_the_host_and_the_devices_and_see_one_bit(dtype):
  from jtl.checkpoint import integrity
  x = np.asarray(jax.numpy.asarray(np.arange(-8, 16).reshape(4, 6) % 7, dtype))
  # The compiled program an accelerator runs, and the host's numpy: the same
  # number, and the same verdict on NaN (the save's check, in the same pass).
  device = jtl.make_mesh().devices.flat[1]
  sums, flags = integrity._sums_and_flags([jax.device_put(x, device)])
  assert int(sums[0]) == integrity.host_fingerprint(x) == integrity.fingerprints({"x": x})["x"]
  assert not flags[0] and integrity.inspect({"x": x})[1] == []
  flipped = np.array(x)
  flipped.reshape(-1)[5] = not flipped.reshape(-1)[5] if dtype == "bool" else flipped.reshape(
      -1)[5] + 1
  assert integrity.host_fingerprint(flipped) != integrity.host_fingerprint(x)
  if np.issubdtype(x.dtype, np.inexact) or "float" in dtype:
    flipped.reshape(-1)[5] = np.nan
    assert bool(integrity._sums_and_flags([jax.device_put(flipped, device)])[1][0])
    assert integrity.inspect({"x": flipped})[1] == ["x"]
