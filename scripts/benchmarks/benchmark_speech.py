"""Spoken digits (FSDD) from few labels: the pretrained speech_embedding
against the same network from random weights, through the app's own path
(`configs/speech_fsdd.py` run by `jtl.app.experiment.finetune`, as
`scripts/finetune.py` runs it).

Each arm and seed trains on `--train_split` (default "train[:120]": two
recordings of each digit by each of the 6 speakers, FSDD's train split being
ordered by recording index), picks its best checkpoint on `--eval_split`
(default "train[-300:]": the last five recordings of each speaker and
digit, never trained on) and scores it once on FSDD's test split
(recordings 0-4). Arms:

- fine-tune: the pretrained network, all of it (configs/speech_fsdd.py);
- probe: the pretrained network frozen, the head on cached features;
- scratch: the same network and schedule from random weights.

  python scripts/benchmarks/benchmark_speech.py --fsdd /path/to/free-spoken-digit-dataset \\
    --results speech.jsonl

Rows already in `--results` are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # configs/ is a folder of plain modules
sys.path.insert(0, str(Path(__file__).parent))

from common import markdown_table  # noqa: E402
from configs import speech_fsdd  # noqa: E402
from jtl.app import evaluation, experiment  # noqa: E402

ARMS = {
    "fine-tune": {},
    "probe": {"strategy": {"name": "linear_probe", "cache_features": True},
              "learning_rate": 1e-2, "weight_decay": 0.0, "lr_multipliers": {}},
    "scratch": {"pretrained": False},
}


def config_for(arm: str, seed: int, args: argparse.Namespace):
  c = speech_fsdd.get_config()
  c.dataset = f"fsdd:{args.fsdd}"
  c.train_split, c.eval_split = args.train_split, args.eval_split
  c.num_steps, c.seed = args.steps, seed
  c.eval_every = c.checkpoint_every = args.eval_every
  for key, value in ARMS[arm].items():
    if key == "strategy":
      c.strategy = type(c)(value)
    elif key == "lr_multipliers":
      c.lr_multipliers = type(c)(value)
    else:
      setattr(c, key, value)
  return c


def run(arm: str, seed: int, args: argparse.Namespace) -> dict:
  workdir = Path(args.workdir) / f"{arm}-{seed}"
  start = time.perf_counter()
  config = config_for(arm, seed, args)
  experiment.finetune(config, workdir, progress=False)  # a finished workdir: nothing to do
  test = evaluation.evaluate_test_split(config, workdir)  # the best step, once
  return {"arm": arm, "seed": seed, "train_split": args.train_split, "steps": args.steps,
          "test_accuracy": test["accuracy"], "best_step": test["step"],
          "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--fsdd", required=True, help="the FSDD folder (holds recordings/)")
  p.add_argument("--results", default="speech.jsonl")
  p.add_argument("--workdir", default="runs/benchmark_speech")
  p.add_argument("--train_split", default="train[:120]")
  p.add_argument("--eval_split", default="train[-300:]")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--eval_every", type=int, default=50)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--arms", nargs="+", default=list(ARMS))
  args = p.parse_args()
  path = Path(args.results)
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  done = {(r["arm"], r["seed"], r["train_split"], r["steps"]) for r in rows}
  for arm in args.arms:
    for seed in args.seeds:
      if (arm, seed, args.train_split, args.steps) in done:
        continue
      row = run(arm, seed, args)
      print(json.dumps(row), flush=True)
      with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
      rows.append(row)
  table = []
  for arm in args.arms:
    acc = [r["test_accuracy"] for r in rows if r["arm"] == arm
           and r["train_split"] == args.train_split and r["steps"] == args.steps]
    if acc:
      table.append([arm, len(acc), f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc, ddof=1):.1f}",
                    " / ".join(f"{100 * a:.1f}" for a in acc)])
  print(markdown_table(["arm", "seeds", "test accuracy % (mean ± std)", "per seed"], table))


if __name__ == "__main__":
  main()
