"""configs/folder.py: the one-command job for a user's image folder (epochs,
a per-file validation split, LP-FT with a cached probe phase, the best
checkpoint evaluated on the folder's test split). A tiny folder, a few steps."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from app_helpers import colour_photos, load_config
from PIL import Image

from jtl.app import evaluation, experiment, preflight, preflight_data
from jtl.data import sources
from jtl.errors import ConfigError, DataError

CLASSES = ("cat", "dog", "ship")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """train/<class>/ 12 images, test/<class>/ 3 images; each class its own colour."""
  return colour_photos(tmp_path_factory.mktemp("photos"), CLASSES, {"train": 12, "test": 3},
                       name="{i:03d}.png")


def small(config, photos):
  config.dataset = f"folder:{photos}"
  config.model, config.pretrained, config.image_size = "small_cnn", False, 32
  config.batch_size, config.eval_batch_size, config.num_epochs = 8, 16, 2
  config.strategy.probe_steps = 10
  config.log_every = 1
  return config


def test_folder_config_epochs_validation_split_lp_ft_and_test_eval(photos, tmp_path, capsys):
  config = small(load_config("folder"), photos)
  config.strategy.probe_steps, config.strategy.probe_learning_rate = 200, 3e-2
  resolved = experiment.resolve_schedule(config)
  # 36 training images, 2 held out for validation (by their paths' hashes): 34 // 8 = 4
  # steps per epoch.
  assert sources.split_size(config.dataset, config.train_split) == 34
  assert sources.split_size(config.dataset, config.eval_split) == 2
  assert (resolved.num_steps, resolved.eval_every, resolved.checkpoint_every) == (8, 4, 4)
  workdir = tmp_path / "run"
  # A kill during a first save leaves Orbax's temporary folder: no checkpoint,
  # so the probe phase runs (issue 26, item 3.5).
  unfinished = workdir / "checkpoints" / "4.orbax-checkpoint-tmp"
  (unfinished / "state").mkdir(parents=True)
  (unfinished / "state" / "_METADATA").write_text('{"tree_metadata": {"para')
  result = experiment.finetune(config, workdir, progress=False)
  out = capsys.readouterr().out
  assert "resuming" not in out and not unfinished.exists()
  assert "LP-FT probe phase on cached features: 34 examples" in out  # train[-val10%] only
  assert "200 head steps at learning rate 0.03" in out and "for 8 steps" in out
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "eval"] == [4, 8]  # every epoch
  assert all(r["count"] == 2 for r in rows if r["split"] == "eval")  # on the validation split
  assert result.eval_metrics["count"] == 2
  report = json.loads((workdir / "final_report.json").read_text())
  assert report["num_steps"] == 8
  # The fine-tuning phase: everything but BatchNorm (frozen by default for lp_ft).
  bn = sum(v.size for k, v in jax.tree_util.tree_leaves_with_path(
      result.state.variables["params"]) if "bn" in jax.tree_util.keystr(k))
  assert bn > 0 and report["trainable_params"] == report["total_params"] - bn
  test = evaluation.evaluate_test_split(config, workdir)
  assert test["split"] == "test" and test["count"] == 9
  assert set(test["per_class_accuracy_by_name"]) == set(CLASSES)
  assert (workdir / "eval_test.json").exists() and (workdir / "confusion_test.png").exists()
  _wise_ft_checks(workdir, result)


def _wise_ft_checks(workdir, result):
  """WiSE-FT on the LP-FT run: alpha 1 is the fine-tuned model, 0 the saved probe."""
  import jtl
  from jtl.app import workdirs
  probe = workdirs.load_probe(workdir)
  wise = evaluation.wise_workdir(workdir, alphas=(0.0, 0.5, 1.0), test_split="test")
  rows = {r["alpha"]: r for r in wise["rows"]}
  assert set(rows) == {0.0, 0.5, 1.0}
  assert wise["alpha"] == max(rows, key=lambda a: (rows[a]["accuracy"], a))
  assert rows[1.0]["loss"] == pytest.approx(evaluation.evaluate_workdir(workdir, step="best")[
      "loss"], rel=1e-5)  # the validation split, the best checkpoint
  run = workdirs.restore(workdir, step="best")
  validation = experiment.eval_batches(run.config, run.spec)
  probe_eval = jtl.train.evaluate(jax.jit(jtl.eval_steps.make_eval_step(run.module)), probe,
                                  validation())
  assert rows[0.0]["loss"] == pytest.approx(probe_eval["loss"], rel=1e-5)
  assert rows[0.0]["loss"] != pytest.approx(rows[1.0]["loss"], rel=1e-3)
  saved = jtl.weights.read(workdir / "export" / "wise.safetensors")
  assert len(saved) == len(jax.tree.leaves(probe)) and wise["test"]["wise"]["count"] == 9
  assert json.loads((workdir / "wise.json").read_text())["alpha"] == wise["alpha"]
  # The data elsewhere (evaluate.py --wise ignored --dataset): the same rows from there.
  moved = shutil.copytree(run.config.dataset[len("folder:"):], workdir.parent / "moved")
  again = evaluation.wise_workdir(workdir, alphas=(0.0, 0.5, 1.0),
                                  data={"dataset": f"folder:{moved}"})
  assert again["rows"] == wise["rows"]


def test_full_with_statistics_training_recomputes_them_before_eval_and_save(photos, tmp_path):
  import ml_collections

  import jtl
  config = small(load_config("folder"), photos)
  config.strategy = ml_collections.ConfigDict({"name": "full", "freeze_batchnorm": False})
  config.num_epochs = 1
  result = experiment.finetune(config, tmp_path / "run", progress=False)
  saved, _ = jtl.restore_variables(tmp_path / "run")
  created = experiment.build_model(config)
  module = created.module
  train = experiment.eval_batches(config, created.spec, config.train_split, config.dataset)
  # Precise BatchNorm (on by default when statistics train): the saved
  # statistics are the population moments of the unaugmented training split
  # under the saved params, not moving averages.
  expected = jtl.recompute_batchnorm(module, {**saved}, train())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               saved["batch_stats"], expected["batch_stats"])
  assert result.eval_metrics["count"] == 2
  config.strategy.precise_batchnorm = 0  # off: the moving averages differ
  experiment.finetune(config, tmp_path / "plain", progress=False)
  plain, _ = jtl.restore_variables(tmp_path / "plain")
  assert not np.allclose(plain["batch_stats"]["stage0_bn"]["mean"],
                         jtl.recompute_batchnorm(module, plain, train())["batch_stats"][
                             "stage0_bn"]["mean"], atol=1e-3)


def test_empty_dataset_and_holdout_of_tfds_are_clear_errors(tmp_path):
  config = load_config("folder")
  with pytest.raises(ConfigError, match=r"--config.dataset=folder:/path"):
    preflight.validate(config)
  config.dataset = f"folder:{tmp_path / 'missing'}"
  with pytest.raises(ConfigError, match="missing"):
    preflight.preflight(config)


def test_lp_ft_cache_with_a_method_is_refused():
  config = load_config("folder")
  config.dataset = "folder:/x"
  config.strategy.cache_features = True
  config.method.name = "distill"
  problems = preflight.config_problems(config)
  assert any("lp_ft" in p and "cache_features=False" in p for p in problems), problems


def test_holdout_split_is_per_class_disjoint_and_fixed():
  labels = np.repeat(np.arange(4), [500, 200, 9, 1])
  src = sources.resolve_source({"train": {"image": np.zeros((710, 2, 2, 3), np.uint8),
                                          "label": labels}})
  _, val = src.indices("train[val10%]")
  _, rest = src.indices("train[-val10%]")
  # About 10% of each class (each example decides by its key's hash); a lone example trains.
  assert np.bincount(labels[val], minlength=4).tolist() == [41, 14, 1, 0]
  assert not set(val) & set(rest) and len(val) + len(rest) == 710
  assert np.array_equal(src.indices("train[val10%]")[1], val)
  with pytest.raises(DataError, match="Unknown split 'tran\\[val10%\\]'"):
    src.indices("tran[val10%]")
  with pytest.raises(DataError, match="1..99%"):
    src.indices("train[val0%]")


def test_adding_a_photo_moves_no_other_photo_between_validation_and_training(tmp_path):
  """Issue 26: one added photo reshuffled the validation split (8 of 30
  validation images had been trained on before the resume)."""
  rng = np.random.default_rng(0)
  for c in ("cat", "dog"):
    (tmp_path / c).mkdir()
    for i in range(40):
      Image.fromarray(rng.integers(0, 255, (4, 4, 3), np.uint8)).save(tmp_path / c / f"{i}.png")

  def split_of_each_file():
    src = sources.resolve_source(tmp_path)
    files = src.inputs["train"]
    return {files[i]: "val" for i in src.indices("train[val10%]")[1]} | {
        files[i]: "train" for i in src.indices("train[-val10%]")[1]}

  before = split_of_each_file()
  assert list(before.values()).count("val") == 13 and len(before) == 80
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "cat" / "00_new.png")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "dog" / "new.png")
  after = split_of_each_file()
  assert len(after) == 82 and {f: after[f] for f in before} == before
  # The split follows the file, not the folder it was copied to.
  shutil.copytree(tmp_path, tmp_path.parent / "copy")
  moved = sources.resolve_source(tmp_path.parent / "copy")
  names = ["/".join(Path(f).parts[-2:]) for f in moved.inputs["train"]]
  held = {names[i] for i in moved.indices("train[val10%]")[1]}
  assert held == {"/".join(Path(f).parts[-2:]) for f, s in after.items() if s == "val"}


def test_lp_ft_phases_without_cache_take_their_own_learning_rates():
  import jax
  import jax.numpy as jnp

  from jtl import models, partition
  config = load_config("folder")
  config.dataset, config.model, config.pretrained = "folder:/x", "small_cnn", False
  config.strategy.cache_features = False
  config.strategy.probe_steps, config.strategy.probe_learning_rate = 5, 0.05
  config.learning_rate, config.warmup_steps, config.schedule = 1e-4, 0, "constant"
  config.num_steps, config.weight_decay, config.clip_norm = 20, 0.0, None
  created = models.create("small_cnn", num_classes=3, pretrained=False)
  _, variables, phases = experiment.build_training(config, created)
  assert [start for start, _, _ in phases] == [0, 5]
  for (_, labels, tx), lr in zip(phases, (0.05, 1e-4)):
    trainable, _ = partition.split(variables["params"], labels)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    step = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates))
    assert step == pytest.approx(lr, rel=1e-3)  # Adam's first step: the learning rate


def test_a_moved_dataset_resumes_and_another_runs_workdir_is_refused(photos, tmp_path, capsys):
  """A VM that comes back with the data elsewhere resumes (and evaluates) its
  run; a config of another run is refused before anything loads; a finished
  run started again keeps its rows and its report."""
  here = shutil.copytree(photos, tmp_path / "here")
  config = small(load_config("folder"), here)
  config.num_epochs = 1
  workdir = tmp_path / "run"
  experiment.finetune(config, workdir, progress=False)
  rows = (workdir / "metrics.jsonl").read_text()
  report = (workdir / "final_report.json").read_text()
  moved = here.rename(tmp_path / "there")
  config.dataset = f"folder:{moved}"
  experiment.finetune(config, workdir, progress=False)
  assert "holds a finished run" in capsys.readouterr().out
  assert (workdir / "metrics.jsonl").read_text() == rows  # no second evaluation row
  assert (workdir / "final_report.json").read_text() == report
  # scripts/finetune.py's test evaluation: the best checkpoint, the data where it is now.
  assert evaluation.evaluate_test_split(config, workdir)["count"] == 9
  # evaluate.py --dataset: where the data is now (the checkpoints say where it was).
  with pytest.raises(DataError, match="here"):
    evaluation.evaluate_workdir(workdir, split="test", step="best")
  result = evaluation.evaluate_workdir(workdir, split="test", step="best",
                                       data={"dataset": config.dataset})
  assert result["count"] == 9
  other = small(load_config("folder"), moved)
  other.strategy.name, other.strategy.probe_steps = "full", None
  with pytest.raises(ConfigError, match=r"another run(.|\n)*strategy: the workdir's run has "
                                        r"'lp_ft', this config 'full'"):
    experiment.finetune(other, workdir, progress=False)
  cars = colour_photos(tmp_path / "cars", ("cat", "dog", "car"), {"train": 4})
  other = small(load_config("folder"), cars)
  with pytest.raises(ConfigError, match=r"dataset classes: the workdir's run has 3 \(cat, dog, "
                                        r"ship\.\.\.\), this config's dataset 3 \(car, cat"):
    experiment.finetune(other, workdir, progress=False)


def test_a_test_split_the_dataset_lacks_is_found_before_training(photos):
  config = small(load_config("folder"), photos)
  config.test_split = "tset"
  problems, _ = preflight_data.data_problems(config)
  assert any("test_split='tset'" in p for p in problems)
  config.test_split = "test"  # the folder config's own: optional for a folder without test/
  assert not preflight_data.data_problems(config)[0]
