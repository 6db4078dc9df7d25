"""Slices of an image folder's split take every class: configs/default.py's
validation split (train[90%:]) of a folder, whose files are listed class by
class, held the last class only."""

import numpy as np
from app_helpers import load_config

import support_matrix as sm
from jtl.data import sources, splits


def _default_config():
  return load_config("default")


def test_default_configs_validation_split_of_a_folder_holds_every_class(tmp_path):
  root = sm.make_image_folder(tmp_path / "photos", classes=3, train=8, test=1)
  src = sources.resolve_source(f"folder:{root}")
  config = _default_config()
  name, val = src.indices(config.eval_split)
  _, train = src.indices(config.train_split)
  labels = src.labels[name]
  assert np.bincount(labels[val], minlength=3).tolist() == [1, 1, 1]
  assert np.bincount(labels[train], minlength=3).tolist() == [7, 7, 7]
  assert not set(val) & set(train) and len(val) + len(train) == 24
  assert sources.split_size(src, config.eval_split) == 3
  # Seeded: the same files every time; a count slice interleaves the classes.
  np.testing.assert_array_equal(src.indices(config.eval_split)[1], val)
  assert np.bincount(labels[src.indices("train[:6]")[1]]).tolist() == [2, 2, 2]
  assert np.bincount(labels[src.indices("train[6:]")[1]]).tolist() == [6, 6, 6]


SPECS = ["train", "train[:90%]", "train[90%:]", "train[:33.5%]", "train[-12.5%:]", "train[10:20]",
         "train[-10:]", "train[:-100%]", "train[:1000]"]
BAD = {"train[:200%]": "percent bounds lie in", "train[10:50%]": "both bounds in percent",
       "train[:1001]": "past the split's 1000 examples", "train[1.5:]": "whole number"}


def test_slices_take_what_tfds_takes_and_its_refusals_are_data_errors():
  import types

  import pytest
  from tensorflow_datasets.core import splits as tfds_splits

  from jtl.errors import DataError
  infos = {"train": types.SimpleNamespace(num_examples=1000)}
  for spec in SPECS:  # the same examples as TFDS's own reading of the split
    tfds = tfds_splits._rel_to_abs_instr(tfds_splits._str_to_relative_instruction(spec), infos)
    _, ours = splits.slice_split(spec, {"train": 1000})
    assert range(1000)[ours] == range(1000)[slice(tfds.from_, tfds.to)], spec
  for spec, match in BAD.items():
    with pytest.raises(DataError, match=match):
      splits.slice_split(spec, {"train": 1000})
