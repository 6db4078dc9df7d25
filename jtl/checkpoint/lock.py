"""One run per workdir: a lock file naming the process that owns it.

Two runs writing checkpoints into one workdir mix their steps and crash on each
other's files, so a run takes `<workdir>/jtl.lock` before its first save and
removes it when it ends. The file is created only if absent, atomically with
its content, so a reader never sees it half written: on a local disk as a
hard link of a complete temporary file; in a bucket (`gs://`, no links there)
as one upload with the precondition "no object of that name exists"
(`ifGenerationMatch=0`, refused with 412 otherwise). Removing a lock (at the
end, or taking over a stale one) removes only the version that was read:
locally if its content is still the same, in a bucket with the precondition
`ifGenerationMatch=<that generation>`. A lock whose process has died on this
machine is taken over with a warning, as is one written before this machine
last booted; one held on another host, or in another container (another PID
namespace) of this machine, cannot be checked from here: its lease decides.
The holder renews the lock every `RENEW_S` (the file's modification time, in
a bucket the object's, with `ifGenerationMatch` on its generation), and one
not renewed for its `lease_s` (`LEASE_S`) has no live run behind it: a VM
deleted after a preemption, a container restarted. A new run waits until
such a lock is either renewed (a live run: refused) or past its lease (taken
over), so a preempted run's workdir is free again within `LEASE_S`, with no
one deleting its lock by hand. The lock's age compares two machines' clocks,
so the waiter also times the wait on its own: at least two of the holder's
renewal periods, at most the lease. A renewal alone would prove that the
process lives, not that it makes progress, so `fit` gives its lock a
`Heartbeat`, beaten at each batch read: a run that reads none for `STALL_S`
(hung in a collective after a peer host died, a deadlocked input pipeline)
stops renewing, and its workdir is free again `STALL_S` + `LEASE_S` after the
hang. The holder checks that the lock is still its own before each save
(`WorkdirLock.verify`), so a run whose lock was taken over or deleted stops
instead of writing beside another. On multi-host runs only process 0 takes
the lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jtl import paths
from jtl.checkpoint.lock_files import BucketObject, LocalFile
from jtl.errors import CheckpointError

log = logging.getLogger(__name__)
LOCK_NAME = "jtl.lock"
# The holder renews its lock every RENEW_S; one not renewed for LEASE_S (six
# renewals missed: a network outage of minutes still keeps it) is stale.
RENEW_S = 30.0
LEASE_S = 180.0
# A run given a Heartbeat renews its lock only while it beat within STALL_S: far
# above a step, an evaluation pass or a compile, so only a hung run lets it lapse.
STALL_S = 3600.0
# How often a run waiting on another's lease reads the lock again.
POLL_S = 5.0


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (tells a reused PID apart), if known."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _machine() -> dict[str, Any]:
  """What tells this machine and PID namespace apart from others of the same
  host name (containers share a kernel's boot id but not its PID namespace)."""
  def read(read_fn: Any) -> Any:
    try:
      return read_fn()
    except OSError:
      return None
  return {"machine_id": read(lambda: Path("/etc/machine-id").read_text().strip() or None),
          "boot_id": read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
          "pid_namespace": read(lambda: os.stat("/proc/self/ns/pid").st_ino)}


def _where(owner: dict[str, Any], mine: dict[str, Any]) -> str:
  """"here" (this machine and PID namespace: the owner's pid can be checked),
  "rebooted" (this machine, by its machine id, before its last boot: the
  owner is gone) or "elsewhere" (another machine of the same host name
  included). A field the lock lacks (an older jtl's) is not compared."""
  if owner.get("host") != mine["host"]:
    return "elsewhere"
  def differs(key: str) -> bool:
    return owner.get(key) is not None and mine.get(key) is not None and owner[key] != mine[key]
  def same(key: str) -> bool:
    return owner.get(key) is not None and owner.get(key) == mine.get(key)
  if differs("boot_id"):
    return "rebooted" if same("machine_id") else "elsewhere"
  return "elsewhere" if differs("pid_namespace") or differs("machine_id") else "here"


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


def _parse_owner(content: bytes | None) -> dict[str, Any] | None:
  """The lock's owner ({} when the file is damaged), None when there is none."""
  if content is None:
    return None
  try:
    owner = json.loads(content)
  except (ValueError, RecursionError):
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


def _damaged_lock(lock: LocalFile | BucketObject, content: bytes) -> bool:
  """True (after a warning) when the damaged lock `lock` (which read as
  `content`) may be taken over; else a CheckpointError saying how to clear it."""
  path = lock.path
  try:
    age = lock.age()
  except FileNotFoundError:
    return True
  head = content[:60]
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


class Heartbeat:
  """When a run last made progress: `beat()` at each batch it reads (wrap the
  batch functions with `each_batch`). A `WorkdirLock` given one stops
  renewing after `STALL_S` without a beat, and renews again at the next.

  Example:
    heartbeat = Heartbeat()
    batches = heartbeat.each_batch(lambda: iter(range(3)))
    list(batches())  # three beats
  """

  def __init__(self) -> None:
    self.last = time.monotonic()

  def beat(self) -> None:
    self.last = time.monotonic()

  def idle(self) -> float:
    """Seconds since the last beat."""
    return time.monotonic() - self.last

  def each_batch(self, batches: Callable[..., Iterable[Any]] | None
                 ) -> Callable[..., Iterator[Any]] | None:
    """`batches` (a function returning an iterable of batches, or None),
    beating at each batch read."""
    if batches is None:
      return None

    def beating(*args: Any) -> Iterator[Any]:
      for batch in batches(*args):
        self.beat()
        yield batch
    return beating


class WorkdirLock:
  """Context manager holding `<workdir>/jtl.lock` for this process, renewed
  every `RENEW_S` by a thread of its own while held.

  Example:
    with WorkdirLock(workdir):
      ...  # train and checkpoint; a second run on `workdir` gets a CheckpointError
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               heartbeat: Heartbeat | None = None):
    if paths.is_remote(workdir):
      self.path = paths.path(workdir) / LOCK_NAME
      self._file: LocalFile | BucketObject = BucketObject(os.fspath(self.path))
    else:
      self.path = Path(workdir).absolute() / LOCK_NAME
      self._file = LocalFile(self.path)
    self.enabled = enabled
    self.held = False
    self._mine: dict[str, Any] | None = None
    self._version: Any = None  # of the lock this run wrote: what it renews
    self._stop_renewing = threading.Event()
    self._renewer: threading.Thread | None = None
    self.lost = False  # set by the renewer when the lock is no longer this run's
    self.heartbeat = heartbeat  # None: renewed while the process lives
    self._stall_warned = False

  def _owner(self) -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "process_start": _process_start(pid),
            **_machine(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "lease_s": LEASE_S,
            "renew_s": RENEW_S, **({"stall_s": STALL_S} if self.heartbeat else {})}

  def acquire(self) -> None:
    if not self.enabled or self.held:
      return
    mine = self._owner()
    content = json.dumps(mine).encode()
    for _ in range(3):
      if self._file.create(content):
        self.held, self._mine, self.lost = True, mine, False
        self._version = self._file.read()[1]
        self._renew_first()
        self._start_renewing()
        return
      self._take_over_if_stale(mine)
    raise CheckpointError(f"Could not take the lock {self.path}; try again.")

  def _renew_first(self) -> None:
    """Renews once before training: a run that cannot renew its lock (a
    bucket where it may create objects but not update them) would lose it to
    the next run after its lease, so it stops now, naming why."""
    try:
      renewed = self._file.renew(self._version)
    except Exception as e:  # noqa: BLE001 - any failure: the lock cannot be kept
      self.release()
      raise CheckpointError(
          f"Took the lock {self.path} but cannot renew it ({type(e).__name__}: {e}). A run "
          f"renews its lock every {RENEW_S:.0f} s, or another run takes the workdir over after "
          f"{LEASE_S:.0f} s: in a bucket it needs permission to update objects "
          "(storage.objects.update), as well as to create and delete them.") from e
    if not renewed:
      self.held = False
      raise CheckpointError(f"The lock {self.path} was replaced as soon as it was taken: "
                            "another run is starting on this workdir; try again.")

  def _take_over_if_stale(self, mine: dict[str, Any]) -> None:
    content, version = self._file.read()
    owner = _parse_owner(content)
    if owner is None:  # released meanwhile
      return
    if not owner:
      if _damaged_lock(self._file, content):
        self._file.remove(version)
      return
    where = _where(owner, mine)
    if where == "rebooted" or (where == "here" and not _alive(owner)):
      log.warning("Taking over the lock %s of process %s on %s, which is no longer running%s.",
                  self.path, owner.get("pid"), owner.get("host"),
                  " (the machine has booted since)" if where == "rebooted" else "")
      self._file.remove(version)
      return
    if where != "here" and _renews(owner):
      outcome, token, unrenewed = self._watch(owner, version)
      if outcome == "changed":  # released or replaced meanwhile: try again
        return
      if outcome == "expired":
        log.warning("Taking over the lock %s of process %s on %s: it was not renewed for "
                    "%.0f s (its lease), so that run is gone (e.g. its VM was preempted).",
                    self.path, owner.get("pid"), owner.get("host"), unrenewed)
        self._file.remove(version, token)  # only if still not renewed
        return
    raise _in_use(self.path, owner, mine, where)

  def _watch(self, owner: dict[str, Any], version: Any) -> tuple[str, Any, float]:
    """Watches `owner`'s lock until it is renewed ("renewed": a live run holds
    it), released or replaced ("changed"), or its lease runs out ("expired").
    Returns (outcome, the lock's last token, seconds it went unrenewed).

    Clocks differ between machines, so the lock's age (this clock against
    the holder's or the server's) only shortens the wait: this run sees the
    lock go unrenewed for two of its holder's renewal periods on its own
    clock before calling it gone, and never waits longer than the lease."""
    lease = float(owner["lease_s"])
    renew_s = owner.get("renew_s")
    renew_s = float(renew_s) if _positive(renew_s) else RENEW_S
    try:
      written, token = self._file.stamp()
    except FileNotFoundError:
      return "changed", None, 0.0
    age = max(0.0, time.time() - written)
    wait = min(lease, max(lease - age, 2 * renew_s))
    log.warning("The lock %s is held by process %s on %s, renewed %.0f s ago. Waiting up to %.0f "
                "s: a live run renews it (then this run stops), a gone one does not (then this "
                "run takes it over).", self.path, owner.get("pid"), owner.get("host"), age, wait)
    start = time.monotonic()
    while (waited := time.monotonic() - start) < wait:
      time.sleep(min(POLL_S, wait - waited))
      try:
        now = self._file.stamp()[1]
      except FileNotFoundError:
        return "changed", None, 0.0
      if now != token:  # renewed, or replaced by another run
        return ("renewed" if self._file.read()[1] == version else "changed"), None, 0.0
    return "expired", token, max(age, waited)

  def _start_renewing(self) -> None:
    self._stop_renewing.clear()
    self._renewer = threading.Thread(target=self._renew_until_released, daemon=True,
                                     name=f"jtl-lock-renewer {self.path}")
    self._renewer.start()

  def _renew_until_released(self) -> None:
    while not self._stop_renewing.wait(RENEW_S):
      if not self.renew_unless_stalled():
        return

  def renew_unless_stalled(self) -> bool:
    """The renewer's turn: renews the lock (`renew`) unless the run's
    heartbeat is `STALL_S` old, warning once per stall. False: the lock was
    found lost, renewals end."""
    idle = self.heartbeat.idle() if self.heartbeat else 0.0
    if idle < STALL_S:
      self._stall_warned = False
      return self.renew()
    if not self._stall_warned:
      self._stall_warned = True
      log.warning("This run read no batch for %.0f s (hung?): it stops renewing its lock %s, "
                  "so another run may take the workdir over %.0f s from now. If this run goes "
                  "on, it renews the lock again, or stops before writing if it was taken.",
                  idle, self.path, LEASE_S)
    return True

  def renew(self) -> bool:
    """Renews the lock once; False when it is no longer this run's (`lost`:
    the run stops at its next log line, evaluation or save). A failed
    request is retried at the next renewal."""
    try:
      if self._file.renew(self._version):
        return True
    except Exception as e:  # noqa: BLE001 - a network error: the lease allows for outages
      if not self._stop_renewing.is_set():
        log.warning("Could not renew the lock %s (%s); trying again in %.0f s.", self.path, e,
                    RENEW_S)
      return True
    if not self._stop_renewing.is_set():  # not the release's own removal
      self.lost = True
      log.warning("The lock %s is no longer this run's (taken over or deleted): the run "
                  "stops before it writes to the workdir again.", self.path)
    return False

  def verify(self) -> None:
    """Raises a CheckpointError when this process no longer holds the lock
    (taken over, or deleted): called before each save, so that a run that
    lost its workdir writes nothing more into it."""
    if not self.held:
      return
    try:
      content, _ = self._file.read()
    except Exception as e:  # noqa: BLE001 - a network error: no evidence the lock was lost
      log.warning("Could not read the lock %s to check it is still this run's (%s); saving.",
                  self.path, e)
      return
    owner = _parse_owner(content)
    if owner != self._mine:
      now = (f"held by process {owner.get('pid')} on {owner.get('host')!r}" if owner
             else "deleted" if owner is None else "damaged")
      raise CheckpointError(
          f"This run no longer holds the lock {self.path}: it is {now}. Another run may be "
          f"writing to {self.path.parent}, so this one stops without saving. Make sure one run "
          "uses the workdir, then run again to resume from its newest checkpoint.")

  def release(self) -> None:
    if self._renewer is not None:
      self._stop_renewing.set()
      self._renewer.join(timeout=5.0)  # a renewal stuck on the network does not hold the exit
      self._renewer = None
    if self.held:
      content, version = self._file.read()
      if _parse_owner(content) == self._mine:  # still ours (not taken over meanwhile)
        self._file.remove(version, takeover=False)
      self.held = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()


def _positive(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _renews(owner: dict[str, Any]) -> bool:
  """Whether the lock's holder renews it (a jtl with leases wrote it)."""
  return _positive(owner.get("lease_s"))


def _stall(owner: dict[str, Any]) -> str:
  """When a hung holder stops renewing, for the in-use message."""
  stall = owner.get("stall_s")
  return (f"; if that run hangs, it stops renewing after {stall / 60:.0f} min without progress"
          if _positive(stall) else "")


def _in_use(path: Any, owner: dict[str, Any], mine: dict[str, Any], where: str
            ) -> CheckpointError:
  """The error for a lock a live run holds (`where`: as `_where` says)."""
  if where == "here":
    where, gone = "this host", ""
  else:
    gone = (f" (it renewed the lock within its lease of {owner['lease_s']:.0f} s{_stall(owner)})"
            if _renews(owner) else f". If that process is gone (e.g. its host was preempted), "
            f"delete {path}")
    where = ("this host name, in another container or machine (PID namespace)"
             if owner.get("host") == mine["host"] else f"host {owner.get('host')!r}")
  return CheckpointError(
      f"Workdir {path.parent} is in use by another run: process {owner.get('pid')} on "
      f"{where}, since {owner.get('since')}{gone}; lock file {path}. One run owns a "
      "workdir: wait for that run to finish or stop it, or pass another --workdir.")


def raise_on_every_process(check: Callable[[], Any], others: str) -> None:
  """Runs `check` (on process 0 it may raise a CheckpointError about the
  lock, which only process 0 holds); with several processes, whether it
  raised is sent to all, and the others raise CheckpointError(`others`), so
  that none is left waiting in the next collective."""
  failed = None
  try:
    check()
  except CheckpointError as e:
    failed = e
  if jax.process_count() > 1:
    if multihost_utils.broadcast_one_to_all(np.int32(failed is not None)) and failed is None:
      failed = CheckpointError(others)
  if failed is not None:
    raise failed
