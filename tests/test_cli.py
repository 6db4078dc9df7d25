"""The scripts' helpers: the huge-pages hint and what the tunable does."""

import os
import subprocess
import sys

import pytest

from jtl import cli

PROBE = """
import jax.numpy as jnp
x = (jnp.zeros((64, 1024, 1024), jnp.float32) + 1).block_until_ready()  # 256 MiB from XLA
with open("/proc/self/smaps_rollup") as f:
  print([int(l.split()[1]) for l in f if l.startswith("AnonHugePages")][0])
"""


def _thp(tmp_path, setting):
  path = tmp_path / "enabled"
  path.write_text(setting)
  return str(path)


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
                    reason="glibc only")
def test_hint_names_the_tunable_only_where_it_helps(tmp_path):
  madvise = _thp(tmp_path, "always [madvise] never\n")
  hint = cli.huge_pages_hint({}, madvise)
  assert hint is not None and f"GLIBC_TUNABLES={cli.HUGE_PAGES_TUNABLE}" in hint
  # An existing value is kept in front of ours.
  assert "GLIBC_TUNABLES=glibc.cpu.x86_avx=1:glibc.malloc.hugetlb=1" in cli.huge_pages_hint(
      {"GLIBC_TUNABLES": "glibc.cpu.x86_avx=1"}, madvise)
  assert cli.huge_pages_hint({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}, madvise) is None
  assert cli.huge_pages_hint({}, _thp(tmp_path, "[always] madvise never\n")) is None
  assert cli.huge_pages_hint({}, _thp(tmp_path, "always madvise [never]\n")) is None
  assert cli.huge_pages_hint({}, str(tmp_path / "missing")) is None


@pytest.mark.skipif(cli.huge_pages_hint({}) is None,
                    reason="kernel or glibc cannot give huge pages on request")
def test_tunable_backs_xla_buffers_with_huge_pages():
  def huge_kib(tunables):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update({"JAX_PLATFORMS": "cpu", **tunables})
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])
  assert huge_kib({"GLIBC_TUNABLES": cli.HUGE_PAGES_TUNABLE}) >= 128 * 1024
  assert huge_kib({}) < 16 * 1024
