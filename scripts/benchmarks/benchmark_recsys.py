"""Item cold-start recommendation on MovieLens 100K: MiniLM's text features
of a new movie rank the users who will like it (configs/recsys_movielens.py,
run by `jtl.app.experiment.finetune` as `scripts/finetune.py` runs it).

Metric: Recall@20 over the movies of a split (`jtl.data.ratings.recall_at_k`:
of the k top-ranked users, the share of the movie's fans, out of at most
20). The head trains on cached features and is saved at its last step, so
the number of steps is picked on the validation movies' recall with seed 0
(`--step_grid`); every seed then runs that many steps and is scored on the
test movies once. Arms:

- minilm probe: the pretrained encoder frozen, the 943-user head on its
  cached features (the config as it is);
- random-init probe: the same encoder from random weights, same training
  (what the text alone gives without pretraining);
- popularity: no text, every movie gets the same ranking, the users by how
  many training movies they liked (the usual cold-start fallback).

  python scripts/benchmarks/benchmark_recsys.py --results recsys.jsonl

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
from configs import recsys_movielens  # noqa: E402
from jtl.app import experiment, workdirs  # noqa: E402
from jtl.data import ratings  # noqa: E402

ARMS = {"minilm probe": {}, "random-init probe": {"pretrained": False}}
K = 20


def scores_of(workdir: Path, step: int, texts: np.ndarray) -> np.ndarray:
  run = workdirs.restore(workdir, step=step)
  model, preprocess = run.model("linen"), run.preprocess
  out = [np.asarray(model(preprocess(list(texts[i:i + 128])))) for i in range(0, len(texts), 128)]
  return np.concatenate(out)


def run(arm: str, seed: int, steps: int, args: argparse.Namespace, data: ratings.Ratings,
        *, test: bool) -> dict:
  c = recsys_movielens.get_config()
  c.num_steps = c.eval_every = c.checkpoint_every = steps
  c.seed = seed
  for key, value in ARMS[arm].items():
    setattr(c, key, value)
  workdir = Path(args.workdir) / f"{arm.replace(' ', '_')}-{seed}-{steps}"
  start = time.perf_counter()
  experiment.finetune(c, workdir, progress=False)
  recall = lambda split: ratings.recall_at_k(scores_of(workdir, steps, data.texts[split]),
                                             data.liked[split], K)
  return {"arm": arm, "seed": seed, "steps": steps, "val_recall": recall("validation"),
          "test_recall": recall("test") if test else None,
          "seconds": round(time.perf_counter() - start, 1)}


def popularity(data: ratings.Ratings) -> dict:
  counts = data.liked["train"].sum(0)
  recall = lambda split: ratings.recall_at_k(
      np.broadcast_to(counts, data.liked[split].shape), data.liked[split], K)
  return {"arm": "popularity", "seed": 0, "steps": 0, "val_recall": recall("validation"), "test_recall": recall("test"), "seconds": 0.0}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default="recsys.jsonl")
  p.add_argument("--workdir", default="runs/benchmark_recsys")
  p.add_argument("--step_grid", type=int, nargs="+", default=[200, 600])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--arms", nargs="+", default=list(ARMS))
  args = p.parse_args()
  data = ratings.movielens100k()
  path = Path(args.results)
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  def get(arm: str, seed: int, steps: int, test: bool) -> dict:
    for r in rows:
      if (r["arm"], r["seed"], r["steps"]) == (arm, seed, steps) and (
          not test or r["test_recall"] is not None):
        return r
    row = popularity(data) if arm == "popularity" else run(arm, seed, steps, args, data,
                                                           test=test)
    print(json.dumps(row), flush=True)
    with path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    rows.append(row)
    return row

  table = [_row("popularity", "-", [get("popularity", 0, 0, True)])]
  for arm in args.arms:
    val = {steps: get(arm, args.seeds[0], steps, False)["val_recall"] for steps in args.step_grid}
    best = max(val, key=val.get)
    table.append(_row(arm, best, [get(arm, seed, best, True) for seed in args.seeds]))
  print(markdown_table(["arm", "steps (picked on val, seed 0)", "seeds", f"val Recall@{K} %",
                        f"test Recall@{K} % (mean ± std)", "per seed"], table))


def _row(arm: str, steps, got: list[dict]) -> list:
  t = [r["test_recall"] for r in got]
  return [arm, steps, len(got), f"{100 * np.mean([r['val_recall'] for r in got]):.1f}",
          f"{100 * np.mean(t):.1f} ± {100 * np.std(t):.1f}",
          " / ".join(f"{100 * x:.1f}" for x in t)]


if __name__ == "__main__":
  main()
