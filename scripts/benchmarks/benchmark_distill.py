"""Knowledge distillation on CIFAR-10: a well fine-tuned teacher, a small student.

The teacher is EfficientNet-Lite0 (ImageNet weights) fine-tuned at its native
224 px (CIFAR's 32 px images resized on the accelerator), BatchNorm frozen.
The student is jtl's `small_cnn` (32 px). Student runs share everything but
the loss: the same augmented batches (random 4-px-padded crops and flips,
drawn on the device from the same seeds), steps and optimizer; with
distillation the teacher sees exactly the student's augmented images (at its
own resolution and normalisation), on the fly, inside the compiled step.

Hyperparameters are chosen on a validation split (10% of each class of the
training images); the final runs train on the other 90% and are scored on
the test split, 3 seeds.

  # once, here: pack the image folder into one .npz (the accelerator machine has no TF/PIL data)
  python scripts/benchmarks/benchmark_distill.py --pack ../shared/data/cifar10_subset --data cifar10.npz
  python scripts/benchmarks/benchmark_distill.py --data cifar10.npz --out runs/distill

Prints markdown tables and writes every result as a JSON line to
<out>/distill.jsonl (and the teacher to <out>/teacher.safetensors).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jtl
from jtl import models
from jtl.export import quantize
from jtl.models import efficientnet
from jtl.recipes import distill, strategies

sys.path.insert(0, str(Path(__file__).parent))  # common.py, also when a test imports this file
import common  # noqa: E402


def pack(folder: Path, out: Path) -> None:
  """Image folder train/ and test/ -> one .npz of uint8 images and int32 labels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arrays = {}
  for split in ("train", "test"):
    classes = sorted(p.name for p in (folder / split).iterdir() if p.is_dir())
    xs, ys = [], []
    for c, name in enumerate(classes):
      for f in sorted((folder / split / name).iterdir()):
        xs.append(np.asarray(Image.open(f).convert("RGB")))
        ys.append(c)
    arrays[f"x_{split}"], arrays[f"y_{split}"] = np.stack(xs), np.asarray(ys, np.int32)
    arrays["classes"] = np.asarray(classes)
  np.savez_compressed(out, **arrays)
  print(f"packed {folder} -> {out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


def split_validation(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, validation indices): `fraction` of every class held out."""
  rng = np.random.default_rng(seed)
  val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:int(round(fraction * np.sum(y == c)))]
                        for c in np.unique(y)])
  return np.setdiff1d(np.arange(len(y)), val), np.sort(val)


# ------------------------------------------------------------------ data on the device


def _crop_and_flip(x: jax.Array, key: jax.Array, pad: int) -> jax.Array:
  k1, k2, k3 = jax.random.split(key, 3)
  h, w = x.shape[:2]
  padded = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  top = jax.random.randint(k1, (), 0, 2 * pad + 1)
  left = jax.random.randint(k2, (), 0, 2 * pad + 1)
  crop = jax.lax.dynamic_slice(padded, (top, left, 0), (h, w, x.shape[2]))
  return jnp.where(jax.random.bernoulli(k3), crop[:, ::-1], crop)


@jax.jit
def augmented_batch(images: jax.Array, labels: jax.Array, idx: jax.Array, key: jax.Array):
  """Student batch: padded random crops + flips of images[idx], scaled to 0..1."""
  x = images[idx].astype(jnp.float32)
  keys = jax.random.split(key, len(idx))
  x = jax.vmap(lambda xi, ki: _crop_and_flip(xi, ki, 4))(x, keys)
  return {"inputs": x / 255.0, "label": labels[idx]}


def batches(images, labels, *, batch_size: int, seed: int):
  """Endless augmented batches; the order and augmentation depend on `seed` alone."""
  n = len(labels)
  key = jax.random.PRNGKey(seed)
  epoch = 0
  while True:
    order = np.random.default_rng((seed, epoch)).permutation(n)
    for i in range(n // batch_size):
      key, sub = jax.random.split(key)
      yield augmented_batch(images, labels, jnp.asarray(order[i * batch_size:(i + 1) * batch_size]),
                            sub)
    epoch += 1


def teacher_inputs(x01: jax.Array, size: int) -> jax.Array:
  """Student inputs (0..1, 32 px) -> the teacher's (its size and normalisation)."""
  return efficientnet.preprocess(x01 * 255.0, size=size, crop_fraction=1.0)


def cosine_adamw(labels, lr: float, steps: int, weight_decay: float):
  return common.cosine_adamw(labels, lr, steps, weight_decay=weight_decay,
                             warmup_steps=max(1, steps // 20))


def train(step, state, stream, steps: int):
  for _ in range(steps):
    state, metrics = step(state, next(stream))
  return state, jax.device_get(metrics)


# ------------------------------------------------------------------ teacher


def train_teacher(args, data, tr, va, out: Path):
  created = models.create("efficientnet_lite0", num_classes=10, pretrained=args.teacher_weights or True)
  module = created.module
  strategy = strategies.build({"name": "full", "freeze_batchnorm": True}, module,
                              created.variables, created.spec, verbose=False)
  steps = args.teacher_epochs * len(tr) // args.batch_size
  tx = cosine_adamw(strategy.labels, args.teacher_lr, steps, 1e-4)
  dtype = jnp.bfloat16 if args.bf16 else None
  size = args.teacher_size

  def loss_fn(logits, batch):
    return jtl.losses.cross_entropy_loss(logits, batch, label_smoothing=0.1)

  step = jax.jit(jtl.make_train_step(module, tx, labels=strategy.labels, loss_fn=loss_fn,
                                     compute_dtype=dtype), donate_argnums=0)
  # The teacher trains on the same augmented 32 px batches, resized on the device.
  to_teacher = jax.jit(lambda b: {**b, "inputs": teacher_inputs(b["inputs"], size)})
  state = jtl.create_train_state(strategy.variables, strategy.labels, tx)
  x, y = jnp.asarray(data["x_train"][tr]), jnp.asarray(data["y_train"][tr])
  stream = (to_teacher(b) for b in batches(x, y, batch_size=args.batch_size, seed=100))
  t0 = time.perf_counter()
  state, metrics = train(step, state, stream, steps)
  variables = jax.device_get(state.variables)
  secs = time.perf_counter() - t0
  frozen = distill.teacher_fn(module, variables, compute_dtype=dtype)
  # Student inputs (0..1, 32 px) in, logits out.
  teacher = jax.jit(lambda x: frozen(teacher_inputs(x, size)))
  apply = lambda x: teacher(x.astype(jnp.float32) / 255.0)
  val_acc = common.accuracy(apply, data["x_train"][va], data["y_train"][va], batch_size=500)
  test_acc = common.accuracy(apply, data["x_test"], data["y_test"], batch_size=500)
  quantize.save(out / "teacher.safetensors", variables,
                meta={"steps": steps, "val_accuracy": val_acc, "test_accuracy": test_acc})
  row = {"kind": "teacher", "steps": steps, "epochs": args.teacher_epochs, "lr": args.teacher_lr,
         "size": size, "val_acc": val_acc, "test_acc": test_acc, "seconds": secs,
         "last_loss": float(metrics["loss"])}
  print(f"teacher: {row}", flush=True)
  return teacher, row


# ------------------------------------------------------------------ student


def run_student(args, data, train_idx, eval_x, eval_y, *, teacher, lr, seed,
                temperature=None, alpha=0.0):
  """Trains one student; `alpha` 0 is the labels-only baseline (no teacher run).

  `teacher` maps a batch of student inputs to the teacher's logits.
  """
  created = models.create("small_cnn", num_classes=10, pretrained=False, seed=seed)
  module = created.module
  labels = jtl.label_params(created.variables["params"], [(".*", "all")])
  tx = cosine_adamw(labels, lr, args.student_steps, args.student_weight_decay)
  x, y = jnp.asarray(data["x_train"][train_idx]), jnp.asarray(data["y_train"][train_idx])
  stream = batches(x, y, batch_size=args.batch_size, seed=seed)
  if alpha:
    # The teacher runs in its own compiled function (compiled once for every
    # run), on exactly the augmented images of this batch.
    step = distill.make_distill_train_step(module, tx, labels=labels, temperature=temperature,
                                           alpha=alpha)
    stream = ({**b, "teacher_logits": teacher(b["inputs"])} for b in stream)
  else:
    step = jtl.make_train_step(module, tx, labels=labels)
  step = jax.jit(step, donate_argnums=0)
  state = jtl.create_train_state(created.variables, labels, tx, rng=seed)
  t0 = time.perf_counter()
  state, _ = train(step, state, stream, args.student_steps)
  variables = jax.device_get(state.variables)
  secs = time.perf_counter() - t0
  evaluate = jax.jit(lambda x: module.apply(variables, x.astype(jnp.float32) / 255.0, train=False))
  return common.accuracy(evaluate, eval_x, eval_y, batch_size=500), secs


def record(out: Path, row: dict) -> None:
  with open(out / "distill.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
  print(json.dumps(row), flush=True)


def table(rows: list[dict]) -> None:
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r["name"], []).append(r)
  lines = []
  for name, rs in groups.items():
    accs = [100 * r["test_acc"] for r in rs]
    std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    lines.append([name, f"{rs[0]['lr']:g}", rs[0]["temperature"] or "-", f"{rs[0]['alpha']:g}",
                  len(rs), f"{statistics.mean(accs):.1f}%", f"{std:.1f}",
                  " / ".join(f"{a:.1f}" for a in accs),
                  f"{statistics.mean(r['seconds'] for r in rs):.0f}"])
  print("\n" + common.markdown_table(
      ["student", "lr", "T", "alpha", "seeds", "test acc mean", "std", "per seed",
       "train s (mean)"], lines, align="lrrrrrrlr"), flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--pack", type=Path, help="image folder to pack into --data, then exit")
  ap.add_argument("--data", type=Path, required=True, help=".npz written by --pack")
  ap.add_argument("--out", type=Path, default=Path("runs/distill"))
  ap.add_argument("--teacher_weights", default=None,
                  help="Lite0 ImageNet .pth (default: the installed pip package)")
  ap.add_argument("--teacher_size", type=int, default=224)
  ap.add_argument("--teacher_epochs", type=int, default=15)
  ap.add_argument("--teacher_lr", type=float, default=3e-4)
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--student_steps", type=int, default=2000)
  ap.add_argument("--student_weight_decay", type=float, default=5e-4)
  ap.add_argument("--lr_grid", default="1e-3,3e-3,1e-2")
  ap.add_argument("--kd_grid", default="4:0.5,4:0.9,2:0.9,8:0.9", help="T:alpha pairs")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--val_fraction", type=float, default=0.1)
  ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                  help="teacher in bfloat16 (the student stays float32)")
  args = ap.parse_args()
  if args.pack:
    pack(args.pack, args.data)
    return
  args.out.mkdir(parents=True, exist_ok=True)
  data = dict(np.load(args.data))
  tr, va = split_validation(data["y_train"], args.val_fraction)
  print(f"devices {jax.devices()}; train {len(tr)} / val {len(va)} / test {len(data['y_test'])}",
        flush=True)
  t_start = time.perf_counter()
  teacher, trow = train_teacher(args, data, tr, va, args.out)
  record(args.out, trow)

  # Validation sweep: labels-only lr, then distillation's (T, alpha) at that lr.
  xv, yv = data["x_train"][va], data["y_train"][va]
  sweep = []
  for lr in [float(v) for v in args.lr_grid.split(",")]:
    acc, secs = run_student(args, data, tr, xv, yv, teacher=teacher, lr=lr, seed=0)
    sweep.append({"kind": "sweep", "name": "labels only", "lr": lr, "temperature": None,
                  "alpha": 0.0, "val_acc": acc, "seconds": secs})
    record(args.out, sweep[-1])
  best_lr = max(sweep, key=lambda r: r["val_acc"])["lr"]
  kd_sweep = []
  for pair in args.kd_grid.split(","):
    t, a = (float(v) for v in pair.split(":"))
    acc, secs = run_student(args, data, tr, xv, yv, teacher=teacher, lr=best_lr, seed=0,
                            temperature=t, alpha=a)
    kd_sweep.append({"kind": "sweep", "name": "distilled", "lr": best_lr, "temperature": t,
                     "alpha": a, "val_acc": acc, "seconds": secs})
    record(args.out, kd_sweep[-1])
  best_kd = max(kd_sweep, key=lambda r: r["val_acc"])

  # Test: 3 seeds each, the chosen hyperparameters, the same batches per seed.
  final = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    for name, opts in (("labels only", {"temperature": None, "alpha": 0.0}),
                       ("distilled", {"temperature": best_kd["temperature"],
                                      "alpha": best_kd["alpha"]})):
      acc, secs = run_student(args, data, tr, data["x_test"], data["y_test"], teacher=teacher,
                              lr=best_lr, seed=seed, **opts)
      final.append({"kind": "test", "name": name, "lr": best_lr, "seed": seed, "test_acc": acc,
                    "seconds": secs, **opts})
      record(args.out, final[-1])
  print(f"\nteacher: EfficientNet-Lite0 at {args.teacher_size} px, {trow['steps']} steps, "
        f"val {100 * trow['val_acc']:.1f}%, test {100 * trow['test_acc']:.1f}%, "
        f"{trow['seconds']:.0f} s")
  print("\nsweep (validation accuracy, seed 0):")
  for r in sweep + kd_sweep:
    print(f"  {r['name']}: lr {r['lr']:g} T {r['temperature']} alpha {r['alpha']}: "
          f"{100 * r['val_acc']:.1f}%")
  table(final)
  print(f"\ntotal {time.perf_counter() - t_start:.0f} s on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
  main()
