"""Gradient checkpointing (`model_kwargs={"remat": True}`): the memory a
compiled train step needs, and what it costs in step time.

  python scripts/benchmarks/benchmark_remat.py [--model vit_b16] [--batch 64] \
      [--time_batch 4] [--repeats 3] [--image_size 224]

For full fine-tuning (every param trains, AdamW) of `--model`, with and
without remat: XLA's memory analysis of jtl's compiled train step at
`--batch` (compiled from shapes only, never run: the temporaries are the
activations kept for the backward pass, which remat recomputes instead), and
the median step time at `--time_batch` on this machine's default device.
Also what JAX's autodiff saves for the backward pass (its residuals), the
program-level effect of remat, and whether the compiled step runs the blocks
as one loop (`jtl.models.remat`: the transformers' blocks are a checkpointed
`lax.scan`, which XLA cannot merge back into the forward pass; per-block
`nn.remat`, the ResNets', reaches XLA as optimization barriers, which XLA:CPU
drops, so there the compiled temporaries do not shrink; see BENCHMARKS.md).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import common
import jtl
from jtl import models

_MODEL = flags.DEFINE_string("model", "vit_b16", "Zoo model with a `remat` option.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch of the compiled (not run) step.")
_TIME_BATCH = flags.DEFINE_integer("time_batch", 4, "Batch of the timed step (0: no timing).")
_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps (median reported).")


def step_and_state(remat: bool, abstract: bool):
  """The jitted full fine-tuning step of the model and its state (shapes only
  when `abstract`)."""
  spec = models.get_spec(_MODEL.value)
  module = spec.build(num_classes=10, image_size=_SIZE.value, remat=remat)
  init = lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, _SIZE.value, _SIZE.value, 3)))
  variables = jax.eval_shape(init) if abstract else jax.jit(init)()
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-4, optimizer="adamw", clip_norm=1.0)
  make_state = lambda v: jtl.create_train_state(v, labels, tx)
  state = jax.eval_shape(make_state, variables) if abstract else make_state(variables)
  step = jax.jit(jtl.make_train_step(module, tx, labels=labels), donate_argnums=(0,))
  return step, state


def batch(n: int, abstract: bool):
  shape = (n, _SIZE.value, _SIZE.value, 3)
  if abstract:
    return {"inputs": jax.ShapeDtypeStruct(shape, jnp.float32),
            "label": jax.ShapeDtypeStruct((n,), jnp.int32)}
  return {"inputs": jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32),
          "label": jnp.arange(n, dtype=jnp.int32) % 10}


def memory(remat: bool) -> dict[str, float]:
  step, state = step_and_state(remat, abstract=True)
  lowered = step.lower(state, batch(_BATCH.value, abstract=True))
  compiled = lowered.compile()
  m = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  # A scanned stack of blocks is a while loop in the compiled program;
  # per-block remat is optimization barriers, which a compiler may drop.
  text = compiled.as_text()
  return {"loops": text.count(" while("), "barriers": text.count("opt-barrier"),
          "temp": gib(m.temp_size_in_bytes), "args": gib(m.argument_size_in_bytes),
          "total": gib(m.argument_size_in_bytes + m.output_size_in_bytes
                       + m.temp_size_in_bytes - m.alias_size_in_bytes)}


def saved_activations_gib(remat: bool) -> float:
  """What JAX's autodiff keeps from the forward pass for the backward one
  (the residuals of the loss's gradient, params and inputs excluded), at
  `--batch`: the program-level effect of remat, whatever a compiler then does."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  spec = models.get_spec(_MODEL.value)
  module = spec.build(num_classes=10, image_size=_SIZE.value, remat=remat)
  x = jnp.zeros((_BATCH.value, _SIZE.value, _SIZE.value, 3))
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x[:1])["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  loss = lambda p: jnp.sum(module.apply({"params": p}, x, train=True,
                                        rngs={"dropout": jax.random.PRNGKey(0)}))
  kept = [a for a, why in saved_residuals(loss, params) if "argument" not in why]
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in kept) / 2**30


def step_seconds(remat: bool) -> float:
  step, state = step_and_state(remat, abstract=False)
  b = batch(_TIME_BATCH.value, abstract=False)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], b)
    return metrics["loss"]
  return common.median_seconds(run, _REPEATS.value)


def main(argv):
  del argv
  rows, mem = [], {}
  for remat in (False, True):
    mem[remat] = memory(remat)
    mem[remat]["saved"] = saved_activations_gib(remat)
    seconds = step_seconds(remat) if _TIME_BATCH.value else None
    rows.append([f"remat={remat}", f"{mem[remat]['saved']:.3f}", f"{mem[remat]['temp']:.3f}", f"{mem[remat]['total']:.3f}",
                 f"{mem[remat]['loops']} / {mem[remat]['barriers']}",
                 f"{seconds:.3f}" if seconds else "-"])
    print(rows[-1], flush=True)
  drop = 1 - mem[True]["temp"] / mem[False]["temp"]
  common.print_table(
      f"{_MODEL.value}, full fine-tuning, {_SIZE.value} px, device {jax.devices()[0].platform}: "
      f"memory of the step compiled at batch {_BATCH.value}, time at batch {_TIME_BATCH.value}",
      ["", f"saved activations GiB (b={_BATCH.value})", f"XLA temp GiB (b={_BATCH.value})", "program GiB",
       "compiled loops / barriers",
       f"s/step (b={_TIME_BATCH.value})"], rows)
  saved = 1 - mem[True]["saved"] / mem[False]["saved"]
  print(f"\nwith remat: saved activations -{100 * saved:.1f}%, XLA temporary memory "
        f"-{100 * drop:.1f}% (goal >= 40%)")


if __name__ == "__main__":
  app.run(main)
