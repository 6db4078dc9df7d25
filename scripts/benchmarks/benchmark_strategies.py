"""Transfer strategies compared on real data; prints tables for BENCHMARKS.md.

Images: EfficientNet-Lite0 (or Lite1/Lite2, --model) with its ImageNet
weights on an image folder (train/<class>/*.{jpg,png}, test/<class>/*; the
CIFAR-10 subset, or the digits / LFW folders of make_small_folders.py), with K
labelled images per class, tested on the test split (text: scripts/benchmarks/benchmark_text.py,
which reuses this script's bookkeeping). Every strategy is built with `jtl.recipes.strategies.build` and
trained by the same loop (same steps, batch size, optimizer family); inputs
are not augmented, so the linear probe trains on cached features.

  python scripts/benchmarks/benchmark_strategies.py --cifar_dir /path/to/cifar10_subset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

import jtl
import jtl.models
from jtl import phases as phases_lib
from jtl.recipes import strategies

sys.path.insert(0, str(Path(__file__).parent))  # common.py, also when a test imports this file
from common import markdown_table  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_folder(root: Path, split: str, per_class: int | None):
  """(uint8 RGB images [N, H, W, 3], int labels [N]) of root/split/<class>/*;
  classes in sorted order, the first `per_class` files (sorted) of each."""
  classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
  if not classes:
    raise SystemExit(f"{root / split} has no class folders; expected {split}/<class>/*.png|jpg")
  images, labels = [], []
  for i, c in enumerate(classes):
    files = sorted(f for f in (root / split / c).iterdir()
                   if f.suffix.lower() in IMAGE_SUFFIXES)[:per_class]
    if not files:
      raise SystemExit(f"{root / split / c} has no {'/'.join(IMAGE_SUFFIXES)} images")
    images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
    labels += [i] * len(files)
  return np.stack(images), np.asarray(labels, np.int32)


def padded_batches(inputs, labels, size):
  n = len(labels)
  for i in range(0, n, size):
    idx = np.arange(i, i + size) % n
    take = lambda x: (jax.tree.map(lambda a: a[idx], x))
    yield {"inputs": take(inputs), "label": labels[idx], "mask": np.arange(i, i + size) < n}


def train_batches(inputs, labels, size, seed):
  rng = np.random.default_rng(seed)
  size = min(size, len(labels))
  while True:
    order = rng.permutation(len(labels))
    for i in range(0, len(order) - size + 1, size):
      idx = order[i:i + size]
      yield {"inputs": jax.tree.map(lambda a: a[idx], inputs), "label": labels[idx]}


_EVAL_STEPS: dict = {}


def evaluate(module, variables, inputs, labels, size):
  # One compiled eval step per module object (LoRA wraps the module).
  if id(module) not in _EVAL_STEPS:
    _EVAL_STEPS[id(module)] = (module, jax.jit(jtl.make_eval_step(module)))
  step = _EVAL_STEPS[id(module)][1]
  return jtl.train.evaluate(step, variables, padded_batches(inputs, labels, size))["accuracy"]


def _INJECTED_ADAM(learning_rate):
  return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def set_learning_rate(opt_state, lr):
  """Writes `lr` into every injected-hyperparameter state of `opt_state`."""
  is_injected = lambda x: hasattr(x, "hyperparams") and "learning_rate" in x.hyperparams
  def put(x):
    if not is_injected(x):
      return x
    return x._replace(hyperparams={**x.hyperparams,
                                   "learning_rate": jnp.asarray(lr, jnp.float32)})
  return jax.tree.map(put, opt_state, is_leaf=is_injected)


def flip_batches(batches, seed):
  """Random horizontal flips: cheap augmentation where classes are
  mirror-symmetric (CIFAR, faces; not digits: --no_flip)."""
  rng = np.random.default_rng(seed + 7)
  for b in batches:
    flip = rng.random(len(b["label"])) < 0.5
    x = np.asarray(b["inputs"]).copy()
    x[flip] = x[flip, :, ::-1]
    yield {**b, "inputs": x}


def probe_variables(s, train, *, batch, head_lr, head_steps, seed, features=None):
  """The strategy's variables with the head trained on cached features
  (the probe phase of LP-FT, or the whole linear probe)."""
  ft, yt = features if features is not None else strategies.extract_features(
      s.module, s.variables, padded_batches(*train, batch))
  head_labels = {"head": jax.tree.map(lambda _: "head", s.variables["params"]["head"])}
  tx = jtl.make_optimizer(head_labels, learning_rate=head_lr, optimizer="adam")
  head = strategies.train_head(ft, yt, s.variables, tx, num_steps=head_steps,
                               batch_size=min(batch, len(yt)), seed=seed)
  return strategies.with_head(s.variables, jax.device_get(head.params)), (ft, yt)


def train_steps(s, name, config, variables, train, *, steps, batch, lr, seed, flip, step_cache):
  """`steps` steps of the strategy's phases (one, or gradual unfreezing's
  stages) at `lr`: Adam with the learning rate in the optimizer state, set
  every step from one warmup-cosine schedule over the run, so one compiled
  step per phase serves every learning rate, step count and seed. Returns
  (variables, the last phase's labels, the last step's metrics)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
  starts = [p.start for p in s.phases if p.start < steps]
  state = labels = None
  it = train_batches(*train, batch, seed)
  if flip:
    it = flip_batches(it, seed)
  for i in range(steps):
    if i in starts:  # a phase starts: its partition and optimizer
      phase = starts.index(i)
      labels = s.labels if phase == 0 else jtl.label_params(
          s.variables["params"], list(s.phases[phase].rules))
      tx = s.make_optimizer(labels, learning_rate=lr, optimizer=_INJECTED_ADAM)
      state = jtl.create_train_state(variables, labels, tx, rng=seed) if phase == 0 else \
          phases_lib.switch_phase(state, labels, tx)
      key = (name, json.dumps(config, sort_keys=True, default=str), phase)
      if key not in step_cache:
        step_cache[key] = jax.jit(jtl.make_train_step(s.module, tx, labels=labels))
      step = step_cache[key]
    state = state.replace(opt_state=set_learning_rate(state.opt_state, float(sched(i))))
    state, metrics = step(state, next(it))
  jax.block_until_ready(state)
  return state.variables, labels, metrics


def input_batches(train, batch, limit=None):
  """The first `limit` (default all) training images, unaugmented, in batches."""
  n = len(train[1]) if limit is None else min(len(train[1]), limit)
  return ({"inputs": train[0][i:min(i + batch, n)]} for i in range(0, n, batch))


def run_strategy(config, created, train, test, *, steps, batch, lr, seed, step_cache,
                 head_lr=1e-2, head_steps=300, features=None, flip=False):
  """Trains one strategy and evaluates it on `test`.

  linear_probe: the head alone on cached features (`head_steps` steps at
  `head_lr`; `lr` unused). lp_ft: that probe first, then full fine-tuning for
  `steps` steps at `lr` (Kumar et al. 2022: the probe phase is cheap, so it
  trains to convergence on the cache). Others: `steps` steps at `lr` (Adam,
  cosine decay, 10% warmup). Returns (accuracy, seconds, trainable params).
  """
  t0 = time.perf_counter()
  name = config if isinstance(config, str) else config["name"]
  # recomputed_probe (this script's key): the probe (linear_probe, LP-FT's
  # probe phase) trains on features under BatchNorm statistics recomputed on
  # the training images (AdaBN on the task's own images), not ImageNet's.
  recomputed_probe = isinstance(config, dict) and config.get("recomputed_probe", False)
  if name == "linear_probe":  # its learning rate is the head's (variants swept by it too)
    head_lr = lr
  if recomputed_probe:
    config = {k: v for k, v in config.items() if k != "recomputed_probe"}
  build_config = {"name": "full", "freeze_batchnorm": config.get("freeze_batchnorm"),
                  "precise_batchnorm": config.get("precise_batchnorm")} \
      if name == "lp_ft" else config
  # The run's seed draws LoRA's init and scratch's re-init too (it stayed 0 before 2026-12-07).
  build_config = {"name": build_config} if isinstance(build_config, str) else build_config
  s = strategies.build({**build_config, "seed": seed}, created.module, created.variables,
                       created.spec, verbose=False)
  # precise_batchnorm (on by default where statistics train): the statistics
  # of the layers that train are recomputed on up to that many unaugmented
  # training images under the final weights, as `jtl.train.fit` does before its
  # evaluation (this loop evaluates once, at the end).
  precise = s.options["precise_batchnorm"]
  print(f"\n== {name} lr={lr:g} seed={seed}: {config}", flush=True)
  n_trainable = s.summary().trainable_params
  variables = s.variables
  if name in ("linear_probe", "lp_ft"):
    if recomputed_probe:
      s = dataclasses.replace(s, variables=jtl.recompute_batchnorm(
          s.module, s.variables, input_batches(train, batch)))
      features = None  # the shared cache holds features under the pretrained statistics
    variables, _ = probe_variables(s, train, batch=batch, head_lr=head_lr, head_steps=head_steps,
                                   seed=seed, features=features)
  labels = s.labels
  if name != "linear_probe":
    variables, labels, metrics = train_steps(s, name, config, variables, train, steps=steps,
                                             batch=batch, lr=lr, seed=seed, flip=flip,
                                             step_cache=step_cache)
    print(f"   final train loss {float(metrics['loss']):.3f}", flush=True)
    n_trainable = jtl.summarize(s.variables["params"], labels).trainable_params  # last phase's
  if precise:
    skip = jtl.partition.frozen_module_paths(labels)
    variables = jtl.recompute_batchnorm(s.module, variables, input_batches(train, batch, precise),
                                        skip=skip)
  seconds = time.perf_counter() - t0
  acc = evaluate(s.module, variables, *test, 100)
  return acc, seconds, n_trainable


def probe_speedup(created, train, batch, epochs=3):
  """Per-epoch time of the frozen-backbone probe: recomputing features vs the cache."""
  s = strategies.build("linear_probe", created.module, created.variables, created.spec,
                       verbose=False)
  tx = s.make_optimizer(learning_rate=1e-3, optimizer="adam")
  state = jtl.create_train_state(s.variables, s.labels, tx)
  step = jax.jit(jtl.make_train_step(s.module, tx, labels=s.labels))
  n_steps = len(train[1]) // batch
  it = train_batches(*train, batch, 0)
  state, _ = step(state, next(it))  # compile
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(epochs * n_steps):
    state, _ = step(state, next(it))
  jax.block_until_ready(state)
  recompute = (time.perf_counter() - t0) / epochs
  t0 = time.perf_counter()
  ft, yt = strategies.extract_features(s.module, s.variables, padded_batches(*train, batch))
  extract = time.perf_counter() - t0
  train_head = strategies.head_trainer(s.variables, tx)
  train_head(ft, yt, num_steps=epochs * n_steps, batch_size=batch)  # compile
  t0 = time.perf_counter()
  head = train_head(ft, yt, num_steps=epochs * n_steps, batch_size=batch)
  jax.block_until_ready(head)
  cached = (time.perf_counter() - t0) / epochs
  print(f"\n### Linear probe per-epoch time ({len(yt)} images, batch {batch})\n\n"
        "| recompute features s/epoch | cached s/epoch | speed-up | one-off extraction s |\n"
        "|---:|---:|---:|---:|\n"
        f"| {recompute:.2f} | {cached:.4f} | {recompute / cached:.0f}x | {extract:.1f} |",
        flush=True)


# Learning rates swept per strategy (Adam, warmup-cosine). linear_probe: the
# head's learning rate on cached features; lp_ft: the fine-tuning phase's
# (its probe phase takes linear_probe's best head learning rate).
GRID = {
    "linear_probe": [3e-3, 1e-2, 3e-2, 1e-1],
    "lp_ft": [1e-4, 3e-4],
    "lp_ft_frozen_bn": [1e-4, 3e-4],
    "full_frozen_bn": [3e-4, 1e-3],
    "full_frozen_stats": [3e-4, 1e-3],
    "full": [3e-4, 1e-3],
    "partial": [1e-3, 3e-3],
    "partial_frozen_bn": [1e-3, 3e-3],
    "llrd": [1e-3, 3e-3],
    "llrd_frozen_bn": [1e-3, 3e-3],
    "llrd_frozen_stats": [1e-3, 3e-3],
    "bitfit": [3e-3, 1e-2],
    "bitfit_frozen_stats": [3e-3, 1e-2],
    "lora": [1e-3, 3e-3],
    "scratch": [3e-3, 1e-2],
    "scratch_precise_bn": [3e-3, 1e-2],
    "full_precise_bn": [3e-4, 1e-3],
    "partial_precise_bn": [1e-3, 3e-3],
    "llrd_precise_bn": [1e-3, 3e-3],
    "bitfit_precise_bn": [3e-3, 1e-2],
    "lora_precise_bn": [1e-3, 3e-3],
}
# Every BatchNorm mode is written out (freeze_batchnorm: True = frozen whole,
# "statistics" = stored statistics with scale/offset training, False =
# statistics re-estimated from the batches; precise_batchnorm: recomputed on
# the training images after the last step, 0 = off), so rows keep their
# meaning when a strategy's default changes. The plain names are the first
# runs' setting.
_RUNNING = {"freeze_batchnorm": False, "precise_batchnorm": 0}  # the moving averages
_PRECISE = {"freeze_batchnorm": False, "precise_batchnorm": 100_000}  # every training image
CONFIGS = {
    "scratch": {"name": "scratch", **_RUNNING},
    "scratch_precise_bn": {"name": "scratch", **_PRECISE},
    "full_precise_bn": {"name": "full", **_PRECISE},
    "linear_probe": {"name": "linear_probe", "cache_features": True},
    "partial": {"name": "partial", "num_blocks": 4, **_RUNNING},
    "partial_frozen_bn": {"name": "partial", "num_blocks": 4, "freeze_batchnorm": True},
    "partial_precise_bn": {"name": "partial", "num_blocks": 4, **_PRECISE},
    "full": {"name": "full", **_RUNNING},
    "full_frozen_bn": {"name": "full", "freeze_batchnorm": True},
    "full_frozen_stats": {"name": "full", "freeze_batchnorm": "statistics"},
    # probe on the cache, then full fine-tuning
    "lp_ft": {"name": "lp_ft", "probe_steps": 1, **_RUNNING},
    "lp_ft_frozen_bn": {"name": "lp_ft", "probe_steps": 1, "freeze_batchnorm": True},
    "llrd": {"name": "llrd", "layer_decay": 0.8, **_RUNNING},
    "llrd_frozen_bn": {"name": "llrd", "layer_decay": 0.8, "freeze_batchnorm": True},
    "llrd_frozen_stats": {"name": "llrd", "layer_decay": 0.8, "freeze_batchnorm": "statistics"},
    "llrd_precise_bn": {"name": "llrd", "layer_decay": 0.8, **_PRECISE},
    "bitfit": {"name": "bitfit", **_RUNNING},
    "bitfit_frozen_stats": {"name": "bitfit", "freeze_batchnorm": "statistics"},
    "bitfit_precise_bn": {"name": "bitfit", **_PRECISE},
    "lora": {"name": "lora", "rank": 8, "alpha": 16.0, **_RUNNING},
    "lora_precise_bn": {"name": "lora", "rank": 8, "alpha": 16.0, **_PRECISE},
}


def labelled_subset(y_all, per_class, seed):
  """`per_class` random indices of each class (seeded), sorted."""
  smallest = int(np.bincount(y_all).min())
  if per_class > smallest:
    raise SystemExit(f"{per_class} labels/class asked for, but the smallest training class "
                     f"has {smallest} images; pass --per_class / --sweep_per_class <= {smallest}")
  rng = np.random.default_rng(1000 + seed)
  return np.sort(np.concatenate([rng.choice(np.flatnonzero(y_all == c), per_class, replace=False)
                                 for c in np.unique(y_all)]))


def stratified_holdout(y, fraction, seed=0):
  """(fit indices, validation indices): `fraction` of every class held out."""
  rng = np.random.default_rng(seed)
  val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:max(1, round(fraction * np.sum(y == c)))]
                        for c in np.unique(y)])
  return np.setdiff1d(np.arange(len(y)), val), np.sort(val)


DEFAULT_MODEL = "efficientnet_lite0"
MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class Results:
  """One JSON line per finished row; rows already in the file are skipped.

  A row is identified by its values of `KEY` (another benchmark passes its own
  fields, e.g. the text benchmark's number of labels and token length). Rows
  written before the --model flag have no "model": they are Lite0's.
  """
  KEY = ("kind", "strategy", "per_class", "seed", "lr", "steps", "image_size", "model")

  def __init__(self, path, key_fields=KEY):
    self.path = Path(path)
    self.key_fields = tuple(key_fields)
    self.rows = [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()] \
        if self.path.exists() else []
    if "model" in self.key_fields:
      self.rows = [{"model": DEFAULT_MODEL, **r} for r in self.rows]

  def key(self, row):
    return tuple(row.get(k, DEFAULT_MODEL if k == "model" else None) for k in self.key_fields)

  def get(self, **key):
    k = self.key(key)
    return next((r for r in self.rows if self.key(r) == k), None)

  def add(self, row):
    self.rows.append(row)
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")


def sweep_means(results, name, *, per_class, steps, image_size, model=DEFAULT_MODEL, seeds=(0,)):
  """{lr: [validation accuracy of each sweep seed]} of `name`, for the rates
  swept on every one of `seeds`."""
  by_lr = {}
  for r in results.rows:
    if (r["kind"] == "sweep" and r["strategy"] == name and r["per_class"] == per_class
        and r["steps"] == steps and r["image_size"] == image_size
        and r.get("model", DEFAULT_MODEL) == model and r["seed"] in seeds):
      by_lr.setdefault(r["lr"], {})[r["seed"]] = r["acc"]
  return {lr: [accs[s] for s in seeds] for lr, accs in by_lr.items() if set(accs) == set(seeds)}


def best_lrs(results, names, *, seeds=(0,), **sweep):
  """{strategy: (best lr, its mean validation accuracy over the sweep seeds)}."""
  best = {}
  for name in names:
    means = {lr: float(np.mean(a)) for lr, a in sweep_means(results, name, seeds=seeds,
                                                             **sweep).items()}
    if means:
      lr = max(means, key=lambda lr: (means[lr], -lr))
      best[name] = (lr, means[lr])
  return best


def _final_row(name, per_class, lr, rows):
  accs = np.array([r["acc"] for r in rows])
  std = 100 * accs.std(ddof=1) if len(rows) > 1 else 0
  return [name, per_class, rows[0]["steps"], f"{lr:g}", f"{rows[0]['trainable']:,}",
          f"{np.mean([r['seconds'] for r in rows]):.0f}", len(rows), f"{100 * accs.mean():.1f}%",
          f"{std:.1f}", " / ".join(f"{100 * a:.1f}" for a in accs)]


def sweep_seeds(args):
  return tuple(map(int, args.sweep_seeds.split(",")))


def image_report(results, args, names):
  """Markdown tables: the sweep, then mean +- std over seeds per row."""
  mine = lambda r: r["image_size"] == args.image_size and r["model"] == args.model
  seeds = sweep_seeds(args)
  sweep = [[name, f"{lr:g}", f"{100 * np.mean(accs):.1f}%",
            " / ".join(f"{100 * a:.1f}" for a in accs)]
           for name in names
           for lr, accs in sorted(sweep_means(
               results, name, per_class=args.sweep_per_class, steps=args.sweep_steps,
               image_size=args.image_size, model=args.model, seeds=seeds).items())]
  lines = [f"\n### Sweep (validation accuracy; {args.sweep_per_class}/class, "
           f"{round(args.val_fraction * 100)}% of each class held out, seeds "
           f"{','.join(map(str, seeds))}, {args.sweep_steps} steps)\n",
           markdown_table(["strategy", "lr", "val acc (mean)", "per seed"], sweep, align="lrrl")]
  test_n = "all" if args.test_per_class is None else f"first {args.test_per_class}"
  lines.append(f"\n### {args.model}, {Path(args.cifar_dir).name} at {args.image_size}px (test: "
               f"{test_n} images per class)\n")
  finals_table = []
  # A rate run on the test split but not picked on validation is marked so: only
  # the picked row is a result (a wider grid rerun adds rows, never a choice).
  picked = best_lrs(results, names, per_class=args.sweep_per_class, steps=args.sweep_steps,
                    image_size=args.image_size, model=args.model, seeds=seeds)
  for k in map(int, args.per_class.split(",")):
    for name in names:
      finals = [r for r in results.rows if r["kind"] == "final" and r["strategy"] == name
                and r["per_class"] == k and mine(r)]
      rate = lambda r: r["head_lr"] if name == "linear_probe" else r["lr"]  # noqa: E731
      for lr in dict.fromkeys(map(rate, finals)):  # one line per learning rate run
        rows = sorted({results.key(r): r for r in reversed(finals) if rate(r) == lr}.values(),
                      key=lambda r: r["seed"])  # one per seed
        choice = "yes" if picked.get(name, (None,))[0] == lr else "NO (not a result)"
        finals_table.append([*_final_row(name, k, lr, rows), choice])
  lines.append(markdown_table(
      ["strategy", "labels/class", "steps", "lr", "trainable params", "train s (mean)", "seeds",
       "test acc mean", "std", "per seed", "picked on validation"], finals_table,
      align="lrrrrrrrrll"))
  print("\n".join(lines), flush=True)


def run_images(args, results):
  names = [n for n in CONFIGS if args.strategies == "all" or n in args.strategies.split(",")]
  root = Path(args.cifar_dir)
  x_all, y_all = load_folder(root, "train", None)
  tx_, ty_ = load_folder(root, "test", args.test_per_class)
  num_classes = int(y_all.max()) + 1
  created = jtl.models.create(args.model, num_classes=num_classes, pretrained=True)
  prep = lambda x: np.asarray(created.preprocess(x, size=args.image_size, crop_fraction=1.0))
  test = (prep(tx_), ty_)
  print(f"{root}: {len(y_all)} train / {len(ty_)} test images, {num_classes} classes, "
        f"{x_all.shape[1]}x{x_all.shape[2]} px; {args.model}", flush=True)
  step_cache: dict = {}
  common = dict(batch=args.batch, step_cache=step_cache, head_steps=args.head_steps,
                flip=not args.no_flip)
  same = dict(image_size=args.image_size, model=args.model)

  def row(kind, name, k, seed, lr, head_lr, steps, train, evalset, features):
    done = results.get(kind=kind, strategy=name, per_class=k, seed=seed, lr=lr, steps=steps,
                       **same)
    if done:
      return done
    acc, sec, n = run_strategy(CONFIGS[name], created, train, evalset, steps=steps, lr=lr,
                               seed=seed, head_lr=head_lr, features=features, **common)
    r = {"kind": kind, "strategy": name, "per_class": k, "seed": seed, "lr": lr,
         "head_lr": head_lr, "steps": steps, **same, "dataset": str(root),
         "flip": not args.no_flip, "acc": acc,
         "seconds": sec, "trainable": n, "eval_n": len(evalset[1]),
         "date": time.strftime("%Y-%m-%d %H:%M")}
    results.add(r)
    print(f"   -> {kind} {name} {k}/class seed {seed} lr {lr:g}: acc {100 * acc:.1f}% "
          f"({sec:.0f}s)", flush=True)
    return r

  # 1. Sweep on a validation split of the labelled images (never the test split);
  # each sweep seed draws its own labelled subset, holdout and initialisation.
  sweep = dict(per_class=args.sweep_per_class, steps=args.sweep_steps, **same)
  splits = {}
  for seed in sweep_seeds(args):
    idx = labelled_subset(y_all, args.sweep_per_class, seed)
    fit_i, val_i = stratified_holdout(y_all[idx], args.val_fraction, seed)
    splits[seed] = ((prep(x_all[idx][fit_i]), y_all[idx][fit_i]),
                    (prep(x_all[idx][val_i]), y_all[idx][val_i]))
  for seed, (fit, val) in splits.items():
    feats = None
    for lr in GRID["linear_probe"] if "linear_probe" in names else ():
      if feats is None and not results.get(kind="sweep", strategy="linear_probe", seed=seed,
                                           lr=lr, **sweep):
        s = strategies.build("linear_probe", created.module, created.variables, created.spec,
                             verbose=False)
        feats = strategies.extract_features(s.module, s.variables,
                                            padded_batches(*fit, args.batch))
      row("sweep", "linear_probe", args.sweep_per_class, seed, lr, lr, args.sweep_steps, fit,
          val, feats)
  seeds = sweep_seeds(args)
  head_lr = best_lrs(results, ["linear_probe"], seeds=seeds, **sweep).get(
      "linear_probe", (1e-2,))[0]
  for seed, (fit, val) in splits.items():
    for name in names:
      if name != "linear_probe":
        for lr in GRID[name]:
          row("sweep", name, args.sweep_per_class, seed, lr, head_lr, args.sweep_steps, fit, val,
              None)
  chosen = best_lrs(results, names, seeds=seeds, **sweep)
  print("\nchosen on validation:", {n: f"lr {lr:g} (val {100 * a:.1f}%)"
                                    for n, (lr, a) in chosen.items()}, flush=True)

  # 2. Final rows: every seed draws its own labelled subset; test on the test split.
  # Strategy-major (every seed of a strategy before the next strategy), so a run
  # cut short leaves whole rows (all seeds) rather than every row with seed 0 only.
  seeds = list(map(int, args.seeds.split(",")))
  for k, steps in zip(map(int, args.per_class.split(",")), map(int, args.steps.split(","))):
    trains = {seed: None for seed in seeds}
    feats = {seed: None for seed in seeds}  # the probe's cache, shared by linear_probe and lp_ft
    for name in names:
      lr = chosen.get(name, (GRID[name][0],))[0]
      for seed in seeds:
        if results.get(kind="final", strategy=name, per_class=k, seed=seed, lr=lr, steps=steps,
                       **same):
          continue
        if trains[seed] is None:
          idx = labelled_subset(y_all, k, seed)
          trains[seed] = (prep(x_all[idx]), y_all[idx])
        kind = CONFIGS[name] if isinstance(CONFIGS[name], str) else CONFIGS[name]["name"]
        if kind in ("linear_probe", "lp_ft") and feats[seed] is None:
          s = strategies.build("full", created.module, created.variables, created.spec,
                               verbose=False)
          feats[seed] = strategies.extract_features(s.module, s.variables,
                                                    padded_batches(*trains[seed], args.batch))
        row("final", name, k, seed, lr, head_lr, steps, trains[seed], test, feats[seed])
      image_report(results, args, names)
  image_report(results, args, names)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cifar_dir", required=True,
                  help="image folder with train/<class>/* and test/<class>/* (any classes, sizes)")
  ap.add_argument("--model", default=DEFAULT_MODEL, choices=MODELS)
  ap.add_argument("--no_flip", action="store_true",
                  help="no random horizontal flips (for classes that are not mirror-symmetric)")
  ap.add_argument("--image_size", type=int, default=128)
  ap.add_argument("--per_class", default="10,100")
  ap.add_argument("--steps", default="10,20", help="train steps per --per_class entry")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--test_per_class", type=int, default=None,
                  help="first N test images per class (default: all)")
  ap.add_argument("--sweep_per_class", type=int, default=100)
  ap.add_argument("--sweep_steps", type=int, default=20)
  ap.add_argument("--sweep_seeds", default="0",
                  help="seeds of the validation sweep, each with its own labelled subset and "
                  "holdout; the rate with the best mean validation accuracy is picked")
  ap.add_argument("--val_fraction", type=float, default=0.2)
  ap.add_argument("--head_steps", type=int, default=300,
                  help="head steps on cached features (linear probe, LP-FT's probe phase)")
  ap.add_argument("--grid", default=None,
                  help='JSON {strategy: [learning rates]} replacing GRID entries, e.g. a second, '
                       'narrower round around the first round\'s best')
  ap.add_argument("--variants", default=None,
                  help='JSON {row name: strategy config} adding rows, e.g. an option sweep: '
                       '\'{"llrd_d06": {"name": "llrd", "layer_decay": 0.6, '
                       '"freeze_batchnorm": "statistics"}}\' (learning rates from --grid)')
  ap.add_argument("--strategies", default="all", help="comma-separated subset of " + ",".join(CONFIGS))
  ap.add_argument("--results", default="strategies_results.jsonl",
                  help="JSON lines, one per finished row; rerunning skips them")
  ap.add_argument("--report", action="store_true", help="print the tables from --results only")
  ap.add_argument("--skip_text", action="store_true",
                  help="no effect (kept for old command lines): text is benchmark_text.py")
  ap.add_argument("--probe_only", action="store_true",
                  help="only the cached linear-probe per-epoch speed-up")
  args = ap.parse_args()
  t_start = time.perf_counter()
  print(f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  results = Results(args.results)
  if args.variants:
    CONFIGS.update(json.loads(args.variants))
  if args.grid:
    GRID.update({k: [float(v) for v in vs] for k, vs in json.loads(args.grid).items()})
  if missing := sorted(set(CONFIGS) - set(GRID)):
    raise SystemExit(f"no learning rates for {missing}: add them to --grid")
  if args.report:
    image_report(results, args, list(CONFIGS))
    return

  if args.probe_only:
    x, y = load_folder(Path(args.cifar_dir), "train", int(args.per_class.split(",")[-1]))
    created = jtl.models.create(args.model, num_classes=int(y.max()) + 1, pretrained=True)
    x = np.asarray(created.preprocess(x, size=args.image_size, crop_fraction=1.0))
    probe_speedup(created, (x, y), args.batch)
    return

  run_images(args, results)

  print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
  main()
