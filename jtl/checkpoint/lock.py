"""One run per workdir: a lock file naming the process that owns it.

Two runs writing checkpoints into one workdir mix their steps and crash on each
other's files, so a run takes `<workdir>/jtl.lock` before its first save and
removes it when it ends. The file is created atomically with its content (a
hard link of a complete temporary file), so a reader never sees it half
written. A lock whose process has died on this host is taken over with a
warning; one held on another host cannot be checked from here and is reported.
On multi-host runs only process 0 takes the lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from jtl.errors import CheckpointError

log = logging.getLogger(__name__)
LOCK_NAME = "jtl.lock"


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (tells a reused PID apart), if known."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(owner: dict[str, Any]) -> bool:
  pid = owner.get("pid", -1)
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by another user
  started = owner.get("process_start")
  return started is None or _process_start(pid) in (None, started)


def _read_owner(path: Path) -> dict[str, Any] | None:
  """The lock's owner ({} when the file is damaged), None when there is none."""
  try:
    owner = json.loads(path.read_bytes())
  except FileNotFoundError:
    return None
  except (OSError, ValueError, RecursionError):
    return {}
  return owner if _is_owner(owner) else {}


def _is_owner(owner: Any) -> bool:
  """Whether `owner` is what `WorkdirLock` writes: a positive pid and a host."""
  pid = owner.get("pid") if isinstance(owner, dict) else None
  return (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
          and isinstance(owner.get("host"), str) and bool(owner["host"]))


# A damaged lock (empty, not JSON, no pid/host) was not written by a jtl run:
# they write it whole, atomically. One older than this has no writer still at
# work on it, and is taken over; a younger one may be some other tool's.
DAMAGED_LOCK_AGE_S = 60.0


def _damaged_lock(path: Path) -> bool:
  """True (after a warning) when the damaged lock at `path` may be taken over;
  else a CheckpointError saying how to clear it."""
  try:
    age = time.time() - path.stat().st_mtime
    head = path.read_bytes()[:60]
  except FileNotFoundError:
    return True
  except OSError as e:
    age, head = 0.0, f"unreadable: {e}".encode()
  what = "empty" if not head else f"starts {head!r}"
  if age >= DAMAGED_LOCK_AGE_S:
    log.warning("Taking over the damaged lock file %s (%s, %.0f s old): it names no process, "
                "and jtl runs write their lock whole.", path, what, age)
    return True
  raise CheckpointError(
      f"The lock file {path} is damaged ({what}; jtl writes a JSON object with the owner's "
      f"pid and host) and only {age:.0f} s old. jtl takes a damaged lock over once it is "
      f"{DAMAGED_LOCK_AGE_S:.0f} s old; if no other run uses this workdir, delete it now "
      f"(rm {path}) and run again.")


class WorkdirLock:
  """Context manager holding `<workdir>/jtl.lock` for this process.

  Example:
    with WorkdirLock(workdir):
      ...  # train and checkpoint; a second run on `workdir` gets a CheckpointError
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.path = Path(workdir).absolute() / LOCK_NAME
    self.enabled = enabled
    self.held = False

  def _owner(self) -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "process_start": _process_start(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

  def acquire(self) -> None:
    if not self.enabled or self.held:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    mine = self._owner()
    tmp = self.path.with_name(f".{LOCK_NAME}.{mine['pid']}.tmp")
    tmp.write_text(json.dumps(mine))
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)
          self.held = True
          return
        except FileExistsError:
          self._take_over_if_stale(mine)
      raise CheckpointError(f"Could not take the lock {self.path}; try again.")
    finally:
      tmp.unlink(missing_ok=True)

  def _take_over_if_stale(self, mine: dict[str, Any]) -> None:
    owner = _read_owner(self.path)
    if owner is None:  # released meanwhile
      return
    if not owner:
      if _damaged_lock(self.path) and _read_owner(self.path) == {}:
        self.path.unlink(missing_ok=True)
      return
    same_host = owner.get("host") == mine["host"]
    if same_host and (owner.get("pid") == mine["pid"] or not _alive(owner)):
      log.warning("Taking over the lock %s of process %s on %s, which is no longer running.",
                  self.path, owner.get("pid"), owner.get("host"))
      if _read_owner(self.path) == owner:
        self.path.unlink(missing_ok=True)
      return
    where = "this host" if same_host else f"host {owner.get('host')!r}"
    raise CheckpointError(
        f"Workdir {self.path.parent} is in use by another run: process {owner.get('pid')} on "
        f"{where}, since {owner.get('since')} (lock file {self.path}). One run owns a "
        "workdir: wait for that run to finish or stop it, or pass another --workdir. "
        f"If that process is gone (e.g. its host was preempted), delete {self.path}.")

  def release(self) -> None:
    if self.held:
      if (_read_owner(self.path) or {}).get("pid") == os.getpid():
        self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()
