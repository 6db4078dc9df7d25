"""jtl's train step on a Flax NNX model vs the hand-written NNX idiom.

  python scripts/benchmarks/benchmark_nnx.py [--size 64] [--batch 64] [--width 32] [--rounds 5]

The same NNX ConvNet (conv/BatchNorm blocks and a head), batch and optimizer
(AdamW with global-norm clipping), two ways:

- jtl: `jtl.make_train_step(model, tx, labels=...)` with rules, jitted with the
  state donated (the model is split once; params and statistics are pure dicts);
- hand-written NNX: `nnx.Optimizer(model, tx, wrt=...)`, `nnx.value_and_grad`
  with `nnx.DiffState`, frozen BatchNorm layers switched to their stored
  statistics by hand, in Flax's fast form (`nnx.split` once, `jax.jit` over a
  pure function that merges, steps and splits again, state donated); and the
  same code under `nnx.jit` for reference.

Two settings: frozen backbone (head only) and full fine-tuning. Printed: the
median step time over interleaved rounds (ratios measured in this one run),
and the compiled FLOPs of each step. Results in BENCHMARKS.md.
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jtl


class ConvNet(nnx.Module):
  def __init__(self, width, num_classes, *, rngs):
    chans = [3, width, 2 * width, 4 * width, 8 * width]
    for i in range(4):
      setattr(self, f"backbone_conv{i}", nnx.Conv(chans[i], chans[i + 1], (3, 3),
                                                  strides=2, rngs=rngs))
      setattr(self, f"backbone_bn{i}", nnx.BatchNorm(chans[i + 1], momentum=0.9, rngs=rngs))
    self.head = nnx.Linear(chans[-1], num_classes, rngs=rngs)

  def __call__(self, x):
    for i in range(4):
      x = nnx.relu(getattr(self, f"backbone_bn{i}")(getattr(self, f"backbone_conv{i}")(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


def tx():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4))


def loss_of(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def jtl_step(model, frozen):
  rules = [("head/.*", "head"), (".*", "frozen")] if frozen else [(".*", "all")]
  labels = jtl.label_params(model, rules)
  opt = jtl.make_optimizer(labels, learning_rate=1e-3, optimizer="adamw", weight_decay=1e-4,
                           clip_norm=1.0)
  state = jtl.create_train_state(model, labels, opt)
  return jtl.make_train_step(model, opt, labels=labels), state


def nnx_step(model, frozen):
  """Flax's documented idiom, in its fast split/merge form."""
  wrt = nnx.All(nnx.Param, nnx.PathContains("head")) if frozen else nnx.Param
  if frozen:  # a careful user freezes the BatchNorm statistics of the backbone
    for _, sub in nnx.iter_modules(model):
      if isinstance(sub, nnx.BatchNorm):
        sub.use_running_average = True
  optimizer = nnx.Optimizer(model, tx(), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))

  def pure(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      return loss_of(model(batch["inputs"]), batch["label"])

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return pure, state, wrt


def nnx_jit_step(model, optimizer, wrt):
  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(model):
      return loss_of(model(batch["inputs"]), batch["label"])
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss
  return step


def flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)),
                                 jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
  print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; NNX ConvNet width {args.width}, {args.size} px, batch "
        f"{args.batch}; median of {args.rounds} interleaved rounds of {args.steps} steps\n")
  print("| setting | jtl ms/step | hand-written NNX ms/step | nnx.jit ms/step | jtl / hand-written "
        "| jtl GFLOPs | hand-written GFLOPs |")
  print("|---|---|---|---|---|---|---|")
  for frozen in (True, False):
    make = lambda: ConvNet(args.width, 10, rngs=nnx.Rngs(0))
    j_pure, j_state = jtl_step(make(), frozen)
    h_pure, h_state, wrt = nnx_step(make(), frozen)
    j_flops, h_flops = flops(j_pure, j_state, batch), flops(h_pure, h_state, batch)
    j_step = jax.jit(j_pure, donate_argnums=0)
    h_step = jax.jit(h_pure, donate_argnums=0)
    nj_model = make()
    if frozen:
      for _, sub in nnx.iter_modules(nj_model):
        if isinstance(sub, nnx.BatchNorm):
          sub.use_running_average = True
    nj_opt = nnx.Optimizer(nj_model, tx(), wrt=wrt)
    nj_step = nnx_jit_step(nj_model, nj_opt, wrt)
    times = {"jtl": [], "nnx": [], "nnx.jit": []}
    state_j, state_h = j_state, h_state
    for r in range(args.rounds + 1):  # round 0 compiles and warms up
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state_j, m = j_step(state_j, batch)
      jax.block_until_ready(m["loss"])
      t1 = time.perf_counter()
      for _ in range(args.steps):
        state_h, loss = h_step(state_h, batch)
      jax.block_until_ready(loss)
      t2 = time.perf_counter()
      for _ in range(args.steps):
        loss = nj_step(nj_model, nj_opt, batch)
      jax.block_until_ready(loss)
      t3 = time.perf_counter()
      if r:
        times["jtl"].append((t1 - t0) / args.steps)
        times["nnx"].append((t2 - t1) / args.steps)
        times["nnx.jit"].append((t3 - t2) / args.steps)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    name = "frozen backbone (head only)" if frozen else "full fine-tuning"
    print(f"| {name} | {med['jtl']:.1f} | {med['nnx']:.1f} | {med['nnx.jit']:.1f} | "
          f"{med['jtl'] / med['nnx']:.3f} | {j_flops / 1e9:.3f} | {h_flops / 1e9:.3f} |")


if __name__ == "__main__":
  main()
