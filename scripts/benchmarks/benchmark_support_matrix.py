"""Runs every cell of the support matrix (tests/support_matrix.py) and checks
each against `expected(...)`: every zoo family (tiny, random weights) x every
strategy config x Linen / NNX, fine-tuned 2 steps through
`jtl.app.experiment.finetune`, evaluated as scripts/evaluate.py does, then
exported to each format as scripts/convert.py --workdir does.

  python scripts/benchmarks/benchmark_support_matrix.py [--family vit --strategy strategy.py:lora
      --api linen] [--out /tmp/matrix.jsonl]

Prints one line per cell as it completes (observed, expected, seconds) and
then a table; appends each cell to --out as JSON lines (rows already there
are skipped: a cut-off run continues). Exit status 1 when a cell disagrees.
The test suite runs a covering subset (tests/app/test_support_matrix.py).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402

import support_matrix as sm  # noqa: E402
from jtl.errors import Preempted  # noqa: E402

# Random init compiles ~5x faster with "rbg" than threefry on XLA:CPU (the
# weights are random anyway); one compilation cache for every cell.
jax.config.update("jax_default_prng_impl", "rbg")


def run_cell(family: str, strategy: str, api: str, work: Path, data: Path) -> list[dict]:
  """The training cell and its export cells: one row each."""
  workdir = work / f"{family}-{strategy.replace(':', '-')}-{api}"
  start = time.perf_counter()
  error = None
  try:
    sm.run_training(family, strategy, api, workdir, data)
  except Preempted:  # SIGTERM / SIGINT: fit stopped at a step; stop the whole run
    raise
  except Exception as e:  # pylint: disable=broad-except  (each cell reports its own)
    error = e
  observed = sm.outcome(error, workdir)
  rows = [_row(family, strategy, api, None, observed, time.perf_counter() - start)]
  for export in sm.EXPORTS:
    start = time.perf_counter()
    if error is None:
      try:
        sm.run_export(export, workdir)
        seen = sm.WORKS
      except Exception as e:  # pylint: disable=broad-except
        seen = sm.outcome(e, workdir, training=False)
    else:
      seen = observed  # the training cell's refusal (or failure) is the export's
    rows.append(_row(family, strategy, api, export, seen, time.perf_counter() - start))
  return rows


def _row(family, strategy, api, export, observed, seconds):
  want = sm.expected(family, strategy, api, export)
  return {"family": family, "strategy": strategy, "api": api, "export": export,
          "observed": observed[:500], "expected": want, "ok": sm.agrees(observed, want),
          "seconds": round(seconds, 1)}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--family", action="append", choices=list(sm.FAMILIES))
  parser.add_argument("--strategy", action="append", choices=sm.STRATEGIES)
  parser.add_argument("--api", action="append", choices=sm.APIS)
  parser.add_argument("--out", default=None, help="JSON lines, one per cell (appended).")
  args = parser.parse_args()
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/jtl_matrix_xla_cache"))
  done = set()
  if args.out and Path(args.out).exists():
    done = {(r["family"], r["strategy"], r["api"]) for r in map(json.loads, open(args.out))}
  work = Path(tempfile.mkdtemp(prefix="jtl_matrix_"))
  data = sm.make_image_folder(work / "images")
  rows, start = [], time.perf_counter()
  # Linen first (the whole family x strategy table), then NNX: a run cut short has the table.
  for api in args.api or sm.APIS:
    for strategy in args.strategy or sm.STRATEGIES:
      for family in args.family or sm.FAMILIES:
        if (family, strategy, api) in done:
          continue
        cell = run_cell(family, strategy, api, work, data)
        for r in cell:
          print(f"{'ok ' if r['ok'] else 'BAD'} {family} {strategy} {api} {r['export'] or 'train'}"
                f": {r['observed'][:160]} (expected {r['expected']}) {r['seconds']}s", flush=True)
        if args.out:
          with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in cell)
        rows += cell
  bad = [r for r in rows if not r["ok"]]
  print(f"\n{len(rows) - len(bad)} of {len(rows)} cells as expected, {len(bad)} not, "
        f"in {time.perf_counter() - start:.0f}s")
  for r in bad:
    print(f"  {r['family']} {r['strategy']} {r['api']} {r['export'] or 'train'}: "
          f"{r['observed'][:300]}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
