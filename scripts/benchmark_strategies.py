"""Transfer strategies compared on real data; prints tables for BENCHMARKS.md.

Images: EfficientNet-Lite0 with its ImageNet weights on a CIFAR-10 image
folder (train/<class>/*.jpg, test/<class>/*.jpg), with K labelled images per
class, tested on the whole test split. Text: MiniLM-L6 on Rotten Tomatoes with
a few hundred labels. Every strategy is built with `jtl.strategies.build` and
trained by the same loop (same steps, batch size, optimizer family); inputs
are not augmented, so the linear probe trains on cached features.

  python scripts/benchmark_strategies.py --cifar_dir /path/to/cifar10_subset
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

import jtl
import jtl.models
from jtl import strategies
from jtl.data import text as text_data


def load_folder(root: Path, split: str, per_class: int | None):
  classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
  images, labels = [], []
  for i, c in enumerate(classes):
    files = sorted((root / split / c).glob("*.jpg"))[:per_class]
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


def run_strategy(config, created, train, test, *, steps, batch, lr, seed, step_cache):
  """Trains one strategy; returns (accuracy, seconds, trainable params, notes)."""
  t0 = time.perf_counter()
  s = strategies.build(config, created.module, created.variables, created.spec, verbose=False)
  print(f"\n== {s.name}: {dict(config) if not isinstance(config, str) else config}")
  print(s.summary())
  n_trainable = s.summary().trainable_params
  if s.cache_features:
    ft, yt = strategies.extract_features(s.module, s.variables, padded_batches(*train, batch))
    head = strategies.train_head(ft, yt, s.variables,
                                 s.make_optimizer(learning_rate=lr * 10, optimizer="adam"),
                                 num_steps=steps, batch_size=min(batch, len(yt)), seed=seed)
    variables = strategies.with_head(s.variables, head.params)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - t0
    acc = evaluate(s.module, variables, *test, batch)
    return acc, seconds, n_trainable
  it = train_batches(*train, batch, seed)
  state = None
  for i, phase in enumerate(s.phases):
    end = s.phases[i + 1].start if i + 1 < len(s.phases) else steps
    labels = jtl.label_params(s.variables["params"], list(phase.rules))
    base_lr = lr * 10 if phase.name in ("linear_probe", "head") else lr
    tx = s.make_optimizer(labels, learning_rate=base_lr, optimizer="adam")
    if state is None:
      state = jtl.create_train_state(s.variables, labels, tx, rng=seed)
    else:
      state = strategies.switch_phase(state, labels, tx)
      print(f"   phase {phase.name} from step {phase.start}: "
            f"{s.summary(labels).trainable_params:,} trainable")
    key = (s.name, config.get("layer_decay") if isinstance(config, dict) else None, i)
    if key not in step_cache:
      step_cache[key] = jax.jit(jtl.make_train_step(s.module, tx, labels=labels))
    step = step_cache[key]
    for _ in range(phase.start, end):
      state, metrics = step(state, next(it))
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  print(f"   final train loss {float(metrics['loss']):.3f}")
  acc = evaluate(s.module, state.variables, *test, batch)
  return acc, seconds, n_trainable


def table(rows, title):
  lines = [f"\n### {title}\n", "| strategy | labels/class | trainable params | train s | test acc |",
           "|---|---:|---:|---:|---:|"]
  lines += [f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]:.1f} | {100 * r[4]:.1f}% |" for r in rows]
  print("\n".join(lines), flush=True)


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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cifar_dir", required=True)
  ap.add_argument("--image_size", type=int, default=64)
  ap.add_argument("--per_class", default="10,100")
  ap.add_argument("--steps", default="30,90", help="train steps per --per_class entry")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--text_train", type=int, default=400)
  ap.add_argument("--text_test", type=int, default=600)
  ap.add_argument("--text_len", type=int, default=48)
  ap.add_argument("--text_steps", type=int, default=50)
  ap.add_argument("--skip_images", action="store_true")
  ap.add_argument("--skip_text", action="store_true")
  ap.add_argument("--probe_only", action="store_true",
                  help="only the cached linear-probe per-epoch speed-up")
  args = ap.parse_args()
  t_start = time.perf_counter()
  print(f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")

  if args.probe_only:
    created = jtl.models.create("efficientnet_lite0", num_classes=10, pretrained=True)
    x, y = load_folder(Path(args.cifar_dir), "train", int(args.per_class.split(",")[-1]))
    x = np.asarray(created.preprocess(x, size=args.image_size, crop_fraction=1.0))
    probe_speedup(created, (x, y), args.batch)
    return

  if not args.skip_images:
    created = jtl.models.create("efficientnet_lite0", num_classes=10, pretrained=True)
    prep = lambda x: np.asarray(created.preprocess(x, size=args.image_size, crop_fraction=1.0))
    root = Path(args.cifar_dir)
    test_x, test_y = load_folder(root, "test", None)
    test = (prep(test_x), test_y)
    blocks = len([g for g, _ in created.spec.groups if g.startswith("blocks_")])
    configs = [
        "scratch",
        {"name": "linear_probe", "cache_features": True},
        {"name": "partial", "num_blocks": 4},
        "full",
        {"name": "lp_ft", "probe_steps": None},
        {"name": "llrd", "layer_decay": 0.8},
        "bitfit",
        {"name": "lora", "rank": 8, "alpha": 16.0},
    ]
    step_cache: dict = {}
    rows = []
    for k, steps in zip(map(int, args.per_class.split(",")), map(int, args.steps.split(","))):
      x, y = load_folder(root, "train", k)
      train = (prep(x), y)
      print(f"\n# EfficientNet-Lite0, {k} labelled images per class ({len(y)}), {steps} steps")
      for config in configs:
        if isinstance(config, dict) and config["name"] == "lp_ft":
          config = {**config, "probe_steps": steps // 3}
        acc, sec, n = run_strategy(config, created, train, test, steps=steps, batch=args.batch,
                                   lr=1e-3 if config != "scratch" else 3e-3, seed=0,
                                   step_cache=step_cache)
        name = config if isinstance(config, str) else config["name"]
        rows.append((name, k, n, sec, acc))
        print(f"   -> {name}: acc {100 * acc:.1f}%, {sec:.1f}s", flush=True)
    table(rows, f"Images: EfficientNet-Lite0 (ImageNet weights), CIFAR-10 at "
                f"{args.image_size}px, test on {len(test_y)} images (blocks: {blocks})")
    probe_speedup(created, train, args.batch)

  if not args.skip_text:
    texts, labels = text_data.rotten_tomatoes()
    tok = text_data.load_tokenizer(max_length=args.text_len)
    rng = np.random.default_rng(0)
    tr = rng.permutation(len(labels["train"]))[:args.text_train]
    te = rng.permutation(len(labels["test"]))[:args.text_test]
    train = (text_data.tokenize(list(texts["train"][tr]), tok), labels["train"][tr].astype(np.int32))
    test = (text_data.tokenize(list(texts["test"][te]), tok), labels["test"][te].astype(np.int32))
    created = jtl.models.create("minilm_l6", num_classes=2, pretrained=True)
    rows, step_cache = [], {}
    for config in [{"name": "linear_probe", "cache_features": True}, "full",
                   {"name": "lora", "rank": 8, "alpha": 16.0,
                    "targets": [r"layer_\d/attention/(query|value)"]}, "scratch"]:
      acc, sec, n = run_strategy(config, created, train, test, steps=args.text_steps,
                                 batch=16, lr=1e-4 if config == "full" else 1e-3, seed=0,
                                 step_cache=step_cache)
      name = config if isinstance(config, str) else config["name"]
      rows.append((name, len(tr), n, sec, acc))
      print(f"   -> {name}: acc {100 * acc:.1f}%, {sec:.1f}s", flush=True)
    table(rows, f"Text: MiniLM-L6 (all-MiniLM-L6-v2 weights), Rotten Tomatoes, "
                f"{len(tr)} labelled snippets, max {args.text_len} tokens, {args.text_steps} "
                f"steps of 16, test on {len(te)} snippets (labels/class column: total labels)")
  print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
  main()
