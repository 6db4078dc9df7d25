"""One path abstraction for every file of a run: a local folder or a bucket.

A workdir is a path, not a local folder: checkpoints, the lock, metrics,
TensorBoard events, plots, reports, evaluation results and exports all go
through `etils.epath` (arrays through Orbax/tensorstore), so `gs://bucket/run`
works as `runs/x` does. Writers that want a local file (matplotlib, the ONNX
and LiteRT converters) write into memory first; nothing is written outside
the workdir.

`gs://` goes through gcsfs (the GCS JSON API), for the files jtl writes and
for the ones Orbax writes through epath (`EPATH_USE_TF=false`, unless set
otherwise: TensorFlow's gfile ignores emulators). The standard variables
are honoured, so any GCS-API server can stand in for the bucket:
`STORAGE_EMULATOR_HOST` (gcsfs, anonymous there) and
`TENSORSTORE_GCS_HTTP_URL` (Orbax's arrays; set from the former when unset,
so the files and the arrays never go to different servers). gcsfs is the
"gcs" extra (`pip install 'jtl[gcs]'`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import socket
import tempfile
import urllib.parse
from typing import Any

from etils import epath

from jtl import _optional
from jtl.errors import CheckpointError

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for a URL (`gs://...`), False for a local path.

  >>> is_remote("gs://bkt/run"), is_remote("runs/x")
  (True, False)
  """
  return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path` (local or `gs://`), with the bucket backend set up."""
  if is_remote(p):
    setup_gcs()
  return p if isinstance(p, epath.Path) else epath.Path(p)


# Seconds a GCS request may wait to connect, and then for each read.
GCS_CONNECT_TIMEOUT_S = 30.0
GCS_READ_TIMEOUT_S = 120.0


@functools.lru_cache(maxsize=None)
def setup_gcs() -> None:
  """Points epath's `gs://` at gcsfs (plain JSON API client) and the array
  store at the same server as the files; once per process."""
  os.environ.setdefault("EPATH_USE_TF", "false")
  # epath decides once per process, at its first path (local ones too),
  # whether gs:// goes through TensorFlow: forget that decision, so a process
  # that made local paths before its first bucket path uses gcsfs as well.
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  if hasattr(gpath, "_is_tf_installed"):
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  import fsspec  # pylint: disable=g-import-not-at-top  (etils[epath] brings it)
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  endpoint = fsspec.config.conf.get("gcs", {}).get("endpoint_url") or emulator
  if endpoint:  # FSSPEC_GCS_ENDPOINT_URL (Private Service Connect, say) or an emulator
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", endpoint)
  gcsfs_core = _optional.require("gcsfs.core", "gs:// paths (jtl.paths)")
  # gcsfs's default class first asks a gRPC control API for the bucket type,
  # a call GCS-API servers other than Google's time out on (60 s per call);
  # the plain class is the JSON API alone.
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs_core.GCSFileSystem, clobber=True)
  options = fsspec.config.conf.setdefault("gcs", {})
  # Another process may change the bucket (the lock, a resumed run): no stale listings.
  options.setdefault("use_listings_cache", False)
  # A request the server never answers: gcsfs waited forever (a run hung at its
  # last save, SIGTERM or not). Per socket read, so a long upload is no timeout;
  # gcsfs retries a timed-out request.
  import aiohttp  # pylint: disable=g-import-not-at-top  (gcsfs brings it)
  options.setdefault("requests_timeout", aiohttp.ClientTimeout(
      total=None, sock_connect=GCS_CONNECT_TIMEOUT_S, sock_read=GCS_READ_TIMEOUT_S))
  if emulator:
    options.setdefault("token", "anon")
  # gcsfs logs each failed request with its traceback (after its retries); the
  # error that follows says it in one message.
  gcsfs_log = logging.getLogger("gcsfs")
  if not any(isinstance(f, _OneLine) for f in gcsfs_log.filters):
    gcsfs_log.addFilter(_OneLine())


class _OneLine(logging.Filter):
  """Keeps a log record's message, drops its traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


# A name that does not resolve is no passing outage: gcsfs retried it for
# about 50 s before failing (EAI_AGAIN, a resolver's passing failure, is left to it).
_NOT_RESOLVED = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def check_reachable(p: PathLike) -> None:
  """Raises a CheckpointError naming `p` and what to check (network, DNS,
  credentials, STORAGE_EMULATOR_HOST) when the bucket of a `gs://` path
  cannot be reached; once per path and server in a process. Local paths
  pass.

  >>> check_reachable("runs/x")  # local: nothing to check
  """
  if not is_remote(p):
    return
  url, endpoint = os.fspath(p), _endpoint()
  try:
    _reach(url.split("://", 1)[1].rstrip("/"), endpoint)
  except CheckpointError:
    raise
  except Exception as e:  # aiohttp's, google.auth's, gcsfs's and the OS's own error classes
    raise CheckpointError(unreachable_message(url, e, endpoint)) from e


def _endpoint() -> str:
  """The GCS-API server gcsfs will use: fsspec's `gcs.endpoint_url` setting
  (FSSPEC_GCS_ENDPOINT_URL: a Private Service Connect endpoint, say), else
  STORAGE_EMULATOR_HOST, else storage.googleapis.com."""
  setup_gcs()
  import fsspec  # pylint: disable=g-import-not-at-top
  configured = fsspec.config.conf.get("gcs", {}).get("endpoint_url")
  if configured:
    return configured
  location = getattr(_optional.require("gcsfs.core", "gs:// paths (jtl.paths)"), "_location",
                     None)
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  return location() if location else (
      emulator if emulator and "://" in emulator else
      f"http://{emulator}" if emulator else "https://storage.googleapis.com")


@functools.lru_cache(maxsize=None)
def _reach(target: str, endpoint: str) -> None:
  """One request for `target` (bucket/path: the workdir, which needs no
  bucket-level permission) at `endpoint`, raising what it meets; cached per
  path and server once it succeeds."""
  # The name first: making the filesystem probes for credentials (~17 s without a network).
  server = urllib.parse.urlsplit(endpoint)
  try:
    if not _behind_proxy():  # a proxy resolves the name, not this machine
      socket.getaddrinfo(server.hostname, server.port or 443)
  except socket.gaierror as e:
    if e.errno in _NOT_RESOLVED:
      raise socket.gaierror(e.errno, f"the name {server.hostname} does not resolve "
                            f"({e.strerror})") from e
  gcs_filesystem().exists(target)


def _behind_proxy() -> bool:
  return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def unreachable_message(url: str, error: BaseException, endpoint: str) -> str:
  """What a bucket URL that cannot be reached at `endpoint` needs checked."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  server = (f"the GCS-API server STORAGE_EMULATOR_HOST={emulator} (is it running? unset the "
            "variable for Google Cloud Storage)" if emulator and emulator in endpoint else
            urllib.parse.urlsplit(endpoint).hostname)
  return (f"Cannot reach {url} ({type(error).__name__}: {str(error)[:300]}). Check the "
          f"network and DNS ({server} must be reachable from this machine) and the "
          "credentials: `gcloud auth application-default login`, or "
          "GOOGLE_APPLICATION_CREDENTIALS=<a service account key .json> with access to the "
          "bucket.")


def gcs_filesystem() -> Any:
  """The gcsfs filesystem that epath uses for `gs://` (after `setup_gcs`)."""
  setup_gcs()
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem("gs")


def write_atomic(dest: PathLike, data: bytes) -> None:
  """Writes `data` so that a reader sees the old file or the new one, never a
  part: locally a temporary file in the same folder and a rename; in a bucket
  one upload (an object appears whole). The folder is created if needed.

  Raises:
    OSError: the destination cannot be written.
  """
  dest = path(dest)
  if is_remote(dest):
    dest.write_bytes(data)
    return
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=os.fspath(dest.parent), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from other users
    os.replace(tmp_name, os.fspath(dest))
  finally:
    if os.path.exists(tmp_name):
      os.remove(tmp_name)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
  """The process's umask: from /proc (Linux), else read by setting it and
  setting it back (once: other threads may create files meanwhile)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def append_text(dest: PathLike, text: str, *, whole: str) -> None:
  """Appends `text` to a log file whose complete new content is `whole`:
  locally an append, in a bucket (no appends there) one upload of `whole`."""
  dest = path(dest)
  if is_remote(dest):
    dest.write_text(whole)
    return
  with open(os.fspath(dest), "a", encoding="utf-8") as f:
    f.write(text)


def save_figure(fig: Any, dest: PathLike, *, dpi: int = 100) -> epath.Path:
  """A matplotlib figure as PNG at `dest`, drawn in memory (no local file)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  write_atomic(dest, buffer.getvalue())
  return path(dest)


def size(p: PathLike) -> int:
  """The file's size in bytes."""
  p = path(p)
  return p.stat().length if is_remote(p) else os.path.getsize(os.fspath(p))
