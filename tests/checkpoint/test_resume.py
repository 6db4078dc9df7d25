"""A run killed with SIGKILL and restarted ends with exactly the params of an
uninterrupted run (CPU, same devices)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from jobs import RESUME_JOB as JOB
from jobs import resume_env as env
from jobs import start_resume_job as run

from jtl.weights import read


# Training processes started, killed and restarted: make test-all. The
# default run keeps the in-process stop and exact resume
# (core/test_preemption.py) and the fallback past a damaged checkpoint
# (checkpoint/test_reliability.py).
@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_params(tmp_path):
  reference = run(tmp_path / "uninterrupted", tmp_path / "a.npz")

  killed = run(tmp_path / "killed", tmp_path / "unused.npz", "0.3")
  checkpoints = tmp_path / "killed" / "checkpoints"
  deadline = time.monotonic() + 240
  while not (checkpoints / "6").exists():
    assert killed.poll() is None, killed.stdout.read()
    assert time.monotonic() < deadline, "no checkpoint at step 6 in time"
    time.sleep(0.05)
  os.kill(killed.pid, signal.SIGKILL)
  killed.wait()
  assert killed.returncode == -signal.SIGKILL
  assert not (tmp_path / "unused.npz").exists()  # it really died mid-run

  resumed = subprocess.run([sys.executable, str(JOB), str(tmp_path / "killed"),
                            str(tmp_path / "b.npz")], capture_output=True, text=True,
                           timeout=300, env=env(tmp_path))
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  start = int(resumed.stdout.split("finished from step")[1].split()[0])
  assert 6 <= start < 12, resumed.stdout

  out, _ = reference.communicate(timeout=300)
  assert reference.returncode == 0, out
  assert "finished from step 0" in out
  a, b = read(tmp_path / "a.npz"), read(tmp_path / "b.npz")
  assert sorted(a) == sorted(b) and len(a) >= 8
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Frozen params really stayed, trainable ones really moved.
  init = read(tmp_path / "a.npz")
  assert "params/body/kernel" in init and "batch_stats/bn/mean" in a
