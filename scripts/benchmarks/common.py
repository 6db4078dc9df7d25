"""What the benchmark scripts share: timers, Markdown tables, accuracy over
padded batches, the cosine AdamW recipe and the PyTorch reference models.

The scripts import it as `common` (they run from this folder's path); it
imports jax, jtl and torch only inside the functions that need them, so a
torch-only worker process (benchmark_models.py) can use it too.

>>> print(markdown_table(["model", "img/s"], [["lite0", 50.6], ["mnv2", 67.9]]))
| model | img/s |
|---|---|
| lite0 | 50.6 |
| mnv2 | 67.9 |
>>> import numpy as np
>>> accuracy(lambda x: np.stack([x[:, 0], -x[:, 0]], -1), np.array([[1.], [-1.], [2.]]),
...          np.array([0, 1, 1]), batch_size=2)
0.6666666666666666
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _ready(out: Any) -> Any:
  """Waits for `out` (JAX dispatches asynchronously; numpy and torch do not)."""
  if "jax" in sys.modules:
    return sys.modules["jax"].block_until_ready(out)
  return out


def call_seconds(fn: Callable[[], Any], runs: int, *, warmup: int = 1) -> list[float]:
  """Seconds of each of `runs` calls of `fn()`, after `warmup` untimed calls
  (compilation, allocation); each call's result is waited for."""
  for _ in range(warmup):
    _ready(fn())
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    _ready(fn())
    times.append(time.perf_counter() - t)
  return times


def median_seconds(fn: Callable[[], Any], runs: int, *, warmup: int = 1) -> float:
  """The median of `call_seconds`."""
  return float(statistics.median(call_seconds(fn, runs, warmup=warmup)))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   align: Sequence[str] | None = None) -> str:
  """A Markdown table; `align` per column: "l" (default) or "r" (`---:`)."""
  align = align or ["l"] * len(header)
  lines = ["| " + " | ".join(map(str, header)) + " |",
           "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
  lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
  return "\n".join(lines)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """`title`, a blank line and the Markdown table, on stdout."""
  print(f"\n{title}\n\n" + markdown_table(header, rows), flush=True)


def predict_padded(fn: Callable[[Any], Any], x: Any, batch_size: int) -> Any:
  """`fn` over `x` in batches; the last batch is padded with copies of its
  last row, so that a jitted `fn` compiles one shape, and the padding dropped."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  outs = []
  for i in range(0, len(x), batch_size):
    xb = x[i:i + batch_size]
    pad = batch_size - len(xb)
    if pad:
      xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
    outs.append(np.asarray(fn(xb))[:batch_size - pad])
  return np.concatenate(outs)


def accuracy(logits_fn: Callable[[Any], Any], x: Any, y: Any, *,
             batch_size: int = 250) -> float:
  """Top-1 accuracy of `logits_fn` on (x, y), in padded batches."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  predictions = predict_padded(lambda xb: np.asarray(logits_fn(xb)).argmax(-1), x, batch_size)
  return float(np.mean(predictions == np.asarray(y)))


def cosine_adamw(labels: Any, lr: float, steps: int, *, weight_decay: float,
                 warmup_steps: int = 0) -> Any:
  """AdamW over `labels` (jtl.make_optimizer) with a linear warm-up from 0
  for `warmup_steps`, then cosine decay to 0 at `steps`."""
  import optax  # pylint: disable=g-import-not-at-top

  import jtl  # pylint: disable=g-import-not-at-top
  schedule = (optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, steps) if warmup_steps
              else optax.cosine_decay_schedule(lr, steps))
  return jtl.make_optimizer(labels, learning_rate=schedule, optimizer="adamw",
                            weight_decay=weight_decay)


def torch_model(name: str, num_classes: int = 1000) -> Any:
  """The PyTorch reference of a zoo model, random weights: "efficientnet_lite0"
  (efficientnet-lite-pytorch) or "mobilenet_v2" (torchvision's architecture
  and names, written out once in tests/fixtures/torch_mobilenet_v2.py)."""
  if name == "efficientnet_lite0":
    from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=g-import-not-at-top
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
  if name != "mobilenet_v2":
    raise SystemExit(f"no PyTorch reference for {name!r}: efficientnet_lite0 or mobilenet_v2")
  # Loaded from its file: tests/ is no package of the torch environment.
  path = ROOT / "tests" / "fixtures" / "torch_mobilenet_v2.py"
  spec = importlib.util.spec_from_file_location("torch_mobilenet_v2", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.mobilenet_v2(num_classes=num_classes)
