"""A small fine-tuning job for the kill-and-resume test.

usage: python resume_job.py WORKDIR OUT.npz [SECONDS_PER_STEP]
Trains an MLP with a frozen body and dropout on an in-memory dataset through
the real input pipeline, checkpointing every 3 steps, and exports the final
params to OUT.npz.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn
import jax
import numpy as np

import jtl
from jtl.export import write
from jtl.data import make_dataset

NUM_STEPS = 12


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(32, name="body")(x))
    x = nn.BatchNorm(momentum=0.9, name="bn")(x, use_running_average=not train)
    x = nn.Dropout(0.3)(x, deterministic=not train)
    return nn.Dense(5, name="head")(x)


def main(workdir, out, seconds_per_step=0.0):
  rng = np.random.default_rng(0)
  data = {"train": {"image": rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8),
                    "label": rng.integers(0, 5, 64)},
          "test": {"image": rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
                   "label": rng.integers(0, 5, 20)}}
  module = Net()
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))
  labels = jtl.label_params(variables["params"], [("body/.*", "frozen"), (".*", "top")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2, optimizer="adamw", weight_decay=1e-4)
  kwargs = dict(split="train", batch_size=8, train=True, image_size=8, seed=1)
  result = jtl.train.fit(
      module=module, variables=variables, labels=labels, tx=tx,
      train_batches=lambda start: iter(make_dataset(data, start_step=start, **kwargs)),
      eval_batches=lambda: make_dataset(data, split="test", batch_size=8, train=False,
                                        image_size=8),
      num_steps=NUM_STEPS, workdir=workdir, checkpoint_every=3, eval_every=6, keep=2,
      log_every=1, progress=False, meta={"model": "resume_job", "num_classes": 5},
      on_log=lambda step, row: time.sleep(seconds_per_step))
  write(jax.device_get(result.state.variables), out)
  print("finished from step", result.start_step, flush=True)


if __name__ == "__main__":
  from jtl.app.cli import exit_on_jtl_error  # as the scripts: a Preempted run exits 128 + signal
  exit_on_jtl_error(lambda argv: main(argv[1], argv[2], float(argv[3]) if len(argv) > 3 else 0.0))(
      sys.argv)
