"""Command-line helpers shared by the scripts."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
import re
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
  """absl flag parsing where an unknown `--config.key` names the nearest
  valid keys, and any invalid flag value or config file is one message with
  exit status 2. A script with a --config flag prints every config key with
  its default and meaning (`keys.listing()`) for `--keys` (then exits, status
  0) and after absl's `--helpfull` output; asked-for help exits 0 (absl's own
  status is 1). `--config.<key>=None` or `--config.<key> None` sets None; the
  last occurrence of a key wins, as for any flag."""
  takes_config = "config" in flags.FLAGS
  if takes_config and any(a in ("--keys", "-keys") for a in argv[1:]):
    print(keys.listing())
    raise SystemExit(0)
  if takes_config:
    _refuse_missing_config_file(argv)
  nones, parsed = _split_nones(argv) if takes_config else ([], list(argv))
  parsed = _name_lists_as_tuples(parsed) if takes_config else parsed
  try:
    rest = flags.FLAGS(parsed)
    if takes_config:
      _config_or_exit(argv)
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
    _exit_with(_command_line_error(argv, e))


def _exit_with(message: str) -> None:
  print(f"ConfigError: {message}", file=sys.stderr)
  raise SystemExit(2) from None


def _config_key(arg: str) -> str | None:
  """"a.b" of `--config.a.b=...` or `--config.a.b` (None for other args)."""
  return arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else None


def _split_nones(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(keys to set to None after parsing, argv without its `--config.<key>=None`
  and `--config.<key> None` args). ml_collections would parse None as the
  string 'None', or fail for a number. A None that a later arg of the same key
  overrides is dropped: the last occurrence wins."""
  nones, kept, args = [], list(argv[:1]), list(argv[1:])
  i = 0
  while i < len(args):
    arg, key = args[i], _config_key(args[i])
    spaced = key is not None and "=" not in arg and args[i + 1:i + 2] == ["None"]
    if key is None or not (arg.endswith("=None") or spaced):
      kept.append(arg)
    elif not any(_config_key(later) == key for later in args[i + 1:]):
      nones.append(key)
    i += 2 if spaced else 1
  return nones, kept


def _name_lists_as_tuples(argv: list[str]) -> list[str]:
  """`--config.k=a,hf-hub:o/n` (or `--config.k a,hf-hub:o/n`) for a key whose
  default is a tuple, as `--config.k=('a', 'hf-hub:o/n')`: ml_collections
  reads a tuple's value as a Python literal, which names with ':' or '/' are
  not."""
  path = _config_path(argv)
  try:
    config = _load_config(path) if path else None
  except Exception:  # noqa: BLE001 - a broken config file is reported by the parse itself
    config = None
  if config is None:
    return argv
  tuples = {k for k in flat_keys(config) if isinstance(_lookup(config, k), (tuple, list))}
  rewritten, args = [], list(argv)
  while args:
    arg = args.pop(0)
    key, equals, value = arg[len("--config."):].partition("=")
    if arg.startswith("--config.") and key in tuples and not equals and args:
      value = args.pop(0)  # the spaced form, `--config.k a,b`
    elif not (arg.startswith("--config.") and key in tuples):
      rewritten.append(arg)
      continue
    if value and not _is_literal(value):
      value = repr(tuple(v.strip() for v in value.split(",") if v.strip()))
    rewritten.append(f"--config.{key}={value}")
  return rewritten


def _is_literal(text: str) -> bool:
  try:
    ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return False
  return True


def _lookup(config: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


def _config_path(argv: Sequence[str]) -> str | None:
  """The value of the last `--config=` / `--config <path>` flag."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def _refuse_missing_config_file(argv: Sequence[str]) -> None:
  """One message naming a `--config` file that does not exist and the config
  files next to where it was looked for (ml_collections' own error is a
  traceback, raised only when the config is first read)."""
  path = _config_path(argv)
  if path is None or not path.partition(":")[0].strip():
    return
  file = path.partition(":")[0]
  if os.path.isfile(file):
    return
  folder = os.path.dirname(file) or "."
  folder = folder if os.path.isdir(folder) else "configs"
  found = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")) \
      if os.path.isdir(folder) else []
  listed = (f"; config files in {folder}/: {', '.join(found)}" if found else "")
  _exit_with(f"--config={path}: no config file {file!r} (looked from {os.getcwd()}){listed}. "
             f"Pass an existing file, e.g. --config=configs/default.py.")


def _last_line(text: str) -> str:
  """The last non-empty line of a message that embeds a traceback."""
  return next((l.strip() for l in reversed(str(text).splitlines()) if l.strip()), str(text))


def _config_or_exit(argv: Sequence[str]) -> None:
  """Reads the parsed config once, so that a config file that failed to load
  (ml_collections defers that error to the first read) is one message."""
  try:
    flags.FLAGS.config  # pylint: disable=pointless-statement
  except Exception as e:  # noqa: BLE001 - any loading failure of the user's file
    _exit_with(f"--config={_config_path(argv)} could not be loaded: {_last_line(e)}")


def _command_line_error(argv: Sequence[str], e: Exception) -> str:
  """The one message for a command line absl or ml_collections refused."""
  text, path = str(e), _config_path(argv)
  if "Error whilst parsing config file" in text:  # get_config(arg) raised
    file, _, arg = (path or "").partition(":")
    return f"--config={path}: {file}'s get_config({arg!r}) failed: {_last_line(text)}"
  as_dict = re.match(r"flag --config\.([\w.]+)=(.*): Failed to parse .* as a ConfigDict: "
                     r"(\w+)\((['\"])(.*?)\4", text, re.S)
  if as_dict:
    key, value, kind, _, why = as_dict.groups()
    return (f"--config.{key}={value} could not be parsed as a dict ({kind}: {why}): write "
            f"a Python dict literal in quotes, e.g. --config.{key}=\"{{'name': 1.0}}\"")
  try:
    unknown, valid, path = _unknown_config_keys(argv)
  except Exception:  # noqa: BLE001 - the config file itself is broken: report e below
    unknown, valid = [], []
  if unknown:
    return _unknown_keys_message(unknown, valid, path)
  script = os.path.basename(argv[0]) if argv else "the script"
  return (f"invalid command line: {type(e).__name__}: {e}\n"
          f"Run {script} --helpfull for the flags.")


def _unknown_keys_message(unknown: list[str], valid: list[str], path: str | None) -> str:
  """Unknown keys with the nearest valid ones (all of them when none is near),
  and how to set what a dotted key cannot reach."""
  near = {k: ["seed"] if k == "strategy.seed" else difflib.get_close_matches(k, valid, n=3)
          for k in unknown}
  lines = [f"unknown config key(s) {unknown} for {path}."]
  lines += [f"  {k}: did you mean {' or '.join(close)}?" for k, close in near.items() if close]
  if any(k.startswith("model_kwargs.") for k in unknown):
    lines.append("Model options are one dict on the command line: "
                 "--config.model_kwargs=\"{'drop_path_rate': 0.1}\"")
  if any(k.startswith("method.") for k in unknown):
    lines.append("A method's options are set with its name, as one dict: "
                 "--config.method=\"{'name': 'distill', 'teacher_workdir': 'runs/teacher'}\" "
                 "(or start from its config: configs/distill.py, domain.py, adversarial.py)")
  if "strategy.seed" in unknown:
    lines.append("The strategy's seed (LoRA's init, scratch's re-init) is the run's one seed.")
  if all(near.values()):
    lines.append("Every key with its default and meaning: --keys")
  else:
    lines.append("Valid keys:\n  " + "\n  ".join(valid))
  return "\n".join(lines)


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
  """(the `--config.<key>`s the config file lacks, its valid keys, the file)."""
  path = _config_path(argv)
  if path is None:
    return [], [], None
  valid = flat_keys(_load_config(path))
  # A dict-valued key (model_kwargs, method) is set whole: its own name is valid too.
  known = lambda k: k in valid or any(v.startswith(k + ".") for v in valid)  # noqa: E731
  given = [_config_key(a) for a in argv if a.startswith("--config.")]
  return [k for k in given if not known(k)], valid, path


@functools.lru_cache(maxsize=8)
def _load_config(path: str) -> ml_collections.ConfigDict:
  """The config a `--config` value (file, optionally `:arg`) names (read, not
  changed: cached, as the tuple keys and the unknown-key check both ask)."""
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_jtl_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """All "a.b" keys of a config (for error messages listing valid keys); an
  empty dict (model_kwargs, lr_multipliers) is a key itself.

  >>> flat_keys(ml_collections.ConfigDict({"a": 1, "b": {"c": 2}, "d": {}}))
  ['a', 'b.c', 'd']
  """
  found = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict) and len(v):
      found.extend(flat_keys(v, f"{prefix}{k}."))
    else:
      found.append(prefix + k)
  return sorted(found)
