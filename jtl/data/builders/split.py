"""The deterministic stratified train/test split shared by the local builders."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, *, test_per_class: int, seed: int
                     ) -> dict[str, np.ndarray]:
  """Per class, `test_per_class` random examples go to "test", the rest to
  "train"; the same seed always gives the same (sorted) indices."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test.append(idx[:test_per_class])
    train.append(idx[test_per_class:])
  return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def grey_examples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
  """(key, example) pairs of a TFDS builder's split: grey [H, W] images as
  RGB (the channel repeated) with their integer labels, keyed by index."""
  for i in indices:
    yield int(i), {"image": np.repeat(images[i][..., None], 3, axis=-1),
                   "label": int(labels[i])}
