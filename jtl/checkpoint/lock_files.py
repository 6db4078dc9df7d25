"""Where a workdir's lock is stored: a file on a local disk (`LocalFile`) or
an object in a bucket (`BucketObject`). Both are created only if absent,
atomically with their content; read with a version (the content, or the
object's generation); renewed (the mtime, or a metadata update) and removed
only in the version that was read. `jtl.checkpoint.lock` decides who holds
the lock; this module only stores it.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from jtl import paths
from jtl.errors import CheckpointError

try:
  import fcntl  # POSIX; on Windows a takeover's check and removal are not serialised
except ImportError:  # pragma: no cover
  fcntl = None

RENEWED_KEY = "jtl-renewed"  # a bucket lock's metadata: when its holder last renewed it


class LocalFile:
  """The lock as a file on a local disk (created by a hard link)."""

  def __init__(self, path: Path):
    self.path = path

  def create(self, content: bytes) -> bool:
    """Creates the file holding `content` if there is none; whether it did."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      tmp.unlink(missing_ok=True)

  def read(self) -> tuple[bytes | None, Any]:
    """(content, version): (None, None) when absent; the version is the content."""
    try:
      content = self.path.read_bytes()
    except FileNotFoundError:
      return None, None
    except OSError as e:
      raise CheckpointError(f"Cannot read the lock file {self.path} ({e}).") from e
    return content, content

  def stamp(self) -> tuple[float, Any]:
    """(when the file was last written or renewed, in seconds since the epoch;
    a token that any renewal or rewrite changes: the mtime in ns)."""
    stat = self.path.stat()
    return stat.st_mtime, stat.st_mtime_ns

  def age(self) -> float:
    """Seconds since the file was written or renewed."""
    return time.time() - self.stamp()[0]

  def renew(self, version: Any) -> bool:
    """Marks the file renewed now if it is still `version`; whether it was."""
    if self.read()[1] != version:
      return False
    try:
      os.utime(self.path)
    except FileNotFoundError:
      return False
    return True

  def remove(self, version: Any, token: Any = None, *, takeover: bool = True) -> None:
    """Removes the file if it is still the `version` that was read (and, with
    `token`, not renewed since). In a takeover the check and the removal hold
    an flock on a sidecar file (`.jtl.lock.takeover`, left in place: removing
    it would let two runs lock two files), so two runs taking over one stale
    lock at once cannot both remove it: the second would remove the first's
    new lock."""
    if not takeover:  # the holder's own release
      if self.read()[1] == version:
        self.path.unlink(missing_ok=True)
      return
    guard = self.path.with_name(f".{self.path.name}.takeover")
    with open(guard, "a") as f:
      if fcntl is not None:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
      try:
        still = self.read()[1] == version and (token is None or self.stamp()[1] == token)
      except FileNotFoundError:
        still = False
      if still:
        self.path.unlink(missing_ok=True)


class BucketObject:
  """The lock as an object in a bucket, through gcsfs (the GCS JSON API, or
  the server that `STORAGE_EMULATOR_HOST` names)."""

  def __init__(self, url: str):
    self.path = paths.path(url)
    self.fs = paths.gcs_filesystem()
    self.bucket, self.key = url.split("://", 1)[1].split("/", 1)

  def create(self, content: bytes) -> bool:
    try:
      # gcsfs sends mode="create" as ifGenerationMatch=0: the server refuses
      # (412, FileExistsError) when the object exists, atomically.
      self.fs.pipe_file(f"{self.bucket}/{self.key}", content, mode="create")
      return True
    except FileExistsError:
      return False

  def read(self) -> tuple[bytes | None, Any]:
    """(content, generation) of one read; (None, None) when absent."""
    try:
      headers, content = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
    except FileNotFoundError:
      return None, None
    return content, headers.get("x-goog-generation")

  def stamp(self) -> tuple[float, Any]:
    """(when the object was written, by the server's clock, or last renewed,
    by the holder's in its metadata: GCS emulators leave `updated` as it was;
    (generation, metageneration, renewal mark), which any renewal or rewrite
    changes), read from the server: gcsfs's listings cache may hold older ones."""
    info = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
    written = datetime.fromisoformat(info["updated"].replace("Z", "+00:00")).timestamp()
    mark = (info.get("metadata") or {}).get(RENEWED_KEY)
    try:
      renewed = float(mark or 0.0)
    except ValueError:
      renewed = 0.0
    return max(written, renewed), (info.get("generation"), info.get("metageneration"), mark)

  def age(self) -> float:
    """Seconds since the object was written or renewed."""
    return time.time() - self.stamp()[0]

  def renew(self, version: Any) -> bool:
    """Marks the object renewed now (a metadata update: atomic with the
    generation's check) if it is still at generation `version`; whether it was."""
    try:
      self.fs.call("PATCH", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version,
                   json={"metadata": {RENEWED_KEY: f"{time.time():.3f}"}})
    except (FileNotFoundError, FileExistsError):  # gone, or replaced (412): not ours
      return False
    return True

  def remove(self, version: Any, token: Any = None, *, takeover: bool = True) -> None:
    """Deletes the object if it is still at generation `version` (and, with
    `token`, at its metageneration: not renewed since), atomically."""
    del takeover  # the server's preconditions guard every deletion
    conditions = {"ifGenerationMatch": version} if version else {}
    if token is not None and token[1] is not None:
      conditions["ifMetagenerationMatch"] = token[1]
    try:
      self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, **conditions)
    except (FileNotFoundError, FileExistsError):  # gone, or replaced (412): not ours
      pass
