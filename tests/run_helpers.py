"""A finished run's workdir written directly, without training: a checkpoint
as scripts/finetune.py leaves it (the config in its meta), for the tests of
what reads a run back (evaluate.py, convert.py --workdir, workdirs.load)."""

import jax
import optax

from jtl import state
from jtl.app import experiment
from jtl.checkpoint import manager


def saved_run(workdir, config, variables, num_classes=2, step=1, accuracy=0.5):
  """Saves `variables` as the checkpoint of `step` of a run of `config` in
  `workdir` (created); returns `workdir`."""
  labels = jax.tree.map(lambda _: "all", variables["params"])
  train_state = state.create_train_state(variables, labels, optax.sgd(0.0))
  mngr = manager.CheckpointManager(workdir, best_metric="accuracy", async_save=False)
  mngr.save(step, train_state, metrics={"accuracy": accuracy},
            meta=experiment.run_meta(config, num_classes), force=True)
  mngr.close()
  return workdir
