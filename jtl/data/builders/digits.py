"""`jtl_digits`: scikit-learn's 1,797 8x8 handwritten digits as 28x28 images.

A real domain shift from MNIST (`jtl_mnist5k`): other writers, scanned at 8x8
with 17 grey levels. Each digit is laid out as MNIST lays out its own
(`mnist_layout`: bilinear 8x8 -> 20x20 box, placed in 28x28 and shifted so
its centre of mass is the frame's centre; no labels used) and served as uint8
RGB (0..16 -> 0..255). Filling the whole frame instead (version 1.0.0) made
the digits 40% taller than any MNIST digit, and a model trained on MNIST was
near chance on them (BENCHMARKS.md, "Domain adaptation"). The data is
sklearn's `datasets/data/digits.csv.gz`, read by path (no network, no sklearn
import). Stratified fixed split: 80 test images per digit (800), the
remaining 997 in "train" (the unlabelled adaptation pool).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jtl import _optional
from jtl.data.builders.mnist5k import JtlMnist5k
from jtl.data.builders.split import stratified_split
from jtl.data.text import package_file

tfds = _optional.require("tensorflow_datasets", "jtl's TFDS datasets")

_SPLIT_SEED = 20240502
_TEST_PER_CLASS = 80


def csv_path() -> Path:
  """Path of scikit-learn's digits.csv.gz."""
  return package_file("sklearn", "datasets", "data", "digits.csv.gz",
                      install="pip install scikit-learn")


def mnist_layout(small: np.ndarray) -> np.ndarray:
  """[N, 8, 8] in 0..1 -> [N, 28, 28] float32: a 20x20 digit centred by mass (as MNIST).

  MNIST size-normalises each digit into a 20x20 box and centres its centre of
  mass in the 28x28 frame; this does the same to 8x8 digits, without labels.
  """
  box = np.asarray(jax.image.resize(jnp.asarray(small, jnp.float32), (len(small), 20, 20),
                                    "bilinear"))
  box = np.clip(box, 0.0, 1.0)
  out = np.zeros((len(small), 28, 28), np.float32)
  out[:, 4:24, 4:24] = box
  grid = np.arange(28, dtype=np.float32)
  for i, im in enumerate(out):
    mass = im.sum()
    if mass <= 0:  # a blank image: nothing to centre
      continue
    cy, cx = (im.sum(1) @ grid) / mass, (im.sum(0) @ grid) / mass
    # At most 4 px each way, so the 20x20 box stays in the frame and np.roll
    # never wraps ink around (sklearn's digits need at most 3).
    dy, dx = (int(np.clip(round(13.5 - c), -4, 4)) for c in (cy, cx))
    out[i] = np.roll(im, (dy, dx), axis=(0, 1))
  return out


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [1797, 28, 28] in `mnist_layout`, labels int64 [1797]) in file order."""
  with gzip.open(csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",")
  small = table[:, :64].reshape(-1, 8, 8).astype(np.float32) / 16.0  # 0..16 -> 0..1
  images = mnist_layout(small) * 255.0
  return np.clip(np.round(images), 0, 255).astype(np.uint8), table[:, 64].astype(np.int64)


class JtlDigits(JtlMnist5k):
  """sklearn's 8x8 digits in MNIST's layout (28x28); 997 train / 800 test, stratified.

  Same features and example encoding as `jtl_mnist5k` (28x28x3 uint8, ten
  classes); only the data and the split differ.
  """

  # A new version is a new directory under data_dir: a 1.0.0 build (digits
  # filling the frame) already prepared there is not reused.
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "First release (digits upsampled to fill the 28x28 frame).",
                   "2.0.0": "MNIST's layout: 20x20 box, centred by mass (`mnist_layout`)."}
  HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset"

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # ships with scikit-learn
    images, labels = load_arrays()
    splits = stratified_split(labels, test_per_class=_TEST_PER_CLASS, seed=_SPLIT_SEED)
    return {name: self._generate_examples(images, labels, idx) for name, idx in splits.items()}
