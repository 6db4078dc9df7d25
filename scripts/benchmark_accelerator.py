"""Fine-tuning throughput and MFU on the local accelerator, side by side with timm.

  python scripts/benchmark_accelerator.py --out runs/accelerator      # one GPU/TPU, 224 px
  python scripts/benchmark_accelerator.py --tiny --out /tmp/accel     # CPU smoke run (tested)

For each model (ViT-B/16, ResNet-50, EfficientNet-Lite0 at 224 px; with --tiny
ViT-Ti/16 and ResNet-18 at 32 px) and each batch size of the sweep, jtl's
compiled train step is timed in two settings, full fine-tuning and frozen
backbone (head only): bf16 compute with fp32 master weights, donated state,
synthetic batches already on the devices (the input pipeline is not measured).
Reported: images/s, the compiled FLOPs of a step (`cost_analysis()`), MFU =
achieved FLOP/s over the device's peak bf16 FLOP/s (`PEAK_BF16_TFLOPS`, by
`jax.devices()[0].device_kind`, or --peak_tflops), the step time over the
forward time, and the peak device memory (`memory_stats()`).

The same models in PyTorch (timm, AMP bf16, torch.compile where it works,
channels_last for convnets) run in a companion process
(`benchmark_accelerator_torch.py`, with --torch_python or this Python if it
has torch and timm); the table gets their images/s and the jtl/timm ratio.

Writes results.json and results.md to --out and prints the table. With
--check_mesh, also checks on the local devices that the sharded step gives
the params of the one-device step (correctness only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jtl  # noqa: E402
from jtl import models  # noqa: E402

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}
FULL = {"vit_b16": "vit_base_patch16_224", "resnet50": "resnet50",
        "efficientnet_lite0": "efficientnet_lite0"}
TINY = {"vit_ti16": "vit_tiny_patch16_224", "resnet18": "resnet18"}


def peak_tflops(kind: str, override: float | None) -> float | None:
  if override:
    return override
  for name, value in PEAK_BF16_TFLOPS.items():
    if kind.startswith(name) or name in kind:
      return value
  return None


def _rules(mode: str) -> list[tuple[str, str]]:
  return [(".*", "all")] if mode == "full" else [("head/.*", "head"), (".*", "frozen")]


def _setup(name: str, mode: str, batch: int, size: int, mesh: jax.sharding.Mesh,
           compute_dtype: Any = jnp.bfloat16, optimizer: str = "adamw"):
  created = models.create(name, num_classes=1000, pretrained=False)
  labels = jtl.label_params(created.variables["params"], _rules(mode))
  tx = jtl.make_optimizer(labels, learning_rate=1e-4 if optimizer == "adamw" else 0.1,
                          optimizer=optimizer, weight_decay=0.05 if optimizer == "adamw" else 0.0)
  state = jtl.place_state(jtl.create_train_state(created.variables, labels, tx), mesh)
  step = jtl.make_train_step(created.module, tx, labels=labels, compute_dtype=compute_dtype)
  rng = np.random.default_rng(0)
  data = {"inputs": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, 1000, batch).astype(np.int32)}
  return created, state, step, jtl.shard_batch(data, mesh)


def _timed(fn, args, steps: int, *, carry: bool) -> float:
  """Seconds per call; with `carry`, the first output feeds the next call."""
  out = fn(*args)
  jax.block_until_ready(out)
  if carry:
    args = (out[0],) + tuple(args[1:])
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
    if carry:
      args = (out[0],) + tuple(args[1:])
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def measure_jtl(name: str, mode: str, batch: int, size: int, steps: int,
                peak: float | None) -> dict[str, Any]:
  mesh = jtl.make_mesh()
  created, state, step, data = _setup(name, mode, batch, size, mesh)
  compiled = jtl.jit_train_step(step, mesh).lower(state, data).compile()
  flops = float(compiled.cost_analysis()["flops"])
  seconds = _timed(compiled, (state, data), steps, carry=True)
  module = created.module
  forward = jax.jit(lambda v, x: module.apply(
      jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, v),
      x.astype(jnp.bfloat16), train=False))
  variables = jax.device_put(created.variables, jtl.parallel.replicated(mesh))
  fwd_seconds = _timed(forward, (variables, data["inputs"]), steps, carry=False)
  stats = jax.devices()[0].memory_stats() or {}
  achieved = flops / seconds / 1e12
  return {"framework": "jtl", "model": name, "mode": mode, "batch": batch, "image_size": size,
          "images_per_s": batch / seconds, "step_ms": 1e3 * seconds,
          "tflops_per_step": flops / 1e12, "achieved_tflops": achieved,
          "mfu": achieved / peak if peak else None, "step_over_forward": seconds / fwd_seconds,
          "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None}


def measure_torch(python: str, pairs: dict[str, str], args: argparse.Namespace) -> list[dict]:
  script = Path(__file__).with_name("benchmark_accelerator_torch.py")
  cmd = [python, str(script), "--models", ",".join(f"{k}={v}" for k, v in pairs.items()),
         "--batches", args.batches, "--image_size", str(args.image_size),
         "--steps", str(args.steps)]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torch_timeout)
  if done.returncode:
    print(f"timm side failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
    return []
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def torch_python(given: str | None) -> str | None:
  if given:
    return given
  probe = subprocess.run([sys.executable, "-c", "import torch, timm"], capture_output=True)
  return sys.executable if probe.returncode == 0 else None


def check_mesh(name: str = "vit_ti16", size: int = 32, batch: int = 16) -> float:
  """Max |params after one sharded step - after the one-device step| (fp32,
  SGD: Adam's first step turns summation-order noise in near-zero gradients
  into +-lr, which says nothing about the sharding)."""
  outs = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = jtl.make_mesh(devices)
    _, state, step, data = _setup(name, "full", batch, size, mesh, compute_dtype=None,
                                  optimizer="sgd")
    state, _ = jtl.jit_train_step(step, mesh)(state, data)
    outs.append(jax.device_get(state.params))
  return max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
             for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])))


def table(rows: list[dict], kind: str) -> str:
  """The markdown table: one line per jtl measurement, timm's beside it."""
  timm = {(r["model"], r["mode"], r["batch"]): r for r in rows if r["framework"] == "timm"}
  fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
  lines = [f"Device: {kind} x {jax.device_count()}", "",
           "| model | mode | batch | jtl img/s | timm img/s | jtl/timm | TFLOP/step | MFU % | "
           "step/forward | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in (r for r in rows if r["framework"] == "jtl"):
    t = timm.get((r["model"], r["mode"], r["batch"]))
    theirs = t["images_per_s"] if t else None
    cells = [r["model"], r["mode"], r["batch"], fmt(r["images_per_s"], ".1f"),
             fmt(theirs, ".1f"), fmt(theirs and r["images_per_s"] / theirs, ".2f"),
             fmt(r["tflops_per_step"], ".3f"), fmt(r["mfu"] and 100 * r["mfu"], ".1f"),
             fmt(r["step_over_forward"], ".2f"), fmt(r["peak_memory_gib"], ".1f")]
    lines.append("| " + " | ".join(map(str, cells)) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--tiny", action="store_true", help="ViT-Ti/16 and ResNet-18 at 32 px")
  parser.add_argument("--models", default=None, help="comma-separated zoo names")
  parser.add_argument("--modes", default="full,frozen")
  parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--peak_tflops", type=float, default=None)
  parser.add_argument("--torch_python", default=None)
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--torch_timeout", type=int, default=300)
  parser.add_argument("--check_mesh", action="store_true")
  args = parser.parse_args(argv)
  pairs = TINY if args.tiny else FULL
  if args.models:
    pairs = {m: {**FULL, **TINY}.get(m, m) for m in args.models.split(",")}
  args.batches = args.batches or ("16" if args.tiny else "64,128,256")
  args.image_size = args.image_size or (32 if args.tiny else 224)
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind, args.peak_tflops)
  rows = []
  for name in pairs:
    for mode in args.modes.split(","):
      for batch in map(int, args.batches.split(",")):
        try:
          rows.append(measure_jtl(name, mode, batch, args.image_size, args.steps, peak))
        except Exception as e:  # noqa: BLE001 - an out-of-memory batch ends the sweep
          print(f"jtl {name} {mode} batch {batch}: {type(e).__name__}: {str(e)[:200]}",
                file=sys.stderr)
          break
  python = None if args.no_torch else torch_python(args.torch_python)
  if python:
    rows += measure_torch(python, pairs, args)
  result = {"device_kind": kind, "devices": jax.device_count(), "peak_bf16_tflops": peak,
            "rows": rows}
  if args.check_mesh:
    result["mesh_max_abs_diff"] = check_mesh()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  text = table(rows, kind)
  (out / "results.md").write_text(text + "\n")
  print(text)
  return rows


if __name__ == "__main__":
  main()
