"""Every config loads and validates, and the network-only (TPU) configs build
their model and point at their pipeline without downloading anything."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from app_helpers import ROOT, load_config

from jtl import models
from jtl.app import experiment, keys, preflight
from jtl.errors import ConfigError, DataError

CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path):
  config = load_config(path.stem)
  if not config.dataset:  # configs/folder.py: the user names the folder
    with pytest.raises(ConfigError, match="--config.dataset=folder:"):
      preflight.validate(config)
    config.dataset = "folder:/path/to/images"
  preflight.validate(config)
  if config.model != "auto":  # configs/folder.py: chosen among model_candidates at run time
    models.get_spec(config.model)
  assert config.strategy.name
  # Every strategy's option is a key, so the command line can switch strategy.
  assert set(config.strategy.keys()) == {"name", *keys.STRATEGY_OPTIONS}


def test_switching_away_from_rules_says_to_clear_them():
  config = load_config("default")
  config.strategy.name, config.strategy.probe_steps = "lp_ft", 5
  with pytest.raises(ConfigError, match=r"--config.strategy.rules=None"):
    preflight.validate(config)
  config.strategy.rules = None
  preflight.validate(config)


@pytest.mark.parametrize("name", ["tpu_vit_b16_cifar10", "tpu_resnet50_flowers"])
def test_tpu_configs_build_model_and_pipeline_offline(name, tmp_path):
  config = load_config(name)
  spec = models.get_spec(config.model)
  module = spec.build(num_classes=10)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), spec.example_input(1)))
  labels = experiment.partition.label_params(shapes["params"], list(config.strategy.rules))
  experiment.build_optimizer(config, labels)
  config.data_dir = str(tmp_path)
  with pytest.raises(DataError, match="not prepared|tfds build"):
    next(iter(experiment.eval_batches(config, spec)()))


@functools.lru_cache(maxsize=None)
def zero_init(model):
  """The model with zeros of its variables' shapes, shared by the strategies:
  they read names and shapes only (building a strategy leaves the model and
  its variables as they were), and a real init compiles for ~10 s."""
  spec = models.get_spec(model)
  module = spec.build(num_classes=10)
  shapes = models.registry.abstract_variables(spec, module)
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  spec = dataclasses.replace(spec, groups=models.registry.layer_groups(spec, variables["params"]))
  return models.creation.CreatedModel(module, variables, None, spec.preprocess, spec)


@pytest.mark.parametrize("name", ["lora", "lp_ft", "gradual", "bitfit", "llrd", "partial"])
def test_strategy_configs_build_their_phases(name):
  config = load_config("strategy", name)
  config.pretrained = False
  preflight.validate(config)
  created = zero_init(config.model)
  module, variables, phases = experiment.build_training(config, created)
  assert len(phases) == (2 if name == "lp_ft" else 1) or name == "gradual"
  summary = experiment.partition.summarize(variables["params"], phases[0][1])
  assert 0 < summary.trainable_params < summary.total_params or name == "llrd"


def test_partial_config_takes_the_number_of_blocks():
  config = load_config("partial", "2")
  assert "blocks_14|blocks_15" in config.strategy.rules[0][0]


def test_invalid_values_are_reported_together():
  config = load_config("default")
  config.batch_size, config.num_steps, config.model = 0, 0, "resnet51"
  config.ema_decay = 1.0
  with pytest.raises(ConfigError) as e:
    preflight.validate(config)
  assert "batch_size" in str(e.value) and "num_steps" in str(e.value) and "resnet51" in str(e.value)
  assert "ema_decay must be a number in [0, 1)" in str(e.value)


def test_readme_lists_every_key_with_its_default_as_the_table_does():
  """The README's key table is `keys.table()` (regenerate it when a key changes)."""
  from jtl.app import keys
  readme = (ROOT / "README.md").read_text()
  listed = readme.split("<!-- keys:begin -->\n")[1].split("\n<!-- keys:end -->")[0]
  assert listed == keys.table()
  config = load_config("default")
  leaves = {f"{k}.{leaf}" if isinstance(v, dict) and k == "augment" else k
            for k, v in config.to_dict().items()
            for leaf in (v if isinstance(v, dict) and k == "augment" else [None])}
  assert leaves == {k.name for k in keys.KEYS}  # every key of the default job is listed


def test_keys_left_out_take_the_table_defaults_and_given_ones_stay():
  import ml_collections

  from jtl.app import keys
  partial = ml_collections.ConfigDict({"model": "small_cnn", "augment": {"flip": False},
                                       "strategy": {"name": "lora", "rank": 4}})
  complete = keys.complete(partial)
  assert complete.augment.flip is False and complete.augment.crop_scale == (0.08, 1.0)
  assert complete.strategy.to_dict() == {"name": "lora", "rank": 4}  # its own options only
  assert complete.keep == 2 and complete.eval_every == 0 and complete.method.name == ""
  filled = keys.complete(ml_collections.ConfigDict())
  assert filled.strategy.name == "rules" and filled.strategy.rules is None  # None: the default
  options = experiment.strategies.resolve_options(keys.strategy_config(filled))
  assert options["rules"] == ((".*", "all"),)  # every parameter trains
