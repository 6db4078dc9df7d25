"""Loading time and peak memory of a ViT-B/16-sized safetensors checkpoint.

  nice -n 19 .venv/bin/python scripts/benchmarks/benchmark_load.py [--dir /tmp/jtl_bench_load]

Builds (once) a ViT-B/16 state dict in timm's key layout (86.6M float32
parameters, ~346 MB), then measures, each in a fresh Python process, the
wall time and the peak resident memory (VmHWM, reset after the imports with
/proc/self/clear_refs) of:

  read          jtl.weights.read(path)
  read+load     jtl.weights.load_pretrained(path, like, converter=timm ViT)
                (`like` from jax.eval_shape: zeros that are never touched)
  read+load+put the same, then jax.device_put of every variable (what a
                training run does next)
  create        jtl.models.create("hf-hub:...") from a local Hub cache: config.json,
                the variable tree from jax.eval_shape (no init), then the load
  create+head   the same with num_classes=10: the new head is the only leaf
                initialised (XLA computes just that leaf of the init)
  create nnx    `create` with api="nnx": the NNX module wraps the loaded arrays

and prints a table of the increase in peak RSS over the process after its
imports, against the bytes on disk. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("read", "read+load", "read+load+put", "create", "create+head", "create nnx")


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(field)


def build(directory: str) -> str:
  """Writes the ViT-B/16 timm-layout checkpoint and a Hub cache around it."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from hub_helpers import _timm_config, timm_vit_shapes  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, "vit_b16_timm.safetensors")
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  sd = {k: (rng.standard_normal(s, np.float32) * 0.02) for k, s in
        timm_vit_shapes(768, 12).items()}
  save_file(sd, path + ".tmp")
  os.replace(path + ".tmp", path)
  # A Hub cache (HF_HUB_CACHE layout) holding the same file, for "create".
  snap = os.path.join(directory, "hub", "models--bench--vit_b16", "snapshots", "0" * 40)
  os.makedirs(snap, exist_ok=True)
  os.makedirs(os.path.join(directory, "hub", "models--bench--vit_b16", "refs"), exist_ok=True)
  with open(os.path.join(directory, "hub", "models--bench--vit_b16", "refs", "main"), "w") as f:
    f.write("0" * 40)
  with open(os.path.join(snap, "config.json"), "wb") as f:
    f.write(_timm_config("vit_base_patch16_224", mean=(.5,) * 3, std=(.5,) * 3, crop=0.9))
  link = os.path.join(snap, "model.safetensors")
  if not os.path.exists(link):
    os.symlink(path, link)
  return path


def measure(mode: str, path: str) -> dict:
  """Runs one mode in this process; returns seconds and memory figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import jtl  # pylint: disable=g-import-not-at-top
  from jtl import checkpoint, models, weights  # pylint: disable=g-import-not-at-top
  from jtl.models import hub_models, vit  # pylint: disable=g-import-not-at-top
  module = vit.vit("b", 1000)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3)))
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  converter = lambda sd: hub_models.convert_timm_vit(sd, num_heads=12)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  base = _status("VmRSS")
  t0 = time.perf_counter()
  if mode == "read":
    out = jtl.weights.read(path)
  elif mode.startswith("read+load"):
    out, report = weights.load_pretrained(path, like=like, converter=converter)
    assert report.ok
    if mode == "read+load+put":
      out = jax.block_until_ready(jax.device_put(out))
  else:
    os.environ["HF_HUB_CACHE"] = os.path.join(os.path.dirname(path), "hub")
    os.environ["HF_HUB_OFFLINE"] = "1"
    head = 10 if mode == "create+head" else None
    api = "nnx" if mode == "create nnx" else "linen"
    out = models.create("hf-hub:bench/vit_b16", num_classes=head, api=api)
    assert out.report.ok and len(out.report.reinitialised) == (2 if head else 0)
  seconds = time.perf_counter() - t0
  return {"mode": mode, "seconds": seconds, "base": base, "peak": _status("VmHWM"),
          "file": os.path.getsize(path)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", default="/tmp/jtl_bench_load")
  parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  path = build(args.dir)
  if args.mode:
    print(json.dumps(measure(args.mode, path)))
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  rows = []
  for mode in MODES:
    runs = []
    for _ in range(args.repeats):
      out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--mode", mode],
                           env=env, capture_output=True, text=True, check=True, cwd=ROOT)
      runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    worst = max(runs, key=lambda r: r["peak"] - r["base"])
    rows.append(worst | {"seconds": min(r["seconds"] for r in runs)})
  mb = 1 << 20
  size = rows[0]["file"]
  print(f"{datetime.date.today()}  file {size / mb:.0f} MiB ({path}), best of "
        f"{args.repeats} runs for time, worst for memory")
  print(f"| mode | time (s) | RSS after imports (MiB) | peak RSS (MiB) | "
        f"peak - imports (MiB) | (peak - imports) / file |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    extra = r["peak"] - r["base"]
    print(f"| {r['mode']} | {r['seconds']:.2f} | {r['base'] / mb:.0f} | "
          f"{r['peak'] / mb:.0f} | {extra / mb:.0f} | {extra / size:.2f}x |")


if __name__ == "__main__":
  main()
