"""Nothing is lost: the best checkpoint survives restarts, a diverging run saves
nothing bad, a workdir has one owner, errors close the manager, and a damaged
checkpoint is skipped (issue 12, items 1-4, 11, 12)."""

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from models_for_tests import MLP, batch, cached_probe_kwargs, fit_kwargs, init
from models_for_tests import mlp_setup as setup

import jtl
from jtl.checkpoint import CheckpointManager, restore_variables
from jtl.checkpoint.lock import LOCK_NAME
from jtl.errors import CheckpointError, DataError, DivergenceError
from jtl.metrics import MetricWriter


def state_at(step):
  module, variables, labels, tx = setup()
  return jtl.create_train_state(variables, labels, tx).replace(step=np.int32(step))


def steps_on_disk(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# Item 1: the best survives any number of restarts.
def test_best_checkpoint_survives_two_restarts(tmp_path):
  first = CheckpointManager(tmp_path, save_every=1, keep=1, best_metric="accuracy",
                            async_save=False)
  first.save(1, state_at(1), metrics={"accuracy": 0.9})
  first.save(2, state_at(2), metrics={"accuracy": 0.1})
  first.close()
  for step in (3, 4):  # two restarts, each a new process's manager
    again = CheckpointManager(tmp_path, save_every=1, keep=1, best_metric="accuracy",
                              async_save=False)
    again.save(step, state_at(step), metrics={"accuracy": 0.1 * step / 10})
    again.close()
  assert steps_on_disk(tmp_path) == [1, 4]
  assert CheckpointManager(tmp_path, best_metric="accuracy").best_step() == 1
  _, meta = restore_variables(tmp_path, step="best", metric="accuracy")
  assert meta["step"] == 1


def test_the_best_evaluation_between_checkpoint_steps_is_saved(tmp_path):
  """Evaluations every step, checkpoints every 4: the best (step 2's) was
  never saved, only steps where both fell could be the best."""
  scores = iter([0.1, 0.9, 0.2, 0.3])  # step 2's evaluation is the best
  rows = lambda b, score: {**b, "score": np.full(8, score, np.float32)}
  kwargs = fit_kwargs(
      tmp_path, eval_every=1, checkpoint_every=4, best_metric="score",
      train_batches=lambda start: iter([rows(batch(8, classes=4, seed=i), 0.0)
                                        for i in range(start, 10)]),
      eval_batches=lambda: [{**rows(batch(8, classes=4, seed=99), next(scores)),
                             "mask": np.ones(8, bool)}],
      eval_fn=lambda outputs, b: {"score": (b["score"] * b["mask"]).sum()})
  jtl.train.fit(num_steps=4, **kwargs)
  assert steps_on_disk(tmp_path) == [2, 4]  # keep=1: the last and the best
  best, meta = restore_variables(tmp_path, step="best")
  assert meta["step"] == 2 and meta["metrics"]["score"] == pytest.approx(0.9)
  at_2 = jtl.train.fit(num_steps=2, **{**kwargs, "workdir": None, "eval_batches": None})
  jax.tree.map(np.testing.assert_array_equal, best["params"],
               jax.device_get(at_2.state.params))


def test_a_loss_is_kept_at_its_lowest_and_damaged_metadata_falls_back(tmp_path):
  manager = CheckpointManager(tmp_path, save_every=1, keep=1, best_metric="loss",
                              async_save=False)
  for step, loss in ((1, 0.5), (2, 0.9), (3, 1.2)):
    manager.save(step, state_at(step), metrics={"loss": loss})
  manager.close()
  assert steps_on_disk(tmp_path) == [1, 3] and manager.best_mode == "min"
  assert restore_variables(tmp_path, step="best")[1]["step"] == 1
  # Damaged metadata of the newest step: the next one, not {} or Orbax's KeyError.
  sharding = tmp_path / "checkpoints" / "3" / "state" / "_sharding"
  sharding.write_bytes(sharding.read_bytes()[:-40] + b"x" * 40)
  variables, meta = restore_variables(tmp_path)
  assert meta["step"] == 1 and set(variables) >= {"params"}
  (tmp_path / "checkpoints" / "1" / "state" / "_METADATA").write_text('{"tree_metadata": 1}')
  with pytest.raises(CheckpointError):
    restore_variables(tmp_path)


def test_a_damaged_best_is_recorded_as_skipped_and_an_explicit_step_tries_no_next(tmp_path,
                                                                                caplog):
  from jtl.checkpoint import restore
  manager = CheckpointManager(tmp_path, save_every=1, keep=2, best_metric="accuracy",
                              async_save=False)
  for step, accuracy in ((2, 0.9), (4, 0.5)):
    manager.save(step, state_at(step), metrics={"accuracy": accuracy})
  manager.close()
  _, meta = restore_variables(tmp_path, step="best")
  assert restore.step_record(meta) == {"step": 2, "requested_step": "best",
                                       "skipped_damaged": []}
  assert restore.fallback_note(meta) is None
  metadata = tmp_path / "checkpoints" / "2" / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:100])  # truncate -s 100
  with caplog.at_level(logging.WARNING):
    _, meta = restore_variables(tmp_path, step="best")
  assert restore.step_record(meta) == {"step": 4, "requested_step": "best",
                                       "skipped_damaged": [2]}
  assert "step 2 cannot be read, trying step 4 (next best)" in caplog.text
  assert restore.fallback_note(meta) == (
      "The best checkpoint (step 2) is damaged: step 4, the next best, was used instead.")
  assert restore_variables(tmp_path, step="latest")[1]["skipped_damaged"] == []
  caplog.clear()
  with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="checkpoints/2"):
    restore_variables(tmp_path, step=2)
  assert "trying" not in caplog.text  # an explicit step: nothing else is tried


# Item 2: a diverging run stops, saves nothing non-finite, keeps the good ones.
def test_diverging_resume_stops_and_keeps_the_good_checkpoints(tmp_path):
  good = jtl.train.fit(num_steps=4, **fit_kwargs(tmp_path))
  assert np.isfinite(good.eval_metrics["loss"])
  before = steps_on_disk(tmp_path)
  best = CheckpointManager(tmp_path, best_metric="accuracy").best_step()
  with pytest.raises(DivergenceError, match=r"diverged at step 6: loss inf"):
    jtl.train.fit(num_steps=10, **fit_kwargs(tmp_path, learning_rate=1e38))
  assert steps_on_disk(tmp_path) == before
  assert CheckpointManager(tmp_path, best_metric="accuracy").best_step() == best
  variables, meta = restore_variables(tmp_path, step="best", metric="accuracy")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  assert not (tmp_path / LOCK_NAME).exists()


def test_diverging_first_run_saves_nothing(tmp_path):
  with pytest.raises(DivergenceError, match="Nothing was saved"):
    jtl.train.fit(num_steps=10, **fit_kwargs(tmp_path, learning_rate=1e38))
  assert steps_on_disk(tmp_path) == []


def test_skip_mode_skips_nonfinite_updates_and_counts_them(tmp_path):
  rows = []
  kwargs = fit_kwargs(tmp_path, learning_rate=1e38, on_nonfinite="skip",
                      on_log=lambda step, row: rows.append(row))
  result = jtl.train.fit(num_steps=4, **kwargs)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(result.state.params))
  assert rows[-1]["skipped_total"] >= 3  # step 1 may still be finite
  saved = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(r.get("skipped", 0) in (0.0, 1.0) for r in saved)


def test_manager_refuses_a_nonfinite_state_and_nonfinite_metrics_never_win(tmp_path):
  mngr = CheckpointManager(tmp_path, save_every=1, best_metric="accuracy", async_save=False)
  bad = state_at(1)
  bad = bad.replace(trainable=jax.tree.map(lambda x: x * np.nan, bad.trainable))
  with pytest.raises(CheckpointError, match="NaN or inf in\n  - params/"):
    mngr.save(1, bad, metrics={"accuracy": 0.5})
  mngr.save(2, state_at(2), metrics={"accuracy": 0.2})
  mngr.save(3, state_at(3), metrics={"accuracy": float("nan")})
  mngr.close()
  assert CheckpointManager(tmp_path, best_metric="accuracy").best_step() == 2
  meta = json.loads((tmp_path / "checkpoints" / "3" / "meta" / "metadata").read_text())
  assert meta["metrics"] == {"accuracy": None}


# Item 3: one run per workdir.
HOLDER = """
import sys, time
from jtl.checkpoint.lock import WorkdirLock
with WorkdirLock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(60)
"""


def _lock_module_env():
  return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def test_second_run_on_a_workdir_is_refused_naming_the_owner(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env=_lock_module_env())
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match=f"in use by another run: process {holder.pid} on "
                                              "this host"):
      jtl.train.fit(num_steps=2, **fit_kwargs(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  assert not (tmp_path / "checkpoints").exists() or steps_on_disk(tmp_path) == []


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  import socket
  (tmp_path / LOCK_NAME).write_text(json.dumps(
      {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}))
  with caplog.at_level(logging.WARNING):
    jtl.train.fit(num_steps=2, **fit_kwargs(tmp_path))
  assert "no longer running" in caplog.text
  assert steps_on_disk(tmp_path) == [2] and not (tmp_path / LOCK_NAME).exists()


def test_a_lock_of_another_container_is_refused_and_one_from_before_a_reboot_taken(tmp_path,
                                                                                  caplog,
                                                                                  monkeypatch):
  """Two containers with one host name (a fixed --hostname, hostNetwork) both
  held the lock: a pid of another PID namespace was checked in this one."""
  from jtl.checkpoint import lock
  # This machine as a machine with an id, a boot id and a PID namespace (a
  # container may have no /etc/machine-id): the rules, not the host, are tested.
  monkeypatch.setattr(lock, "_machine", lambda: {"machine_id": "m1", "boot_id": "b1",
                                                 "pid_namespace": 4026531836})
  mine = lock.WorkdirLock(tmp_path)._owner()
  path = tmp_path / LOCK_NAME
  # pid 1 with another start time reads as dead in this namespace: it may not
  # be. Written by a jtl without leases (none recorded): nothing expires it.
  other = {**mine, "pid": 1, "process_start": "1", "pid_namespace": mine["pid_namespace"] + 1}
  del other["lease_s"]
  path.write_text(json.dumps(other))
  with pytest.raises(CheckpointError, match="process 1 on this host name, in another "
                                            "container or machine"):
    lock.WorkdirLock(tmp_path).acquire()
  # Another machine of the same host name (its own machine id) may be alive.
  path.write_text(json.dumps({**other, "boot_id": "its-boot", "machine_id": "another"}))
  with pytest.raises(CheckpointError, match="process 1 on this host name, in another"):
    lock.WorkdirLock(tmp_path).acquire()
  path.write_text(json.dumps({**other, "boot_id": "an-earlier-boot"}))  # this machine, rebooted
  with caplog.at_level(logging.WARNING), lock.WorkdirLock(tmp_path):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert "the machine has booted since" in caplog.text


def test_a_lock_not_renewed_within_its_lease_is_taken_over_from_anywhere(tmp_path, caplog,
                                                                        monkeypatch):
  """A preempted VM's run (another host, or a restarted container: no pid to
  check) left its lock: it is free once its holder has not renewed it for
  its lease, with no one deleting it by hand; one renewed meanwhile is a
  live run's, and refused."""
  from jtl.checkpoint import lock
  monkeypatch.setattr(lock, "POLL_S", 0.01)
  path = tmp_path / LOCK_NAME
  # Its holder renewed every 0.01 s: this run watches it for two of those.
  gone = {"pid": 7, "host": "preempted-vm", "since": "earlier", "lease_s": 60.0, "renew_s": 0.01}
  path.write_text(json.dumps(gone))
  old = time.time() - 61
  os.utime(path, (old, old))
  with caplog.at_level(logging.WARNING), lock.WorkdirLock(tmp_path):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  # Written 61 s before now: the lease's 60 s are past, however long this took.
  assert re.search(r"preempted-vm: it was not renewed for \d+ s \(its lease\)", caplog.text)
  # A live holder renewing it, fresh or (this clock ahead of the holder's)
  # seemingly long past its lease: refused either way, on seeing a renewal
  # within two of its renewal periods (5 s) on this clock.
  for written in (time.time(), time.time() - 1000):
    path.write_text(json.dumps({**gone, "renew_s": 5.0}))
    os.utime(path, (written, written))
    stop = threading.Event()

    def holder_renews():
      while not stop.wait(0.02):
        os.utime(path)
    renewer = threading.Thread(target=holder_renews)
    renewer.start()
    try:
      with pytest.raises(CheckpointError, match="process 7 on host 'preempted-vm', since "
                                                r"earlier \(it renewed the lock within its lease"):
        lock.WorkdirLock(tmp_path).acquire()
    finally:
      stop.set()
      renewer.join()
    assert json.loads(path.read_text())["renew_s"] == 5.0  # theirs, kept


def test_two_runs_taking_over_one_stale_lock_remove_it_once(tmp_path, monkeypatch):
  """Waiters on one lease wake together: B checks the stale lock, A removes
  it and creates its own, then B's removal must not take A's new lock."""
  from jtl.checkpoint import lock_files
  path = tmp_path / LOCK_NAME
  path.write_text("stale")
  checked, resume = threading.Event(), threading.Event()
  local_file = lock_files.LocalFile
  read = local_file.read

  def read_then_pause_in_b(self):
    got = read(self)
    if threading.current_thread().name == "B":
      checked.set()
      resume.wait(30)
    return got
  monkeypatch.setattr(local_file, "read", read_then_pause_in_b)
  stale = local_file(path)
  b = threading.Thread(target=stale.remove, args=(b"stale",), name="B")
  b.start()
  assert checked.wait(30)
  a = threading.Thread(name="A", target=lambda: (stale.remove(b"stale"), stale.create(b"A's")))
  a.start()
  a.join(0.3)  # without the takeover guard A removes and creates here, before B goes on
  resume.set()
  b.join(30)
  a.join(30)
  assert path.read_bytes() == b"A's"


def test_the_holder_renews_its_lock_until_it_releases_it(tmp_path, monkeypatch):
  from jtl.checkpoint import lock
  path = tmp_path / LOCK_NAME
  held = lock.WorkdirLock(tmp_path)
  with held:
    old = time.time() - 1000
    os.utime(path, (old, old))
    assert held.renew() and path.stat().st_mtime > old + 900
    assert held._renewer.is_alive()  # pylint: disable=protected-access
    path.write_text(json.dumps({"pid": 4242, "host": "other-vm", "lease_s": 60.0}))
    assert not held.renew()  # another run's lock now: not renewed, and the run stops
    with pytest.raises(CheckpointError, match="no longer holds the lock"):
      held.verify()
  assert held._renewer is None  # pylint: disable=protected-access
  path.unlink()
  monkeypatch.setattr(lock, "RENEW_S", 0.01)  # the thread renews on its own
  with lock.WorkdirLock(tmp_path) as held:
    os.utime(path, (old, old))
    deadline = time.monotonic() + 60
    while path.stat().st_mtime < old + 900 and time.monotonic() < deadline:
      time.sleep(0.01)
    assert path.stat().st_mtime > old + 900
  assert not path.exists()


@pytest.fixture
def fit_locks(monkeypatch):
  """The WorkdirLocks that `fit` takes, in order."""
  from jtl import fit_io
  from jtl.checkpoint import lock
  locks = []

  class Recorded(lock.WorkdirLock):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      locks.append(self)
  monkeypatch.setattr(fit_io, "WorkdirLock", Recorded)
  return locks


def test_a_lock_the_renewals_find_lost_stops_the_run_before_it_writes_again(tmp_path,
                                                                            fit_locks):
  """The renewer finds the lock another run's (its lease ran out while
  renewals failed): the run stops at its next log line, not at its next
  save, so it writes no metrics into the workdir the other run now owns."""
  locks = fit_locks

  def taken_over_at_3(step, row):
    if step == 3:
      (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "other-vm"}))
      assert not locks[0].renew()  # what the renewer thread finds at its next renewal

  with pytest.raises(CheckpointError, match=r"no longer holds the lock .* held by process 4242"):
    jtl.train.fit(num_steps=8, **fit_kwargs(tmp_path, on_log=taken_over_at_3,
                                            checkpoint_every=100))
  logged = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(logged) == 3


def test_a_run_that_reads_no_batch_for_an_hour_stops_renewing_until_it_reads_again(tmp_path,
                                                                                   caplog):
  from jtl.checkpoint import lock
  path = tmp_path / LOCK_NAME
  heartbeat = lock.Heartbeat()
  with lock.WorkdirLock(tmp_path, heartbeat=heartbeat) as held:
    assert json.loads(path.read_text())["stall_s"] == lock.STALL_S
    old = time.time() - 1000
    heartbeat.last -= lock.STALL_S + 1  # hung since an hour: a dead peer, a stuck pipeline
    for _ in range(3):
      os.utime(path, (old, old))
      with caplog.at_level(logging.WARNING, logger=lock.__name__):
        assert held.renew_unless_stalled()  # renewals go on, but skip the lock
      assert path.stat().st_mtime == old  # left to lapse: another run may take it over
    assert caplog.text.count("read no batch for") == 1  # warned once per stall
    next(heartbeat.each_batch(lambda: iter([{"x": 1}]))())  # the run goes on
    assert held.renew_unless_stalled() and path.stat().st_mtime > old + 900


def test_fit_beats_its_locks_heartbeat_at_each_batch_read(tmp_path, fit_locks):
  from jtl.checkpoint import lock
  locks = fit_locks
  idle = []

  def stall(step, row):  # as if each step had hung for an hour
    idle.append(locks[0].heartbeat.idle())
    locks[0].heartbeat.last -= lock.STALL_S
  jtl.train.fit(num_steps=4, **fit_kwargs(tmp_path, on_log=stall, eval_every=100))
  # Steps 1-3 read the next step's batch after the last stall (the train batches
  # beat; the last step reads none); the evaluation after the last log line
  # read its batches (they beat too).
  assert len(idle) == 4 and max(idle[:3]) < lock.STALL_S / 2 < idle[3], idle
  assert locks[0].heartbeat.idle() < lock.STALL_S / 2


def test_a_cached_probes_feature_extraction_beats_the_heartbeat_at_each_batch_read(tmp_path,
                                                                                   fit_locks):
  """The backbone pass of a cached linear probe reads the whole training split
  (hours on a big one): each of its batch reads beats, as a step's does."""
  from jtl.checkpoint import lock
  from jtl.recipes.strategies import features
  locks = fit_locks
  idle = []

  def train_pass():  # as if each batch had taken an hour to read
    for seed in range(4):
      idle.append(locks[0].heartbeat.idle())
      locks[0].heartbeat.last -= lock.STALL_S
      yield batch(8, classes=4, seed=seed)
  features.fit_cached_probe(**cached_probe_kwargs(
      train_pass=train_pass(), num_steps=3, batch_size=8, workdir=tmp_path))
  # Each batch read after the first finds the beat of the one before it.
  assert len(idle) == 4 and max(idle[1:]) < lock.STALL_S / 2, idle
  assert locks[0].heartbeat.idle() < lock.STALL_S / 2


def test_a_run_that_cannot_renew_its_lock_stops_before_training(tmp_path, monkeypatch):
  from jtl.checkpoint import lock_files

  def forbidden(self, version):
    raise PermissionError("403 Forbidden: storage.objects.update")
  monkeypatch.setattr(lock_files.LocalFile, "renew", forbidden)
  with pytest.raises(CheckpointError, match=r"cannot renew it \(PermissionError: 403 Forbidden"):
    jtl.train.fit(num_steps=2, **fit_kwargs(tmp_path))
  assert not (tmp_path / LOCK_NAME).exists()  # taken, then given back
  assert not (tmp_path / "checkpoints").exists() or steps_on_disk(tmp_path) == []


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_save(tmp_path):
  def take_over_at_3(step, row):
    if step == 3:  # another run's lock replaces this one's (deleted, then taken)
      (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "other-vm"}))

  with pytest.raises(CheckpointError, match=r"no longer holds the lock .* held by process 4242 "
                                            r"on 'other-vm'.* stops without saving"):
    jtl.train.fit(num_steps=6, **fit_kwargs(tmp_path, on_log=take_over_at_3))
  assert steps_on_disk(tmp_path) == [2]  # nothing written after the lock was lost
  assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 4242  # theirs, kept


@pytest.mark.parametrize("content", [b"", b"{\"pid\": 12", b"\x00\xff garbage", b"[1, 2]",
                                     b'{"pid": "x", "host": null}', b'{"pid": 0, "host": "h"}'])
def test_damaged_lock_file_is_called_damaged_and_taken_over_once_old(tmp_path, caplog, content):
  """An empty or garbled jtl.lock (jtl writes it whole, so no run is writing
  it) used to read as 'process None on host None' and block every re-run:
  now a fresh one is an error saying it is damaged and how to clear it, and
  one older than DAMAGED_LOCK_AGE_S is taken over with a warning."""
  from jtl.checkpoint import lock
  path = tmp_path / LOCK_NAME
  path.write_bytes(content)
  with pytest.raises(CheckpointError, match=rf"The lock file {path} is damaged .* delete it "
                                            rf"now \(rm {path}\) and run again"):
    lock.WorkdirLock(tmp_path).acquire()
  old = path.stat().st_mtime - lock.DAMAGED_LOCK_AGE_S - 1
  os.utime(path, (old, old))
  with caplog.at_level(logging.WARNING), lock.WorkdirLock(tmp_path):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert "Taking over the damaged lock file" in caplog.text and not path.exists()


def test_fit_refuses_log_every_0_before_any_step(tmp_path):
  """fit (the Python API) as the config: log_every=0 was a ZeroDivisionError at step 1."""
  from jtl.errors import ConfigError
  with pytest.raises(ConfigError, match=r"log_every must be an integer >= 1 .* got 0"):
    jtl.train.fit(num_steps=2, **fit_kwargs(tmp_path, log_every=0))
  assert not (tmp_path / "checkpoints").exists()


# Item 4: an error inside the loop closes the manager; the in-flight save completes.
def test_error_in_the_loop_finishes_the_pending_save_and_raises_the_real_error(tmp_path):
  def broken(start):
    for i in range(start, 3):
      yield batch(8, classes=4, seed=i)
    raise DataError("truncated.jpg cannot be decoded")

  kwargs = fit_kwargs(tmp_path, async_checkpoints=True, train_batches=broken)
  with pytest.raises(DataError, match="truncated.jpg"):
    jtl.train.fit(num_steps=10, **kwargs)
  assert steps_on_disk(tmp_path) == [2]
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
  assert not (tmp_path / LOCK_NAME).exists()
  resumed = jtl.train.fit(num_steps=4, **fit_kwargs(tmp_path))
  assert resumed.start_step == 2


# Item 11: resume falls back past a damaged checkpoint, with a warning naming it.
def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, caplog):
  jtl.train.fit(num_steps=4, **fit_kwargs(tmp_path, keep=2))
  assert steps_on_disk(tmp_path) == [2, 4]
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:7])  # truncated array data
  variables, meta = restore_variables(tmp_path)  # evaluate.py's path
  assert meta["step"] == 2
  with caplog.at_level(logging.WARNING):
    resumed = jtl.train.fit(num_steps=6, **fit_kwargs(tmp_path, keep=2))
  assert resumed.start_step == 2
  assert "/checkpoints/4" in caplog.text
  assert (tmp_path / "checkpoints" / "4.damaged").is_dir()
  assert steps_on_disk(tmp_path)[-2:] == [4, 6]  # the 4 written by the resumed run


def test_a_bit_flipped_in_stored_array_data_is_found_and_the_step_skipped(tmp_path, caplog):
  """Orbax keeps no checksum: a flipped bit inside a chunk (zstd stores
  incompressible float data raw) restored silently, other weights than saved."""
  jtl.train.fit(num_steps=4, **fit_kwargs(tmp_path, keep=2))
  chunks = [f for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*")
            if f.is_file() and f.parent.name == "d"]
  biggest = max(chunks, key=lambda f: f.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x10  # one bit
  biggest.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=r"checkpoints/4: the data of 1 array\(s\) differ "
                                            r"from what was saved .*\n  - params/body/kernel"):
    restore_variables(tmp_path, step=4)
  with caplog.at_level(logging.WARNING):
    _, meta = restore_variables(tmp_path)  # "latest": the step before it
    assert meta["step"] == 2
    resumed = jtl.train.fit(num_steps=6, **fit_kwargs(tmp_path, keep=2))
  assert resumed.start_step == 2 and (tmp_path / "checkpoints" / "4.damaged").is_dir()


def test_stray_step_folder_is_skipped(tmp_path, caplog):
  jtl.train.fit(num_steps=2, **fit_kwargs(tmp_path))
  (tmp_path / "checkpoints" / "50").mkdir()
  (tmp_path / "checkpoints" / "50" / "junk").write_text("x")
  assert CheckpointManager(tmp_path).latest_step() == 2
  _, meta = restore_variables(tmp_path)
  assert meta["step"] == 2
  with caplog.at_level(logging.WARNING):
    resumed = jtl.train.fit(num_steps=4, **fit_kwargs(tmp_path))
  assert resumed.start_step == 2 and "checkpoints/50" in caplog.text


def test_a_checkpoint_that_fits_nothing_is_still_a_clear_error(tmp_path):
  jtl.train.fit(num_steps=2, **fit_kwargs(tmp_path))
  other = fit_kwargs(tmp_path)
  wider = init(MLP(num_classes=4), batch(8, size=4, classes=4)["inputs"])
  labels = jtl.label_params(wider["params"], [(".*", "all")])
  other.update(variables=wider, labels=labels,
               tx=jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd"))
  with pytest.raises(CheckpointError, match="does not fit"):
    jtl.train.fit(num_steps=4, **other)
  assert steps_on_disk(tmp_path) == [2]


# Item 12: full disk, metrics.jsonl on resume, NaN in JSON.
def test_full_disk_names_the_workdir_and_the_intact_checkpoint(tmp_path, monkeypatch):
  mngr = CheckpointManager(tmp_path, save_every=1, async_save=False)
  mngr.save(1, state_at(1))

  def full(*args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: write failed: No space left on device")

  monkeypatch.setattr(mngr._manager, "save", full)
  with pytest.raises(CheckpointError, match=r"disk is full. The last complete checkpoint, "
                                            r"step 1, is intact"):
    mngr.save(2, state_at(2))
  mngr.close()


def test_resumed_run_writes_each_step_once_and_nan_as_null(tmp_path):
  jtl.train.fit(num_steps=3, **fit_kwargs(tmp_path))  # checkpoint at 2, rows for 1..3
  jtl.train.fit(num_steps=4, **fit_kwargs(tmp_path))  # resumes at 2
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == [1, 2, 3, 4]
  writer = MetricWriter(tmp_path / "w", tensorboard=False)
  writer.write(1, "train", {"loss": float("nan"), "accuracy": 0.5})
  line = (tmp_path / "w" / "metrics.jsonl").read_text()
  assert json.loads(line)["loss"] is None and "NaN" not in line
