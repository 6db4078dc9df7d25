"""`jtl_digits`: scikit-learn's 1,797 8x8 handwritten digits as 28x28 images.

A real domain shift from MNIST (`jtl_mnist5k`): other writers, scanned at 8x8
with 17 grey levels, then upsampled (bilinear) to MNIST's 28x28 and served as
uint8 RGB. The data is sklearn's `datasets/data/digits.csv.gz`, read by path
(no network, no sklearn import). Stratified fixed split: 80 test images per
digit (800), the remaining 997 in "train" (the unlabelled adaptation pool).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jtl.data.builders.mnist5k import JtlMnist5k
from jtl.data.builders.split import stratified_split
from jtl.data.text import package_file

_SPLIT_SEED = 20240502
_TEST_PER_CLASS = 80


def csv_path() -> Path:
  """Path of scikit-learn's digits.csv.gz."""
  return package_file("sklearn", "datasets", "data", "digits.csv.gz",
                      install="pip install scikit-learn")


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [1797, 28, 28], labels int64 [1797]) in file order."""
  with gzip.open(csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",")
  small = (table[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.float32)
  images = np.stack([np.asarray(Image.fromarray(im, mode="F").resize((28, 28), Image.BILINEAR))
                     for im in small])
  return np.clip(np.round(images), 0, 255).astype(np.uint8), table[:, 64].astype(np.int64)


class JtlDigits(JtlMnist5k):
  """sklearn's 8x8 digits upsampled to 28x28; 997 train / 800 test, stratified.

  Same features and example encoding as `jtl_mnist5k` (28x28x3 uint8, ten
  classes); only the data and the split differ.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset"

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # ships with scikit-learn
    images, labels = load_arrays()
    splits = stratified_split(labels, test_per_class=_TEST_PER_CLASS, seed=_SPLIT_SEED)
    return {name: self._generate_examples(images, labels, idx) for name, idx in splits.items()}
