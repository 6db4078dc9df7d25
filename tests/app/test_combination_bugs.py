"""Where combinations meet (issue 27, section 2): a model family with a
strategy, a strategy with an export, research code with the scripts. Each
test failed before its fix."""

import functools

import jax
import numpy as np
import pytest
from app_helpers import ROOT, load_config
from models_for_tests import MLP, batch, init

import jtl
from jtl import models
from jtl.app import experiment
from jtl.errors import ConfigError, PartitionError
from jtl.recipes import strategies



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
    summary = jtl.eval_steps.summarize_eval(jtl.make_eval_step(model)(variables, b))
    assert ("top5_accuracy" in summary) == (classes > 5), classes
  top5 = np.argsort(-model.apply(variables, b["inputs"]), -1)[:, :5]
  expected = np.mean((top5 == np.asarray(b["label"])[:, None]).any(-1))
  assert summary["top5_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_no_config_picks_its_best_checkpoint_on_the_test_split(path):
  # Bug 7: default.py and text_minilm.py evaluated on "test" with best_metric
  # set, so `evaluate.py --step best` scored a checkpoint picked on test.
  from jtl.data import splits
  config = load_config(path.stem)
  train, held = config.get("train_split", "train"), config.get("eval_split", "test")
  if config.get("eval_dataset") and config.eval_dataset != config.dataset:
    train = None  # another dataset (domain adaptation): disjoint from the training data
  assert not config.get("best_metric") or not held.startswith("test"), held
  holdout = splits.parse_holdout(held)
  if train is not None and holdout is not None:  # a stratified part and its rest
    assert splits.parse_holdout(train) == (holdout[0], True, holdout[2])
  elif train is not None:  # slices of one split must not overlap
    sizes = {"train": 1000, "test": 100, "validation": 100}
    (a, sa), (b, sb) = (splits.slice_split(s, sizes) for s in (train, held))
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
  assert jtl.eval_steps.summarize_eval(jtl.make_eval_step(wrapped)(new.variables, b))["count"] == 8


def test_dict_outputs_with_a_custom_loss_name_what_evaluation_scores(tmp_path):
  # Bug 5: a model returning a dict, trained with a custom loss, trained and
  # then crashed at the first evaluation ('NoneType' object has no attribute 'shape').
  import flax.linen as nn
  import jax.numpy as jnp

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
      h = nn.Dense(8)(x)
      return {"features": h, "logits": nn.Dense(3, name="head")(h)}

  module = Net()
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2)
  loss_fn = lambda out, b: jtl.losses.cross_entropy_loss(out["logits"], b)
  rng = np.random.default_rng(0)
  data = {"inputs": rng.standard_normal((16, 4)).astype(np.float32),
          "label": rng.integers(0, 3, 16).astype(np.int32)}
  evals = lambda: iter([{**data, "mask": np.ones(16, bool)}])
  kwargs = dict(module=module, variables=variables, labels=labels, tx=tx, loss_fn=loss_fn,
                train_batches=lambda start: iter([data] * 10), num_steps=2, eval_batches=evals,
                eval_every=1, progress=False)
  steps_run = []
  with pytest.raises(jtl.errors.StepError, match=r"returned a dict with keys \['features', "
                     r"'logits'\].*Pass eval_output="):
    jtl.train.fit(**kwargs, log_every=1, on_log=lambda step, m: steps_run.append(step))
  assert steps_run == []  # before the first training step
  result = jtl.train.fit(**kwargs, eval_output="logits")
  logits = module.apply({"params": result.state.params}, data["inputs"])["logits"]
  assert result.eval_metrics["accuracy"] == pytest.approx(
      np.mean(np.argmax(logits, -1) == data["label"]))
  # Or an eval_fn for outputs that are not class scores: its sums, averaged.
  eval_fn = lambda out, b: {"mse": jnp.sum(jnp.mean(out["features"] ** 2, -1) * b["mask"])}
  scored = jtl.train.fit(**kwargs, eval_fn=eval_fn, best_metric="mse")
  features = module.apply({"params": scored.state.params}, data["inputs"])["features"]
  assert scored.eval_metrics["mse"] == pytest.approx(float(np.mean(features ** 2)), rel=1e-5)


def test_lora_defaults_to_the_attention_projections_of_a_vit(tmp_path):
  # Bug 3: a Linen ViT/DINOv2's default LoRA targets were its MLP and patch
  # embedding, never query/key/value (Linen's DenseGeneral was not adaptable).
  import dataclasses

  from jtl.models import vit
  module = vit.ViT(num_classes=2, patch_size=8, width=16, depth=2, mlp_dim=32, num_heads=2,
                   image_size=16)  # a tiny ViT, described as the zoo's vit_ti16 is
  spec = dataclasses.replace(models.get_spec("vit_ti16"), groups=vit.groups(2),
                             example_input=lambda n: np.zeros((n, 16, 16, 3), np.float32))
  # Jitted: op-by-op, the ViT's init and applies compile ~130 single ops (5 s).
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), spec.example_input(1))
  strategy = strategies.build({"name": "lora", "rank": 2}, module, variables, spec)
  flat = jtl.tree.flatten(strategy.variables["params"])
  adapted = sorted(p[:-len("/lora_a")] for p in flat if p.endswith("/lora_a"))
  attention = [f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{name}"
               for i in range(2) for name in ("key", "out", "query", "value")]
  assert adapted == sorted(attention)
  query = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/lora_a"]
  out = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/lora_a"]
  assert query.shape == out.shape == (16, 2)  # [inputs, r]: PEFT's Linear in_features
  # LoraModel (the training path) computes what the merged kernels compute.
  rng = np.random.default_rng(0)
  flat = {p: (rng.standard_normal(v.shape).astype(np.float32) if p.endswith("lora_b")
              else v) for p, v in flat.items()}
  lora_vars = {**strategy.variables, "params": jtl.tree.unflatten(flat)}
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  features = jax.jit(lambda m, v, x: m.apply(v, x, method="features"), static_argnums=0)
  got = features(strategy.module, lora_vars, x)
  merged = {**lora_vars, "params": strategies.merge_lora(lora_vars["params"], 16.0)}
  want = features(module, merged, x)
  plain = features(module, variables, x)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.max(np.abs(want - plain)) > 0.1  # the adapters act
  # A target that matches no layer is an error naming it and the layers there are.
  with pytest.raises(ConfigError, match=r"LoRA targets \['query'\] match no .*layer.*\n"
                                        r"(.*\n)*.*MultiHeadDotProductAttention_0/query"):
    strategies.build({"name": "lora", "targets": "query"}, module, variables, spec)


def test_a_schedule_change_on_resume_is_explicit_and_the_rate_is_logged(tmp_path):
  # Bug 11: resuming with another num_steps silently rebuilt the cosine
  # schedule (the rate jumped from 0 back up), and the rate was never logged.
  import jax.numpy as jnp

  from jtl.checkpoint import CheckpointManager
  config = load_config("default")
  config.num_steps, config.warmup_steps, config.learning_rate = 300, 0, 2e-3
  assert experiment.schedule_config(config, tmp_path) is config  # a fresh workdir
  params = {"head": {"w": jnp.zeros((2, 3))}}
  labels = jtl.label_params(params, [(".*", "head")])
  state = jtl.create_train_state(params, labels, jtl.make_optimizer(labels, learning_rate=0.1))
  mngr = CheckpointManager(tmp_path, async_save=False)
  mngr.save(300, state, meta=experiment.run_meta(config, 10), force=True)
  mngr.close()
  assert experiment.schedule_config(config, tmp_path) is config  # the same schedule
  config.num_steps = 400
  with pytest.raises(ConfigError, match=r"trained to step 300 with num_steps=300; this config "
                     r"has num_steps=400\. .* the rate at step 300 would be 0\.000293 instead "
                     r"of 0\. Choose: --config.resume_schedule=new"):
    experiment.schedule_config(config, tmp_path)
  config.resume_schedule = "new"
  assert experiment.schedule_config(config, tmp_path) is config
  config.resume_schedule = "old"
  old = experiment.schedule_config(config, tmp_path)
  assert old.num_steps == 300 and config.num_steps == 400  # trains to 400 on the old schedule
  # The train metrics carry the schedule's rate at each step.
  schedule = experiment.learning_rate_schedule(config)
  transform = experiment.logging_learning_rate(None, schedule)
  for step in (0, 150, 300):
    _, metrics = transform(state.replace(step=jnp.int32(step)), {}, None)
    assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(step)))
