"""Config-selected training methods (jtl.app.methods) through jtl.app.experiment:
distillation from a teacher run, DANN / CORAL with a target domain, adversarial
training, and the post-training evaluation options (int8, AdaBN, PGD)."""

import json
from pathlib import Path

import numpy as np
import pytest

from configs import adversarial as adversarial_config
from configs import distill as distill_config
from configs import domain as domain_config
from jtl.app import evaluation, experiment, methods
from jtl.checkpoint.restore import restore_variables
from jtl.errors import ConfigError
from jtl.export import quantize


def small(config, data_dir, steps=3):
  config.data_dir = str(data_dir)
  config.num_steps = steps
  config.batch_size = 32
  config.eval_batch_size = 400
  config.eval_every = steps
  config.checkpoint_every = steps
  config.log_every = 1
  config.warmup_steps = 0
  return config


def train_rows(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if r["split"] == "train"]


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_distillation_from_a_teacher_workdir(tmp_path, data_dir):
  teacher_dir = tmp_path / "teacher"
  experiment.finetune(small(distill_config.get_config("labels"), data_dir, steps=4),
                      teacher_dir, progress=False)
  config = small(distill_config.get_config(), data_dir)
  config.model = "small_cnn_w16"
  config.method.teacher_workdir = str(teacher_dir)
  result = experiment.finetune(config, tmp_path / "student", progress=False)
  rows = train_rows(tmp_path / "student")
  assert all(r["soft_loss"] > 0 for r in rows)  # the teacher's targets were used
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert result.eval_metrics["count"] == 400  # the validation digits
  variables, meta = restore_variables(tmp_path / "student", step="latest")
  assert meta["model"] == "small_cnn_w16"
  assert variables["params"]["stage0_conv"]["kernel"].shape[-1] == 16  # the student's


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_dann_trains_on_target_images_and_evaluates_on_the_target(tmp_path, data_dir):
  workdir = tmp_path / "dann"
  experiment.finetune(small(domain_config.get_config("dann"), data_dir), workdir,
                      progress=False)
  rows = train_rows(workdir)
  assert {"domain_accuracy", "adapt_loss", "grl_scale"} <= set(rows[0])
  assert rows[0]["grl_scale"] < rows[-1]["grl_scale"]  # the DANN schedule ramps up
  variables, _ = restore_variables(workdir, step="latest")
  assert set(variables["params"]) == {"model", "domain"}
  assert variables["params"]["domain"]["fc1"]["kernel"].shape[-1] == 1024
  # The config's DANN normalises each domain apart (batchnorm "separate"): its
  # running statistics are the source's, so the target is evaluated after AdaBN
  # even when not asked, and says so.
  plain = evaluation.evaluate_workdir(workdir, split="test")
  assert plain["count"] == 800  # jtl_digits test split, the target
  assert plain["adabn"] == {"dataset": "jtl_digits", "split": "train",
                            "why": "method.batchnorm='separate'"}
  adapted = evaluation.evaluate_workdir(workdir, split="test", adabn=True,
                                       out_dir=tmp_path / "adabn")
  assert adapted["count"] == 800 and adapted["adabn"]["why"] == "asked"
  assert adapted["accuracy"] == pytest.approx(plain["accuracy"])  # the same AdaBN
  # Each evaluation has its own files: the run's result (the default step) keeps
  # eval_test.json, one with AdaBN asked for gets its own.
  assert plain["results_file"] == str(workdir / "eval_test.json")
  assert adapted["results_file"] == str(tmp_path / "adabn" / "eval_test_adabn.json")
  assert (tmp_path / "adabn" / "confusion_test_adabn.png").exists()
  assert json.loads(Path(plain["results_file"]).read_text())["count"] == 800


@pytest.mark.slow  # end to end: training, int8, PGD: make test-all
def test_adversarial_training_then_int8_and_pgd_evaluation(tmp_path, data_dir):
  workdir = tmp_path / "adv"
  experiment.finetune(small(adversarial_config.get_config(), data_dir), workdir,
                      progress=False)
  assert "adv_accuracy" in train_rows(workdir)[0]
  path = tmp_path / "int8.safetensors"
  result = evaluation.evaluate_workdir(workdir, precision="int8", save_quantized=path,
                                       attack="pgd", eps=0.1, attack_steps=3)
  float32 = evaluation.evaluate_workdir(workdir, out_dir=tmp_path / "f32")
  assert result["precision"] == "int8" and result["model_bytes"] < 0.5 * float32["model_bytes"]
  assert abs(result["accuracy"] - float32["accuracy"]) <= 0.05
  assert result["adv_accuracy"] <= float32["accuracy"] + 1e-6
  loaded, meta = quantize.load(path)
  assert meta["precision"] == "int8" and meta["model"] == "small_cnn"
  assert path.stat().st_size == result["saved_quantized"]["bytes"]


def test_method_config_errors_name_the_problem():
  config = distill_config.get_config()
  config.method.teacher_workdir = ""
  with pytest.raises(ConfigError, match="teacher_workdir"):
    methods.resolve_options(config)
  config.method.name = "distil"
  with pytest.raises(ConfigError, match="'distil'.*adversarial"):
    methods.resolve_options(config)
  config = adversarial_config.get_config()
  config.method.epsilon = 0.3
  with pytest.raises(ConfigError, match=r"no options \['epsilon'\].*eps"):
    methods.resolve_options(config)
  config = domain_config.get_config("dann")
  config.strategy.name = "lora"
  with pytest.raises(ConfigError, match="strategy 'lora'"):
    methods.build(config, None, None, None, None, None)


def test_domain_methods_take_a_batchnorm_mode():
  config = domain_config.get_config("dann")
  assert methods.resolve_options(config)["batchnorm"] == "separate"  # the config's choice
  assert methods.needs_adabn(config)
  config.method.batchnorm = None  # unset: the default
  options = methods.resolve_options(config)
  assert options["batchnorm"] == "joint" and options["domain_hidden"] == 1024
  assert not methods.needs_adabn(config)
  coral = domain_config.get_config("coral")
  assert methods.resolve_options(coral)["batchnorm"] == "joint"
  coral.method.batchnorm = "separate"
  assert methods.resolve_options(coral)["batchnorm"] == "separate" and methods.needs_adabn(coral)
  assert not methods.needs_adabn(domain_config.get_config("source_only"))
  config.method.batchnorm = "per_domain"
  with pytest.raises(ConfigError, match=r"batchnorm='per_domain'.*'joint', 'separate'"):
    methods.resolve_options(config)


def test_pixel_affine_matches_the_pipeline_presets():
  mul, add = methods.pixel_affine("imagenet")
  np.testing.assert_allclose(add, -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225]),
                             rtol=1e-5)
  np.testing.assert_allclose(mul, 1 / np.array([0.229, 0.224, 0.225]), rtol=1e-5)


@pytest.mark.slow  # a LoRA run through the app (20 s on 2 CPU): make test-all
def test_a_lora_teacher_teaches_with_its_adapters_folded_in(tmp_path, data_dir):
  from configs import small_cnn
  from jtl.app import keys, workdirs
  teacher = small(small_cnn.get_config(), data_dir, steps=1)
  teacher.strategy = keys.strategy_options("lora")
  teacher.learning_rate = 0.1  # one step moves the adapters well away from zero
  experiment.finetune(teacher, tmp_path / "teacher", progress=False)
  run = workdirs.restore(tmp_path / "teacher", step="latest")
  size = run.config.image_size
  fn, meta = methods._teacher(  # pylint: disable=protected-access
      {"teacher_workdir": str(tmp_path / "teacher"), "teacher_step": "latest"}, run.spec, size)
  assert meta["step"] == 1
  x = np.random.default_rng(0).uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
  merged = run.module.apply(run.merged_variables(), x)
  unmerged = run.module.apply(run.variables, x)  # Linen ignores the adapter leaves
  assert np.abs(np.asarray(merged) - np.asarray(unmerged)).max() > 1e-3
  np.testing.assert_allclose(fn(x), merged, atol=1e-5)


def _pixel_radius(x_adv, pixels, mul, add):
  """Per channel: the largest pixel change and the pixels' range of `x_adv`."""
  back = ((np.asarray(x_adv) - add) / mul).reshape(-1, 3)
  return np.abs(back - pixels.reshape(-1, 3)).max(0), back.min(0), back.max(0)


def test_attacks_are_eps_in_every_channel_under_imagenet_normalisation(monkeypatch):
  """Pixel-unit eps becomes each channel's own radius and bounds (ImageNet's
  std differ per channel): one scalar scale made them 0.1013 / 0.0991 / 0.0996
  and pushed pixels out of [0, 1]."""
  import jax  # pylint: disable=g-import-not-at-top
  from beyond_models import TinyCNN, init, labels  # pylint: disable=g-import-not-at-top

  import jtl  # pylint: disable=g-import-not-at-top
  from jtl.recipes import adversarial  # pylint: disable=g-import-not-at-top
  mul, add = methods.pixel_affine("imagenet")
  pixels = np.random.default_rng(0).uniform(0, 1, (8, 8, 8, 3)).astype(np.float32)
  pixels[:, :2], pixels[:, 2:4] = 0.0, 1.0  # black and white: the bounds bind
  x, y = pixels * mul + add, labels(8)
  model = TinyCNN(4)
  v = init(model, x)
  config = adversarial_config.get_config()
  config.method.steps = 10
  spec = type("Spec", (), {"normalization": "imagenet", "image_size": 8})()
  method = methods.build(config, model, v, spec, None, None)
  lab = jtl.label_params(v["params"], [(".*", "all")])
  state = jtl.create_train_state(v, lab, jtl.make_optimizer(lab, learning_rate=0.1))
  attacked, _ = jax.jit(method.batch_transform)(state, {"inputs": x, "label": y}, None)
  eps = config.method.eps
  radius, low, high = _pixel_radius(attacked["inputs"], pixels, mul, add)
  assert np.all(radius <= eps + 1e-5) and np.all(radius >= eps - 1e-5), radius
  assert low.min() >= -1e-5 and high.max() <= 1 + 1e-5, (low, high)
  # scripts/evaluate.py --attack: the robust eval step gets the same units.
  given = {}
  monkeypatch.setattr(adversarial, "make_robust_eval_step", lambda m, **kw: given.update(kw))
  run = type("Run", (), {"spec": spec, "module": model})()
  jit = jax.jit
  monkeypatch.setattr(jax, "jit", lambda f: f)
  evaluation._robust_eval_step(run, "pgd", eps, 10)  # pylint: disable=protected-access
  attack = adversarial.make_attack(
      attack="pgd", eps=eps, steps=10, input_scale=given["input_scale"], bounds=given["bounds"])
  x_adv = jit(lambda x: attack(adversarial.model_loss(model, v, {"label": y}), x,
                               jax.random.PRNGKey(1)))(x)
  radius, low, high = _pixel_radius(x_adv, pixels, mul, add)
  assert np.all(radius <= eps + 1e-5) and np.all(radius >= eps - 1e-5), radius
  assert low.min() >= -1e-5 and high.max() <= 1 + 1e-5, (low, high)


@pytest.mark.parametrize("name", ["dann", "coral"])
def test_domain_methods_keep_the_strategys_l2sp_and_layer_decay(name):
  """The optimizer of the wrapped model ("model/...", "domain/...") is the
  strategy's: L2-SP toward the pretrained weights and layer-wise decay on the
  model's params, as without the method; once it was a plain optimizer."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from jtl import partition  # pylint: disable=g-import-not-at-top
  from jtl.recipes.strategies.l2sp import L2SPState  # pylint: disable=g-import-not-at-top
  config = domain_config.get_config(name)
  config.pretrained, config.num_classes = False, 10  # no dataset read
  config.warmup_steps = 0  # a first update that is not zero
  if name == "dann":
    config.method.domain_hidden = 16
  config.strategy.l2sp, config.strategy.l2sp_head, config.strategy.layer_decay = 0.5, 0.1, 0.5
  created = experiment.build_model(config)
  strategy = experiment.build_strategy(config, created)
  _, variables, phases = experiment.build_training(config, created, strategy)
  no_batches = lambda *_: (lambda start: iter(()))  # noqa: E731
  method = methods.build(config, created.module, variables, created.spec, no_batches(),
                         no_batches)
  [(_, labels, tx)] = experiment.wrapped_phases(config, strategy, method)
  params = method.variables["params"]
  trainable, _ = partition.split(params, labels)
  state = tx.init(trainable)
  [ref] = [s.reference for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, L2SPState)) if isinstance(s, L2SPState)]
  assert set(ref) == {"model"}
  jax.tree.map(np.testing.assert_array_equal, ref["model"], variables["params"])
  # An update of the wrapped model's params is the plain strategy's on "model/".
  moved = jax.tree.map(lambda p: p + 0.1, trainable)
  grads = jax.tree.map(lambda p: 0.01 * np.sign(np.asarray(p) + 0.5), trainable)
  update = lambda tx, grads, params: tx.update(grads, tx.init(params), params)[0]  # noqa: E731
  updates, plain = jax.jit(lambda g, p: (update(tx, g, p), update(
      phases[0][2], g["model"], p["model"])))(grads, moved)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates["model"], plain)
  assert float(optax.tree_utils.tree_norm(plain)) > 0
  if name == "dann":  # the domain classifier trains with the optimizer alone
    assert float(optax.tree_utils.tree_norm(updates["domain"])) > 0
