"""The scripts' CPU runtime set-up: glibc heap reuse plus synchronous dispatch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jtl import cli

# Loads jtl/cli.py alone (importing jtl would take seconds), sets up the
# runtime, then counts the page faults of a step shaped like a training step:
# donated state, temporaries of 36 MiB (above glibc's largest mmap threshold).
PROBE = f"""
import importlib.util, resource
spec = importlib.util.spec_from_file_location("cli", {str(Path(cli.__file__))!r})
cli = importlib.util.module_from_spec(spec); spec.loader.exec_module(cli)
print("hint:", cli.configure_cpu_runtime())
import jax, jax.numpy as jnp
step = jax.jit(lambda s, w: s * 0.5 + jnp.tanh(s @ w) @ w.T * 1e-3, donate_argnums=0)
s, w = jnp.ones((9216, 1024)), jnp.ones((1024, 128)) * 1e-3
for _ in range(3):
  s = step(s, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  s = step(s, w).block_until_ready()
print("faults per step:", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""

ON_GLIBC = cli.on_glibc()


def _probe(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update({"JAX_PLATFORMS": "cpu", **({"GLIBC_TUNABLES": tunables} if tunables else {})})
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                       capture_output=True, text=True).stdout
  hint = out.split("hint: ", 1)[1].split("\n", 1)[0]
  return hint, float(out.split("faults per step: ")[1])


@pytest.mark.skipif(not ON_GLIBC, reason="glibc only")
def test_missing_tunables_are_named_and_kept_after_existing_ones():
  assert cli.missing_heap_tunables({}) == list(cli.HEAP_REUSE_TUNABLES)
  assert cli.missing_heap_tunables(
      {"GLIBC_TUNABLES": "glibc.cpu.x86_avx=1:" + cli.HEAP_REUSE_TUNABLES[1]}) == [
          cli.HEAP_REUSE_TUNABLES[0]]


@pytest.mark.skipif(not ON_GLIBC, reason="glibc only")
def test_heap_reuse_removes_the_page_faults_of_each_step():
  hint, faults = _probe("glibc.cpu.x86_avx=1")
  expected = "GLIBC_TUNABLES=glibc.cpu.x86_avx=1:" + ":".join(cli.HEAP_REUSE_TUNABLES)
  assert expected in hint
  assert faults > 8_000  # 36 MiB from fresh 4 KiB pages, every step
  hint, faults = _probe(":".join(cli.HEAP_REUSE_TUNABLES))
  assert hint == "None"
  assert faults < 100
