"""scripts/evaluate.py on a finished run: the data it is evaluated on (moved,
or other data), the step it evaluates when the asked one is damaged, and the
files each evaluation writes. One tiny small_cnn run (4 steps, checkpoints 2
and 4) shared by the module; each test works on its own copy."""

import json
import shutil

import pytest
from app_helpers import colour_photos

from configs import small_cnn
from jtl.app import evaluation, experiment, workdirs
from jtl.checkpoint.layout import select_step
from jtl.errors import DataError

CLASSES = ("cat", "dog", "ship")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(workdir, photos): a finished 4-step run on a 3-class photo folder."""
  root = tmp_path_factory.mktemp("run")
  photos = colour_photos(root / "photos", CLASSES, {"train": 4, "test": 2})
  c = small_cnn.get_config()
  c.dataset, c.train_split, c.eval_split = f"folder:{photos}", "train", "test"
  c.batch_size, c.eval_batch_size, c.num_steps = 8, 8, 4
  c.warmup_steps, c.eval_every, c.checkpoint_every, c.keep = 0, 2, 2, 2
  c.test_split = None
  experiment.finetune(c, root / "run", progress=False)
  return root / "run", photos


@pytest.fixture
def run(finished, tmp_path):
  """A copy of the finished run (never the shared one changed)."""
  workdir, photos = finished
  return shutil.copytree(workdir, tmp_path / "run"), photos


def test_other_classes_are_refused_before_scoring_and_nothing_is_written(run, tmp_path):
  workdir, _ = run
  other = colour_photos(tmp_path / "uni", ("chat noir é", "ship", "犬"), {"test": 2})
  before = sorted(p.name for p in workdir.iterdir())
  with pytest.raises(DataError) as e:
    evaluation.evaluate_workdir(workdir, split="test", data={"dataset": f"folder:{other}"})
  assert "missing (the run's, not in this dataset): cat, dog" in str(e.value)
  assert "extra (in this dataset, not the run's): chat noir é, 犬" in str(e.value)
  assert sorted(p.name for p in workdir.iterdir()) == before
  fewer = colour_photos(tmp_path / "fewer", ("cat", "dog"), {"test": 2})
  with pytest.raises(DataError, match="missing .*: ship"):
    evaluation.evaluate_workdir(workdir, split="test", data={"dataset": f"folder:{fewer}"})


def test_reordered_classes_are_refused():
  from jtl.app.evaluation import _class_differences  # pylint: disable=protected-access
  assert _class_differences(["b", "a"], ["a", "b"], 2) == [
      "reordered: the run's order is b, a; this dataset's a, b"]
  assert _class_differences(None, ["a", "b", "c"], 2) == [
      "the dataset has 3 classes, the run's head 2"]
  assert _class_differences(["a", "b"], ["a", "b"], 2) == []


def test_a_dataset_without_class_names_is_compared_by_count():
  """Audit: CIFAR-10 -> TFDS's cifar10_1 (a ClassLabel without names: "0".."9")
  was refused as 'other classes'."""
  from jtl.app.evaluation import _class_differences  # pylint: disable=protected-access
  named = ["airplane", "automobile", "bird"]
  assert _class_differences(named, ["0", "1", "2"], 3) == []
  assert _class_differences(["0", "1", "2"], named, 3) == []
  assert _class_differences(named, ["0", "1"], 3) == [
      "missing (the run's, not in this dataset): airplane, automobile, bird",
      "extra (in this dataset, not the run's): 0, 1"]
  assert _class_differences(named, ["0", "2", "1"], 3) != []  # folders named by numbers
  assert _class_differences(["0", "1", "2"], ["0", "2", "5"], 3) == [  # digit folders
      "missing (the run's, not in this dataset): 1", "extra (in this dataset, not the run's): 5"]


def test_moved_data_gets_its_own_files_and_a_missing_folder_names_the_flag(run, tmp_path):
  workdir, photos = run
  own = evaluation.evaluate_workdir(workdir, split="test")
  assert own["results_file"] == str(workdir / "eval_test.json")
  kept = (workdir / "eval_test.json").read_text()
  moved = shutil.copytree(photos, tmp_path / "mnt" / "photos_now")
  result = evaluation.evaluate_workdir(workdir, split="test",
                                       data={"dataset": f"folder:{moved}"})
  assert result["results_file"] == str(workdir / "eval_test_on_photos_now.json")
  assert (workdir / "confusion_test_on_photos_now.png").exists()
  assert (workdir / "eval_test.json").read_text() == kept  # the run's own, untouched
  assert result["accuracy"] == own["accuracy"]
  # The same path as the run's: its own evaluation, its own name.
  same = evaluation.evaluate_workdir(workdir, split="test", data={"dataset": f"folder:{photos}"})
  assert same["results_file"] == str(workdir / "eval_test.json")
  for meta in workdir.glob("checkpoints/*/meta/metadata"):  # the run's data moved away
    saved = json.loads(meta.read_text())
    saved["config"]["dataset"] = f"folder:{tmp_path / 'gone'}"
    meta.write_text(json.dumps(saved))
  with pytest.raises(DataError, match=r"does not exist(.|\n)*If it has moved, pass where it is "
                                      r"now: scripts/evaluate.py --dataset=folder:"):
    evaluation.evaluate_workdir(workdir, split="test")


def test_the_runs_own_folder_spelled_otherwise_is_its_own_data(run, tmp_path, monkeypatch):
  """Audit: --dataset naming the run's folder with a trailing slash, through a
  symlink or relative to the current directory was taken for other data
  (eval_test_on_photos.json / eval_test_on_link.json, not eval_test.json)."""
  workdir, photos = run
  (tmp_path / "link").symlink_to(photos)
  monkeypatch.chdir(photos.parent)
  recorded = f"folder:{photos}"
  for given in (f"folder:{photos}/", f"folder:{tmp_path / 'link'}", f"folder:{photos.name}",
                f"folder:{photos.parent}/./{photos.name}"):
    assert workdirs.same_data("dataset", given, recorded), given
  assert not workdirs.same_data("dataset", f"folder:{tmp_path}", recorded)
  assert not workdirs.same_data("dataset", "cifar10", recorded)
  result = evaluation.evaluate_workdir(workdir, split="test",
                                       data={"dataset": f"folder:{tmp_path / 'link'}"})
  assert result["results_file"] == str(workdir / "eval_test.json")


def test_a_damaged_best_is_evaluated_as_the_step_read_and_recorded(run):
  workdir, _ = run
  best = select_step(workdir / "checkpoints", "best", metric="accuracy")
  other = ({2, 4} - {best}).pop()
  metadata = workdir / "checkpoints" / str(best) / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:100])  # truncate -s 100
  result = evaluation.evaluate_workdir(workdir, split="test")  # the run's result: "best"
  assert (result["step"], result["requested_step"], result["skipped_damaged"]) == (
      other, "best", [best])
  # Not the run's own result (its best): named by the step read.
  assert result["results_file"] == str(workdir / f"eval_test_step{other}.json")
  assert not (workdir / "eval_test.json").exists()
  saved = json.loads((workdir / f"eval_test_step{other}.json").read_text())
  assert saved["skipped_damaged"] == [best] and saved["requested_step"] == "best"


def test_an_export_of_a_damaged_best_records_the_step_in_its_sidecar(run, tmp_path):
  pytest.importorskip("jax2onnx")
  from jtl.app import deploy_runs
  from jtl.export import deploy
  workdir, _ = run
  best = select_step(workdir / "checkpoints", "best", metric="accuracy")
  metadata = workdir / "checkpoints" / str(best) / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:100])
  exported = deploy_runs.export_workdir(workdir, "onnx", out=tmp_path / "m.onnx")
  sidecar = deploy.read_meta(exported.path)
  assert (sidecar["step"], sidecar["requested_step"], sidecar["skipped_damaged"]) == (
      ({2, 4} - {best}).pop(), "best", [best])
