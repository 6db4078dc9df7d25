"""A user's own model (not in the zoo) through the scripts and back from a
workdir: a config file that registers it, or model="package.module:Name".
The scripts run as subprocesses: evaluate.py and convert.py start without
the registration, which the workdir must let them redo."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jtl import models
from jtl.app import evaluation, experiment, workdirs
from jtl.errors import ConfigError

ROOT = Path(__file__).parents[2]
PKG = Path(__file__).parents[1] / "own_model_pkg"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """train/<class>/ 8 images, test/<class>/ 4 images; each class its own colour."""
  root = tmp_path_factory.mktemp("own_photos")
  rng = np.random.default_rng(0)
  for split, n in (("train", 8), ("test", 4)):
    for c, name in enumerate(("red", "green", "blue")):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        x = rng.integers(0, 60, (20, 24, 3))
        x[..., c] += 180
        Image.fromarray(x.astype(np.uint8)).save(root / split / name / f"{i}.png")
  return root


def script(name, *args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                        capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


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
