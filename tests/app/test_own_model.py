"""A user's own model (not in the zoo) through the scripts and back from a
workdir: a config file that registers it, or model="package.module:Name".
The scripts run as subprocesses: evaluate.py and convert.py start without
the registration, which the workdir must let them redo."""

import json
import os
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from app_helpers import ROOT, colour_photos, run_script
from PIL import Image

from jtl import models
from jtl.app import evaluation, experiment, preflight, workdirs
from jtl.errors import ConfigError

PKG = Path(__file__).parents[1] / "own_model_pkg"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """train/<class>/ 8 images, test/<class>/ 4 images; each class its own colour."""
  return colour_photos(tmp_path_factory.mktemp("own_photos"), ("red", "green", "blue"),
                       {"train": 8, "test": 4})


def script(name, *args, cwd):
  return run_script(name, *args, cwd=cwd, timeout=600)


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_model_registered_by_the_config_file_through_finetune_evaluate_convert(photos, tmp_path):
  workdir = tmp_path / "run"
  trained = script("finetune.py", "--config", PKG / "registered_config.py", "--workdir", workdir,
                   f"--config.dataset=folder:{photos}", cwd=tmp_path)
  assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
  final = json.loads((workdir / "final_report.json").read_text())["eval"]

  # A fresh process that never ran the config file: the workdir says where
  # "tiny_registered" was registered, and evaluate.py registers it again.
  evaluated = script("evaluate.py", "--workdir", workdir, "--step", "latest", cwd=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads((workdir / "eval_test.json").read_text())
  assert result["count"] == 12 == final["count"]
  assert result["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)

  converted = script("convert.py", "--workdir", workdir, "--format", "onnx", "--step", "latest",
                     cwd=tmp_path)
  assert converted.returncode == 0, converted.stderr[-3000:]
  for done in (evaluated, converted):  # Orbax's warning about a file never meant to be there
    assert "Metadata file does not exist" not in done.stderr, done.stderr[-2000:]
  onnx_file = workdir / "export" / "model.onnx"
  assert onnx_file.stat().st_size > 1000

  # This process never registered it either: restore redoes it, and the
  # ONNX file computes what the restored module does.
  assert "tiny_registered" not in models.list_models()
  run = workdirs.restore(workdir, step="latest")
  assert type(run.module).__name__ == "TinyRegistered" and run.spec.image_size == 16
  import onnxruntime as ort
  x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  session = ort.InferenceSession(str(onnx_file))
  got = session.run(None, {session.get_inputs()[0].name: x})[0]
  want = np.asarray(run.module.apply(run.variables, x, train=False))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.fixture(scope="module")
def reference_run(photos, tmp_path_factory):
  """A 2-step run of model="own_model_pkg.models:TinyNet" at 16 px."""
  workdir = tmp_path_factory.mktemp("reference_run")
  config = experiment.ml_collections.ConfigDict(_reference_config(photos))
  experiment.finetune(config, workdir, progress=False)
  return workdir


def test_model_by_module_path_trains_restores_and_evaluates(reference_run, caplog):
  from own_model_pkg.models import TinyNet
  final = json.loads((reference_run / "final_report.json").read_text())["eval"]
  with caplog.at_level(logging.INFO):
    run = workdirs.restore(reference_run, step="latest")
  assert "Metadata file does not exist" not in caplog.text
  assert isinstance(run.module, TinyNet) and run.module.num_classes == 3
  # The class's own normalization: its size and crop, not the zoo's 224 px default.
  assert (run.spec.image_size, run.spec.normalization.crop_fraction) == (16, 1.0)
  assert set(run.variables) == {"params", "batch_stats"}
  result = evaluation.evaluate_workdir(reference_run, step="latest")
  assert result["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)


def test_load_gives_the_model_and_the_preprocessing_the_run_used(reference_run, photos):
  """`workdirs.load`: raw photos in, the logits of the run's own evaluation out."""
  run = workdirs.restore(reference_run, step="latest")
  config = run.config
  batch = next(iter(experiment.eval_batches(config, run.spec)()))
  files = sorted((photos / "test").glob("*/*.png"))  # the folder source's order
  raw = [np.asarray(Image.open(f).convert("RGB")) for f in files]
  assert raw[0].shape == (20, 24, 3)  # not square: the pipeline resizes the whole image
  inputs = np.concatenate([np.asarray(run.preprocess(x)) for x in raw])
  np.testing.assert_allclose(inputs, batch["inputs"][:len(raw)], atol=2e-4)
  expected = np.asarray(run.module.apply(run.variables, batch["inputs"][:len(raw)]))
  for api in ("linen", "nnx", "apply"):
    model, preprocess = workdirs.load(reference_run, step="latest", api=api)
    logits = np.asarray(model(preprocess(np.stack(raw))))
    np.testing.assert_allclose(logits, expected, atol=1e-4, err_msg=api)


def _reference_config(photos):
  from configs import default
  c = default.get_config()
  c.model, c.pretrained, c.image_size = "own_model_pkg.models:TinyNet", False, 16
  c.model_kwargs = {"width": 4}
  c.dataset, c.strategy.rules = f"folder:{photos}", ((".*", "all"),)
  c.train_split, c.eval_split = "train", "test"  # the folder's own splits
  c.batch_size, c.eval_batch_size, c.num_steps, c.warmup_steps = 8, 16, 2, 0
  c.eval_every = c.checkpoint_every = 2
  c.strategy.precise_batchnorm, c.log_every = 0, 1
  return c.to_dict()


@pytest.mark.parametrize("name, message", [
    ("no_such_pkg.models:Net", "cannot import 'no_such_pkg.models'.*PYTHONPATH"),
    ("own_model_pkg.models:Missing", "has no attribute 'Missing'"),
    ("own_model_pkg.models:jax", "is a module; expected a jtl.models.ModelSpec"),
    ("my_net", "Unknown model 'my_net'.*package.module:Name"),
])
def test_bad_model_references_say_what_to_do(name, message):
  with pytest.raises(ConfigError, match=f"(?s){message}"):
    models.get_spec(name)


def test_a_folder_without_a_config_json_is_named_as_such(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ConfigError, match="is a folder but not one in the Hugging Face Hub layout"):
    models.get_spec(str(tmp_path))


def test_spec_of_module_needs_num_classes_and_defaults_to_unit_pixels():
  import flax.linen as nn

  class NoClasses(nn.Module):
    def __call__(self, x):
      return x

  with pytest.raises(ConfigError, match="no `num_classes` field"):
    models.spec_of_module(NoClasses)
  from own_model_pkg.models import TinyNet

  class Plain(TinyNet):
    normalization = None

  spec = models.spec_of_module(Plain, name="plain")
  assert (spec.image_size, spec.normalization.preset, spec.default_num_classes) == (224, "unit", 3)
  assert spec.build(num_classes=5).num_classes == 5
  variables = jax.eval_shape(spec.build(num_classes=5).init, jax.random.PRNGKey(0),
                             spec.example_input(1))
  assert variables["params"]["head"]["kernel"].shape == (8, 5)


# --- An own NNX model: model="package.module:Name" (a class, or a factory) ---

@pytest.fixture(scope="module")
def nnx_run(photos, tmp_path_factory):
  """A 2-step run of model="own_model_pkg.models:TinyNnxNet" with its BatchNorm
  frozen by the rules (its statistics must stay as initialised)."""
  workdir = tmp_path_factory.mktemp("nnx_run")
  c = _reference_config(photos)
  c["model"] = "own_model_pkg.models:TinyNnxNet"
  c["strategy"]["rules"] = ((r"bn/.*", None), (".*", "all"))
  experiment.finetune(experiment.ml_collections.ConfigDict(c), workdir, progress=False)
  return workdir


@pytest.mark.slow  # a fine-tuning run (the next test checks the module without one)
def test_own_nnx_model_trains_restores_and_evaluates_as_the_nnx_module(nnx_run, photos):
  from flax import nnx
  from own_model_pkg.models import TinyNnxNet
  final = json.loads((nnx_run / "final_report.json").read_text())["eval"]
  run = workdirs.restore(nnx_run, step="latest")
  assert run.meta["model"] == "own_model_pkg.models:TinyNnxNet"
  # The NNX attribute paths; width=4 from model_kwargs; the frozen BatchNorm's statistics.
  assert jax.tree.map(np.shape, run.variables) == {
      "params": {"conv": {"kernel": (3, 3, 3, 4), "bias": (4,)}, "bn": {"scale": (4,), "bias": (4,)},
                 "head": {"kernel": (4, 3), "bias": (3,)}},
      "batch_stats": {"bn": {"mean": (4,), "var": (4,)}}}
  np.testing.assert_array_equal(run.variables["batch_stats"]["bn"]["var"], np.ones(4))
  assert (run.spec.image_size, run.spec.normalization.crop_fraction) == (16, 1.0)
  assert preflight.model_options(run.spec) == ["width"]
  result = evaluation.evaluate_workdir(nnx_run, step="latest")
  assert result["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
  # The restored module computes what the user's NNX module with these weights does.
  model = TinyNnxNet(3, 4, rngs=nnx.Rngs(0))
  nnx.update(model, nnx.State({**run.variables["params"], "bn": {
      **run.variables["params"]["bn"], **run.variables["batch_stats"]["bn"]}}))
  model.eval()
  x = np.random.default_rng(1).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(run.module.apply(run.variables, x, train=False)),
                             np.asarray(model(x)), atol=1e-5)


def test_nnx_linen_runs_the_nnx_module_its_batchnorm_modes_and_precise_statistics():
  from flax import nnx
  from own_model_pkg.models import TinyNnxNet
  import jtl
  from jtl import adapter
  module = models.get_spec("own_model_pkg.models:TinyNnxNet").build(num_classes=3, width=4)
  x = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), x, train=False)
  nnx_model = TinyNnxNet(3, 4, rngs=nnx.Rngs(0))
  nnx.update(nnx_model, nnx.State({**variables["params"], "bn": {
      **variables["params"]["bn"], **variables["batch_stats"]["bn"]}}))
  nnx_model.eval()
  np.testing.assert_allclose(module.apply(variables, x), nnx_model(x), atol=1e-6)
  # Training updates the statistics; a frozen BatchNorm (its params frozen) keeps them.
  _, trained = module.apply(variables, x, train=True, mutable=["batch_stats"])
  assert np.abs(trained["batch_stats"]["bn"]["mean"]).max() > 1e-3
  with adapter.frozen_batchnorm({"bn"}):
    y, kept = module.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(kept["batch_stats"]["bn"]["mean"], np.zeros(4))
  np.testing.assert_allclose(y, module.apply(variables, x), atol=1e-6)
  # Precise BatchNorm: the population moments of the conv's output on the batch.
  new = jtl.recompute_batchnorm(module, variables, [{"inputs": x}])
  params = variables["params"]["conv"]
  h = np.asarray(jax.lax.conv_general_dilated(
      x, params["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ) + np.asarray(params["bias"])
  np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], h.mean((0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["bn"]["var"], h.var((0, 1, 2)), rtol=1e-4)


def test_nnx_linen_passes_the_mode_flag_the_nnx_call_takes():
  from flax import nnx
  from jtl import adapter
  from jtl.models import own_nnx

  class FlagNet(nnx.Module):  # the common NNX style: the mode and key as call arguments
    def __init__(self, num_classes=3, *, rngs):
      self.body, self.bn = nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
      self.drop, self.head = nnx.Dropout(0.5), nnx.Linear(8, num_classes, rngs=rngs)

    def __call__(self, x, train: bool = False, deterministic: bool | None = None, rngs=None):
      h = self.bn(self.body(x), use_running_average=not train)
      return self.head(self.drop(h, deterministic=deterministic, rngs=rngs))

  module = own_nnx.spec_of_nnx(FlagNet, name="t:FlagNet").build(num_classes=3)
  x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32) + 2.0
  variables = module.init(jax.random.PRNGKey(0), x, train=False)
  run = lambda seed: module.apply(variables, x, train=True, mutable=["batch_stats"],  # noqa: E731
                                  rngs={"dropout": jax.random.PRNGKey(seed)})
  (y1, trained), (y2, _) = run(1), run(2)
  assert np.abs(trained["batch_stats"]["bn"]["mean"]).max() > 1e-3  # trained in train mode
  assert np.abs(y1 - y2).max() > 1e-3  # dropout on, with the key it was given
  np.testing.assert_array_equal(module.apply(variables, x), module.apply(variables, x))
  with adapter.frozen_batchnorm({"bn"}):
    _, kept = run(1)
  np.testing.assert_array_equal(kept["batch_stats"]["bn"]["mean"], np.zeros(8))


def test_own_nnx_factory_and_bad_nnx_references():
  spec = models.get_spec("own_model_pkg.models:tiny_nnx")
  assert spec.image_size == 16 and spec.default_num_classes == 3
  module = spec.build(num_classes=5, width=2)
  variables = jax.eval_shape(lambda r, x: module.init(r, x, train=False),
                             jax.random.PRNGKey(0), spec.example_input(1))
  assert variables["params"]["head"]["kernel"].shape == (2, 5)
  from own_model_pkg import models as pkg
  from jtl.models import own_nnx
  pkg.no_classes = lambda *, rngs: pkg.TinyNnxNet(rngs=rngs)
  with pytest.raises(ConfigError, match="takes no `num_classes`"):
    models.get_spec("own_model_pkg.models:no_classes")
  assert not own_nnx.is_nnx_model(lambda num_classes: None)


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_own_nnx_model_through_finetune_evaluate_convert(photos, tmp_path):
  workdir = tmp_path / "run"
  config = tmp_path / "nnx_config.py"
  config.write_text(
      "from configs import default\n\n"
      "def get_config(arg=None):\n"
      "  c = default.get_config()\n"
      "  c.model, c.pretrained, c.image_size = 'own_model_pkg.models:tiny_nnx', False, 16\n"
      "  c.strategy.rules = (('.*', 'all'),)\n"
      "  c.batch_size, c.eval_batch_size, c.num_steps, c.warmup_steps = 8, 16, 2, 0\n"
      "  c.eval_every = c.checkpoint_every = 2\n"
      "  c.train_split, c.eval_split = 'train', 'test'\n"
      "  return c\n")
  env_path = f"{PKG.parent}{os.pathsep}{ROOT}"
  run = lambda name, *args: run_script(name, *args, cwd=tmp_path, timeout=600,
                                      env={"PYTHONPATH": env_path})
  trained = run("finetune.py", "--config", config, "--workdir", workdir,
                f"--config.dataset=folder:{photos}")
  assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
  final = json.loads((workdir / "final_report.json").read_text())["eval"]
  evaluated = run("evaluate.py", "--workdir", workdir, "--step", "latest")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.loads((workdir / "eval_test.json").read_text())["accuracy"] == pytest.approx(
      final["accuracy"], abs=1e-6)
  converted = run("convert.py", "--workdir", workdir, "--format", "onnx", "--step", "latest")
  assert converted.returncode == 0, converted.stderr[-3000:]
  restored = workdirs.restore(workdir, step="latest")
  import onnxruntime as ort
  x = np.random.default_rng(1).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  session = ort.InferenceSession(str(workdir / "export" / "model.onnx"))
  got = session.run(None, {session.get_inputs()[0].name: x})[0]
  want = np.asarray(restored.module.apply(restored.variables, x, train=False))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_own_nnx_model_with_api_nnx_trains_as_its_linen_form():
  """api="nnx" on an own NNX model: the app's NNX form (`experiment.as_api`,
  ToNNX around the wrapper) keeps the wrapper's parameter paths, computes its
  outputs, and two train steps end with the Linen form's params and statistics."""
  import jtl
  module = models.get_spec("own_model_pkg.models:TinyNnxNet").build(num_classes=3, width=4)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(8, 16, 16, 3)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), x, train=False)
  config = experiment.ml_collections.ConfigDict({"api": "nnx", "seed": 0})
  model, nnx_variables = experiment.as_api(config, module, variables)
  assert jtl.tree.flatten(nnx_variables["params"]).keys() == jtl.tree.flatten(
      variables["params"]).keys()
  np.testing.assert_allclose(model(x, train=False), module.apply(variables, x), atol=1e-6)

  batches = [{"inputs": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32),
              "label": rng.integers(0, 3, 8).astype(np.int32)} for _ in range(2)]

  def train(m, v):
    labels = jtl.label_params(v["params"], ((".*", "all"),))
    tx = jtl.make_optimizer(labels, learning_rate=0.05)
    state = jtl.create_train_state(v, labels, tx)
    step = jax.jit(jtl.make_train_step(m, tx, labels=labels))
    for b in batches:
      state, _ = step(state, b)
    return jax.device_get(state)

  a, b = train(module, variables), train(model, nnx_variables)
  for path, value in jtl.tree.flatten(a.params).items():
    np.testing.assert_allclose(jtl.tree.flatten(b.params)[path], value, atol=1e-5, err_msg=path)
  np.testing.assert_allclose(b.model_state["state"]["bn"]["mean"],
                             a.model_state["batch_stats"]["bn"]["mean"], atol=1e-6)
  assert not np.allclose(a.params["head"]["kernel"], variables["params"]["head"]["kernel"])
