"""Fine-tuning throughput and MFU on the local accelerator, side by side with timm.

  pip install -e .   # once: the benchmark scripts import the installed jtl
  python scripts/benchmarks/benchmark_accelerator.py --out runs/accelerator      # one GPU/TPU, 224 px
  python scripts/benchmarks/benchmark_accelerator.py --tiny --out /tmp/accel     # CPU smoke run (tested)

For each model (ViT-B/16, ResNet-50, EfficientNet-Lite0 at 224 px; with --tiny
ViT-Ti/16 and ResNet-18 at 32 px) and each batch size of the sweep, jtl's
compiled train step is timed in two settings, full fine-tuning and frozen
backbone (head only): bf16 compute with fp32 master weights, donated state,
synthetic batches already on the devices (the input pipeline is not measured).
Reported: images/s, the compiled FLOPs of a step (`cost_analysis()`), MFU =
achieved FLOP/s over the device's peak bf16 FLOP/s (`PEAK_BF16_TFLOPS`, by
`jax.devices()[0].device_kind`, or --peak_tflops), for the frozen backbone the
step time over the forward time, and the device memory the compiled step needs
(XLA's `memory_analysis()`).

The largest batch of each model and mode is measured first and the rest of the
sweep after, each side under a time budget (--torch_budget_s, --budget_s), so
that one command fits a short accelerator lease; results are rewritten after
every row.

The same models in PyTorch (timm, AMP bf16, torch.compile where it works,
channels_last for convnets) run first, in a companion process
(`benchmark_accelerator_torch.py`, with --torch_python or this Python if it
has torch and timm), which gives the device back before JAX takes it; the table
gets their images/s and the jtl/timm ratio.

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

import jax
import jax.numpy as jnp
import numpy as np

import jtl
from jtl import models

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
           compute_dtype: Any = jnp.bfloat16, optimizer: str = "adamw", **build: Any):
  created = models.create(name, num_classes=1000, pretrained=False, **build)
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


def program_flops(step, state, batch) -> tuple[float | None, str | None]:
  """FLOPs of one step as written, before XLA rewrites it, and where the count
  came from. The program is lowered for the CPU from shapes alone: an
  accelerator's compiled program counts no FLOPs in library calls (cuBLAS and
  cuDNN on GPU), and jax 0.11 gives no cost analysis of a GPU lowering. The
  count depends on the program, not on the device that runs it."""
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (state, batch))
  try:
    lowered = jax.jit(step).trace(*shapes).lower(lowering_platforms=("cpu",))
    return float(lowered.cost_analysis()["flops"]), "program as written (HLO cost analysis)"
  except Exception as e:  # noqa: BLE001 - never lose a timing over a FLOP count
    print(f"FLOP count unavailable: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    return None, None


def program_gib(compiled) -> float | None:
  """Device memory the compiled step needs (arguments + outputs + temporaries,
  donated buffers counted once), from XLA's own memory analysis: per program,
  unlike `memory_stats()`'s peak, which only grows over a process."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  return total / 2**30


def measure_jtl(name: str, mode: str, batch: int, size: int, steps: int,
                peak: float | None, **build: Any) -> dict[str, Any]:
  """One jtl row (`build`: keyword arguments of the zoo model). The forward
  pass is timed for the frozen mode only, where "step over forward" is the
  goal (a head-only step should cost about a forward)."""
  mesh = jtl.make_mesh()
  created, state, step, data = _setup(name, mode, batch, size, mesh, **build)
  flops, flops_source = program_flops(step, state, data)
  t0 = time.perf_counter()
  compiled = jtl.jit_train_step(step, mesh).lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  seconds = _timed(compiled, (state, data), steps, carry=True)
  fwd_seconds = None
  if mode == "frozen":
    module = created.module
    forward = jax.jit(lambda v, x: module.apply(
        jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, v),
        x.astype(jnp.bfloat16), train=False))
    variables = jax.device_put(created.variables, jtl.parallel.replicated(mesh))
    fwd_seconds = _timed(forward, (variables, data["inputs"]), steps, carry=False)
  achieved = flops and flops / seconds / 1e12
  return {"framework": "jtl", "model": name, "mode": mode, "batch": batch, "image_size": size,
          "images_per_s": batch / seconds, "step_ms": 1e3 * seconds,
          "tflops_per_step": flops and flops / 1e12, "flops_source": flops_source,
          "achieved_tflops": achieved,
          "mfu": achieved / peak if peak and achieved else None,
          "step_over_forward": fwd_seconds and seconds / fwd_seconds,
          "program_gib": program_gib(compiled), "compile_s": compile_s,
          "build": build}


def measure_torch(python: str, plan: list[tuple[str, str, int]], pairs: dict[str, str],
                  args: argparse.Namespace) -> list[dict]:
  """timm's rows, from the companion process (run before JAX takes the device)."""
  script = Path(__file__).with_name("benchmark_accelerator_torch.py")
  cmd = [python, str(script), "--plan", ",".join(f"{pairs[m]}:{m}:{mode}:{b}" for m, mode, b in plan),
         "--image_size", str(args.image_size), "--steps", str(args.steps),
         "--budget_s", str(args.torch_budget_s)]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torch_budget_s + 120)
  except subprocess.TimeoutExpired as e:
    print(f"timm side timed out: {e}", file=sys.stderr)
    return []
  sys.stderr.write(done.stderr[-3000:])
  if done.returncode:
    print(f"timm side failed ({done.returncode})", file=sys.stderr)
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
  fmt = lambda value, spec: "-" if value is None else format(value, spec)
  lines = [f"Device: {kind} x {jax.device_count()}", "",
           "| model | mode | batch | jtl img/s | timm img/s | jtl/timm | TFLOP/step | MFU % | "
           "step/forward | program GiB | timm how |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in (r for r in rows if r["framework"] == "jtl"):
    t = timm.get((r["model"], r["mode"], r["batch"]))
    theirs = t["images_per_s"] if t else None
    cells = [r["model"], r["mode"], r["batch"], fmt(r["images_per_s"], ".1f"),
             fmt(theirs, ".1f"), fmt(theirs and r["images_per_s"] / theirs, ".2f"),
             fmt(r["tflops_per_step"], ".3f"), fmt(r["mfu"] and 100 * r["mfu"], ".1f"),
             fmt(r["step_over_forward"], ".2f"), fmt(r["program_gib"], ".1f"),
             t["how"] if t else "-"]
    lines.append("| " + " | ".join(map(str, cells)) + " |")
  return "\n".join(lines)


def plan_of(pairs: dict[str, str], args: argparse.Namespace) -> list[tuple[str, str, int]]:
  """(model, mode, batch) in the order measured: the largest batch of every
  model and mode first, so a run cut short by its time budget still compares
  every model; the rest of the sweep after."""
  batches = {"full": [int(b) for b in args.batches.split(",")],
             "frozen": [int(b) for b in (args.frozen_batches or args.batches).split(",")]}
  modes = args.modes.split(",")
  first = [(m, mode, max(batches[mode])) for mode in modes for m in pairs]
  rest = [(m, mode, b) for mode in modes for m in pairs for b in sorted(batches[mode])[::-1]
          if b != max(batches[mode])]
  return first + rest


def write(out: Path, result: dict) -> str:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  text = table(result["rows"], result["device_kind"])
  if result["not_measured"]:
    text += "\n\nNot measured: " + "; ".join(result["not_measured"])
  (out / "results.md").write_text(text + "\n")
  return text


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--tiny", action="store_true", help="ViT-Ti/16 and ResNet-18 at 32 px")
  parser.add_argument("--models", default=None, help="comma-separated zoo names")
  parser.add_argument("--modes", default="full,frozen")
  parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
  parser.add_argument("--frozen_batches", default=None, help="default: --batches")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--peak_tflops", type=float, default=None)
  parser.add_argument("--torch_python", default=None)
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--torch_budget_s", type=int, default=300,
                      help="timm starts no new measurement after this many seconds")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="jtl starts no new measurement after this many seconds")
  parser.add_argument("--model_kwargs", default="{}",
                      help='JSON keyword arguments of every jtl model, e.g. \'{"fused_attention": false}\'')
  parser.add_argument("--check_mesh", action="store_true")
  args = parser.parse_args(argv)
  pairs = TINY if args.tiny else FULL
  if args.models:
    pairs = {m: {**FULL, **TINY}.get(m, m) for m in args.models.split(",")}
  args.batches = args.batches or ("16" if args.tiny else "128,256")
  args.frozen_batches = args.frozen_batches or (None if args.tiny else "256")
  args.image_size = args.image_size or (32 if args.tiny else 224)
  plan = plan_of(pairs, args)
  # timm first: a JAX process keeps the device memory it took until it exits.
  python = None if args.no_torch else torch_python(args.torch_python)
  rows = measure_torch(python, plan, pairs, args) if python else []
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind, args.peak_tflops)
  result = {"device_kind": kind, "devices": jax.device_count(), "peak_bf16_tflops": peak,
            "jax": jax.__version__, "rows": rows, "not_measured": []}
  out, start = Path(args.out), time.perf_counter()
  for name, mode, batch in plan:
    if args.budget_s and time.perf_counter() - start > args.budget_s:
      result["not_measured"].append(f"jtl {name} {mode} {batch}: time budget")
      continue
    try:
      rows.append(measure_jtl(name, mode, batch, args.image_size, args.steps, peak,
                              **json.loads(args.model_kwargs)))
    except Exception as e:  # noqa: BLE001 - an out-of-memory batch is reported, not fatal
      print(f"jtl {name} {mode} batch {batch}: {type(e).__name__}: {str(e)[:300]}",
            file=sys.stderr)
      result["not_measured"].append(f"jtl {name} {mode} {batch}: {type(e).__name__}")
    write(out, result)
  if args.check_mesh:
    result["mesh_max_abs_diff"] = check_mesh()
  print(write(out, result))
  return rows


if __name__ == "__main__":
  main()
