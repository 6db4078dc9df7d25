"""The scripts end to end: fine-tune (real EfficientNet-Lite0 weights, real
MNIST digits), resume in the same workdir, evaluate, and clear errors."""

import json

import pytest
from app_helpers import ROOT, run_script

SMALL = ["--config.num_steps={steps}", "--config.image_size=32", "--config.batch_size=16",
         "--config.eval_batch_size=250", "--config.eval_every=2", "--config.checkpoint_every=2",
         "--config.log_every=1", "--config.warmup_steps=0"]


def script(name, *args, data_dir, timeout=600):
  # The runs share a compilation cache, as a restarted job on one machine does.
  return run_script(name, *args, timeout=timeout, env={
      "TFDS_DATA_DIR": str(data_dir), "JAX_COMPILATION_CACHE_DIR": str(data_dir / "xla_cache")})


def finetune(workdir, steps, data_dir, *extra):
  # The plain training step (the probe config would train on cached features,
  # tests/app/test_cached_probe.py): per-step logs, checkpoints and resuming.
  args = ["--config", ROOT / "configs" / "linear_probe.py", "--workdir", workdir,
          f"--config.data_dir={data_dir}", "--config.strategy.cache_features=False",
          *[a.format(steps=steps) for a in SMALL], *extra]
  return script("finetune.py", *args, data_dir=data_dir)


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_finetune_resume_and_evaluate(tmp_path, data_dir):
  workdir = tmp_path / "run"
  first = finetune(workdir, 2, data_dir)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
  assert "Pretrained load report" in first.stdout and "trainable:" in first.stdout
  report = json.loads((workdir / "final_report.json").read_text())
  # Checkpoints are picked on the 400 validation digits held out of training.
  assert report["start_step"] == 0 and report["eval"]["count"] == 400
  assert (workdir / "curves.png").stat().st_size > 1000
  assert any((workdir / "tensorboard").iterdir())
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert {"loss", "steps_per_second", "examples_per_second", "input_wait_fraction"} <= set(train_rows[0])

  assert [r["learning_rate"] for r in train_rows] == pytest.approx([1e-2, 5e-3])  # cosine, 2 steps
  # More steps on resume change the schedule: an error saying so, then the choice.
  refused = finetune(workdir, 4, data_dir)
  assert refused.returncode == 2 and "--config.resume_schedule=new" in refused.stderr
  second = finetune(workdir, 4, data_dir, "--config.resume_schedule=new")
  assert second.returncode == 0, second.stderr[-5000:]
  report = json.loads((workdir / "final_report.json").read_text())
  assert report["start_step"] == 2  # resumed, did not start over

  evaluated = script("evaluate.py", "--workdir", workdir, "--step", "best", "--split", "test",
                     data_dir=data_dir)
  assert evaluated.returncode == 0, evaluated.stderr[-5000:]
  result = json.loads((workdir / "eval_test.json").read_text())
  assert result["count"] == 1000 and len(result["per_class_accuracy"]) == 10
  assert result["class_names"] == [str(d) for d in range(10)]
  assert result["per_class_accuracy_by_name"]["7"] == result["per_class_accuracy"][7]
  assert sum(map(sum, result["confusion_matrix"])) == 1000
  assert 0.0 <= result["accuracy"] <= result["top5_accuracy"] <= 1.0
  assert (workdir / "confusion_test.png").exists()


def test_unknown_config_key_names_the_nearest_valid_keys(tmp_path, data_dir):
  result = script("finetune.py", "--config", ROOT / "configs" / "default.py", "--workdir",
                  tmp_path, "--config.learnin_rate=0.1", data_dir=data_dir)
  assert result.returncode != 0
  assert "unknown config key(s) ['learnin_rate']" in result.stderr
  assert "learnin_rate: did you mean learning_rate" in result.stderr
  assert "--keys" in result.stderr  # every key, without a list of 60 here
  result = script("finetune.py", "--config", ROOT / "configs" / "default.py", "--workdir",
                  tmp_path, "--config.zzzz=0.1", data_dir=data_dir)
  assert "Valid keys:" in result.stderr and "augment.crop_scale" in result.stderr


def test_workdir_of_another_model_is_refused_and_left_intact(tmp_path):
  import jax
  from models_for_tests import MLP, batch, init

  import jtl
  from jtl.errors import CheckpointError
  module = MLP()
  variables = init(module, batch(8, classes=4)["inputs"])
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd")
  data = lambda start: iter([jax.tree.map(lambda x: x, batch(8, classes=4))] * 10)
  kwargs = dict(module=module, variables=variables, labels=labels, tx=tx, train_batches=data,
                workdir=tmp_path, checkpoint_every=1, progress=False, async_checkpoints=False)
  jtl.train.fit(num_steps=2, meta={"model": "mlp", "num_classes": 4}, **kwargs)
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(CheckpointError, match="belongs to a different model"):
    jtl.train.fit(num_steps=4, meta={"model": "resnet50", "num_classes": 4}, **kwargs)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
