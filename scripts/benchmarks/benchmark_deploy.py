"""Deployment benchmark: jtl float32 / int8 weights against ONNX Runtime and
LiteRT (float32, full-integer int8), on models fine-tuned on a real dataset.

  nice -n 19 .venv/bin/python scripts/benchmarks/benchmark_deploy.py \\
      --data /work/shared/data/cifar10_subset --out /tmp/bench_deploy \\
      [--torch_python /tmp/torchenv/bin/python] [--survey]

For each model (EfficientNet-Lite0 from its ImageNet weights, top blocks
fine-tuned; MobileNetV2 from a random init, as no ImageNet weights can be had
offline) it fine-tunes at 224 px for --steps steps (scripts/finetune.py's
library path), exports ONNX / LiteRT / LiteRT int8 (calibrated on
--calibration training images), and prints per runtime: test accuracy, top-1
agreement with jtl float32, file size, batch-1 latency (median) and batch-64
throughput, all on --threads threads, measured in this one run. With
--torch_python (a separate venv with torch; jtl never needs torch) it also
times PyTorch eager float32 on the same architectures (random weights: speed
only). --survey tries every zoo model (random init; text models with int32 token
inputs padded to 128) in every format.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import common


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True, help="image folder with train/ and test/")
  p.add_argument("--out", default="/tmp/bench_deploy")
  p.add_argument("--models", default="efficientnet_lite0,mobilenet_v2")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--calibration", type=int, default=300)
  p.add_argument("--eval_images", type=int, default=1000)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--latency_runs", type=int, default=50)
  p.add_argument("--torch_python", default=None)
  p.add_argument("--survey", action="store_true")
  p.add_argument("--survey_one", default=None, help=argparse.SUPPRESS)
  return p.parse_args()


def finetune(name: str, args: argparse.Namespace) -> str:
  """Fine-tunes `name` at 224 px; returns the workdir (reused if done)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  from jtl.app import experiment  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "default.py")
  spec = importlib.util.spec_from_file_location("default_config", path)
  default_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default_config)
  workdir = os.path.join(args.out, name)
  if os.path.exists(os.path.join(workdir, "final_report.json")):
    return workdir
  c = default_config.get_config()
  pretrained = name == "efficientnet_lite0"
  c.update(dict(model=name, pretrained=pretrained, dataset=f"folder:{args.data}",
                image_size=224, batch_size=args.batch_size, eval_batch_size=100,
                num_steps=args.steps, eval_every=args.steps, checkpoint_every=args.steps,
                log_every=25, warmup_steps=10, learning_rate=2e-3 if pretrained else 5e-3))
  if not pretrained:
    c.strategy.rules = ((r".*", "all"),)
  c.augment.flip = True
  experiment.finetune(c, workdir, progress=False)
  return workdir


def predictors(workdir: str, args: argparse.Namespace) -> dict[str, tuple]:
  """{runtime: (predict, bytes)} for the five ways of running the model."""
  from jtl.optim import tree_bytes  # pylint: disable=g-import-not-at-top
  from jtl.app import deploy_runs, workdirs  # pylint: disable=g-import-not-at-top
  from jtl.export import deploy, quantize  # pylint: disable=g-import-not-at-top
  run = workdirs.restore(workdir, step="latest")
  module, variables = run.module, run.merged_variables()
  out = {"jtl jit float32": (quantize.make_inference_fn(module, variables, precision="float32"),
                             tree_bytes(variables))}
  q = quantize.prepare(variables, "int8")
  qpath = os.path.join(workdir, "export", "model_int8.safetensors")
  out["jtl int8 weights"] = (quantize.make_inference_fn(module, q, precision="int8"),
                             quantize.save(qpath, q))
  labels = {"onnx": "ONNX Runtime float32", "tflite": "LiteRT float32",
            "tflite_int8": "LiteRT int8"}
  for fmt, label in labels.items():
    exported = deploy_runs.export_workdir(workdir, fmt, step="latest",
                                          num_calibration=args.calibration)
    if "calibration_check" in exported.meta:
      print(f"  int8 calibration check: {exported.meta['calibration_check']}")
    out[label] = (deploy.load(exported.path, num_threads=args.threads), exported.bytes)
  return out


def accuracy(workdir: str, preds: dict[str, tuple], args: argparse.Namespace) -> dict[str, tuple]:
  """{runtime: (accuracy %, agreement with jtl float32 %)} on the test split."""
  from jtl.app import experiment, workdirs  # pylint: disable=g-import-not-at-top
  run = workdirs.restore(workdir, step="latest")
  config, spec = run.config, run.spec
  top1 = {k: [] for k in preds}
  labels = []
  for batch in experiment.eval_batches(config, spec, "test")():
    mask = np.asarray(batch["mask"], bool)
    x = np.asarray(batch["inputs"], np.float32)[mask]
    labels.append(np.asarray(batch["label"])[mask])
    for name, (fn, _) in preds.items():
      top1[name].append(np.asarray(fn(x)).argmax(-1))
    if sum(map(len, labels)) >= args.eval_images:
      break
  y = np.concatenate(labels)
  ref = np.concatenate(top1["jtl jit float32"])
  return {k: (100 * np.mean(np.concatenate(v) == y), 100 * np.mean(np.concatenate(v) == ref))
          for k, v in top1.items()}


def speed(preds: dict[str, tuple], args: argparse.Namespace) -> dict[str, tuple]:
  """{runtime: (batch-1 median ms, batch-64 images/s)}."""
  rng = np.random.default_rng(0)
  x1 = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
  x64 = rng.standard_normal((64, 224, 224, 3)).astype(np.float32)
  out = {}
  for name, (fn, _) in preds.items():
    lat = common.median_seconds(lambda: np.asarray(fn(x1)), args.latency_runs, warmup=2) * 1e3
    thr = 64 / common.median_seconds(lambda: np.asarray(fn(x64)), 3, warmup=2)
    out[name] = (lat, thr)
    print(f"  {name}: {lat:.2f} ms at batch 1, {thr:.1f} images/s at batch 64", flush=True)
  return out


TORCH_CODE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])  # this folder: common.py (timer, the reference models)
import common
torch.set_num_threads(int(sys.argv[1])); torch.manual_seed(0)
out = {}
for name in sys.argv[2].split(","):
  m = common.torch_model(name, num_classes=10).eval()
  res = {}
  for b, runs in ((1, 50), (64, 3)):
    x = torch.randn(b, 3, 224, 224)
    with torch.inference_mode():
      res[b] = common.median_seconds(lambda: m(x), runs, warmup=2)
  out[name] = (res[1] * 1e3, 64 / res[64])
print(json.dumps(out))
"""


def torch_speed(args: argparse.Namespace, names: list[str]) -> dict[str, tuple]:
  if not args.torch_python:
    return {}
  try:
    run = subprocess.run([args.torch_python, "-c", TORCH_CODE, str(args.threads), ",".join(names),
                          os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])
  except (subprocess.SubprocessError, OSError, ValueError) as e:
    print(f"PyTorch timing skipped: {e}")
    return {}


def survey(args: argparse.Namespace) -> None:
  """Every zoo image model, random init, in every format: converts or why not.

  Each (model, format) runs in its own process: a runtime that aborts (a
  native crash) is reported, not fatal."""
  from jtl import models  # pylint: disable=g-import-not-at-top
  from jtl.export import deploy  # pylint: disable=g-import-not-at-top
  print("| model | " + " | ".join(deploy.FORMATS) + " |")
  print("|---|---|---|---|")
  for name in models.list_models():
    spec = models.get_spec(name)
    cells = []
    for fmt in deploy.FORMATS:
      run = subprocess.run([sys.executable, os.path.abspath(__file__), "--data", args.data,
                            "--out", args.out, "--threads", str(args.threads),
                            "--survey_one", f"{name}:{fmt}"],
                           capture_output=True, text=True, timeout=1800)
      lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
      cell = lines[-1][7:] if lines else "process died before exporting"
      if run.returncode != 0:  # a native abort in the converter or the runtime
        cell += f"; then the process died (exit {run.returncode}) running it"
      cells.append(cell)
    size = f"{spec.image_size} px" if spec.input_kind == "image" else f"{TEXT_LENGTH} tokens"
    print(f"| {name} ({size}) | " + " | ".join(cells) + " |", flush=True)


TEXT_LENGTH = 128  # all-MiniLM-L6-v2's tokenizer pads and truncates to 128


def _survey_inputs(spec, name: str):
  """(inputs for 2 examples, per-example shape, token_inputs) of a zoo model."""
  if spec.input_kind == "image":
    size = spec.image_size
    return (np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32),
            (size, size, 3), False)
  sentences = ["A man is eating a piece of bread.", "The new movie is awesome"]
  try:
    batch = spec.preprocess(sentences, max_length=TEXT_LENGTH)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    pad = TEXT_LENGTH - batch["input_ids"].shape[1]
    batch = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in batch.items()}
  except Exception:  # noqa: BLE001 - no tokenizer installed: random ids
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, (2, TEXT_LENGTH)).astype(np.int32)
    mask = (np.arange(TEXT_LENGTH)[None] < np.array([[20], [9]])).astype(np.int32)
    batch = {"input_ids": ids * mask, "attention_mask": mask}
  return ({k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask")},
          (TEXT_LENGTH,), True)


def survey_one(args: argparse.Namespace) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from jtl import models  # pylint: disable=g-import-not-at-top
  from jtl.export import deploy  # pylint: disable=g-import-not-at-top
  name, fmt = args.survey_one.split(":")
  spec = models.get_spec(name)
  created = models.create(name, pretrained=False, num_classes=10)
  # Zero-initialised heads (ViT) would make every logit 0: give them values.
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda v: rng.normal(0, 0.02, v.shape).astype(v.dtype)
                           if v.ndim >= 1 and not np.any(v) else v, created.variables)
  x, shape, tokens = _survey_inputs(spec, name)
  fn = deploy.inference_fn(created.module, variables, token_inputs=tokens)
  ref = np.asarray(jax.jit(fn)(*(x[k] for k in deploy.TOKEN_INPUTS) if tokens else (x,)))
  path = os.path.join(args.out, "survey", name + deploy.SUFFIX[fmt])
  def one(i: int):
    return tuple(x[k][i:i + 1] for k in deploy.TOKEN_INPUTS) if tokens else x[i:i + 1]

  try:
    rep = [one(0), one(1)] if fmt == "tflite_int8" else None
    e = deploy.export(created.module, variables, path, format=fmt, input_shape=shape,
                      representative=rep, token_inputs=tokens)
    print(f"RESULT exported {e.bytes / 1e6:.1f} MB", flush=True)
    y = deploy.load(path, num_threads=args.threads)(x)
    diff = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-12))
    cosine = float(np.min((y * ref).sum(-1) / (np.linalg.norm(y, axis=-1)
                                               * np.linalg.norm(ref, axis=-1) + 1e-12)))
    print(f"RESULT ok, {e.bytes / 1e6:.1f} MB, max rel. diff {diff:.1e}, "
          f"min cosine {cosine:.3f}", flush=True)
  except Exception as err:  # noqa: BLE001 - reported in the table
    print(f"RESULT FAILS: {type(err).__name__}: {str(err)[:160]}".replace("\n", " "), flush=True)


def main() -> None:
  args = parse_args()
  from jtl.app import cpu  # pylint: disable=g-import-not-at-top
  cpu.configure_cpu_runtime()
  os.makedirs(args.out, exist_ok=True)
  if args.survey_one:
    survey_one(args)
    return
  if args.survey:
    survey(args)
    return
  names = args.models.split(",")
  rows = []
  torch = torch_speed(args, names)
  for name in names:
    t = time.time()
    workdir = finetune(name, args)
    print(f"{name}: fine-tuned in {time.time() - t:.0f} s -> {workdir}", flush=True)
    preds = predictors(workdir, args)
    acc = accuracy(workdir, preds, args)
    spd = speed(preds, args)
    base = spd["jtl jit float32"][0]
    for k, (fn, size) in preds.items():
      rows.append((name, k, acc[k][0], acc[k][1], size / 1e6, spd[k][0], base / spd[k][0], spd[k][1]))
    if name in torch:
      lat, thr = torch[name]
      rows.append((name, "PyTorch eager float32 (speed only)", float("nan"), float("nan"),
                   float("nan"), lat, base / lat, thr))
  print("\n| model | runtime | test acc. % | top-1 agrees with jtl % | file MB | batch-1 ms "
        "| speed-up vs jtl f32 (b1) | batch-64 img/s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | "
          f"{r[6]:.2f}x | {r[7]:.1f} |")


if __name__ == "__main__":
  main()
