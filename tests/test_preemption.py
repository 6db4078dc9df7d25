"""A run ends well when it is stopped (issue 26, section 2 and item 3.1): a
partial metrics line does not derail the re-run. (Item 3.5, an unfinished
save before LP-FT's first checkpoint: tests/test_folder_config.py.)"""

import json
import logging

import numpy as np
from models_for_tests import MLP, batch, init

import jtl


def fit_kwargs(workdir, **extra):
  module = MLP()
  variables = init(module, batch(8, classes=4)["inputs"])
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd")
  data = lambda start: iter([batch(8, classes=4, seed=i) for i in range(start, 100)])
  evals = lambda: [{**batch(8, classes=4, seed=99), "mask": np.ones(8, bool)}]
  kwargs = dict(module=module, variables=variables, labels=labels, tx=tx, train_batches=data,
                eval_batches=evals, workdir=workdir, checkpoint_every=2, eval_every=2, keep=1,
                progress=False, async_checkpoints=False, log_every=1,
                meta={"model": "mlp", "num_classes": 4})
  return {**kwargs, **extra}


# Item 3.1: a kill (or a full disk) during a metrics write leaves a partial line.
def test_partial_metrics_line_is_dropped_and_the_run_resumes(tmp_path, caplog):
  jtl.train.fit(num_steps=3, **fit_kwargs(tmp_path))  # checkpoints at 2 and 3, 5 rows
  jsonl = tmp_path / "metrics.jsonl"
  with open(jsonl, "a") as f:
    f.write('{"step": 4, "split": "train", "lo')  # cut mid-row, no newline
  with caplog.at_level(logging.WARNING):
    result = jtl.train.fit(num_steps=5, **fit_kwargs(tmp_path))
  assert result.start_step == 3
  assert any("dropped 1 unreadable line(s) (line 6" in r.getMessage() for r in caplog.records)
  rows = [json.loads(line) for line in jsonl.read_text().splitlines()]  # every line whole
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5]
  assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 3, 4, 5]
