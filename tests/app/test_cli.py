"""The scripts' CPU runtime set-up: glibc heap reuse plus synchronous dispatch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jtl.app import cli, cpu

# Loads jtl/app/cpu.py alone (importing jtl would take seconds), sets up the
# runtime and prints what it applied. Only deterministic facts are asserted:
# page-fault counts depend on the kernel's reclaim and the machine's load, so
# they are measured by scripts/benchmarks/profile_step.py (BENCHMARKS.md), not here.
PROBE = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("cpu", {str(Path(cpu.__file__))!r})
cpu = importlib.util.module_from_spec(spec); spec.loader.exec_module(cpu)
print("hint:", cpu.configure_cpu_runtime())
import jax
print("async dispatch:", jax.config.read("jax_cpu_enable_async_dispatch"))
"""

ON_GLIBC = cpu.on_glibc()


def _probe(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update({"JAX_PLATFORMS": "cpu", **({"GLIBC_TUNABLES": tunables} if tunables else {})})
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                       capture_output=True, text=True).stdout
  hint = out.split("hint: ", 1)[1].split("\n", 1)[0]
  return hint, out.split("async dispatch: ", 1)[1].strip()


@pytest.mark.skipif(not ON_GLIBC, reason="glibc only")
def test_missing_tunables_are_named_and_kept_after_existing_ones():
  assert cpu.missing_heap_tunables({}) == list(cpu.HEAP_REUSE_TUNABLES)
  assert cpu.missing_heap_tunables(
      {"GLIBC_TUNABLES": "glibc.cpu.x86_avx=1:" + cpu.HEAP_REUSE_TUNABLES[1]}) == [
          cpu.HEAP_REUSE_TUNABLES[0]]


@pytest.mark.skipif(not ON_GLIBC, reason="glibc only")
def test_runtime_settings_follow_the_tunables():
  # Without the tunables: a hint naming them (after the user's own), dispatch untouched.
  hint, async_dispatch = _probe("glibc.cpu.x86_avx=1")
  expected = "GLIBC_TUNABLES=glibc.cpu.x86_avx=1:" + ":".join(cpu.HEAP_REUSE_TUNABLES)
  assert expected in hint and async_dispatch == "True"
  # With them: no hint, synchronous dispatch (XLA allocates on the main heap).
  hint, async_dispatch = _probe(":".join(cpu.HEAP_REUSE_TUNABLES))
  assert hint == "None" and async_dispatch == "False"


def test_keys_lists_every_config_key_with_its_default_and_meaning(monkeypatch, capsys):
  from absl import flags

  from jtl.app import keys
  with_config = flags.FlagValues()  # a script's flags, as finetune.py defines them
  flags.DEFINE_string("config", None, "a configs/*.py file", flag_values=with_config)
  monkeypatch.setattr(cli.flags, "FLAGS", with_config)
  with pytest.raises(SystemExit) as e:
    cli.parse_flags_with_config_keys(["finetune.py", "--keys"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert {"  model (required)", "  microbatches (default 1)",
          "  augment.crop_scale (default (0.08, 1.0))"} <= set(lines)
  shown = [line.strip().split(" (", 1)[0] for line in lines if line.startswith("  ")
           and not line.startswith("   ")]
  assert shown == [k.name for k in keys.KEYS] and len(shown) > 40
  text = " ".join(out.split())
  assert [k.name for k in keys.KEYS if " ".join(k.meaning.split()) not in text] == []
  # Every strategy's options, under strategy: their defaults per strategy and meaning.
  options = [line.strip().split(" (", 1)[0] for line in lines if line.startswith("    strategy.")]
  assert options == [f"strategy.{o}" for o in keys.STRATEGY_OPTIONS]
  assert "    strategy.probe_steps (lp_ft: 300)" in lines
  assert "    strategy.num_blocks (partial: 4)" in lines
  assert [o for o, (_, meaning) in keys.STRATEGY_OPTIONS.items()
          if " ".join(meaning.split()) not in text] == []
  # A script without --config (evaluate.py) has no --keys: an unknown flag, exit status 2.
  monkeypatch.setattr(cli.flags, "FLAGS", flags.FlagValues())
  with pytest.raises(SystemExit) as e:
    cli.parse_flags_with_config_keys(["evaluate.py", "--keys"])
  assert e.value.code == 2 and "keys" in capsys.readouterr().err


def test_none_on_the_command_line_is_none(monkeypatch):
  from absl import flags
  from ml_collections import config_flags

  ROOT = Path(__file__).resolve().parents[2]
  with_config = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=with_config)
  monkeypatch.setattr(cli.flags, "FLAGS", with_config)
  cli.parse_flags_with_config_keys([
      "finetune.py", f"--config={ROOT / 'configs' / 'default.py'}", "--config.clip_norm=None",
      "--config.test_split=None", "--config.strategy.probe_steps=None"])
  config = with_config.config
  assert (config.clip_norm, config.test_split, config.strategy.probe_steps) == (None,) * 3
  with pytest.raises(SystemExit) as e:  # a key the config lacks: the usual error
    cli.parse_flags_with_config_keys([
        "finetune.py", f"--config={ROOT / 'configs' / 'default.py'}", "--config.clip_nrom=None"])
  assert e.value.code == 2


def test_asked_for_help_exits_0_and_an_unknown_flag_2(monkeypatch, capsys):
  from absl import app, flags
  script_flags = flags.FlagValues()
  for help_flag in (app.HelpFlag(), app.HelpfullFlag()):
    flags.DEFINE_flag(help_flag, flag_values=script_flags)
  monkeypatch.setattr(cli.flags, "FLAGS", script_flags)
  for argv, status in ((["convert.py", "--help"], 0), (["convert.py", "--helpfull"], 0),
                       (["convert.py", "--bogus"], 2)):
    with pytest.raises(SystemExit) as e:
      cli.parse_flags_with_config_keys(argv)
    assert e.value.code == status, argv
  assert "Try --helpfull" in capsys.readouterr().out  # absl printed the usage


STUCK = """
import threading, time
from jtl.app import cli
from jtl.errors import CheckpointError
cli.EXIT_GRACE_S = 0.5
threading.Thread(target=time.sleep, args=(600,), name="stuck-upload").start()  # not daemon

@cli.exit_on_jtl_error
def main(argv):
  raise CheckpointError("Saving a checkpoint to gs://bucket/run failed.")

main([])
"""


def test_a_script_exits_with_its_error_status_though_a_thread_hangs(tmp_path):
  script = tmp_path / "script.py"
  script.write_text(STUCK)
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
  assert done.returncode == 2  # not held for the 600 s the thread sleeps
  assert "CheckpointError: Saving a checkpoint" in done.stderr
  assert "without waiting for background threads ['MainThread', 'stuck-upload']" in done.stderr
