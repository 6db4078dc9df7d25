"""What `import jtl` costs, against `import jax, flax, optax`; prints a table.

Each statement runs in a fresh Python process, `--repeats` times, the
statements interleaved so that machine load falls on all of them alike. For
each run it records the wall time of the whole process (interpreter start
included), its CPU time (user + system) and peak resident set (`ru_utime`,
`ru_stime`, `ru_maxrss` from `os.wait4`), and reports medians (and the
fastest run), and ratios of the medians to `import jax, flax, optax` from
the same run. CPU time varies less than wall time on a busy machine. The children run in an empty
directory with PYTHONPATH set to the checkout, so `--before` can point at
another checkout (e.g. the previous commit) to put its numbers in the same
table:

  git archive HEAD~1 jtl | tar -x -C /tmp/jtl_before
  python scripts/benchmarks/benchmark_import.py --before /tmp/jtl_before
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "import jax, flax, optax"


def run_once(statement: str, pythonpath: Path, cwd: str) -> tuple[float, float, int, float]:
  """Returns (wall s, peak RSS MiB, lines printed, CPU s) of one fresh process."""
  env = dict(os.environ, PYTHONPATH=str(pythonpath))
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-c", statement], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  with proc.stdout:
    out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f"`{statement}` (PYTHONPATH={pythonpath}) failed:\n{out.decode()}")
  lines = len(out.decode(errors="replace").splitlines())
  return wall, usage.ru_maxrss / 1024, lines, usage.ru_utime + usage.ru_stime


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7, help="processes per statement")
  parser.add_argument("--before", type=Path, default=None,
                      help="another checkout (holding jtl/) to measure as 'before'")
  args = parser.parse_args()

  cases = [("`import jax, flax, optax`", BASELINE, ROOT)]
  if args.before is not None:
    cases.append(("`import jtl` before", "import jtl", args.before.resolve()))
  cases += [("`import jtl`", "import jtl", ROOT),
            ("`import jtl, jtl.data.pipeline` (first make_dataset)",
             "import jtl, jtl.data.pipeline", ROOT)]
  results: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name, _, _ in cases}
  with tempfile.TemporaryDirectory() as cwd:
    for name, statement, path in cases:  # warm the file cache; not counted
      run_once(statement, path, cwd)
    for _ in range(args.repeats):
      for name, statement, path in cases:
        results[name].append(run_once(statement, path, cwd))

  med = {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                max(r[2] for r in runs), min(r[0] for r in runs),
                statistics.median(r[3] for r in runs))
         for name, runs in results.items()}
  base_t, base_m, _, _, base_c = med[cases[0][0]]
  print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end, "
        f"Python {platform.python_version()}, {datetime.date.today()}, median of "
        f"{args.repeats} fresh processes")
  print()
  print("| statement | wall s (fastest) | CPU s | peak RSS MiB | time / baseline "
        "| CPU / baseline | RSS / baseline | lines printed |")
  print("|---|---|---|---|---|---|---|---|")
  for name, _, _ in cases:
    t, m, lines, fastest, c = med[name]
    print(f"| {name} | {t:.2f} ({fastest:.2f}) | {c:.2f} | {m:.0f} | {t / base_t:.2f}x "
          f"| {c / base_c:.2f}x | {m / base_m:.2f}x | {lines} |")


if __name__ == "__main__":
  main()
