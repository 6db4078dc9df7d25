"""The cached-feature linear probe through the experiment (scripts/finetune.py's
path): one backbone pass, the head trained on the cache, checkpointed and
evaluated like any run (issue 15)."""

import json

import jax
import numpy as np
import pytest
from PIL import Image
from app_helpers import photo_folder

from configs import strategy as strategy_config
from jtl.app import evaluation, experiment, preflight
from jtl.errors import ConfigError


def probe_config(data):
  c = strategy_config.get_config("linear_probe")
  c.model, c.pretrained, c.image_size = "small_cnn", False, 28
  c.dataset, c.train_split, c.eval_split = f"folder:{data}", "train", "test"
  c.batch_size, c.eval_batch_size, c.num_steps = 8, 8, 20
  c.warmup_steps, c.eval_every, c.checkpoint_every = 0, 0, 0
  return c


def test_linear_probe_trains_on_cached_features_and_evaluates(tmp_path):
  config = probe_config(photo_folder(tmp_path / "photos"))
  assert preflight.cached_probe_problems(config) == []
  result = experiment.finetune(config, tmp_path / "run", progress=False)
  assert result.eval_metrics["count"] == 4 and result.steps_per_second > 0
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"][0]
  assert train["step"] == 20 and train["cached_examples"] == 4  # 2 classes x 2 train photos
  assert 0 <= train["head_compile_seconds"] <= train["head_seconds"]
  initial = experiment.build_model(config).variables["params"]
  trained = jax.device_get(result.state.params)
  for name in initial:  # the backbone is the model's own; only the head moved
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial[name]),
                                                    jax.tree.leaves(trained[name])))
    assert same == (name != "head"), name
  evaluated = evaluation.evaluate_workdir(tmp_path / "run")
  assert evaluated["accuracy"] == pytest.approx(result.eval_metrics["accuracy"])
  _evaluation_output_checks(tmp_path)
  again = experiment.finetune(config, tmp_path / "run", progress=False)
  assert again.start_step == 20  # a finished cached run is not retrained


def test_cache_features_true_with_augmentation_is_refused(tmp_path):
  config = probe_config(photo_folder(tmp_path / "photos"))
  config.strategy.cache_features = True
  config.augment.crop = True
  with pytest.raises(ConfigError, match="augment.crop is on: cached features need"):
    preflight.preflight(config)
  config.augment.crop = False
  config.augment.randaugment_n = 2
  assert preflight.cached_probe_problems(config) == [
      "augment.randaugment_n > 0: cached features need an unaugmented pipeline"]
  config.strategy.cache_features = None  # auto: falls back to the plain step
  assert preflight.cached_probe_problems(config) is None


def test_the_probe_config_trains_on_cached_features_by_default():
  from configs import linear_probe  # pylint: disable=g-import-not-at-top
  assert preflight.cached_probe_problems(linear_probe.get_config()) == []
  ema = linear_probe.get_config()
  ema.ema_decay = 0.99  # the EMA lives in the train step: the plain step runs, not the cache
  assert preflight.cached_probe_problems(ema) is None
  ema.strategy.cache_features = True
  assert any("ema_decay" in p for p in preflight.cached_probe_problems(ema))


def test_cached_and_uncached_probes_train_the_same_head(tmp_path):
  # Full-batch steps (batch = the 8 training photos): the head sees the same
  # batches on the cache and through the plain step, in any order.
  data = photo_folder(tmp_path / "photos")
  rng = np.random.default_rng(1)
  for name in ("cat", "dog"):
    for i in range(2, 4):
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(
          data / "train" / name / f"{i}.jpg")
  heads = {}
  for cache in (True, False):
    config = probe_config(data)
    config.batch_size, config.strategy.cache_features = 8, cache
    result = experiment.finetune(config, tmp_path / f"run_{cache}", progress=False)
    assert result.state.step == 20
    heads[cache] = jax.device_get(result.state.params["head"])
  start = experiment.build_model(config).variables["params"]["head"]
  assert not np.allclose(heads[True]["kernel"], start["kernel"], atol=1e-3)  # it trained
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(heads[True][name], heads[False][name], rtol=1e-4, atol=1e-5)



def _evaluation_output_checks(tmp_path):
  """evaluate_workdir into a file: refused before the evaluation runs; a write
  that fails after it: the error carries the metrics (evaluate.py used to
  compute everything, then die with a raw OSError and print nothing)."""
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match=r"Cannot write the evaluation's results: out_dir "
                                        rf"{tmp_path / 'file'} is not a folder"):
    evaluation.evaluate_workdir(tmp_path / "run", out_dir=tmp_path / "file")
  (tmp_path / "out" / "eval_test.json").mkdir(parents=True)  # writable folder, unwritable file
  with pytest.raises(ConfigError, match=r'The evaluation finished \({"step": 20, "split": '
                     r'"test", "accuracy": [0-9.]+, .*"count": 4}\) but its files could not be '
                     rf"written into {tmp_path / 'out'} \(IsADirectoryError"):
    evaluation.evaluate_workdir(tmp_path / "run", out_dir=tmp_path / "out")
