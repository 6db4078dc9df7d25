"""Where combinations meet (issue 27, section 2): a model family with a
strategy, a strategy with an export, research code with the scripts. Each
test failed before its fix."""

import functools
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from models_for_tests import MLP, batch, init

import jtl
from jtl import models
from jtl.app import experiment
from jtl.errors import ConfigError, PartitionError
from jtl.recipes import strategies

ROOT = Path(__file__).parents[1]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@functools.lru_cache(maxsize=None)
def abstract(model):
  spec = models.get_spec(model)
  return spec, models.registry.abstract_variables(spec, spec.build(num_classes=2))


def test_strategies_on_models_without_batchnorm_skip_precise_batchnorm():
  # Bug 1: configs/strategy.py:lora and :full failed on ViT, DINOv2, BERT with
  # "fit(batchnorm_batches=...)": precise BatchNorm simply does not apply there.
  for name in ("lora", "full", "partial", "gradual", "scratch"):
    config = load_config("strategy", name)
    for model in ("vit_ti16", "dinov2_s14", "minilm_l6"):
      config.model = model
      spec, variables = abstract(model)
      assert "batch_stats" not in variables
      assert experiment.precise_batchnorm_batches(config, spec, variables) is None, (name, model)
    # With BatchNorm, where the statistics train: on.
    config.model = "efficientnet_lite0"
    assert experiment.precise_batchnorm_images(config, abstract(config.model)[1]) == (
        strategies.PRECISE_BATCHNORM_IMAGES)
  # Asked for explicitly on a model without BatchNorm: an error naming the config key.
  config.model, config.strategy.precise_batchnorm = "vit_ti16", 300
  with pytest.raises(ConfigError, match=r"strategy.precise_batchnorm=300: model 'vit_ti16' "
                                        r"has no BatchNorm statistics.*strategy.precise_batchnorm=0"):
    experiment.precise_batchnorm_images(config, abstract("vit_ti16")[1])


def test_top5_accuracy_is_reported_only_for_more_than_5_classes():
  # Bug 12: text_minilm reported top-5 accuracy 1.0 on its 2 classes.
  for classes in (2, 5, 6):
    model = MLP(num_classes=classes)
    b = batch(16, classes=classes)
    variables = init(model, b["inputs"])
    summary = jtl.summarize_eval(jtl.make_eval_step(model)(variables, b))
    assert ("top5_accuracy" in summary) == (classes > 5), classes
  top5 = np.argsort(-model.apply(variables, b["inputs"]), -1)[:, :5]
  expected = np.mean((top5 == np.asarray(b["label"])[:, None]).any(-1))
  assert summary["top5_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_no_config_picks_its_best_checkpoint_on_the_test_split(path):
  # Bug 7: default.py and text_minilm.py evaluated on "test" with best_metric
  # set, so `evaluate.py --step best` scored a checkpoint picked on test.
  from jtl.data import sources
  config = load_config(path.stem)
  train, held = config.get("train_split", "train"), config.get("eval_split", "test")
  if config.get("eval_dataset") and config.eval_dataset != config.dataset:
    train = None  # another dataset (domain adaptation): disjoint from the training data
  assert not config.get("best_metric") or not held.startswith("test"), held
  holdout = sources.parse_holdout(held)
  if train is not None and holdout is not None:  # a stratified part and its rest
    assert sources.parse_holdout(train) == (holdout[0], True, holdout[2])
  elif train is not None:  # slices of one split must not overlap
    sizes = {"train": 1000, "test": 100, "validation": 100}
    (a, sa), (b, sb) = (sources.slice_split(s, sizes) for s in (train, held))
    assert a != b or not set(range(1000)[sa]) & set(range(1000)[sb]), (train, held)
  if path.stem in ("default", "text_minilm"):
    assert config.test_split == "test"  # scored once, after training


def test_create_train_state_takes_a_bare_params_tree():
  # Bug 10: create_train_state(params, ...) gave KeyError: 'params'.
  import jax.numpy as jnp
  params = {"body": {"w": jnp.full((4, 8), 0.1)}, "head": {"w": jnp.zeros((8, 3))}}
  labels = jtl.label_params(params, [("head/.*", "head"), (".*", "frozen")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2)
  bare = jtl.create_train_state(params, labels, tx)
  wrapped = jtl.create_train_state({"params": params}, labels, tx)
  assert bare.model_state == {} and jax.tree.structure(bare) == jax.tree.structure(wrapped)
  np.testing.assert_array_equal(bare.params["head"]["w"], params["head"]["w"])
  step = jax.jit(jtl.make_train_step(lambda p, x: jnp.tanh(x @ p["body"]["w"]) @ p["head"]["w"],
                                     tx, labels=labels))
  state, metrics = step(bare, {"inputs": jnp.ones((8, 4)), "label": jnp.zeros((8,), jnp.int32)})
  assert np.isfinite(metrics["loss"]) and int(state.step) == 1
  # Neither variables nor a tree of the labels' shape: an error saying what to pass.
  with pytest.raises(PartitionError, match=r"no 'params'.*Pass \{'params': params"):
    jtl.create_train_state({"batch_stats": {}}, labels, tx)


def test_restore_best_defaults_to_the_metric_the_run_used(tmp_path):
  # Bug 9: restore_variables(dir, step="best") said no checkpoint has a finite
  # metric None unless metric= was passed.
  import jax.numpy as jnp

  from jtl.checkpoint import CheckpointManager, restore_variables
  from jtl.errors import CheckpointError
  params = {"head": {"w": jnp.zeros((2, 3))}}
  labels = jtl.label_params(params, [(".*", "head")])
  state = jtl.create_train_state({"params": params}, labels, jtl.make_optimizer(labels, learning_rate=0.1))
  mngr = CheckpointManager(tmp_path / "a", keep=5, best_metric="loss", best_mode="min",
                           async_save=False)
  for step, loss in ((1, 0.5), (2, 0.2), (3, 0.9)):  # lowest loss: step 2 (not max, not latest)
    mngr.save(step, state.replace(step=jnp.int32(step)),
              metrics={"loss": loss, "accuracy": 0.1 * step}, force=True)
  mngr.close()
  _, meta = restore_variables(tmp_path / "a", step="best")
  assert meta["step"] == 2 and (meta["best_metric"], meta["best_mode"]) == ("loss", "min")
  assert restore_variables(tmp_path / "a", step="best", metric="accuracy")[1]["step"] == 3
  # A run saved without a best metric: the error says what to pass.
  plain = CheckpointManager(tmp_path / "b", async_save=False)
  plain.save(1, state, metrics={"accuracy": 0.5}, force=True)
  plain.close()
  with pytest.raises(CheckpointError, match="pass metric='accuracy'"):
    restore_variables(tmp_path / "b", step="best")
  assert restore_variables(tmp_path / "b", step="best", metric="accuracy")[1]["step"] == 1


def test_a_linen_module_with_another_flag_is_told_how_to_wrap_it():
  # Bug 6: a bare Linen module whose flag is `deterministic` failed with
  # "unexpected keyword argument 'train'".
  import flax.linen as nn
  import jax.numpy as jnp

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
      x = nn.Dropout(0.5)(nn.Dense(8)(x), deterministic=deterministic)
      return nn.Dense(3, name="head")(x)

  module = Net()
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2)
  state = jtl.create_train_state(variables, labels, tx)
  b = {"inputs": jnp.ones((8, 4)), "label": jnp.zeros((8,), jnp.int32)}
  with pytest.raises(jtl.errors.StepError, match=r"Net.__call__ takes no 'train' argument "
                     r"\(its arguments: x, deterministic\).*"
                     r"jtl.LinenModel\(module, train_kwarg='deterministic'\)"):
    jtl.make_train_step(module, tx, labels=labels)(state, b)
  # Wrapped as the message says, it trains and evaluates.
  wrapped = jtl.LinenModel(module, train_kwarg="deterministic")
  new, metrics = jax.jit(jtl.make_train_step(wrapped, tx, labels=labels))(state, b)
  assert np.isfinite(metrics["loss"]) and int(new.step) == 1
  assert jtl.summarize_eval(jtl.make_eval_step(wrapped)(new.variables, b))["count"] == 8
