"""Test setup: 8 fake CPU devices and strict numerics, before jax is imported."""

import importlib.metadata
import os


def _checked_xla() -> bool:
  """Whether the installed jaxlib's XLA is one known to take the flag below:
  XLA aborts on a flag it does not know, so a newer jaxlib runs without it
  (slower, not wrong) until someone checks it again."""
  try:
    return importlib.metadata.version("jaxlib").split(".")[:2] == ["0", "10"]
  except importlib.metadata.PackageNotFoundError:
    return False


# XLA:CPU's legacy elemental emitters instead of its fusion emitters: the
# tiny test programs compile ~4x faster (tests/models, with the level 0 below:
# 165 -> 135 CPU s; test_steps + test_model_kinds 80 -> 37). One LLVM module
# per program instead of 32 compiled in parallel: the two xdist workers
# already fill the cores (test_steps, test_layers, test_strategies_core and
# test_vit: 36.5 -> 33.7 s and 35.1 -> 33.7 s).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    + (" --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
       if _checked_xla() else ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA compiles at backend optimization level 0 without expensive LLVM passes
# (jax_disable_most_optimizations): the suite's tiny programs spend far longer
# compiling than running (test_steps + test_model_kinds: 128 -> 80 CPU s), and
# every comparison here is between jtl's programs or within a tolerance, never
# of speed. In the environment, so the scripts' subprocesses compile the same
# way; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
# XLA:CPU takes seconds to compile each threefry call (every new shape of
# random init); the "rbg" generator compiles ~5x faster. Tests compare runs
# with each other, never with fixed random draws, so the generator is free.
jax.config.update("jax_default_prng_impl", "rbg")

import pytest  # noqa: E402

# Fixtures every test folder can ask for by name.
from hub_helpers import fake_hub  # noqa: E402,F401 - the local Hub server


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """XLA programs compiled once per test process: app runs (experiment.finetune,
  the scripts' code paths) build fresh jitted steps each time, so each test
  that trains twice, or like an earlier test, compiled the same programs again
  (~45% of test_folder_config's CPU). jax's persistent cache, in this
  process's temp folder (empty at its start, one per xdist worker: no
  concurrent writers), serves them after the first compile; a cached program
  is the same executable, so results do not change."""
  path = tmp_path_factory.mktemp("xla_cache")
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir for the datasets jtl builds locally (jtl_digits, ...):
  built once per test process, shared by the tests that train on them."""
  return tmp_path_factory.mktemp("tfds")

# Fixture generators run with torch (never in the test suite): don't collect them.
# A config file that registers a model at import: test_own_model.py checks that a
# process which never imported it (doctest collection would) can restore the run.
collect_ignore_glob = ["fixtures/make_*.py", "own_model_pkg/registered_config.py"]
