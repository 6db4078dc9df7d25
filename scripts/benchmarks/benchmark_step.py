"""Cost of a train step with a frozen backbone, against the forward pass.

  python scripts/benchmarks/benchmark_step.py [--model efficientnet_lite0] [--image_size 128] [--batch 32]

Prints, for one model on this machine's CPU (or whatever device JAX has):
forward time, jtl's frozen-backbone train step, jtl's full fine-tuning step,
and the common "naive" recipe (gradient of all params, then
optax.chain(clip_by_global_norm, multi_transform({..., frozen: set_to_zero()})))
as ratios to the forward pass, measured in one run, with compiled-FLOPs ratios.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import common
import jtl
from jtl import models

_MODEL = flags.DEFINE_string("model", "efficientnet_lite0", "Zoo model.")
_SIZE = flags.DEFINE_integer("image_size", 128, "Input resolution.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions (median reported).")


def naive_step(module, variables, labels):
  """The common recipe: differentiate everything, zero the frozen updates."""
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.multi_transform({"head": optax.adam(1e-3), "frozen": optax.set_to_zero()},
                                         labels))
  opt_state = tx.init(variables["params"])

  def step(params, opt_state, batch_stats, batch):
    def loss_fn(p):
      logits, new_stats = module.apply({"params": p, "batch_stats": batch_stats}, batch["inputs"],
                                       train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.PRNGKey(0)})
      return jtl.losses.cross_entropy_loss(logits, batch), new_stats
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_stats["batch_stats"], loss, optax.tree.norm(grads)

  return jax.jit(step), (variables["params"], opt_state, variables["batch_stats"])


def timed(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile() if not hasattr(fn, "lower") else fn.lower(*args).compile()
  flops = compiled.cost_analysis()
  flops = flops[0]["flops"] if isinstance(flops, list) else flops["flops"]
  return common.median_seconds(lambda: compiled(*args), _REPEATS.value), flops


def main(argv):
  del argv
  spec = models.get_spec(_MODEL.value)
  module = spec.build(num_classes=10)
  variables = models.registry.init_variables(spec, module)
  groups = [name for name, _ in spec.groups]
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.normal(size=(_BATCH.value, _SIZE.value, _SIZE.value, 3)),
                                 jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, _BATCH.value))}

  rows = []
  forward_t, forward_f = timed(jax.jit(lambda v, x: module.apply(v, x, train=False)),
                               variables, batch["inputs"])
  rows.append(("forward (eval mode)", forward_t, forward_f))
  for name, rules in [("jtl: frozen backbone, head trains", [("head/.*", "head"), (".*", "frozen")]),
                      ("jtl: full fine-tuning", [(".*", "head")])]:
    labels = jtl.label_params(variables["params"], rules)
    tx = jtl.make_optimizer(labels, learning_rate=1e-3, optimizer="adam", clip_norm=1.0)
    state = jtl.create_train_state(variables, labels, tx)
    step = jax.jit(jtl.make_train_step(module, tx, labels=labels))
    rows.append((name,) + timed(step, state, batch))
  labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "frozen")])
  step, args = naive_step(module, variables, labels)
  rows.append(("naive: grad of all, set_to_zero frozen",) + timed(step, *args, batch))

  print(f"\n{_MODEL.value} at {_SIZE.value}px, batch {_BATCH.value}, on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s)); groups: {groups[0]}..{groups[-1]}")
  print(f"{'step':<42} {'ms':>9} {'x forward':>10} {'GFLOPs':>9} {'FLOPs x fwd':>12}")
  for name, t, f in rows:
    print(f"{name:<42} {1000 * t:>9.1f} {t / forward_t:>10.2f} {f / 1e9:>9.2f} {f / forward_f:>12.2f}")


if __name__ == "__main__":
  app.run(main)
