"""The job files that tests start as real processes (tests/*_job.py), and
what starting them needs: a free port, the resume job's command."""

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
RESUME_JOB = TESTS / "resume_job.py"
MULTIHOST_JOB = TESTS / "multihost_job.py"
GCS_FINETUNE_JOB = TESTS / "gcs_finetune_job.py"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def resume_env(tmp_path):
  """The environment of a resume job: its own XLA compilation cache in tmp_path."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")}


def start_resume_job(workdir, out, seconds_per_step="0"):
  """Starts tests/resume_job.py training into `workdir`; returns the Popen."""
  return subprocess.Popen(
      [sys.executable, str(RESUME_JOB), str(workdir), str(out), seconds_per_step],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=resume_env(Path(workdir).parent))
