"""The XLA:CPU runtime a script sets up first (`jtl.app.cli.prepare_process`).

It imports nothing of jtl, so that tests/app/test_cli.py can load this file
alone in a fresh process (importing jtl would take seconds there).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import jax
from absl import logging

# glibc malloc settings (read at process start) under which freed memory stays
# in the process heap: no allocation is served by a fresh mmap, and the heap
# top is never handed back to the OS.
HEAP_REUSE_TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=68719476736")


def on_glibc() -> bool:
  """Whether this process runs on Linux with glibc (where the tunables apply)."""
  return sys.platform == "linux" and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")


def missing_heap_tunables(environ: Mapping[str, str] | None = None) -> list[str]:
  """The HEAP_REUSE_TUNABLES not in $GLIBC_TUNABLES.

  >>> missing_heap_tunables({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
  ['glibc.malloc.trim_threshold=68719476736']
  """
  environ = os.environ if environ is None else environ
  given = environ.get("GLIBC_TUNABLES", "").split(":")
  return [t for t in HEAP_REUSE_TUNABLES if t not in given]


def configure_cpu_runtime(environ: Mapping[str, str] | None = None) -> str | None:
  """Makes XLA:CPU reuse memory across steps; logs and returns a hint where it cannot.

  Call it first thing, before any JAX computation creates the CPU client.

  XLA:CPU allocates every step's buffers afresh, and glibc maps large blocks
  from the OS and unmaps them on free, so each step faults in (and the
  kernel zeroes) all its pages again: 650,000 faults and nearly half of a
  MobileNetV2 training step at 224 px on 2 cores (BENCHMARKS.md). With
  HEAP_REUSE_TUNABLES in $GLIBC_TUNABLES, freed blocks stay in the main heap;
  with synchronous dispatch, set here, XLA allocates on the calling thread,
  whose heap that is (worker-thread arenas still map large blocks afresh).
  glibc reads the tunables only at process start, so where they are missing
  this changes nothing and logs (and returns) a hint on the CPU backend naming
  them. Off glibc it does nothing.
  """
  if not on_glibc():
    return None
  environ = os.environ if environ is None else environ
  missing = missing_heap_tunables(environ)
  if not missing:
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # affects CPU devices only
    return None
  if jax.default_backend() != "cpu":
    return None
  value = ":".join(filter(None, [environ.get("GLIBC_TUNABLES")] + missing))
  hint = (f"XLA:CPU training steps ran about 2x faster when memory is reused across steps: "
          f"start the process with GLIBC_TUNABLES={value} (glibc reads it only at "
          "start-up; `make finetune` sets it).")
  logging.warning(hint)
  return hint
