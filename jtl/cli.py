"""Command-line helpers shared by the scripts."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

from absl import flags


def enable_compilation_cache() -> None:
  """Caches compiled XLA programs across runs (a restarted or resumed job, or
  evaluate.py after finetune.py, skips recompiling): $JAX_COMPILATION_CACHE_DIR
  if set, else <jtl cache dir>/xla (see jtl.checkpoint.cache_dir)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jtl.checkpoint.sources import cache_dir  # pylint: disable=g-import-not-at-top
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


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
