"""Where a zoo model's full fine-tuning step spends its time on this backend.

Times the jit-compiled SGD (or Adam) step (BatchNorm in train mode, every parameter
trained; as scripts/benchmarks/benchmark_models.py), then records two steps with
`jax.profiler` and prints the slowest XLA ops with the jax op they came from.

  python scripts/benchmarks/profile_step.py --model mobilenet_v2 --size 128 --batch 32 --steps 8
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import statistics
import tempfile
import time


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="mobilenet_v2")
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
  a = p.parse_args()

  from jtl.app import cpu
  cpu.configure_cpu_runtime()  # as scripts/finetune.py does
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jtl.models  # noqa: F401 - registers the families
  from jtl.models import registry

  spec = registry.get_spec(a.model)
  module = spec.build(num_classes=1000)
  variables = registry.init_variables(spec, module)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((a.batch, a.size, a.size, 3)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 1000, a.batch))
  tx = (optax.sgd(1e-3, momentum=0.9) if a.optimizer == "sgd" else optax.adam(1e-4))

  def loss_fn(params, stats, key):
    logits, upd = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"], rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

  @jax.jit
  def train_step(params, stats, opt_state, key):
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  key = jax.random.PRNGKey(0)
  state = train_step(variables["params"], variables["batch_stats"],
                     tx.init(variables["params"]), key)
  jax.block_until_ready(state)
  times = []
  usage = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(a.steps):
    t = time.perf_counter()
    state = jax.block_until_ready(train_step(*state, key))
    times.append(time.perf_counter() - t)
  after = resource.getrusage(resource.RUSAGE_SELF)
  print(f"{a.model} {a.size}px batch {a.batch} {a.optimizer} on {jax.default_backend()}: step "
        f"{statistics.median(times):.3f} s (median of {a.steps}; "
        f"{', '.join(f'{t:.3f}' for t in times)})")
  print(f"per step: {(after.ru_minflt - usage.ru_minflt) / a.steps:,.0f} page faults, "
        f"{(after.ru_stime - usage.ru_stime) / a.steps:.2f} s system CPU "
        f"(GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r})")

  hlo = train_step.lower(*state, key).compile().as_text()
  origin = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    op = re.search(r'op_name="([^"]+)"', line)
    if m:
      origin[m.group(1)] = (m.group(2), op.group(1) if op else "")
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(2):
      state = jax.block_until_ready(train_step(*state, key))
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and re.fullmatch(r"[a-z_]+(\.\d+)?", e["name"]):
      per_op[e["name"]] += e["dur"] / 2e3  # ms per step
  print(f"XLA ops: {sum(per_op.values()):.0f} ms per step summed over threads; slowest:")
  for name, ms in per_op.most_common(a.top):
    shape, op = origin.get(name, ("?", ""))
    print(f"  {ms:7.1f} ms  {name:<30} {shape:<28} {op[-80:]}")


if __name__ == "__main__":
  main()
