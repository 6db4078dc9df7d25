"""A run ends well when it is stopped (issue 26, section 2 and item 3.1):
SIGTERM/SIGINT finish the step, save it, release the lock and stop with a
message naming the step, from which a re-run continues exactly; a partial
metrics line does not derail the re-run. (Item 3.5, an unfinished
save before LP-FT's first checkpoint: tests/app/test_folder_config.py.)"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from models_for_tests import batch, cached_probe_kwargs, fit_kwargs
from jobs import start_resume_job as resume_run

import jtl
from jtl.checkpoint.layout import finished_steps
from jtl.errors import Preempted


# Item 3.1: a kill (or a full disk) during a metrics write leaves a partial line.
def test_partial_metrics_line_is_dropped_and_the_run_resumes(tmp_path, caplog):
  jtl.train.fit(num_steps=3, **fit_kwargs(tmp_path))  # checkpoints at 2 and 3, 5 rows
  jsonl = tmp_path / "metrics.jsonl"
  with open(jsonl, "a") as f:
    f.write('{"step": 4, "split": "train", "lo')  # cut mid-row, no newline
  with caplog.at_level(logging.WARNING):
    result = jtl.train.fit(num_steps=5, **fit_kwargs(tmp_path))
  assert result.start_step == 3
  assert any("dropped 1 unreadable line(s) (line 6" in r.getMessage() for r in caplog.records)
  rows = [json.loads(line) for line in jsonl.read_text().splitlines()]  # every line whole
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5]
  assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 3, 4, 5]


def two_phase_kwargs(workdir, **extra):
  """fit_kwargs with the head alone training until step 2, then everything
  (the shape of LP-FT and gradual unfreezing)."""
  kwargs = fit_kwargs(workdir, **extra)
  params = kwargs["variables"]["params"]
  head = jtl.label_params(params, [("head/.*", "head"), (".*", jtl.partition.FROZEN)])
  kwargs["later_phases"] = [(2, kwargs["labels"], kwargs["tx"])]
  kwargs["labels"] = head
  kwargs["tx"] = jtl.make_optimizer(head, learning_rate=0.1, optimizer="sgd")
  return kwargs


def test_sigterm_saves_the_step_releases_the_lock_and_resumes_exactly(tmp_path, caplog):
  def signal_twice_at_3(step, row):  # the second arrives while the first is handled
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  stopped = tmp_path / "stopped"
  with caplog.at_level(logging.WARNING), pytest.raises(
      Preempted, match=r"Stopped by SIGTERM after step 3 of 6\. Checkpoint step 3 is saved"
  ) as stop:
    jtl.train.fit(num_steps=6, on_log=signal_twice_at_3, **two_phase_kwargs(stopped))
  assert (stop.value.step, stop.value.signal_name, stop.value.exit_code) == (3, "SIGTERM", 143)
  assert any("SIGTERM received again" in r.getMessage() for r in caplog.records)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  assert not (stopped / "jtl.lock").exists()
  assert finished_steps(stopped) == [2, 3]  # the regular save at 2 (the best) and the stop's
  rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]

  resumed = jtl.train.fit(num_steps=6, **two_phase_kwargs(stopped))  # in phase 1, at step 3
  reference = jtl.train.fit(num_steps=6, **two_phase_kwargs(tmp_path / "reference"))
  assert (resumed.start_step, reference.start_step) == (3, 0)
  a = jtl.tree.flatten(jax.device_get(resumed.state))
  b = jtl.tree.flatten(jax.device_get(reference.state))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigint_without_a_workdir_names_that_nothing_was_saved_and_fit_off_the_main_thread():
  kill = lambda step, row: os.kill(os.getpid(), signal.SIGINT)
  with pytest.raises(Preempted, match=r"SIGINT after step 1 of 3\. Nothing was saved") as e:
    jtl.train.fit(num_steps=3, on_log=kill, **fit_kwargs(None))
  assert e.value.exit_code == 130 and e.value.step is None
  # Off the main thread no handler can be installed: fit runs as before.
  results = []
  worker = threading.Thread(target=lambda: results.append(
      jtl.train.fit(num_steps=2, **fit_kwargs(None, eval_batches=None))))
  worker.start()
  worker.join()
  assert [int(r.state.step) for r in results] == [2]


@pytest.mark.slow  # a job in a subprocess: make test-all
def test_a_preempted_job_exits_143_naming_the_step_saved(tmp_path):
  """A real process signalled from outside, exiting through the scripts'
  wrapper (resuming from the step is the SIGKILL test's job and the test above)."""
  workdir = tmp_path / "run"
  job = resume_run(workdir, tmp_path / "unused.npz", "0.3")
  deadline = time.monotonic() + 240
  while not (workdir / "checkpoints" / "3").exists():
    assert job.poll() is None, job.stdout.read()
    assert time.monotonic() < deadline, "no checkpoint at step 3 in time"
    time.sleep(0.05)
  job.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  job.send_signal(signal.SIGTERM)  # a second one, during the step or the save
  out, _ = job.communicate(timeout=120)
  assert job.returncode == 143, out
  match = re.search(r"Preempted: Stopped by SIGTERM after step (\d+) of 12\. Checkpoint step "
                    r"(\d+) is saved in (\S+) and", out)
  assert match and match[1] == match[2] and match[3] == str(workdir), out
  assert 3 <= int(match[1]) < 12 and int(match[1]) in finished_steps(workdir)
  assert not (workdir / "jtl.lock").exists() and not (tmp_path / "unused.npz").exists()


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_two_processes_one_signalled_both_save_the_same_step_and_resume(tmp_path):
  from jobs import MULTIHOST_JOB
  from jobs import free_port as _port

  def start(steps, seconds_per_step):
    port = _port()
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environ["MULTIHOST_SECONDS_PER_STEP"] = seconds_per_step
    return [subprocess.Popen(
        [sys.executable, str(MULTIHOST_JOB), str(i), "2", str(port), str(workdir),
         str(tmp_path / "out.npz"), str(steps)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=environ) for i in range(2)]

  def finish(procs):
    try:
      return [p.communicate(timeout=240)[0] for p in procs], [p.returncode for p in procs]
    finally:
      for p in procs:
        p.kill()

  workdir = tmp_path / "two"
  procs = start(40, "0.3")
  deadline = time.monotonic() + 240
  while not (workdir / "checkpoints" / "2").exists():
    assert all(p.poll() is None for p in procs), finish(procs)
    assert time.monotonic() < deadline, "no checkpoint at step 2 in time"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # one host's preemption notice
  logs, codes = finish(procs)
  assert codes == [143, 143], logs
  pattern = (r"Preempted: Stopped by a preemption notice \(SIGTERM to one of the processes\) "
             r"after step (\d+) of 40\. Checkpoint step (\d+) is saved")
  found = [re.search(pattern, log) for log in logs]
  assert all(found), logs
  saved = {int(m[1]) for m in found} | {int(m[2]) for m in found}
  assert len(saved) == 1, logs  # both processes stopped and saved at the same step
  saved = saved.pop()
  assert 2 <= saved < 40 and saved in finished_steps(workdir)
  assert not (workdir / "jtl.lock").exists()
  logs, codes = finish(start(saved + 1, "0"))  # both restore it and go on
  assert codes == [0, 0], logs
  assert all(f"done from step {saved}" in log for log in logs), logs


def test_cached_probe_stopped_during_extraction_releases_the_lock(tmp_path):
  from jtl.recipes.strategies import features

  read = []

  def train_pass():  # preempted while the backbone runs over the training split
    for seed in range(4):
      if seed == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      read.append(seed)
      yield batch(8, classes=4, seed=seed)

  with pytest.raises(Preempted, match=r"SIGTERM while extracting the features \(at batch 2\)"
                                          r"\. Nothing was saved yet in .* its lock is released"):
    features.fit_cached_probe(**cached_probe_kwargs(
        train_pass=train_pass(), num_steps=5, batch_size=8, workdir=tmp_path))
  assert not (tmp_path / "jtl.lock").exists() and finished_steps(tmp_path) == []
  assert read == [0, 1]  # stopped at the next batch read, not after the whole pass


def test_a_signal_during_work_with_nothing_to_save_stops_at_once_saying_so():
  import os
  import signal
  import time

  import pytest

  from jtl import preemption
  from jtl.errors import Preempted
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Preempted, match=r"Stopped by SIGTERM during model='auto' selection; "
                                      r"nothing was saved\. Run again") as e:
    with preemption.stop_at_once("model='auto' selection", "Run again to redo it."):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # the handler raises before this ends
  assert e.value.exit_code == 143 and e.value.step is None
  assert signal.getsignal(signal.SIGTERM) is before  # put back
