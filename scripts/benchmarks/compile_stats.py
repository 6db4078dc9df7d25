"""Where the test suite's time goes: a pytest plugin that adds up, per test,
jax's own timings of tracing, lowering and XLA compiles (and their counts).

    PYTHONPATH=scripts/benchmarks .venv/bin/python -m pytest -q -p no:cacheprovider \
        -p compile_stats -n 2 --dist loadfile -m "not slow" tests jtl
    .venv/bin/python scripts/benchmarks/compile_stats.py   # the tables

Each xdist worker writes `$COMPILE_STATS_DIR/<worker>.json` (default
/tmp/compile_stats) at the end of its session. Only the test's own process is
counted: the scripts' subprocesses are not. The timings are wall times of
the listener's events, so a loaded machine inflates them.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import pytest

OUT = Path(os.environ.get("COMPILE_STATS_DIR", "/tmp/compile_stats"))
EVENTS = {"jaxpr_trace_duration": "trace", "jaxpr_to_mlir_module_duration": "lower",
          "backend_compile_duration": "compile"}
_stats: dict[str, dict[str, float]] = {}
_current: dict[str, str | None] = {"test": None}


def _listener(event: str, duration: float, **kwargs) -> None:
  del kwargs
  name = EVENTS.get(event.rsplit("/", 1)[-1])
  test = _current["test"]
  if name and test:
    row = _stats.setdefault(test, {})
    row[name] = row.get(name, 0.0) + duration
    row[name + "_n"] = row.get(name + "_n", 0) + 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  import jax  # pylint: disable=g-import-not-at-top - after the suite's conftest set XLA up
  if not getattr(_listener, "registered", False):
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _listener.registered = True
  _current["test"], start = item.nodeid, time.perf_counter()
  yield
  _stats.setdefault(item.nodeid, {})["wall"] = time.perf_counter() - start
  _current["test"] = None


def pytest_sessionfinish(session):
  del session
  OUT.mkdir(parents=True, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  (OUT / f"{worker}.json").write_text(json.dumps(_stats))


def main() -> None:
  stats: dict[str, dict[str, float]] = {}
  for path in glob.glob(str(OUT / "*.json")):
    stats.update(json.loads(Path(path).read_text()))
  total = {k: sum(row.get(k, 0.0) for row in stats.values())
           for k in ("wall", "trace", "lower", "compile", "trace_n", "lower_n", "compile_n")}
  print(f"{len(stats)} tests: wall {total['wall']:.0f} s; trace {total['trace']:.0f} s "
        f"({total['trace_n']:.0f}), lower {total['lower']:.0f} s ({total['lower_n']:.0f}), "
        f"compile {total['compile']:.0f} s ({total['compile_n']:.0f})\n")
  print("| test | wall s | trace s | lower s | compile s | compiles |")
  print("|---|---:|---:|---:|---:|---:|")
  for test, row in sorted(stats.items(), key=lambda kv: -kv[1].get("wall", 0.0))[:30]:
    print(f"| {test} | {row.get('wall', 0):.1f} | {row.get('trace', 0):.1f} | "
          f"{row.get('lower', 0):.1f} | {row.get('compile', 0):.1f} | "
          f"{row.get('compile_n', 0):.0f} |")


if __name__ == "__main__":
  main()
