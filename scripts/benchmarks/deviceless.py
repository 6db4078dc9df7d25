"""The accelerator programs compiled for a GPU or TPU on a host without one (issue 28).

XLA compiles for a device it is only described: for a GPU, a target file
(`gpu_targets/h100_sxm.txtpb`: compute capability, SM count, shared memory,
bandwidth, CUDA and cuDNN versions; the CUDA plugin's compiler, ptxas and
cuDNN run on the CPU); for a TPU, a topology name ("v5e:2x4": libtpu's
compiler). `jax.experimental.topologies.get_topology_desc` makes the
compile-only devices. What comes out is the program the device would run:
its memory and, on a GPU, its kernels and library calls (cuBLAS, cuDNN).
No timings: nothing runs.

  make cuda-lowering        # once: the CUDA plugin, cuDNN, ptxas (~5 GB, outside the venv)
  make tpu-compiler         # once: libtpu (~0.7 GB, outside the venv)
  python scripts/benchmarks/deviceless.py --out /tmp/aot
  python scripts/benchmarks/deviceless.py --out /tmp/aot_v5e --platform tpu --target v5e:1x1
  python scripts/benchmarks/deviceless.py --out /tmp/aot_nhwc --models efficientnet_lite0 \\
      --modes full --xla_flags=--xla_gpu_force_conv_nhwc=true

Per row (jtl's programs as benchmark_accelerator.py builds them: bf16
compute, fp32 master weights, AdamW, donated state): the device memory the
program needs (`memory_analysis()`: arguments + outputs + temporaries,
donated buffers once), what it sends in collectives (several devices: data
parallel, the batch split) and, on a GPU, its kernel launches by kind, with
the bytes each kind reads and writes (operands + results of each launch: an
upper bound on its HBM traffic): cuBLAS matmuls, cuDNN convolutions and
fused attention, reduction and elementwise fusions, layout changes (copies,
transposes).

Where a GPU program differs from the one on a card: no autotuning (XLA's
defaults pick gemm and convolution algorithms: which kernel runs, not what
is computed or which buffers live), and Triton gemm fusion off
(`--xla_gpu_enable_triton_gemm=false`: deviceless, XLA finds no Triton tiles
for ViT's [50432, 768] matmuls and fails), so every matmul is a cuBLAS call.
Cross-check: ViT-B/16's full step at batch 256 needs 24.5 GiB here; on the
H200 of issue 18 XLA reported 24.4 GiB for the same step (jax 0.11.2).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SITES = {  # where `make cuda-lowering` and `make tpu-compiler` install the compilers
    "cuda": Path(os.environ.get("JTL_CUDA_LOWERING_SITE",
                                Path.home() / ".cache" / "jtl" / "cuda-lowering")),
    "tpu": Path(os.environ.get("JTL_TPU_COMPILER_SITE",
                               Path.home() / ".cache" / "jtl" / "tpu-compiler")),
}
PLUGINS = {"cuda": ("jax_plugins/xla_cuda12", "make cuda-lowering"),
           "tpu": ("libtpu", "make tpu-compiler")}
NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
             "opt-barrier", "partition-id", "replica-id", "add-dependency",
             "all-reduce-done", "all-gather-done", "collective-permute-done", "async-done"}
COLLECTIVES = {"all-reduce", "all-reduce-start", "all-gather", "all-gather-start",
               "reduce-scatter", "all-to-all", "collective-permute", "collective-permute-start",
               "async-start"}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
KINDS = ("gemm", "conv", "attention", "reduction", "elementwise", "layout", "collective",
         "other")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape, tuples summed.

  >>> shape_bytes("(bf16[256,197,768]{2,1,0}, f32[])")
  77463556
  """
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
    size = math.prod(int(d) for d in dims.split(",") if d)
    total += size * DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
  return total


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f"unbalanced parentheses: {text[start:start + 80]}")


def parse_instruction(line: str) -> dict | None:
  """name, shape, opcode, operands and attributes of one HLO instruction line.

  >>> i = parse_instruction('  %f = bf16[2,3]{1,0} fusion(%a, %b.1), kind=kLoop, calls=%c')
  >>> i["name"], i["opcode"], i["operands"], i["attrs"]
  ('f', 'fusion', ['a', 'b.1'], ', kind=kLoop, calls=%c')
  """
  m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
  if not m:
    return None
  rest = line[m.end():]
  end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _closing(rest, op.end() - 1)
  return {"name": m.group(1), "shape": shape, "opcode": op.group(1),
          "operands": re.findall(r"%([\w.\-]+)", rest[op.end():close]),
          "attrs": rest[close + 1:]}


def computations(text: str) -> tuple[dict[str, list[dict]], str]:
  """({computation name: its instructions}, the entry's name) of an HLO module."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      current = comps.setdefault(head.group(2), [])
      entry = head.group(2) if head.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      inst = parse_instruction(line)
      if inst:
        current.append(inst)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def kernel_kind(inst: dict) -> str:
  """What one launched instruction is: gemm, conv, attention, reduction,
  elementwise, layout, collective or other."""
  op, name, attrs = inst["opcode"], inst["name"], inst["attrs"]
  if op in COLLECTIVES:
    return "collective"
  if op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', attrs)
    target = target.group(1) if target else ""
    if "fmha" in target or "Attention" in target:
      return "attention"
    if "conv" in target.lower():
      return "conv"
    return "gemm" if ("matmul" in target or "gemm" in target) else "other"
  if op in ("copy", "transpose"):
    return "layout"
  if op == "fusion":
    if "transpose" in name or re.match(r"(loop_)?copy", name):
      return "layout"
    if "kind=kCustom" in attrs:
      return "gemm" if "gemm" in name or "dot" in name else "other"
    if "kind=kInput" in attrs:
      return "reduction"
    return "elementwise"
  if op in ("dot", "convolution"):
    return "gemm" if op == "dot" else "conv"
  if op in ("reduce", "reduce-window", "select-and-scatter"):
    return "reduction"
  return "other"


def kernels(text: str) -> list[dict]:
  """The launches of a compiled module, in order: the entry's instructions
  that run a kernel or a library call, while loops' bodies repeated by their
  known trip count. Each: kind, name, bytes (operands + result; a
  collective's: its result, the data each device sends)."""
  comps, entry = computations(text)
  out: list[dict] = []

  def walk(comp: str, repeat: int) -> None:
    sizes = {i["name"]: shape_bytes(i["shape"]) for i in comps[comp]}
    for inst in comps[comp]:
      if inst["opcode"] == "while":
        body = re.search(r"body=%([\w.\-]+)", inst["attrs"]).group(1)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst["attrs"])
        walk(body, repeat * int(trips.group(1)) if trips else repeat)
        continue
      if inst["opcode"] in NO_KERNEL:
        continue
      kind = kernel_kind(inst)
      moved = shape_bytes(inst["shape"]) + (0 if kind == "collective" else sum(
          sizes.get(o, 0) for o in inst["operands"]))
      out.extend([{"kind": kind, "name": inst["name"], "shape": inst["shape"],
                   "bytes": moved}] * repeat)

  walk(entry, 1)
  return out


def reduced_dtypes(text: str) -> dict[str, float]:
  """GiB that the module's all-reduces read, by the dtype of what they read
  (their operands: XLA:TPU may write a narrower result than it sums).

  >>> reduced_dtypes(ENTRY_EXAMPLE)
  {'bf16': 0.0, 'f32': 1.0}
  """
  comps, entry = computations(text)
  shapes = {i["name"]: i["shape"] for c in comps.values() for i in c}
  read: collections.Counter = collections.Counter()
  for comp in comps.values():
    for inst in comp:
      if inst["opcode"] not in ("all-reduce", "all-reduce-start"):
        continue
      for operand in inst["operands"]:
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shapes.get(operand, "")):
          if dims:  # arrays: the loss's scalars are not gradients
            read[dtype] += math.prod(int(d) for d in dims.split(",")) * DTYPE_BYTES.get(dtype, 4)
  return {d: round(read.get(d, 0) / 2**30, 4) for d in sorted({"bf16", "f32", *read})}


ENTRY_EXAMPLE = """ENTRY %main {
  %p = f32[16384,16384]{1,0} parameter(0)
  %s = f32[] parameter(1)
  %r = (bf16[16384,16384]{1,0}, f32[]) all-reduce(%p, %s), to_apply=%add
}
"""


def summarize(text: str, batch: int) -> dict[str, Any]:
  """Launches and GiB moved per kind, and how many buffers hold attention
  scores ([batch, heads, T, T], T >= 50)."""
  found = kernels(text)
  count = collections.Counter(k["kind"] for k in found)
  moved = collections.Counter()
  for k in found:
    moved[k["kind"]] += k["bytes"]
  scores = len(re.findall(rf"= \w+\[{batch},\d+,(\d{{2,}}),\1\]", text))
  return {"kernels": len(found), **{f"n_{k}": count.get(k, 0) for k in KINDS},
          "gib_moved": round(sum(moved.values()) / 2**30, 3),
          **{f"gib_{k}": round(moved.get(k, 0) / 2**30, 3) for k in KINDS},
          "score_buffers": scores}


def setup(platform: str = "cuda", xla_flags: str = "") -> None:
  """Makes the compiler for `platform` ("cuda": the CUDA plugin, "tpu":
  libtpu) importable and lets it serve compile-only devices; call before jax
  is imported. jax's own platform stays the CPU, so the CUDA plugin skips
  its check for a GPU."""
  if "jax" in sys.modules:
    raise RuntimeError("deviceless.setup() must run before jax is imported")
  site, (marker, make) = SITES[platform], PLUGINS[platform]
  if not (site / marker).is_dir():
    sys.exit(f"no {platform} compiler in {site}: run `{make}` (or set "
             f"{'JTL_CUDA_LOWERING_SITE' if platform == 'cuda' else 'JTL_TPU_COMPILER_SITE'})")
  sys.path[:0] = [str(site), str(HERE)]
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu asks, off a TPU VM
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no lock: compiling only
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags] + (
      ["--xla_gpu_enable_triton_gemm=false"] if platform == "cuda" else [])).strip()


def target_devices(platform: str, target: str, count: int = 1) -> list:
  """Compile-only devices: `count` GPUs of one host, each described by the
  GpuTargetConfig file `target`, or the chips of the TPU topology `target`
  ("v5e:2x4": one host's 8 v5e chips)."""
  from jax.experimental import topologies
  if platform == "cuda":
    path = Path(target)
    return list(topologies.get_topology_desc(path.stem, "cuda", target_config=path.read_text(),
                                             topology=f"1x1x{count}").devices)
  bounds = [int(d) for d in target.split(":")[1].split("x")]
  return list(topologies.get_topology_desc(
      target, platform="tpu", chip_config_name="default", num_slices=1,
      chips_per_host_bounds=tuple(bounds + [1] * (3 - len(bounds))),
      wrap=(False, False, False)).devices)


def compile_row(devices: list, name: str, mode: str, batch: int, size: int,
                build: dict) -> dict:
  """One row: the program compiled for `devices` (more than one: data
  parallel, jtl's mesh, the batch split, the state replicated), its memory
  and kernels per device."""
  import jax

  import jtl
  from benchmark_accelerator import abstract_program
  fn, args, donate = abstract_program(name, mode, batch, size, build)
  mesh = jtl.make_mesh(devices)
  where = (jtl.parallel.replicated(mesh), jtl.parallel.batch_sharding(mesh))
  t0 = time.perf_counter()
  compiled = jax.jit(fn, in_shardings=where, donate_argnums=donate).trace(*args).lower().compile()
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  text = compiled.as_text()
  if devices[0].platform == "tpu":  # its fusions are not kernels of the kinds above
    sent = [k for k in kernels(text) if k["kind"] == "collective"]
    summary = {"n_collective": len(sent),
               "gib_collective": round(sum(k["bytes"] for k in sent) / 2**30, 5)}
  else:
    summary = summarize(text, batch // len(devices))
  if len(devices) > 1:
    summary.update({f"gib_reduced_{d}": v for d, v in reduced_dtypes(text).items()})
  return {"model": name, "mode": mode, "batch": batch, "devices": len(devices),
          "image_size": size, "build": build,
          "host_compile_s": round(time.perf_counter() - t0, 1),
          "program_gib": round(total / 2**30, 2), "temp_gib": round(m.temp_size_in_bytes / 2**30, 2),
          **summary}


COLUMNS = ["model", "mode", "batch", "devices", "variant", "program_gib", "kernels", "n_gemm", "n_conv",
           "n_attention", "n_reduction", "n_elementwise", "n_layout", "n_other", "gib_moved",
           "gib_gemm", "gib_conv", "gib_attention", "gib_reduction", "gib_elementwise",
           "gib_layout", "n_collective", "gib_collective", "gib_reduced_f32",
           "gib_reduced_bf16", "score_buffers"]


TPU_COLUMNS = ["model", "mode", "batch", "devices", "variant", "program_gib", "temp_gib",
               "n_collective", "gib_collective", "gib_reduced_f32", "gib_reduced_bf16",
               "host_compile_s"]


def table(rows: list[dict], columns: list[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    row = {**row, "variant": json.dumps(row["build"]) if row["build"] else "-"}
    lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--platform", choices=("cuda", "tpu"), default="cuda")
  p.add_argument("--target", default=None,
                 help="cuda: a GpuTargetConfig file (default: gpu_targets/h100_sxm.txtpb); "
                 "tpu: a topology (default: v5e:1x1)")
  p.add_argument("--models", default="vit_b16,resnet50,efficientnet_lite0")
  p.add_argument("--modes", default="full,frozen,forward,partial")
  p.add_argument("--batch", type=int, default=256, help="the global batch")
  p.add_argument("--devices", type=int, default=1,
                 help="GPUs of one host (a TPU topology names its chips): more than one "
                 "compiles the data-parallel step")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--variants", default=None,
                 help="JSON: model -> list of build kwargs; each is a row per mode (a model "
                 "listed here has no plain row). Default for cuda: ViT with fused attention, "
                 "Lite0's grouped and shifted depthwise convolutions; for tpu: Lite0's grouped")
  p.add_argument("--xla_flags", default="", help="added to XLA_FLAGS (an A/B: one process each)")
  args = p.parse_args(argv)
  # Lite0's depthwise convolutions as an accelerator runs them: its "auto"
  # formulation is chosen by this host's backend (the CPU's shifted form).
  args.variants = args.variants or ('{"efficientnet_lite0": [{"formulation": "grouped"}]}'
                                    if args.platform == "tpu" else (
      '{"vit_b16": [{"fused_attention": true}], '
      '"efficientnet_lite0": [{"formulation": "grouped"}, {"formulation": "shifted"}]}'))
  args.target = args.target or (str(HERE / "gpu_targets" / "h100_sxm.txtpb")
                                if args.platform == "cuda" else "v5e:1x1")
  return args


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  setup(args.platform, args.xla_flags)
  devices = target_devices(args.platform, args.target, args.devices)
  variants = json.loads(args.variants)
  rows, out = [], Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for mode in args.modes.split(","):
    for name in args.models.split(","):
      for build in variants.get(name, [{}]):
        if build.get("fused_attention") and mode not in ("full", "partial"):
          continue
        try:
          rows.append(compile_row(devices, name, mode, args.batch, args.image_size, build))
        except Exception as e:  # noqa: BLE001 - one row's failure never costs the others
          rows.append({"model": name, "mode": mode, "batch": args.batch, "build": build,
                       "error": f"{type(e).__name__}: {str(e)[:300]}"})
        rows[-1].update(device=devices[0].device_kind, xla_flags=os.environ["XLA_FLAGS"])
        print("ROW " + json.dumps(rows[-1]), flush=True)
        (out / "aot.json").write_text(json.dumps(rows, indent=2))
  columns = COLUMNS if args.platform == "cuda" else TPU_COLUMNS
  text = f"{devices[0].device_kind} (compiled on this host, nothing run)\n\n" + table(
      [r for r in rows if "error" not in r], columns)
  (out / "aot.md").write_text(text + "\n")
  print(text)
  return rows


if __name__ == "__main__":
  main()
