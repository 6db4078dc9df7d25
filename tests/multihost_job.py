"""One fine-tuning run as process PROCESS_ID of NUM_PROCESSES on this machine.

usage: python multihost_job.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.npz STEPS [DIE_AT]

8 CPU devices in all (8 / NUM_PROCESSES per process); with 2 processes they
form one mesh through `jax.distributed` (coordinator on 127.0.0.1:PORT, gloo
collectives). The global batch of step s is fixed by s; each process feeds its
own rows of it, which `shard_batch` assembles into global arrays; so for the
precise BatchNorm batches. Checkpoints every 2 steps; process 0 writes the
final variables to OUT.npz. With DIE_AT,
process 1 exits abruptly after that step (a preempted host). With
MULTIHOST_API=nnx in the environment the model is the NNX `NnxNet`; with
MULTIHOST_SECONDS_PER_STEP, each step takes at least that long (time to
signal a process mid-run). With MULTIHOST_API=cached_probe the run is a
linear probe on cached features (`cached_probe`). With MULTIHOST_TAKE_LOCK_AT, process 0 overwrites
the workdir's lock after that step as another host's run would (the run
has lost its workdir). A run stopped by SIGTERM exits as the scripts do
(`Preempted`: 128 + the signal, the message on stderr).
"""

import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before jax is imported: this process's CPU devices
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // int(sys.argv[2])}"
  os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn
import jax
import numpy as np

import jtl

GLOBAL_BATCH = 16


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.relu(nn.Dense(32, name="body")(x.reshape((x.shape[0], -1))))
    x = nn.BatchNorm(momentum=0.9, name="bn")(x, use_running_average=not train)
    return nn.Dense(5, name="head")(x)


def nnx_net():
  """`Net` as a Flax NNX module."""
  from flax import nnx

  class NnxNet(nnx.Module):
    def __init__(self, rngs):
      self.body = nnx.Linear(6 * 6 * 3, 32, rngs=rngs)
      self.bn = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
      self.head = nnx.Linear(32, 5, rngs=rngs)

    def __call__(self, x):
      return self.head(self.bn(nnx.relu(self.body(x.reshape((x.shape[0], -1))))))
  return NnxNet(nnx.Rngs(0))


def global_batch(step):
  rng = np.random.default_rng(step)
  return {"inputs": rng.normal(size=(GLOBAL_BATCH, 6, 6, 3)).astype(np.float32),
          "label": rng.integers(0, 5, GLOBAL_BATCH).astype(np.int32)}


def local_batches(start):
  rows = GLOBAL_BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  for step in range(start, 10_000):
    yield {k: v[mine] for k, v in global_batch(step).items()}


def batchnorm_batches():
  """Two fixed global batches for precise BatchNorm, this process's rows (the
  last 4 rows of the second are padding: mask False)."""
  rows = GLOBAL_BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  for seed, padding in ((1000, 0), (1001, 4)):
    mask = np.arange(GLOBAL_BATCH) < GLOBAL_BATCH - padding
    yield {"inputs": global_batch(seed)["inputs"][mine], "mask": mask[mine]}


class ProbeNet(nn.Module):
  """A frozen body with a `features` method, for the cached linear probe."""

  def setup(self):
    self.body = nn.Dense(32)
    self.head = nn.Dense(5)

  def features(self, x, *, train=False):
    del train
    return nn.relu(self.body(x.reshape((x.shape[0], -1))))

  def __call__(self, x, *, train=False):
    return self.head(self.features(x))


def cached_probe(workdir, out, steps):
  """The cached features of two global batches (the last 4 rows of the second
  are padding), each process feeding its rows, and `features.fit_cached_probe`
  on them; every process writes them and its head to OUT.<process>.npz."""
  from jtl.recipes.strategies import features
  module = ProbeNet()
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 6, 6, 3), np.float32))
  labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "frozen")])
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd")
  rows = GLOBAL_BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  train_pass = [{k: v[mine] for k, v in {**global_batch(seed), "mask": np.arange(GLOBAL_BATCH)
                                         < GLOBAL_BATCH - padding}.items()}
                for seed, padding in ((1000, 0), (1001, 4))]
  feats, ys = features.extract_features(module, variables, train_pass)
  result = features.fit_cached_probe(
      module=module, variables=variables, labels=labels, tx=tx, head_tx=tx,
      train_pass=train_pass, num_steps=steps, batch_size=8, workdir=workdir,
      meta={"model": "probe_net", "num_classes": 5})
  head = jax.device_get(result.state.params["head"])
  np.savez(out.replace(".npz", f".{jax.process_index()}.npz"), features=feats, labels=ys,
           **jtl.tree.flatten(head))


def main(argv):
  process_id, num_processes, port = (int(a) for a in argv[1:4])
  workdir, out, steps = argv[4], argv[5], int(argv[6])
  die_at = int(argv[7]) if len(argv) > 7 else None
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jtl.parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  if os.environ.get("MULTIHOST_API") == "cached_probe":
    cached_probe(workdir, out, steps)
    print("done", flush=True)
    return
  if os.environ.get("MULTIHOST_API") == "nnx":
    module = nnx_net()
    variables = jtl.adapter.variables_of(module)
  else:
    module = Net()
    variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 6, 6, 3), np.float32))
  labels = jtl.label_params(variables["params"], [("body/.*", "frozen"), (".*", "top")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2, optimizer="adamw", clip_norm=1.0)

  def on_log(step, row):
    if die_at is not None and step == die_at and jax.process_index() == 1:
      os._exit(17)  # no cleanup, like a preempted host
    if str(step) == os.environ.get("MULTIHOST_TAKE_LOCK_AT") and jax.process_index() == 0:
      other = {"pid": 4242, "host": "another-host", "since": "now", "lease_s": 180, "renew_s": 30}
      (Path(workdir) / "jtl.lock").write_text(json.dumps(other))
    time.sleep(float(os.environ.get("MULTIHOST_SECONDS_PER_STEP", 0)))
    rate = row["examples_per_second"] / row["steps_per_second"]
    print(f"step {step}: {rate:.1f} examples per step", flush=True)

  result = jtl.train.fit(
      module=module, variables=variables, labels=labels, tx=tx, train_batches=local_batches,
      num_steps=steps, workdir=workdir, checkpoint_every=2, keep=2, log_every=1,
      progress=False, meta={"model": "multihost_job", "num_classes": 5}, on_log=on_log,
      batchnorm_batches=batchnorm_batches)
  if jax.process_index() == 0:
    flat = jtl.tree.flatten(jax.device_get(result.state.variables))
    np.savez(out, start_step=result.start_step, **flat)
  print("done from step", result.start_step, flush=True)


if __name__ == "__main__":
  from jtl.app.cli import exit_on_jtl_error
  exit_on_jtl_error(main)(sys.argv)
