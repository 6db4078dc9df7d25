"""The multi-host path as real processes: two processes on 127.0.0.1 (gloo, 4
CPU devices each) train like one process with 8 devices, write checkpoints
that one process restores (and the reverse), and resume exactly after one of
them is killed (issue 18)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jobs import MULTIHOST_JOB as JOB
from jobs import free_port as _port


def launch(processes, workdir, out, steps, die_at=None, timeout=240, api="linen", env=None):
  """Runs the job as `processes` processes; returns their exit codes."""
  port = _port()
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **(env or {})}
  env["MULTIHOST_API"] = api
  procs = [subprocess.Popen(
      [sys.executable, str(JOB), str(i), str(processes), str(port), str(workdir), str(out),
       str(steps), *([str(die_at)] if die_at else [])],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for i in range(processes)]
  try:
    if die_at:  # the survivor blocks in a collective: stop it as a scheduler would
      procs[-1].wait(timeout=timeout)
      procs[0].kill()
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  logs = [p.stdout.read() for p in procs]
  return codes, logs


def params(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assert_same(a, b, atol=1e-5):
  assert a.keys() == b.keys()
  for k in a:
    if k != "start_step":
      np.testing.assert_allclose(a[k], b[k], atol=atol, err_msg=k)


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_two_processes_match_one_and_resume_across_kill_and_layouts(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  codes, logs = launch(1, one, tmp_path / "one6.npz", 6)
  assert codes == [0], logs[0][-3000:]
  # Two hosts; host 1 is killed after step 5 (checkpoints at 2 and 4), then both restart.
  codes, logs = launch(2, two, tmp_path / "unused.npz", 6, die_at=5)
  assert codes[1] == 17, logs[1][-3000:]
  complete = [int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()]
  assert complete and max(complete) in (2, 4)  # 4 only if its async save finished in time
  codes, logs = launch(2, two, tmp_path / "two6.npz", 6)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  resumed = params(tmp_path / "two6.npz")
  assert int(resumed["start_step"]) == max(complete)
  # Tolerance: the cross-process reductions sum in another order than one process's.
  assert_same(params(tmp_path / "one6.npz"), resumed)
  # Precise BatchNorm: the saved statistics are the population moments of the
  # global batches' unmasked rows under the final params (both processes' rows).
  from multihost_job import GLOBAL_BATCH, Net, global_batch

  import jtl
  final = jtl.tree.unflatten({k: v for k, v in resumed.items() if k != "start_step"})
  direct = jtl.recompute_batchnorm(Net(), final, [
      {"inputs": global_batch(1000)["inputs"]},
      {"inputs": global_batch(1001)["inputs"], "mask": np.arange(GLOBAL_BATCH) < GLOBAL_BATCH - 4}])
  for leaf in ("mean", "var"):
    np.testing.assert_allclose(final["batch_stats"]["bn"][leaf], direct["batch_stats"]["bn"][leaf],
                               rtol=1e-4, atol=1e-5)
  # A checkpoint of two processes restores in one, and one process's in two.
  codes, logs = launch(1, two, tmp_path / "two_then_one8.npz", 8)
  assert codes == [0], logs[0][-3000:]
  codes, logs = launch(2, one, tmp_path / "one_then_two8.npz", 8)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  a, b = params(tmp_path / "two_then_one8.npz"), params(tmp_path / "one_then_two8.npz")
  assert int(a["start_step"]) == int(b["start_step"]) == 6
  assert_same(a, b)


@pytest.mark.slow  # two processes: make test-all
def test_two_processes_recompute_nnx_batchnorm_statistics_of_the_global_batches(tmp_path):
  codes, logs = launch(2, tmp_path / "nnx", tmp_path / "nnx.npz", 2, api="nnx")
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  from multihost_job import GLOBAL_BATCH, global_batch, nnx_net

  import jtl
  final = jtl.tree.unflatten({k: v for k, v in params(tmp_path / "nnx.npz").items()
                         if k != "start_step"})
  direct = jtl.recompute_batchnorm(nnx_net(), final, [
      {"inputs": global_batch(1000)["inputs"]},
      {"inputs": global_batch(1001)["inputs"], "mask": np.arange(GLOBAL_BATCH) < GLOBAL_BATCH - 4}])
  initial = jtl.adapter.variables_of(nnx_net())["state"]["bn"]
  for leaf in ("mean", "var"):
    assert not np.allclose(final["state"]["bn"][leaf], initial[leaf], atol=1e-3)
    np.testing.assert_allclose(final["state"]["bn"][leaf], direct["state"]["bn"][leaf],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two processes: make test-all
def test_a_lock_held_elsewhere_stops_both_processes_before_training(tmp_path):
  # Only process 0 takes the lock; before its refusal was broadcast, process 1
  # waited in the first collective until the scheduler's timeout.
  workdir = tmp_path / "busy"
  workdir.mkdir()
  (workdir / "jtl.lock").write_text(json.dumps({"pid": 4242, "host": "another-host",
                                                "since": "2026-12-07 10:00:00 UTC"}))
  codes, logs = launch(2, workdir, tmp_path / "unused.npz", 4, timeout=120)
  assert codes == [2, 2], logs[0][-3000:] + logs[1][-3000:]
  assert "is in use by another run: process 4242 on host 'another-host'" in logs[0]
  assert "Process 0 could not take the lock" in logs[1]
  assert not (workdir / "checkpoints").exists() or not any(
      p.name.isdigit() for p in (workdir / "checkpoints").iterdir())


@pytest.mark.slow  # two processes: make test-all
def test_a_lock_taken_over_mid_run_stops_both_processes_at_the_next_save(tmp_path):
  workdir = tmp_path / "taken"
  codes, logs = launch(2, workdir, tmp_path / "unused.npz", 6, timeout=120,
                       env={"MULTIHOST_TAKE_LOCK_AT": "3"})
  assert codes == [2, 2], logs[0][-3000:] + logs[1][-3000:]
  assert "This run no longer holds the lock" in logs[0]
  assert "Process 0 no longer holds the lock" in logs[1]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]  # the save at step 4 wrote nothing
  assert json.loads((workdir / "jtl.lock").read_text())["pid"] == 4242  # left to its owner


@pytest.mark.slow  # two processes: make test-all
def test_two_processes_train_the_cached_probe_of_one(tmp_path):
  """A linear probe on cached features: 2 processes x 4 devices gather every
  process's features (and labels, masks) and train the head of 1 x 8."""
  codes, logs = launch(1, tmp_path / "one", tmp_path / "one.npz", 5, api="cached_probe")
  assert codes == [0], logs[0][-3000:]
  codes, logs = launch(2, tmp_path / "two", tmp_path / "two.npz", 5, api="cached_probe")
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  one = params(tmp_path / "one.0.npz")
  import jax
  from multihost_job import ProbeNet, global_batch
  want = np.concatenate([global_batch(1000)["label"], global_batch(1001)["label"][:-4]])
  np.testing.assert_array_equal(one["labels"], want)  # the 28 real rows, in order
  assert one["features"].shape == (28, 32)
  initial = ProbeNet().init(jax.random.PRNGKey(0), np.zeros((1, 6, 6, 3), np.float32))
  assert np.abs(one["kernel"] - initial["params"]["head"]["kernel"]).max() > 1e-3  # trained
  for process in (0, 1):
    two = params(tmp_path / f"two.{process}.npz")
    np.testing.assert_array_equal(two["labels"], want)
    # Tolerance: the features of 4 + 4 devices against 8, then 5 head steps.
    assert_same(one, two)


@pytest.mark.slow  # two processes: make test-all
def test_two_processes_log_the_global_examples_per_second(tmp_path):
  """examples_per_second counts every process's rows (the global batch of 16),
  not one process's 8."""
  codes, logs = launch(2, tmp_path / "rate", tmp_path / "unused.npz", 2)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  from multihost_job import GLOBAL_BATCH
  for log in logs:
    rates = [line for line in log.splitlines() if "examples per step" in line]
    assert rates == [f"step {s}: {GLOBAL_BATCH:.1f} examples per step" for s in (1, 2)], log[-3000:]
