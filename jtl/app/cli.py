"""Command-line helpers shared by the scripts."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from absl import flags, logging

from jtl.app import cpu, keys
from jtl.errors import ConfigError, JtlError
from jtl.weights.sources import cache_dir


def prepare_process() -> None:
  """What an entry point does first: library INFO logs (Orbax, TFDS) off, as
  they drown the progress bar; the CPU runtime configured, before any
  computation creates the CPU client; the persistent compilation cache on."""
  logging.set_verbosity(logging.WARNING)
  cpu.configure_cpu_runtime()
  enable_compilation_cache()


def enable_compilation_cache() -> None:
  """Caches compiled XLA programs across runs (a restarted or resumed job, or
  evaluate.py after finetune.py, skips recompiling): $JAX_COMPILATION_CACHE_DIR
  if set, else <jtl cache dir>/xla (see jtl.weights.cache_dir)."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


def refuse_empty_paths(**flags: str | None) -> None:
  """ConfigError for a path flag given as "" (`--workdir=$UNSET`), which would
  otherwise mean the current directory.

  >>> refuse_empty_paths(workdir="runs/a", out=None)
  >>> refuse_empty_paths(workdir="")
  Traceback (most recent call last):
  jtl.errors.ConfigError: --workdir is empty (an unset shell variable?): pass a path, e.g. --workdir runs/default.
  """
  for name, value in flags.items():
    if value is not None and not value.strip():
      raise ConfigError(f"--{name} is empty (an unset shell variable?): pass a path, e.g. "
                        f"--{name} runs/default.")


def exit_on_jtl_error(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """Wraps a script's `main`: a `JtlError` is printed as one message (its
  class and text, no traceback) and the process exits with status 2; a run
  stopped by a signal after saving (`Preempted`) exits with 128 + the
  signal's number (143 for SIGTERM, 130 for SIGINT), as the shell reports a
  process that signal ended.

  >>> from jtl.errors import ConfigError
  >>> def main(argv): raise ConfigError("learning_rate must be > 0, got -1")
  >>> try:
  ...   exit_on_jtl_error(main)([])
  ... except SystemExit as e:
  ...   print("exit", e.code)
  exit 2
  """
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> object:
    try:
      return main(argv)
    except JtlError as e:
      sys.stdout.flush()
      print(f"\n{type(e).__name__}: {e}", file=sys.stderr, flush=True)
      code = getattr(e, "exit_code", 2)
      _exit_even_if_threads_hang(code)
      raise SystemExit(code) from None
  return wrapped


# After an error, what a script's exit may wait for: Orbax's and tensorstore's
# worker threads still retrying an abandoned upload kept a process whose save
# to gs:// failed alive for minutes, so a supervisor never saw its status.
EXIT_GRACE_S = 30.0


def _exit_even_if_threads_hang(code: int) -> None:
  """Once the interpreter exits (never while a caller that caught the
  SystemExit, e.g. IPython's %run, goes on), ends the process with `code`
  if it still waits for threads EXIT_GRACE_S later (the error is already
  printed and the workdir's lock released)."""
  def watchdog() -> None:
    time.sleep(EXIT_GRACE_S)
    waiting = [t.name for t in threading.enumerate() if not t.daemon]
    print(f"Exiting without waiting for background threads {waiting}.", file=sys.stderr,
          flush=True)
    os._exit(code)  # pylint: disable=protected-access

  def at_exit() -> None:  # before the interpreter joins the threads that may hang
    threading.Thread(target=watchdog, name="jtl-exit-watchdog", daemon=True).start()

  # threading's exit hooks run before it joins non-daemon threads (atexit's, after).
  register = getattr(threading, "_register_atexit", None)
  if register is not None:
    register(at_exit)


_HELP_FLAGS = ("help", "helpshort", "helpfull", "?", "h")


def parse_flags_with_config_keys(argv: Sequence[str]) -> list[str]:
  """absl flag parsing where an unknown `--config.key` lists the valid keys,
  and any invalid flag value is one message with exit status 2. A script
  with a --config flag prints every config key with its default and meaning
  (`keys.listing()`) for `--keys` (then exits, status 0) and after absl's
  `--helpfull` output; asked-for help exits 0 (absl's own status is 1)."""
  takes_config = "config" in flags.FLAGS
  if takes_config and any(a in ("--keys", "-keys") for a in argv[1:]):
    print(keys.listing())
    raise SystemExit(0)
  # `--config.key=None` sets None (the keys' "None: ..." meaning); ml_collections
  # would parse it as the string 'None', or fail for a number.
  nones = [a.split("=", 1)[0][len("--config."):] for a in argv[1:]
           if takes_config and a.startswith("--config.") and a.endswith("=None")]
  argv = [a for a in argv if not (a.startswith("--config.") and a.endswith("=None"))]
  try:
    rest = flags.FLAGS(argv)
    for key in nones:
      _set_none(flags.FLAGS.config, key)
    return rest
  except SystemExit as e:  # absl's --help / --helpfull print the flags and exit 1
    if not any(a.lstrip("-") in _HELP_FLAGS for a in argv[1:]):
      raise
    if takes_config and any(a in ("--helpfull", "-helpfull") for a in argv[1:]):
      print("\n" + keys.listing())
    raise SystemExit(0) from e  # asked-for help is a success (as argparse's)
  except Exception as e:  # ml_collections raises AttributeError/KeyError/flags errors
    try:
      unknown, valid, path = _unknown_config_keys(argv)
    except Exception:  # noqa: BLE001 - the config file itself is broken: report e below
      unknown, valid, path = [], [], None
    if unknown:
      print(f"ConfigError: unknown config key(s) {unknown} for {path}. Valid keys:\n  "
            + "\n  ".join(valid), file=sys.stderr)
      if any(k.startswith("model_kwargs.") for k in unknown):
        print("Model options are one dict on the command line: "
              "--config.model_kwargs=\"{'drop_path_rate': 0.1}\"", file=sys.stderr)
    else:
      print(f"ConfigError: invalid command line: {type(e).__name__}: {e}\n"
            f"Run {os.path.basename(argv[0]) if argv else 'the script'} --helpfull for the "
            "flags.", file=sys.stderr)
    raise SystemExit(2) from None


def _set_none(config: Any, dotted: str) -> None:
  """`config.<dotted> = None`, for a key the config has (else the unknown-key error)."""
  *parents, name = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  if name not in node:
    raise KeyError(f"unknown config key {dotted!r}")
  node[name] = None


def _unknown_config_keys(argv: Sequence[str]) -> tuple[list[str], list[str], str | None]:
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


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """All "a.b" keys of a config (for error messages listing valid keys)."""
  found = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      found.extend(flat_keys(v, f"{prefix}{k}."))
    else:
      found.append(prefix + k)
  return sorted(found)
