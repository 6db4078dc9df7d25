"""The linear probe through scripts/finetune.py, on cached features and
without: seconds per epoch each way, and their ratio, in one run.

  nice -n 10 .venv/bin/python scripts/benchmarks/benchmark_probe_cache.py \
      --data /path/to/folder --epochs 4 --image_size 224

`--data` is an image folder with train/ and test/ folders of class folders.
Each mode is one `scripts/finetune.py --config configs/linear_probe.py` run
in a fresh process (cold XLA compilation cache, glibc heap tunables as
`make finetune` sets them), differing only in `strategy.cache_features`:

  cached    one backbone pass over the training split (`extract_seconds`),
            then every head step on the cache in one compiled scan
            (`head_seconds`, of which `head_compile_seconds` compiling it);
  uncached  the plain training step: each epoch runs the frozen backbone
            over every training image again.

Evaluation and the checkpoint come at the last step only, so the uncached
run's per-epoch log windows hold training steps alone; its first epoch also
holds the step's compilation and is reported apart (s/epoch is the median of
the others). Per epoch, cached = (head_seconds - head_compile_seconds) /
epochs; the one-off costs (backbone pass, compilation) are columns of their
own, and the wall time of each whole process is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[2]
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def count_images(folder: Path) -> int:
  return sum(1 for p in folder.rglob("*") if p.is_file())


def finetune_args(args: argparse.Namespace, workdir: Path, cache: bool, per_epoch: int
                  ) -> list[str]:
  """The finetune.py command line of one mode."""
  return [sys.executable, str(ROOT / "scripts" / "finetune.py"),
          "--config", str(ROOT / "configs" / "linear_probe.py"), "--workdir", str(workdir),
          f"--config.dataset=folder:{args.data}", "--config.train_split=train",
          "--config.eval_split=test", f"--config.image_size={args.image_size}",
          f"--config.batch_size={args.batch_size}",
          f"--config.eval_batch_size={args.batch_size}",
          f"--config.num_steps={args.epochs * per_epoch}", "--config.eval_every=0",
          "--config.checkpoint_every=0", f"--config.log_every={per_epoch}",
          "--config.warmup_steps=0", f"--config.strategy.cache_features={cache}"]


def run_mode(args: argparse.Namespace, root: Path, cache: bool, per_epoch: int
             ) -> dict[str, float]:
  """Runs one mode; returns its timings and final eval accuracy."""
  workdir = root / ("cached" if cache else "uncached")
  env = {**os.environ, "GLIBC_TUNABLES": TUNABLES, "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(workdir) + "_xla"}
  t0 = time.perf_counter()
  proc = subprocess.run(finetune_args(args, workdir, cache, per_epoch), capture_output=True,
                        text=True, env=env, cwd=ROOT)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f"finetune.py failed ({'cached' if cache else 'uncached'}):\n"
                     f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  accuracy = [r for r in rows if r["split"] == "eval"][-1]["accuracy"]
  if cache:
    (row,) = train
    compile_s = row["head_compile_seconds"]
    return {"wall": wall, "accuracy": accuracy, "extract": row["extract_seconds"],
            "compile": compile_s, "first_epoch": float("nan"),
            "epoch": (row["head_seconds"] - compile_s) / args.epochs}
  epochs = [per_epoch / r["steps_per_second"] for r in train]
  return {"wall": wall, "accuracy": accuracy, "extract": 0.0, "compile": float("nan"),
          "first_epoch": epochs[0], "epoch": statistics.median(epochs[1:])}


def table(results: dict[str, dict[str, float]], args: argparse.Namespace, n: int,
          per_epoch: int) -> str:
  c, u = results["cached"], results["uncached"]
  lines = [f"EfficientNet-Lite0 linear probe (configs/linear_probe.py) at {args.image_size} px, "
           f"{n} training images, batch {args.batch_size} ({per_epoch} steps/epoch), "
           f"{args.epochs} epochs"]
  cell = lambda v, digits: "-" if v != v else f"{v:.{digits}f}"  # NaN: no such cost
  rows = [[name, cell(r["extract"], 2), cell(r["compile"], 2), cell(r["first_epoch"], 2),
           f"{r['epoch']:.5f}", f"{r['wall']:.1f}", f"{r['accuracy']:.3f}"]
          for name, r in results.items()]
  lines.append(common.markdown_table(
      ["mode", "one-off backbone pass s", "head scan compile s", "first epoch s", "s/epoch",
       "process wall s", "eval acc"], rows, align="lrrrrrr"))
  lines.append(f"per-epoch speed-up (uncached s/epoch / cached s/epoch): "
               f"{u['epoch'] / c['epoch']:.0f}x; counting the head scan's compilation in the "
               f"cached epochs: {u['epoch'] / (c['epoch'] + c['compile'] / args.epochs):.1f}x; "
               f"whole process: {u['wall'] / c['wall']:.2f}x "
               f"(eval acc: one seed, {args.epochs} epochs; a sanity check, not a result)")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", type=Path, required=True, help="folder with train/ and test/")
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir")
  args = p.parse_args()
  n = count_images(args.data / "train")
  per_epoch = n // args.batch_size
  if per_epoch < 1 or args.epochs < 3:
    raise SystemExit(f"need >= 1 step per epoch and >= 3 epochs; got {n} images, batch "
                     f"{args.batch_size}, {args.epochs} epochs")
  root = args.workdir or Path(tempfile.mkdtemp(prefix="jtl_probe_cache_"))
  results = {}
  for cache in (True, False):
    results["cached" if cache else "uncached"] = run_mode(args, root, cache, per_epoch)
  print(table(results, args, n, per_epoch))


if __name__ == "__main__":
  main()
