"""What preflight refuses before any training step (an audit of
scripts/finetune.py found each of these accepted, or refused only after
training steps had run): eval_batch_size, a best_metric the evaluation will
not report, an empty folder path, a workdir inside the dataset folder, an
eval_dataset with other classes, a data_dir jtl cannot write; and the
messages that say how to set a method's options."""

import logging

import pytest
from app_helpers import colour_photos, load_config

from jtl.app import methods, preflight
from jtl.data import sources
from jtl.errors import ConfigError, DataError
from jtl.recipes import strategies


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """train/ and test/ of cat, dog, ship: 1 tiny photo each."""
  return colour_photos(tmp_path_factory.mktemp("photos"), ("cat", "dog", "ship"),
                       {"train": 1, "test": 1}, size=(8, 8))


def small(photos, **values):
  config = load_config("small_cnn")
  config.dataset = f"folder:{photos}"
  config.train_split, config.eval_split, config.test_split = "train", "test", None
  config.num_steps, config.batch_size, config.warmup_steps = 4, 8, 0
  for key, value in values.items():
    config[key] = value
  return config


def refused(config, workdir=None):
  with pytest.raises(ConfigError, match="Invalid config") as e:
    preflight.preflight(config, workdir=workdir)
  return str(e.value)


def test_eval_batch_size_is_checked_before_training(photos):
  message = refused(small(photos, eval_batch_size=-5))
  assert "eval_batch_size must be an integer >= 1" in message and "got -5" in message
  assert "or None or 0 (batch_size)" in message
  for size in (None, 0, 3):
    preflight.preflight(small(photos, eval_batch_size=size))


def test_top5_best_metric_needs_more_than_five_classes(photos):
  message = refused(small(photos, best_metric="top5_accuracy"))
  assert ("best_metric='top5_accuracy' is reported only for more than 5 classes, and this run "
          "has 3") in message and "set best_metric='accuracy'" in message
  preflight.preflight(small(photos, best_metric="top5_accuracy", num_classes=10))


def test_an_empty_folder_path_is_refused(photos):
  message = refused(small(photos, dataset="folder:"))
  assert "the folder path of 'folder:' is empty (an unset shell variable?)" in message
  with pytest.raises(DataError, match="is empty"):
    sources.resolve_source("folder: ")


def test_a_workdir_inside_the_dataset_folder_is_refused_before_anything_is_written(photos,
                                                                                     tmp_path):
  before = sorted(p.name for p in photos.rglob("*"))
  for workdir in (photos, photos / "train" / "run"):
    message = refused(small(photos), workdir=workdir)
    assert f"the workdir is inside the dataset folder: workdir {workdir} is in dataset=" in message
  message = refused(small(photos, eval_dataset=f"folder:{photos}"), workdir=photos / "run")
  assert message.count("the workdir is inside") == 1
  assert sorted(p.name for p in photos.rglob("*")) == before
  # The reverse, a dataset inside the workdir, is fine.
  inside = colour_photos(tmp_path / "run" / "data", ("cat", "dog"), {"train": 1, "test": 1},
                         size=(8, 8))
  preflight.preflight(small(inside), workdir=tmp_path / "run")
  # Nor is a hidden folder of the dataset, which the scan skips (audit).
  preflight.preflight(small(photos), workdir=photos / ".runs" / "a")
  preflight.preflight(small(photos), workdir=photos / "train" / ".run")
  # But not one that would first create a visible folder: photos/runs would be a class.
  message = refused(small(photos), workdir=photos / "runs" / ".a")
  assert "the workdir is inside the dataset folder" in message


def test_an_eval_dataset_with_other_classes_is_refused(photos, tmp_path):
  other = colour_photos(tmp_path / "other", ("chat noir é", "ship", "犬"), {"test": 1},
                        size=(8, 8))
  message = refused(small(photos, eval_dataset=f"folder:{other}"))
  assert (f"eval_dataset 'folder:{other}' has other classes than dataset 'folder:{photos}' "
          "(only in dataset: ['cat', 'dog']; only in eval_dataset: ['chat noir é', '犬'])"
          ) in message
  same = colour_photos(tmp_path / "same", ("cat", "dog", "ship"), {"test": 1}, size=(8, 8))
  preflight.preflight(small(photos, eval_dataset=f"folder:{same}"))


def test_a_data_dir_jtl_cannot_write_is_a_data_error(tmp_path):
  (tmp_path / "file").write_text("x")
  data_dir = tmp_path / "file" / "tfds"  # an OSError however privileged the user
  with pytest.raises(DataError, match="Cannot build the local dataset 'jtl_digits' in data_dir "
                     f"'{data_dir}'.*Pass a data_dir you can write"):
    sources.resolve_source("jtl_digits", str(data_dir))


def test_messages_say_how_to_set_what_the_command_line_cannot_reach(photos, caplog):
  config = small(photos)
  config.method = {"name": "distill"}
  with pytest.raises(ConfigError, match=r"""--config.method="\{'name': 'distill', """
                     r"""'teacher_workdir': '...'\}\""""):
    methods.resolve_options(config)
  with pytest.raises(ConfigError, match=r"seed \(in a run config: its `seed` key\)"):
    strategies.resolve_options({"name": "lora", "rnak": 2})
  with caplog.at_level(logging.WARNING):
    preflight.preflight(small(photos, warmup_steps=4))
  assert "warmup_steps=4 >= num_steps=4" in caplog.text
