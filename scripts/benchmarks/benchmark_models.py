"""CPU throughput of jtl's EfficientNet-Lite0 / MobileNetV2 vs PyTorch eager.

Runs both in one go: jtl (JAX) and PyTorch each in fresh subprocesses,
alternated for --rounds rounds (PyTorch from another Python that has torch;
jtl never imports torch), so that neither side inherits the other's warm
caches or a noisy minute. Prints forward img/s
and full fine-tuning step img/s (SGD and Adam; BatchNorm in train mode, all
parameters trained) per model and resolution, the jtl/torch ratios, then
batch-1 latency and batch-64 throughput of jtl's jit-compiled predict.

  .venv/bin/python scripts/benchmarks/benchmark_models.py \
      --torch_python /tmp/torchenv/bin/python --sizes 128,224 --batch 32 --rounds 3

Both sides see the same environment, printed in the header. Run it with
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
(as `make finetune` does; glibc then keeps freed memory for reuse, which
helps both sides) and without. jtl's workers call
`jtl.app.cpu.configure_cpu_runtime()` first, as the scripts do.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys

import common

MODELS = ("efficientnet_lite0", "mobilenet_v2")


def torch_worker(name: str, size: int, batch: int, iters: int, warmup: int) -> dict:
  import torch
  torch.manual_seed(0)
  model = common.torch_model(name)
  x = torch.randn(batch, 3, size, size)
  y = torch.randint(0, 1000, (batch,))
  out = {"threads": torch.get_num_threads(), "version": torch.__version__}
  model.eval()
  with torch.no_grad():
    out["forward"] = batch / common.median_seconds(lambda: model(x), iters, warmup=warmup)
  model.train()
  for opt_name, opt in (("sgd", torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)),
                        ("adam", torch.optim.Adam(model.parameters(), lr=1e-4))):
    def step():
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
    out[opt_name] = batch / common.median_seconds(step, iters, warmup=warmup)
  return out


# --------------------------------------------------------------------- jtl side

def jtl_bench(name: str, size: int, batch: int, iters: int, warmup: int) -> dict:
  from jtl.app import cpu
  cpu.configure_cpu_runtime()  # as scripts/finetune.py does
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jtl.models  # noqa: F401 - registers the families
  from jtl.models import registry

  spec = registry.get_spec(name)
  module = spec.build(num_classes=1000)
  variables = registry.init_variables(spec, module)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, 3)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 1000, batch))
  out = {"backend": jax.default_backend()}
  fwd = jax.jit(lambda v, x: module.apply(v, x))
  out["forward"] = batch / common.median_seconds(lambda: fwd(variables, x).block_until_ready(),
                                   iters, warmup=warmup)
  for opt_name, tx in (("sgd", optax.sgd(1e-3, momentum=0.9)), ("adam", optax.adam(1e-4))):
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    def loss_fn(params, stats, key):
      logits, upd = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                                 mutable=["batch_stats"], rngs={"dropout": key})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, upd["batch_stats"]

    # Donates the state, as jtl.jit_train_step does (torch updates in place).
    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, stats, opt_state, key, tx=tx):
      (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), stats, opt_state

    state = [params, stats, opt_state]
    key = jax.random.PRNGKey(0)

    def step(state=state):
      state[:] = train_step(*state, key)
      jax.block_until_ready(state[0])
    out[opt_name] = batch / common.median_seconds(step, iters, warmup=warmup)
  return out


def jtl_predict(name: str, size: int, iters: int) -> dict:
  from jtl.app import cpu
  cpu.configure_cpu_runtime()
  import numpy as np

  import jtl.models  # noqa: F401
  from jtl.models import registry
  from jtl.export import serving
  spec = registry.get_spec(name)
  module = spec.build(num_classes=1000)
  predict = serving.make_predict_fn(module, registry.init_variables(spec, module))
  out = {}
  for b in (1, 64):
    x = np.zeros((b, size, size, 3), np.float32)
    t = common.median_seconds(lambda: predict(x), iters if b == 1 else max(2, iters // 3),
                              warmup=2)
    out[f"b{b}"] = t
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--torch_python", default="/tmp/torchenv/bin/python")
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--sizes", default="128,224")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--predict_size", type=int, default=224)
  p.add_argument("--no_predict", action="store_true")
  p.add_argument("--rounds", type=int, default=3,
                 help="fresh jtl and torch processes per measurement, alternated; "
                      "the table shows the median over rounds")
  p.add_argument("--torch_worker", help=argparse.SUPPRESS)
  p.add_argument("--jtl_worker", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.torch_worker or a.jtl_worker:
    worker = torch_worker if a.torch_worker else jtl_bench
    name, size = (a.torch_worker or a.jtl_worker).split(":")
    print(json.dumps(worker(name, int(size), a.batch, a.iters, a.warmup)))
    return
  rows = []
  print(f"batch {a.batch}, median of {a.iters} iterations after {a.warmup} warm-up, "
        f"median of {a.rounds} alternated rounds of fresh processes; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (both sides)", flush=True)

  def run_worker(python: str, flag: str, name: str, size: int) -> dict:
    out = subprocess.run(
        [python, __file__, flag, f"{name}:{size}", "--batch", str(a.batch),
         "--iters", str(a.iters), "--warmup", str(a.warmup)],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])

  for name in a.models.split(","):
    for size in map(int, a.sizes.split(",")):
      runs = {"jtl": [], "torch": []}
      for r in range(a.rounds):
        runs["torch"].append(run_worker(a.torch_python, "--torch_worker", name, size))
        runs["jtl"].append(run_worker(sys.executable, "--jtl_worker", name, size))
        print(f"  round {r}: {name} {size}px " + "  ".join(
            f"{kind} jtl {runs['jtl'][-1][kind]:.1f} torch {runs['torch'][-1][kind]:.1f}"
            for kind in ("forward", "sgd", "adam")), flush=True)
      for kind in ("forward", "sgd", "adam"):
        j = statistics.median(run[kind] for run in runs["jtl"])
        t = statistics.median(run[kind] for run in runs["torch"])
        rows.append((name, size, kind, j, t))
  print("\n| model | px | what | jtl img/s | torch eager img/s | jtl/torch |")
  print("|---|---|---|---|---|---|")
  for name, size, kind, j, t in rows:
    what = {"forward": "forward (eval)", "sgd": "train step SGD",
            "adam": "train step Adam"}[kind]
    print(f"| {name} | {size} | {what} | {j:.1f} | {t:.1f} | {j / t:.2f} |")
  if not a.no_predict:
    print(f"\njit predict at {a.predict_size}px (jtl):\n| model | batch-1 latency ms | "
          "batch-64 img/s |\n|---|---|---|")
    for name in a.models.split(","):
      r = jtl_predict(name, a.predict_size, max(a.iters, 10))
      print(f"| {name} | {r['b1'] * 1e3:.1f} | {64 / r['b64']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
