"""Item cold-start recommendation on MovieLens 100K: MiniLM's text features
of a new movie rank the users who will like it (configs/recsys_movielens.py,
run by `jtl.app.experiment.finetune` as `scripts/finetune.py` runs it).

Metric: Recall@20 over the movies of a split (`jtl.data.ratings.recall_at_k`:
of the k top-ranked users, the share of the movie's fans, out of at most
20). The head trains on cached features and is saved at its last step, so
the number of steps is picked on the validation movies' recall with seed 0
(`--step_grid`); every seed then runs that many steps and is scored on the
test movies once (seed 0 from its grid run's checkpoint). Arms:

- minilm probe: the pretrained encoder frozen, the 943-user head on its
  cached features (the config as it is);
- random-init probe: the same encoder from random weights, same training
  (what the text alone gives without pretraining);
- popularity: no text, every movie gets the same ranking, the users by how
  many training movies they liked (the usual cold-start fallback);
- minilm lp_ft: the config with `strategy.name=lp_ft`: the library's LP-FT
  (its default 300 probe steps at 1e-2 on the cached features, then every
  parameter fine-tunes, the encoder too); its steps (`--ft_step_grid`) and
  learning rate (`--ft_lr_grid`, around the library's 1e-4) are picked on
  validation recall with seed 0, as the probe's steps are.

  python scripts/benchmarks/benchmark_recsys.py --results recsys.jsonl
  python scripts/benchmarks/benchmark_recsys.py --results recsys.jsonl --arms "minilm lp_ft"

Rows already in `--results` are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from jtl.recipes import strategies  # noqa: E402

# Config values per arm ("a.b": a nested key); an arm with its own grid of
# steps and learning rates: FT_ARMS.
ARMS = {"minilm probe": {}, "random-init probe": {"pretrained": False},
        "minilm lp_ft": {"strategy.name": "lp_ft"}}
FT_ARMS = ("minilm lp_ft",)
K = 20


def scores_of(workdir: Path, step: int, texts: np.ndarray, *, probe: bool = False
              ) -> np.ndarray:
  """The users' scores of `texts` by the run's checkpoint at `step`, or by
  LP-FT's saved probe (its start, before fine-tuning) with `probe`."""
  run = workdirs.restore(workdir, step=step)
  if probe:
    run = dataclasses.replace(run, variables=workdirs.load_probe(workdir))
  model, preprocess = run.model("linen"), run.preprocess
  out = [np.asarray(model(preprocess(list(texts[i:i + 128])))) for i in range(0, len(texts), 128)]
  return np.concatenate(out)


def run(arm: str, seed: int, steps: int, lr: float | None, args: argparse.Namespace,
        data: ratings.Ratings, *, test: bool, done: dict | None = None) -> dict:
  """One run's row; `done`: its row without the test score, whose finished
  workdir is scored on test instead of training again."""
  c = recsys_movielens.get_config()
  c.num_steps = c.eval_every = c.checkpoint_every = steps
  c.seed = seed
  for key, value in ARMS[arm].items():
    parent, _, leaf = key.rpartition(".")
    setattr(c[parent] if parent else c, leaf, value)
  if lr is not None:
    c.learning_rate = lr
  workdir = workdir_of(arm, seed, steps, lr, args)
  start = time.perf_counter()
  if done is None or not (workdir / "final_report.json").exists():
    done = None
    experiment.finetune(c, workdir, progress=False)
  recall = lambda split: ratings.recall_at_k(scores_of(workdir, steps, data.texts[split]),
                                             data.liked[split], K)
  lr_field = {} if lr is None else {"learning_rate": lr}
  return {"arm": arm, "seed": seed, "steps": steps, **lr_field,
          "val_recall": recall("validation"),
          "test_recall": recall("test") if test else None,
          "seconds": done["seconds"] if done else round(time.perf_counter() - start, 1)}


def workdir_of(arm: str, seed: int, steps: int, lr: float | None,
               args: argparse.Namespace) -> Path:
  name = f"{arm.replace(' ', '_')}-{seed}-{steps}" + (f"-{lr:g}" if lr is not None else "")
  return Path(args.workdir) / name


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
  p.add_argument("--ft_step_grid", type=int, nargs="+", default=[50, 150],
                 help="fine-tuning steps of the FT_ARMS (after their probe phase)")
  p.add_argument("--ft_lr_grid", type=float, nargs="+",
                 default=[strategies.LEARNING_RATES["lp_ft"], 3e-4],
                 help="fine-tuning learning rates of the FT_ARMS")
  p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
  args = p.parse_args()
  data = ratings.movielens100k()
  path = Path(args.results)
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  def get(arm: str, seed: int, steps: int, test: bool, lr: float | None = None) -> dict:
    same = [r for r in rows
            if (r["arm"], r["seed"], r["steps"], r.get("learning_rate")) == (arm, seed, steps, lr)]
    for r in same:
      if not test or r["test_recall"] is not None:
        return r
    # The step grid's seed-0 run, picked on validation: scored on test from its workdir.
    row = popularity(data) if arm == "popularity" else run(
        arm, seed, steps, lr, args, data, test=test, done=same[0] if same else None)
    print(json.dumps(row), flush=True)
    with path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    rows.append(row)
    return row

  table = [_row("popularity", "-", [get("popularity", 0, 0, True)])]
  for arm in args.arms:
    grid = ([(s, lr) for s in args.ft_step_grid for lr in args.ft_lr_grid] if arm in FT_ARMS
            else [(s, None) for s in args.step_grid])
    val = {(s, lr): get(arm, args.seeds[0], s, False, lr)["val_recall"] for s, lr in grid}
    steps, lr = max(val, key=val.get)
    picked = steps if lr is None else f"{steps}, lr {lr:g}"
    table.append(_row(arm, picked, [get(arm, seed, steps, True, lr) for seed in args.seeds]))
    if arm in FT_ARMS:  # where fine-tuning started: LP-FT's probe, scored the same way
      got = [[ratings.recall_at_k(scores_of(workdir_of(arm, seed, steps, lr, args), steps,
                                            data.texts[split], probe=True), data.liked[split], K)
              for split in ("validation", "test")] for seed in args.seeds]
      print(f"{arm}'s probe phase alone (before fine-tuning), val / test Recall@{K} %: "
            + ", ".join(f"{100 * v:.1f} / {100 * t:.1f}" for v, t in got))
  print(markdown_table(["arm", "steps (picked on val, seed 0)", "seeds", f"val Recall@{K} %",
                        f"test Recall@{K} % (mean ± std)", "per seed", "s per run"], table))


def _row(arm: str, steps, got: list[dict]) -> list:
  t = [r["test_recall"] for r in got]
  return [arm, steps, len(got), f"{100 * np.mean([r['val_recall'] for r in got]):.1f}",
          f"{100 * np.mean(t):.1f} ± {100 * np.std(t, ddof=1):.1f}",
          " / ".join(f"{100 * x:.1f}" for x in t),
          f"{np.mean([r['seconds'] for r in got]):.0f}"]


if __name__ == "__main__":
  main()
