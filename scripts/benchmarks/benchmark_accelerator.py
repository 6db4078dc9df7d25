"""Fine-tuning throughput, MFU, compile time and memory on the local accelerator, beside timm.

  pip install -e .   # once: the benchmark scripts import the installed jtl
  python scripts/benchmarks/benchmark_accelerator.py --out runs/accelerator --budget_s 450
  python scripts/benchmarks/benchmark_accelerator.py --smoke --out /tmp/accel   # CPU, tiny (tested)
  python scripts/benchmarks/benchmark_accelerator.py --count_ops cuda --out /tmp/counts \
    --models efficientnet_lite0 --batches 256 --model_kwargs '{"formulation": "grouped"}'
    # no device: the step lowered for CUDA, its BatchNorm passes counted

Rows, per model (ViT-B/16, ResNet-50, EfficientNet-Lite0 at 224 px; with
--smoke ViT-Ti/16, ResNet-18 and Lite0 at 32 px), in this order of priority:
full fine-tuning at the largest batch (ViT also with cuDNN fused attention,
the A/B), the frozen backbone (head only) and the bf16 forward pass alone,
partial fine-tuning (the last 2 blocks and what follows), then full
fine-tuning at the other batch sizes. jtl: bf16 compute, fp32 master weights,
AdamW, donated state, synthetic batches already on the device.

Per row: images/s, compile time (a cold persistent compilation cache,
`jax_compilation_cache_dir` = --cache_dir), FLOPs of the program as written
(HLO cost analysis of the program lowered for the CPU from shapes), MFU
against the chip's dense bf16 peak, the device memory the program needs
(XLA's `memory_analysis()`) and the process's peak (`memory_stats()`), and for
the frozen/partial rows the step time over the forward's. Then: the numbers
of fused against Flax attention (max |logits diff|, max |grad diff|), a
`jax.profiler` trace of one step of the --profile models with the top-10
kernels by time, and a second process compiling the full-fine-tuning programs
again from the cache (what a second run pays).

No row is lost to a metric it cannot compute: every metric is guarded and
reported as missing with the reason; every row and extra is guarded; rows are
printed ("ROW {json}") and results.json/results.md rewritten as each
completes. Time: --budget_s for the whole command (timm gets
--torch_budget_s of it first, in a companion process that gives the device
back before JAX takes it: benchmark_accelerator_torch.py, with
--torch_python or this Python if it has torch and timm); no row starts when
less than its expected cost is left, and each row times at most --steps steps
within --row_budget_s.

With --check_mesh, also checks on the local devices that the sharded step
gives the params of the one-device step (correctness only).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

T_START = time.perf_counter()  # before jax's import: a second run's whole cost
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np

import jtl
from jtl import models

sys.path.insert(0, str(Path(__file__).parent))  # common.py, also when a test imports this file
import common  # noqa: E402

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
SMOKE = {"vit_ti16": "vit_tiny_patch16_224", "resnet18": "resnet18",
         "efficientnet_lite0": "efficientnet_lite0"}
MODES = ("full", "frozen", "partial", "forward")
FUSED = {"fused_attention": True}


def peak_tflops(kind: str, override: float | None) -> float | None:
  if override:
    return override
  for name, value in PEAK_BF16_TFLOPS.items():
    if kind.startswith(name) or name in kind:
      return value
  return None


def rules(spec: Any, mode: str) -> list[tuple[str, str]]:
  """Partition rules: everything, the head only, or the last 2 blocks and the
  groups after them (final norm / top conv, head)."""
  if mode == "full":
    return [(".*", "all")]
  if mode in ("frozen", "forward"):
    return [("head/.*", "head"), (".*", "frozen")]
  blocks = [g for g in spec.groups if g[0] not in ("head", "top", "encoder_norm")]
  start = list(spec.groups).index(blocks[-2])
  return [(pattern, "top") for _, pattern in spec.groups[start:]] + [(".*", "frozen")]


def _setup(name: str, mode: str, batch: int, size: int, mesh: jax.sharding.Mesh,
           compute_dtype: Any = jnp.bfloat16, optimizer: str = "adamw", **build: Any):
  created = models.create(name, num_classes=1000, pretrained=False, **build)
  labels = jtl.label_params(created.variables["params"], rules(created.spec, mode))
  tx = jtl.make_optimizer(labels, learning_rate=1e-4 if optimizer == "adamw" else 0.1,
                          optimizer=optimizer, weight_decay=0.05 if optimizer == "adamw" else 0.0)
  # copy=False: place_state copies (one copy of the weights, not two, beside the caller's).
  state = jtl.place_state(jtl.create_train_state(created.variables, labels, tx, copy=False), mesh)
  step = jtl.make_train_step(created.module, tx, labels=labels, compute_dtype=compute_dtype)
  rng = np.random.default_rng(0)
  data = {"inputs": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, 1000, batch).astype(np.int32)}
  return created, state, step, jtl.shard_batch(data, mesh)


def _forward(created, mesh, data):
  """The bf16 eval-mode forward pass and its (variables, inputs)."""
  module = created.module
  bf16 = lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a
  fn = lambda v, x: module.apply(v, x.astype(jnp.bfloat16), train=False)
  variables = jax.device_put(jax.tree.map(bf16, created.variables), jtl.parallel.replicated(mesh))
  return jax.jit(fn), (variables, data["inputs"])


def _timed(fn: Callable, args: tuple, steps: int, *, carry: bool,
           budget_s: float | None = None) -> tuple[float, int, tuple]:
  """(seconds per call, calls timed, the last call's args); with `carry`, the
  first output feeds the next call (the donated state lives on in it). One
  untimed call first; at most `budget_s` of timed calls."""
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  if carry:
    args = (out[0],) + tuple(args[1:])
  if budget_s:
    steps = max(1, min(steps, int(budget_s / max(first, 1e-6))))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
    if carry:
      args = (out[0],) + tuple(args[1:])
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps, steps, args


def program_flops(fn: Callable, *args: Any) -> tuple[float | None, str | None]:
  """FLOPs of one call as written, before XLA rewrites it, and where the count
  came from. Lowered for the CPU from shapes alone: an accelerator's compiled
  program counts no FLOPs in library calls (cuBLAS and cuDNN on GPU), and jax
  gives no cost analysis of a GPU lowering. The count depends on the program,
  not on the device that runs it."""
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  lowered = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cpu",))
  flops = (lowered.cost_analysis() or {}).get("flops")
  if not flops:
    raise ValueError(f"cost analysis gave no FLOP count ({flops!r})")
  return float(flops), "program as written (HLO cost analysis, CPU lowering)"


def activation_ops(text: str, batch: int) -> dict[str, int]:
  """Ops on [batch, H, W, C] activations in a StableHLO module's text:
  reductions of them (BatchNorm's statistics and gradients, pooling) and
  converts that produce them (bf16 <-> f32). They tell which BatchNorm a
  step runs: jtl's closed form has 4 reductions per layer (2 forward, 2
  backward) and, in bf16, 5 converts (each pass's half-precision reads and
  writes); Flax's autodiff of its forward has 5 and 6.

  >>> line = "%3 = stablehlo.convert %2 : (tensor<8x4x4x2xbf16>) -> tensor<8x4x4x2xf32>"
  >>> activation_ops(line, 8)
  {'reductions': 0, 'converts': 1}
  """
  shape = re.compile(rf"tensor<{batch}x\d+x\d+x\d+x")
  counts = {"reductions": 0, "converts": 0}
  for line in text.splitlines():
    if "stablehlo.reduce(" in line:
      counts["reductions"] += bool(shape.match(line.rsplit(" : (", 1)[-1]))
    elif "stablehlo.convert " in line:
      counts["converts"] += bool(shape.match(line.rsplit("-> ", 1)[-1]))
  return counts


def abstract_program(name: str, mode: str, batch: int, size: int | None, build: dict,
                     compute_dtype: Any = jnp.bfloat16):
  """(function, argument shapes, donated argnums) of one row from shapes
  alone, nothing initialised: the train step of `mode` (full, frozen,
  partial; AdamW) or the bf16 eval-mode forward pass ("forward"), on `size`
  px images (None: the model's own example input, text included)."""
  spec = models.get_spec(name)
  module = spec.build(num_classes=1000, **build)
  variables = models.registry.abstract_variables(spec, module)
  inputs = (jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32) if size else
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                         spec.example_input(batch)))
  if mode == "forward":
    half = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, jnp.bfloat16 if a.dtype == jnp.float32 else a.dtype), variables)
    to_half = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return (lambda v, x: module.apply(v, jax.tree.map(to_half, x), train=False)), (half, inputs), ()
  labels = jtl.label_params(variables["params"], rules(spec, mode))
  tx = jtl.make_optimizer(labels, learning_rate=1e-4, weight_decay=0.05)
  state = jax.eval_shape(lambda v: jtl.create_train_state(v, labels, tx), variables)
  step = jtl.make_train_step(module, tx, labels=labels, compute_dtype=compute_dtype)
  data = {"inputs": inputs, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  return step, (state, data), (0,)


def lowered_step(name: str, batch: int, size: int, compute_dtype: Any, platform: str,
                 **build: Any) -> str:
  """StableHLO of a model's full fine-tuning step (AdamW) lowered for
  `platform` from shapes alone: nothing is initialised, compiled or run."""
  step, args, _ = abstract_program(name, "full", batch, size, build, compute_dtype)
  return jax.jit(step).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def count_ops(args: argparse.Namespace) -> list[dict]:
  """--count_ops: `activation_ops` of each model's full step at the largest
  batch, float32 and bf16 compute, lowered for the platform named."""
  batch = max(int(b) for b in args.batches.split(","))
  rows = []
  for name in args.pairs:
    for dtype in (jnp.float32, jnp.bfloat16):
      text = lowered_step(name, batch, args.image_size, dtype, args.count_ops,
                          **json.loads(args.model_kwargs))
      rows.append({"model": name, "batch": batch, "image_size": args.image_size,
                   "compute": jnp.dtype(dtype).name, "platform": args.count_ops,
                   **activation_ops(text, batch)})
      print("COUNT " + json.dumps(rows[-1]), flush=True)
  Path(args.out).mkdir(parents=True, exist_ok=True)
  (Path(args.out) / "op_counts.json").write_text(json.dumps(rows, indent=2))
  return rows


def program_gib(compiled) -> float:
  """Device memory the compiled program needs (arguments + outputs +
  temporaries, donated buffers counted once), from XLA's memory analysis:
  per program, unlike `memory_stats()`'s peak, which only grows over a
  process."""
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**30


def process_peak_gib() -> float:
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    raise ValueError("this backend reports no memory_stats()")
  return stats["peak_bytes_in_use"] / 2**30


def guarded(row: dict, key: str, fn: Callable[[], Any]) -> Any:
  """row[key] = fn(), or None with the reason in row["missing"][key]."""
  try:
    row[key] = fn()
  except Exception as e:  # noqa: BLE001 - a metric never costs the row
    row[key] = None
    row.setdefault("missing", {})[key] = f"{type(e).__name__}: {str(e)[:200]}"
  return row[key]


def _program(name: str, mode: str, batch: int, size: int, build: dict):
  """(compiled-to-be function, args, carry, created, flops_fn) of one row."""
  mesh = jtl.make_mesh()
  created, state, step, data = _setup(name, "frozen" if mode == "forward" else mode,
                                      batch, size, mesh, **build)
  if mode == "forward":
    fn, args = _forward(created, mesh, data)
    return fn, args, False, (lambda: program_flops(fn, *args))
  flops = lambda: program_flops(step, state, data)
  return jtl.jit_train_step(step, mesh), (state, data), True, flops


def measure_jtl(name: str, mode: str, batch: int, size: int, steps: int, peak: float | None,
                *, row_budget_s: float | None = None, profile_dir: str | None = None,
                **build: Any) -> dict[str, Any]:
  """One jtl row (`build`: keyword arguments of the zoo model); a compile or
  step failure raises, every other metric is guarded."""
  row: dict[str, Any] = {"framework": "jtl", "model": name, "mode": mode, "batch": batch,
                         "image_size": size, "build": build}
  fn, args, carry, flops_fn = _program(name, mode, batch, size, build)
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  row["compile_s"] = time.perf_counter() - t0
  seconds, row["steps"], args = _timed(compiled, args, steps, carry=carry,
                                       budget_s=row_budget_s)
  row.update(images_per_s=batch / seconds, step_ms=1e3 * seconds)
  flops = guarded(row, "tflops_per_step", lambda: flops_fn()[0] / 1e12)
  row["achieved_tflops"] = flops and flops / seconds
  row["mfu"] = row["achieved_tflops"] / peak if peak and flops else None
  guarded(row, "program_gib", lambda: program_gib(compiled))
  guarded(row, "process_peak_gib", process_peak_gib)
  if build.get("fused_attention"):
    guarded(row, "cudnn_fmha_in_program", lambda: "__cudnn$fmha" in compiled.as_text())
  if profile_dir:
    row["trace_dir"] = profile_dir
    guarded(row, "top_kernels", lambda: profile_one_step(compiled, args, carry, profile_dir))
  return row


def profile_one_step(compiled: Callable, args: tuple, carry: bool, trace_dir: str,
                     top: int = 10) -> list[dict]:
  """`jax.profiler` trace of one call; the top kernels by time (from the file)."""
  out = compiled(*args)
  jax.block_until_ready(out)
  args = (out[0],) + tuple(args[1:]) if carry else args
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  try:
    jax.block_until_ready(compiled(*args))
  finally:
    jax.profiler.stop_trace()
  files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  return top_kernels(files[-1], top)


def top_kernels(trace_file: str, top: int = 10) -> list[dict]:
  """Kernels (GPU/TPU device streams) or XLA ops (CPU threads) of a trace,
  by total time: [{name, ms, calls, percent}]."""
  with gzip.open(trace_file) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
  device = {p for p, n in procs.items() if "/device:" in n}
  if device:
    spans = [e for e in spans if e["pid"] in device]
    streams = [e for e in spans if "stream" in threads.get((e["pid"], e["tid"]), "").lower()]
    spans = streams or [e for e in spans if threads.get((e["pid"], e["tid"])) not in
                        ("XLA Modules", "Steps", "XLA TraceMe")]
  else:  # CPU: XLA's op names on its worker threads
    spans = [e for e in spans if threads.get((e["pid"], e["tid"])) != "python"
             and re.fullmatch(r"[A-Za-z_][\w.\-]*", e["name"])]
  ms, calls = collections.Counter(), collections.Counter()
  for e in spans:
    ms[e["name"]] += e["dur"] / 1e3
    calls[e["name"]] += 1
  total = sum(ms.values()) or 1.0
  return [{"name": n[:120], "ms": round(t, 3), "calls": calls[n],
           "percent": round(100 * t / total, 1)} for n, t in ms.most_common(top)]


def fused_numerics(name: str, batch: int, size: int) -> dict[str, Any]:
  """Fused (cuDNN) against Flax attention on the same weights and images,
  both bf16, each against an fp32 Flax reference: max |logits diff| and the
  relative L2 error of the whole gradient; and whether cuDNN's kernel is in the
  fused program at all (where cuDNN is absent it is Flax's attention)."""
  created = models.create(name, num_classes=1000, pretrained=False)
  fused = created.spec.build(num_classes=1000, **FUSED)
  rng = np.random.default_rng(0)
  params = dict(created.variables["params"])
  head = params["head"]  # zeros at init: random, so that the logits differ
  params["head"] = {"kernel": rng.normal(0, 0.02, head["kernel"].shape).astype(np.float32),
                    "bias": head["bias"]}
  x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  y = rng.integers(0, 1000, batch)

  def loss(p, module, dtype):
    p = jax.tree.map(lambda a: a.astype(dtype), p)
    logits = module.apply({"params": p}, x.astype(dtype), train=False).astype(jnp.float32)
    return jtl.losses.cross_entropy_loss(logits, {"label": y}), logits

  out = {}
  for key, module, dtype in (("fp32", created.module, jnp.float32),
                             ("xla", created.module, jnp.bfloat16), ("fused", fused, jnp.bfloat16)):
    fn = jax.jit(jax.value_and_grad(lambda p, m=module, d=dtype: loss(p, m, d), has_aux=True))
    if key == "fused":
      out["cudnn_fmha_in_program"] = "__cudnn$fmha" in fn.lower(params).compile().as_text()
    (_, logits), grads = fn(params)
    out[key] = (np.asarray(logits), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)])
  diff = lambda a, b: float(np.max(np.abs(a - b)))
  result = {"cudnn_fmha_in_program": out.pop("cudnn_fmha_in_program"),
            "max_abs_logit": float(np.max(np.abs(out["fp32"][0])))}
  norm = lambda leaves: float(np.sqrt(sum(np.sum(np.square(g)) for g in leaves)))
  for a, b in (("fused", "xla"), ("fused", "fp32"), ("xla", "fp32")):
    result[f"logits_{a}_vs_{b}"] = diff(out[a][0], out[b][0])
    # ||g_a - g_b|| / ||g_b|| over the whole gradient tree (per-leaf ratios
    # explode on leaves whose gradient is ~0).
    result[f"grad_rel_{a}_vs_{b}"] = (
        norm([g - h for g, h in zip(out[a][1], out[b][1])]) / max(norm(out[b][1]), 1e-30))
  return result


def second_run(plan: list, args: argparse.Namespace, timeout_s: float) -> list[dict]:
  """What a second run pays: a new process compiling `plan`'s programs with
  the persistent cache the first run filled. It allocates device memory on
  demand (this process still holds its pool) and runs no step."""
  cmd = [sys.executable, __file__, "--second_run", json.dumps(plan), "--out", args.out,
         "--cache_dir", args.cache_dir, "--image_size", str(args.image_size)]
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  t0 = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
  sys.stderr.write(done.stderr[-2000:])
  rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
  for r in rows:
    r["process_s"] = time.perf_counter() - t0
  return rows


def run_second(plan: list, image_size: int) -> None:
  """The --second_run process: set up and compile each program (from the
  cache); print one ROW per program, with the seconds since this process
  started (imports included) when it was ready to run."""
  for name, mode, batch, build in plan:
    row = {"model": name, "mode": mode, "batch": batch, "build": build}
    try:
      t0 = time.perf_counter()
      fn, fargs, _, _ = _program(name, mode, batch, image_size, build)
      row["setup_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      fn.lower(*fargs).compile()
      row["cached_compile_s"] = time.perf_counter() - t0
      row["ready_s"] = time.perf_counter() - T_START
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print("ROW " + json.dumps(row), flush=True)


def measure_torch(python: str, plan: list, pairs: dict[str, str], args: argparse.Namespace,
                  budget_s: float) -> list[dict]:
  """timm's rows, from the companion process (run before JAX takes the device)."""
  script = Path(__file__).with_name("benchmark_accelerator_torch.py")
  todo = list(dict.fromkeys(f"{pairs[m]}:{m}:{mode}:{b}" for m, mode, b, _ in plan))
  cmd = [python, str(script), "--plan", ",".join(todo), "--image_size", str(args.image_size),
         "--steps", str(args.steps), "--budget_s", str(budget_s),
         "--row_budget_s", str(args.row_budget_s)]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s + 150)
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


def _variant(build: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in sorted(build.items())) or "-"


def table(rows: list[dict], kind: str, second: list[dict] = ()) -> str:
  """The markdown table: one line per jtl measurement, timm's beside it."""
  timm = {(r["model"], r["mode"], r["batch"]): r for r in rows if r["framework"] == "timm"}
  jtl_rows = [r for r in rows if r["framework"] == "jtl"]
  forward = {(r["model"], r["batch"]): r for r in jtl_rows
             if r["mode"] == "forward" and not r.get("build")}
  cached = {(r["model"], r["mode"], r["batch"], _variant(r["build"])): r for r in second}
  fmt = lambda value, spec: "-" if value is None else format(value, spec)
  header = ["model", "mode", "batch", "variant", "jtl img/s", "timm img/s", "jtl/timm",
            "TFLOP/step", "MFU %", "step/forward", "program GiB", "jtl peak GiB",
            "timm peak GiB", "compile s", "cached compile s", "timm compile+warm-up s"]
  body = []
  for r in jtl_rows:
    t = timm.get((r["model"], r["mode"], r["batch"]), {})
    theirs, fwd = t.get("images_per_s"), forward.get((r["model"], r["batch"]))
    ratio = (r["step_ms"] / fwd["step_ms"] if fwd and r["mode"] in ("frozen", "partial")
             else None)
    second_row = cached.get((r["model"], r["mode"], r["batch"], _variant(r["build"])), {})
    # A fused row whose program has no cuDNN call measured Flax's attention.
    variant = _variant(r["build"]) + (
        " (no cuDNN call: Flax's attention)" if r.get("cudnn_fmha_in_program") is False else "")
    cells = [r["model"], r["mode"], r["batch"], variant,
             fmt(r["images_per_s"], ".1f"), fmt(theirs, ".1f"),
             fmt(theirs and r["images_per_s"] / theirs, ".2f"),
             fmt(r.get("tflops_per_step"), ".3f"), fmt(r.get("mfu") and 100 * r["mfu"], ".1f"),
             fmt(ratio, ".2f"), fmt(r.get("program_gib"), ".2f"),
             fmt(r.get("process_peak_gib"), ".2f"), fmt(t.get("peak_memory_gib"), ".2f"),
             fmt(r.get("compile_s"), ".1f"), fmt(second_row.get("cached_compile_s"), ".1f"),
             fmt(t.get("warmup_s"), ".1f")]
    body.append(cells)
  return f"Device: {kind} x {jax.device_count()}\n\n" + common.markdown_table(header, body)


def kernels_table(rows: list[dict]) -> str:
  parts = []
  for r in rows:
    if r.get("top_kernels"):
      cells = [[f"{k['ms']:.3f}", k["calls"], f"{k['percent']:.1f}", f"`{k['name']}`"]
               for k in r["top_kernels"]]
      parts += [f"\nTop kernels, {r['model']} {r['mode']} batch {r['batch']} (one step):", "",
                common.markdown_table(["ms", "calls", "%", "kernel"], cells)]
  return "\n".join(parts)


def plan_of(pairs: dict[str, str], args: argparse.Namespace) -> list[tuple[str, str, int, dict]]:
  """(model, mode, batch, build) in order of priority: full fine-tuning at
  the largest batch (and ViT's fused attention A/B), frozen + forward, the
  other A/B variants (--ab) of full fine-tuning, partial, then full at the
  other batches; a run cut short by its budget still compares every model
  on the rows that matter most."""
  batches = sorted({int(b) for b in args.batches.split(",")}, reverse=True)
  modes, big, build = args.modes.split(","), batches[0], json.loads(args.model_kwargs)
  plan = []
  for m in pairs:
    plan.append((m, "full", big, build))
    if args.fused_ab and m.startswith("vit"):
      plan.append((m, "full", big, {**build, **FUSED}))
  plan += [(m, mode, big, build) for m in pairs for mode in ("frozen", "forward")]
  ab = json.loads(args.ab)
  plan += [(m, "full", big, {**build, **extra}) for m in pairs for extra in ab.get(m, [])]
  plan += [(m, "partial", big, build) for m in pairs]
  plan += [(m, "full", b, build) for b in batches[1:] for m in pairs]
  return [p for p in plan if p[1] in modes]


def write(out: Path, result: dict) -> str:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
  text = table(result["rows"], result["device_kind"], result.get("second_run", []))
  text += kernels_table(result["rows"])
  if result.get("fused_numerics"):
    text += "\n\nFused vs Flax attention: " + json.dumps(result["fused_numerics"])
  if result["not_measured"]:
    text += "\n\nNot measured: " + "; ".join(result["not_measured"])
  (out / "results.md").write_text(text + "\n")
  return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", "--tiny", action="store_true",
                      help="ViT-Ti/16, ResNet-18, Lite0 at 32 px, batch 4, 2 steps (CPU-sized)")
  parser.add_argument("--models", default=None, help="comma-separated zoo names")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--batches", default=None, help="comma-separated; the largest first")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--peak_tflops", type=float, default=None)
  parser.add_argument("--torch_python", default=None)
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="the whole command: no row or extra starts that would not fit")
  parser.add_argument("--torch_budget_s", type=float, default=150,
                      help="timm starts no new row after this many seconds")
  parser.add_argument("--row_budget_s", type=float, default=15,
                      help="at most this long timing one row's steps")
  parser.add_argument("--reserve_s", type=float, default=60,
                      help="kept from the jtl rows for the extras (numerics, second run)")
  parser.add_argument("--no_fused_ab", dest="fused_ab", action="store_false",
                      help="no ViT row with fused attention")
  parser.add_argument("--ab", default='{"efficientnet_lite0": [{"formulation": "shifted"}]}',
                      help="JSON {model: [build keyword arguments, ...]}: more full rows")
  parser.add_argument("--profile", default=None,
                      help="models whose largest-batch full step is profiled (default: ViT, Lite0)")
  parser.add_argument("--cache_dir", default=None,
                      help="persistent compilation cache, empty for cold compile times "
                           "(default: OUT/jax_cache)")
  parser.add_argument("--no_second_run", dest="second", action="store_false")
  parser.add_argument("--model_kwargs", default="{}",
                      help="JSON keyword arguments of every jtl model")
  parser.add_argument("--check_mesh", action="store_true")
  parser.add_argument("--count_ops", choices=("cuda", "tpu", "cpu"), default=None,
                      help="only lower each model's full step for this platform (no device "
                           "needed) and count its activation reductions and converts")
  parser.add_argument("--second_run", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  pairs = SMOKE if args.smoke else FULL
  if args.models:
    pairs = {m: {**FULL, **SMOKE}.get(m, m) for m in args.models.split(",")}
  args.pairs = pairs
  args.batches = args.batches or ("4" if args.smoke else "256,128")
  args.image_size = args.image_size or (32 if args.smoke else 224)
  args.steps = args.steps or (2 if args.smoke else 20)
  if args.profile is None:
    args.profile = ",".join(m for m in pairs if m.startswith(("vit", "efficientnet")))
  args.cache_dir = args.cache_dir or str(Path(args.out) / "jax_cache")
  return args


def use_cache(cache_dir: str) -> int:
  """Every compiled program goes to (and comes from) `cache_dir`; returns the
  number of entries already there (0: this run's compile times are cold)."""
  Path(cache_dir).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return len(os.listdir(cache_dir))


def _flops_of_flax_row(row: dict, rows: list[dict], peak: float | None) -> None:
  """A fused row's FLOPs are the Flax row's (the model as written): lowered
  for the CPU, its program takes the other platforms' branch, which
  recomputes the attention for the backward pass and would count it."""
  base = next((r for r in rows if r["framework"] == "jtl" and not r["build"] and
               (r["model"], r["mode"], r["batch"]) == (row["model"], row["mode"], row["batch"])
               and r.get("tflops_per_step")), None)
  if base:
    row["tflops_per_step"] = base["tflops_per_step"]
    row["achieved_tflops"] = row["tflops_per_step"] / (row["step_ms"] / 1e3)
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    row["flops_from"] = "the Flax-attention row"


def run_jtl(plan: list, args: argparse.Namespace, result: dict, time_left: Callable) -> None:
  """The jtl rows, in plan order; a row that fails or would not fit is listed."""
  out, rows, peak = Path(args.out), result["rows"], result["peak_bf16_tflops"]
  profile, cost = set(args.profile.split(",")) - {""}, {}
  for name, mode, batch, build in plan:
    label = f"jtl {name} {mode} {batch} {_variant(build)}"
    expected = cost.get(name, args.row_budget_s)
    if time_left() < args.reserve_s + expected:
      result["not_measured"].append(f"{label}: time budget")
      continue
    trace = None
    if name in profile and mode == "full" and not build.get("fused_attention"):
      profile.discard(name)
      trace = tempfile.mkdtemp(prefix=f"jtl_trace_{name}_")  # not in --out: traces are large
    t0 = time.perf_counter()
    try:
      row = measure_jtl(name, mode, batch, args.image_size, args.steps, peak,
                        row_budget_s=args.row_budget_s, profile_dir=trace, **build)
      if build.get("fused_attention"):
        _flops_of_flax_row(row, rows, peak)
      rows.append(row)
      print("ROW " + json.dumps(row, default=str), flush=True)
    except Exception as e:  # noqa: BLE001 - out of memory, a failed compile: reported
      print(f"{label}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
      result["not_measured"].append(f"{label}: {type(e).__name__}")
    cost[name] = max(cost.get(name, 0.0), time.perf_counter() - t0)
    write(out, result)


def run_extras(plan: list, args: argparse.Namespace, result: dict, time_left: Callable) -> None:
  """Fused-attention numerics, then the second run; each guarded and skipped
  when the budget is spent."""
  vit = [m for m in args.pairs if m.startswith("vit")]
  if args.fused_ab and vit and time_left() > 30:
    try:
      result["fused_numerics"] = fused_numerics(vit[0], 8, args.image_size)
      print("FUSED " + json.dumps(result["fused_numerics"]), flush=True)
    except Exception as e:  # noqa: BLE001
      result["not_measured"].append(f"fused numerics: {type(e).__name__}: {str(e)[:200]}")
  again = [list(p) for p in plan if p[1] == "full" and any(
      r["model"] == p[0] and r["mode"] == "full" and r["batch"] == p[2] and r["build"] == p[3]
      for r in result["rows"])][:4]
  if args.second and again and time_left() > 20:
    try:
      result["second_run"] = second_run(again, args, min(max(time_left() - 5, 15), 600))
      print("SECOND " + json.dumps(result["second_run"]), flush=True)
    except Exception as e:  # noqa: BLE001
      result["not_measured"].append(f"second run: {type(e).__name__}: {str(e)[:200]}")


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  start = time.perf_counter()
  time_left = lambda: (args.budget_s or float("inf")) - (time.perf_counter() - start)
  if args.count_ops:
    return count_ops(args)
  cached_before = use_cache(args.cache_dir)
  if args.second_run:
    run_second(json.loads(args.second_run), args.image_size)
    return []
  plan = plan_of(args.pairs, args)
  # timm first: a JAX process keeps the device memory it took until it exits.
  python = None if args.no_torch else torch_python(args.torch_python)
  not_measured = []
  if python:
    rows = measure_torch(python, plan, args.pairs, args,
                         min(args.torch_budget_s, max(time_left() / 3, 1)))
  else:
    rows = []
    not_measured.append("timm: skipped: " + ("--no_torch" if args.no_torch else
                                             "torch not installed (or timm)"))
    print(not_measured[-1], flush=True)
  kind = jax.devices()[0].device_kind
  result = {"device_kind": kind, "devices": jax.device_count(), "jax": jax.__version__,
            "peak_bf16_tflops": peak_tflops(kind, args.peak_tflops), "rows": rows,
            "not_measured": not_measured, "cache_entries_at_start": cached_before,
            "plan": plan}
  run_jtl(plan, args, result, time_left)
  run_extras(plan, args, result, time_left)
  if args.check_mesh:
    result["mesh_max_abs_diff"] = check_mesh()
  result["wall_s"] = time.perf_counter() - start
  print(write(Path(args.out), result))
  return rows


if __name__ == "__main__":
  main()
