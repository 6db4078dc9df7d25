"""Stopping a run cleanly on SIGTERM or SIGINT.

A preempted Cloud TPU/GPU VM gets SIGTERM and about 30 seconds. While `fit`
runs, a `StopRequests` turns SIGTERM and SIGINT into a request: the step in
progress finishes, `fit` saves it synchronously, closes its writers and
manager, releases the workdir lock and raises `jtl.errors.Preempted` naming
the step saved (the scripts exit with status 128 + the signal number). A
second signal while that happens is logged and ignored, so it cannot cut the
save short (SIGKILL still stops the process at once; Orbax's atomic saves
then keep the previous checkpoint intact).

Multi-host: every process must save the same step. When `jax.distributed`
is initialised, JAX's preemption service owns SIGTERM (its notifier, not
Python, handles it, and tells every process); `reached(step)` is then
`jax.experimental.multihost_utils.reached_preemption_sync_point(step)`,
true on all processes at the same step, and SIGINT is passed on to it as a
SIGTERM. Handlers are installed only from the main thread (Python allows no
other); elsewhere a signal keeps its usual effect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax

from jtl.errors import Preempted

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _sync_manager_ready() -> bool:
  """Whether JAX's preemption service runs (jax.distributed initialised with
  the service on): then it, not Python, handles SIGTERM."""
  if not jax.distributed.is_initialized():
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    multihost_utils.reached_preemption_sync_point(0)  # raises when the service is off
  except RuntimeError:
    return False
  return True


class StopRequests:
  """A context manager during which SIGTERM and SIGINT ask the run to stop.

  Example:
    with StopRequests() as stop:
      for step in range(start + 1, num_steps + 1):
        train_one_step()
        if stop.reached(step):   # call it after every step, on every process
          save(step)
          raise Preempted(...)
  """

  def __init__(self) -> None:
    self.signum: int | None = None  # the first signal received here
    self.synced = False  # JAX's preemption service decides (jax.distributed)
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is not threading.main_thread():
      log.info("Not on the main thread: SIGTERM and SIGINT keep their usual effect "
               "(no checkpoint on preemption).")
      return self
    self.synced = _sync_manager_ready()
    if self.synced:
      handled = (signal.SIGINT,)  # SIGTERM: JAX's preemption notifier
    elif jax.process_count() > 1:
      log.warning("jax.distributed's preemption service is off (jax_enable_preemption_service):"
                  " a SIGTERM cannot be turned into one step saved by every process.")
      return self
    else:
      handled = SIGNALS
    for signum in handled:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      log.warning("%s received again: still stopping; the checkpoint being written is "
                  "finished first (SIGKILL stops at once, without it).", name)
      return
    self.signum = signum
    log.warning("%s received: finishing the current step, then saving a checkpoint and "
                "stopping.", name)
    if self.synced:  # JAX's notifier listens for SIGTERM and tells every process
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether the run stops after `step` (which it has just completed).

    With JAX's preemption service this must be called after every step, on
    every process, with the same step numbers; it is then true on all of
    them at the same step.
    """
    if self.synced:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  @property
  def signal_number(self) -> int:
    """The signal that stopped the run (SIGTERM when JAX's preemption service
    reported a notice: this process may not have received it itself)."""
    return self.signum or signal.SIGTERM

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signal_number).name

  @property
  def cause(self) -> str:
    """What stopped the run, for messages."""
    if self.signum is None and self.synced:
      return "a preemption notice (SIGTERM to one of the processes)"
    return self.signal_name


@contextlib.contextmanager
def stop_at_once(doing: str, then: str) -> Iterator[None]:
  """During work that has nothing to save (`doing`: "model='auto' selection"),
  SIGTERM and SIGINT raise `Preempted` at once, saying what `then` happens
  ("run again to redo it"), instead of ending the process without a word
  (SIGTERM) or with a traceback (SIGINT). Main thread only, as StopRequests."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    raise Preempted(f"Stopped by {name} during {doing}; nothing was saved. {then}",
                    step=None, signal_name=name, exit_code=128 + signum)

  previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def preempted(stop: StopRequests, *, saved: int | None, when: str, workdir: Any) -> Preempted:
  """The error a run raises once it has stopped for `stop`: what stopped it,
  `when` ("after step 40 of 100"), and the step `saved` in `workdir`."""
  if saved is not None:
    kept = (f"Checkpoint step {saved} is saved in {workdir} and the workdir's lock released; "
            f"run again with the same workdir to resume from step {saved}.")
  elif workdir is None:
    kept = "Nothing was saved: no workdir was given."
  else:
    kept = (f"Nothing was saved yet in {workdir} and its lock is released; run again with the "
            "same workdir to start over.")
  return Preempted(f"Stopped by {stop.cause} {when}. {kept}", step=saved,
                   signal_name=stop.signal_name, exit_code=128 + stop.signal_number)
