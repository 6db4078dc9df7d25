"""Item cold-start recommendation on MovieLens 100K: MiniLM's text features
of a new movie rank the users who will like it (configs/recsys_movielens.py,
run by `jtl.app.experiment.finetune` as `scripts/finetune.py` runs it).

Metric: Recall@20 over the movies of a split (`jtl.data.ratings.recall_at_k`:
of the k top-ranked users, the share of the movie's fans, out of at most
20). Each run saves the head every 100 steps; the step is picked on the
validation movies' recall, and only that step is scored on the test
movies, once. Arms:

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


def run(arm: str, seed: int, args: argparse.Namespace, data: ratings.Ratings) -> dict:
  c = recsys_movielens.get_config()
  c.num_steps, c.seed = args.steps, seed
  for key, value in ARMS[arm].items():
    setattr(c, key, value)
  workdir = Path(args.workdir) / f"{arm.replace(' ', '_')}-{seed}"
  start = time.perf_counter()
  experiment.finetune(c, workdir, progress=False)
  steps = range(c.eval_every, args.steps + 1, c.eval_every)
  val = {s: ratings.recall_at_k(scores_of(workdir, s, data.texts["validation"]),
                                data.liked["validation"], K) for s in steps}
  best = max(val, key=val.get)
  test = ratings.recall_at_k(scores_of(workdir, best, data.texts["test"]), data.liked["test"], K)
  return {"arm": arm, "seed": seed, "steps": args.steps, "best_step": best,
          "val_recall": val[best], "test_recall": test,
          "seconds": round(time.perf_counter() - start, 1)}


def popularity(data: ratings.Ratings) -> dict:
  counts = data.liked["train"].sum(0)
  recall = lambda split: ratings.recall_at_k(
      np.broadcast_to(counts, data.liked[split].shape), data.liked[split], K)
  return {"arm": "popularity", "seed": 0, "steps": 0, "best_step": 0,
          "val_recall": recall("validation"), "test_recall": recall("test"), "seconds": 0.0}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default="recsys.jsonl")
  p.add_argument("--workdir", default="runs/benchmark_recsys")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--arms", nargs="+", default=list(ARMS))
  args = p.parse_args()
  data = ratings.movielens100k()
  path = Path(args.results)
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  done = {(r["arm"], r["seed"], r["steps"]) for r in rows}
  todo = [("popularity", 0)] + [(a, s) for a in args.arms for s in args.seeds]
  for arm, seed in todo:
    if (arm, seed, 0 if arm == "popularity" else args.steps) in done:
      continue
    row = popularity(data) if arm == "popularity" else run(arm, seed, args, data)
    print(json.dumps(row), flush=True)
    with path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    rows.append(row)
  table = []
  for arm in ["popularity"] + args.arms:
    got = [r for r in rows if r["arm"] == arm and r["steps"] in (0, args.steps)]
    if got:
      t = [r["test_recall"] for r in got]
      table.append([arm, len(got), " / ".join(str(r["best_step"]) for r in got),
                    f"{100 * np.mean([r['val_recall'] for r in got]):.1f}",
                    f"{100 * np.mean(t):.1f} ± {100 * np.std(t):.1f}"])
  print(markdown_table(["arm", "seeds", "step (picked on val)", f"val Recall@{K} %",
                        f"test Recall@{K} % (mean ± std)"], table))


if __name__ == "__main__":
  main()
