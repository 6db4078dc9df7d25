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


ROOT = Path(__file__).resolve().parents[2]


def _parse(monkeypatch, capsys, *args):
  """finetune.py's flag parsing of `args` (sys.argv too: ml_collections reads
  the overrides there): (the config, None) or (None, the error's text)."""
  from absl import flags
  from ml_collections import config_flags
  script_flags = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=script_flags, lock_config=True)
  argv = ["finetune.py", *args]
  monkeypatch.setattr(cli.flags, "FLAGS", script_flags)
  monkeypatch.setattr(sys, "argv", argv)
  monkeypatch.chdir(ROOT)
  try:
    cli.parse_flags_with_config_keys(argv)
  except SystemExit as e:
    assert e.code == 2
    return None, capsys.readouterr().err
  return script_flags.config, None


def test_dict_keys_are_valid_so_the_real_error_is_reported(monkeypatch, capsys):
  """Audit item 3: model_kwargs / lr_multipliers were 'unknown config keys'
  whenever another error existed, hiding it."""
  cnn = "--config=configs/small_cnn.py"
  config, _ = _parse(monkeypatch, capsys, cnn, "--config.model_kwargs={'width': 16}",
                     "--config.lr_multipliers={'all': 2.0}")
  assert config.model_kwargs.to_dict() == {"width": 16} and config.lr_multipliers.all == 2.0
  for dict_key in ("--config.model_kwargs={'width': 16}", "--config.lr_multipliers={'all': 2.0}"):
    _, err = _parse(monkeypatch, capsys, cnn, dict_key, "--config.num_steps=ten")
    assert "unknown config key" not in err and "--config.num_steps=ten" in err, err
  _, err = _parse(monkeypatch, capsys, cnn, "--config.model_kwargs={'width': 16")
  assert err.startswith("ConfigError: --config.model_kwargs={'width': 16 could not be parsed as "
                        "a dict (SyntaxError: '{' was never closed)"), err


def test_the_last_none_or_value_of_a_key_wins(monkeypatch, capsys):
  """Audit item 4: `--config.key=None` won whatever its position."""
  cnn = "--config=configs/small_cnn.py"
  config, _ = _parse(monkeypatch, capsys, cnn, "--config.test_split=None",
                     "--config.test_split=tset")
  assert config.test_split == "tset"
  config, _ = _parse(monkeypatch, capsys, cnn, "--config.test_split=tset",
                     "--config.test_split=None")
  assert config.test_split is None
  config, _ = _parse(monkeypatch, capsys, cnn, "--config.clip_norm", "None",
                     "--config.test_split", "None", "--config.num_steps", "7")
  assert (config.clip_norm, config.test_split, config.num_steps) == (None, None, 7)
  config, _ = _parse(monkeypatch, capsys, cnn, "--config.test_split", "None",
                     "--config.test_split=tset")
  assert config.test_split == "tset"


def test_a_tuple_key_takes_comma_separated_names_with_colons_and_slashes(monkeypatch, capsys):
  """Audit: configs/folder.py's documented `--config.model_candidates=a,hf-hub:o/n`
  exited 2: ml_collections reads a tuple's value as a Python literal."""
  folder = "--config=configs/folder.py"
  config, err = _parse(monkeypatch, capsys, folder,
                       "--config.model_candidates=efficientnet_lite0,hf-hub:timm/resnet50.a1_in1k")
  assert config.model_candidates == ("efficientnet_lite0", "hf-hub:timm/resnet50.a1_in1k"), err
  config, _ = _parse(monkeypatch, capsys, folder, "--config.model_candidates=efficientnet_lite1")
  assert config.model_candidates == ("efficientnet_lite1",)
  config, err = _parse(monkeypatch, capsys, folder, "--config.model_candidates",
                       "efficientnet_lite0,hf-hub:timm/resnet50.a1_in1k", "--config.num_epochs=2")
  assert config.model_candidates == ("efficientnet_lite0", "hf-hub:timm/resnet50.a1_in1k"), err
  assert config.num_epochs == 2
  config, _ = _parse(monkeypatch, capsys, folder,
                     "--config.model_candidates=('a', 'local/folder')")
  assert config.model_candidates == ("a", "local/folder")


def test_a_missing_or_failing_config_file_is_one_message(monkeypatch, capsys):
  """Audit item 8: raw OSError tracebacks / a traceback inside the message."""
  _, err = _parse(monkeypatch, capsys, "--config=configs/nope.py", "--config.num_steps=3")
  assert "ConfigError: --config=configs/nope.py: no config file 'configs/nope.py'" in err, err
  assert "config files in configs/: adversarial.py, default.py" in err and "Traceback" not in err
  _, err = _parse(monkeypatch, capsys, "--config=configs/partial.py:abc")
  assert err.strip() == ("ConfigError: --config=configs/partial.py:abc: configs/partial.py's "
                         "get_config('abc') failed: ValueError: invalid literal for int() with "
                         "base 10: 'abc'"), err


def test_an_unknown_key_names_the_nearest_valid_ones(monkeypatch, capsys):
  """Audit items 10 and 11: a typo gets suggestions, not 60 keys; a method's
  option and strategy.seed say how to set them."""
  cnn = "--config=configs/small_cnn.py"
  _, err = _parse(monkeypatch, capsys, cnn, "--config.learning_rat=3")
  assert "learning_rat: did you mean learning_rate" in err and "  api\n" not in err, err
  _, err = _parse(monkeypatch, capsys, cnn, "--config.strategy.seed=3")
  assert "strategy.seed: did you mean seed?" in err, err
  _, err = _parse(monkeypatch, capsys, cnn, "--config.method.teacher_workdir=/x")
  assert "--config.method=\"{'name': 'distill', 'teacher_workdir': 'runs/teacher'}\"" in err
  config, _ = _parse(monkeypatch, capsys, cnn,
                     "--config.method={'name': 'distill', 'teacher_workdir': '/x'}")
  assert config.method.teacher_workdir == "/x"
