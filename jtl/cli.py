"""Command-line helpers shared by the scripts."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence

from absl import flags


def enable_compilation_cache() -> None:
  """Caches compiled XLA programs across runs (a restarted or resumed job, or
  evaluate.py after finetune.py, skips recompiling): $JAX_COMPILATION_CACHE_DIR
  if set, else <jtl cache dir>/xla (see jtl.checkpoint.cache_dir)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jtl.checkpoint.sources import cache_dir  # pylint: disable=g-import-not-at-top
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_hint(environ: Mapping[str, str] | None = None,
                    thp_setting: str = THP_SETTING) -> str | None:
  """A hint to start the process with glibc's huge-pages tunable, or None.

  XLA:CPU allocates its activation buffers afresh at every step; with 4 KiB
  pages the first touch of each page costs a fault, which on 2 cores took
  about 40% of a MobileNetV2 training step (BENCHMARKS.md). glibc >= 2.35 backs
  large allocations with transparent huge pages when started with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1. The kernel must allow it ("madvise"
  in `thp_setting`; with "always" it needs nothing), and glibc reads the tunable
  only at process start, so this can only be a hint (`make finetune` sets it).

  >>> huge_pages_hint({"GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}) is None
  True
  """
  environ = os.environ if environ is None else environ
  if HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":"):
    return None
  libc = os.confstr("CS_GNU_LIBC_VERSION") if sys.platform == "linux" else None
  try:
    version = tuple(int(v) for v in (libc or "").split()[1].split(".")[:2])
    with open(thp_setting) as f:
      advised = "[madvise]" in f.read()
  except (IndexError, ValueError, OSError):
    return None
  if version < (2, 35) or not advised:
    return None
  previous = environ.get("GLIBC_TUNABLES")
  value = f"{previous}:{HUGE_PAGES_TUNABLE}" if previous else HUGE_PAGES_TUNABLE
  return (f"CPU steps run up to 1.6x faster with transparent huge pages: start the "
          f"process with GLIBC_TUNABLES={value} (glibc reads it only at start-up).")


def log_huge_pages_hint() -> None:
  """Logs `huge_pages_hint()` as a warning when running on the CPU backend."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  hint = huge_pages_hint()
  if hint and jax.default_backend() == "cpu":
    logging.warning(hint)


def parse_flags_with_config_keys(argv: Sequence[str]) -> list[str]:
  """absl flag parsing where an unknown `--config.key` lists the valid keys."""
  try:
    return flags.FLAGS(argv)
  except Exception:  # ml_collections raises AttributeError/KeyError/flags errors
    unknown, valid, path = _unknown_config_keys(argv)
    if not unknown:
      raise
    print(f"ConfigError: unknown config key(s) {unknown} for {path}. Valid keys:\n  "
          + "\n  ".join(valid), file=sys.stderr)
    raise SystemExit(2) from None


def _unknown_config_keys(argv: Sequence[str]) -> tuple[list[str], list[str], str | None]:
  from jtl.experiment import flat_keys  # pylint: disable=g-import-not-at-top
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  if path is None:
    return [], [], None
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_jtl_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  valid = flat_keys(module.get_config(arg) if arg else module.get_config())
  given = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  return [k for k in given if k not in valid], valid, path
