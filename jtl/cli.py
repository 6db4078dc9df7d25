"""Command-line helpers shared by the scripts."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from jtl.errors import ConfigError


def parse_flags_with_config_keys(argv: Sequence[str]) -> list[str]:
  """absl flag parsing where an unknown `--config.key` lists the valid keys."""
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = str(getattr(e, "flagname", "") or "")
    if not name.startswith("config."):
      raise
    from jtl.experiment import flat_keys  # pylint: disable=g-import-not-at-top
    config_path = _config_path(argv)
    keys: list[str] = []
    if config_path:
      from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
      module = config_flags.config_flags._LoadConfigModule("config", config_path.split(":")[0])
      arg = config_path.split(":", 1)[1] if ":" in config_path else None
      cfg = module.get_config(arg) if arg is not None else module.get_config()
      keys = flat_keys(cfg)
    print(f"ConfigError: unknown config key {name[len('config.'):]!r} "
          f"(from {config_path}). Valid keys:\n  " + "\n  ".join(keys), file=sys.stderr)
    raise SystemExit(2) from ConfigError(name)


def _config_path(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None
