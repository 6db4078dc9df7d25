"""`jtl_lfw_subset`: scikit-image's 100 faces and 100 non-faces, as TFDS.

The data is `skimage/data/lfw_subset.npy` (200 gray 25x25 crops from LFW; the
first 100 are faces, the other 100 background patches), read by path, so
building needs no network. Labels: 0 = "non_face", 1 = "face". The split is
fixed and stratified: per class, a seeded permutation puts 20 crops in "test"
and 80 in "train". Images are served as 25x25x3 uint8.
"""

from __future__ import annotations

import numpy as np

from jtl import _optional
from jtl.data.builders.split import grey_examples, stratified_split
from jtl.data.text import package_file

tfds = _optional.require("tensorflow_datasets", "jtl's TFDS datasets")

_SPLIT_SEED = 20240502
_TEST_PER_CLASS = 20
CLASS_NAMES = ("non_face", "face")


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [200, 25, 25], labels int64 [200]) in file order."""
  path = package_file("skimage", "data", "lfw_subset.npy",
                      install="pip install scikit-image")
  gray = np.load(path)  # float64 in [0, 1]
  images = np.round(gray * 255).astype(np.uint8)
  labels = np.array([1] * 100 + [0] * 100, np.int64)
  return images, labels


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Deterministic stratified split: per class, 20 test and the rest train."""
  return stratified_split(labels, test_per_class=_TEST_PER_CLASS, seed=_SPLIT_SEED)


class JtlLfwSubset(tfds.core.GeneratorBasedBuilder):
  """100 LFW faces and 100 non-faces from scikit-image; 160 train / 40 test."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(25, 25, 3)),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data.lfw_subset",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-image; nothing is downloaded.
    images, labels = load_arrays()
    return {name: self._generate_examples(images, labels, idx)
            for name, idx in split_indices(labels).items()}

  def _generate_examples(self, images, labels, indices):
    return grey_examples(images, labels, indices)
