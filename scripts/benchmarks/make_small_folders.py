"""Writes two small real datasets as image folders (train/<class>/*.png, test/<class>/*.png)
for scripts/benchmarks/benchmark_strategies.py.

  digits: scikit-learn's 1,797 8x8 handwritten digits (17 grey levels, scaled
          to 0-255), written at their native 8x8; 10 classes "0".."9";
          test = 50 per class (500), train = the rest (1,297; 124-133 per class).
  lfw:    scikit-image's lfw_subset: 200 grey 25x25 crops, the first 100 faces,
          the other 100 non-face background patches; classes "face", "non_face";
          test = 25 per class (50), train = 75 per class (150).

The split is fixed: per class, a permutation seeded with SPLIT_SEED puts the
first `test_per_class` images in test. Images keep their native size; the
benchmark resizes them (bilinear) to --image_size.

  python scripts/benchmarks/make_small_folders.py --out /tmp/notes/folders
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_SEED = 20261128


def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(uint8 [1797, 8, 8], labels [1797], class names)."""
  from sklearn.datasets import load_digits
  data = load_digits()
  images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
  return images, data.target.astype(np.int64), [str(c) for c in range(10)]


def lfw() -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(uint8 [200, 25, 25], labels [200], class names): 0 = face, 1 = non_face."""
  from skimage.data import lfw_subset
  gray = np.asarray(lfw_subset(), np.float64)
  # documented as uint8, shipped (scikit-image 0.26) as float64 in [0, 1]
  images = np.round(gray * 255) if gray.max() <= 1.0 else gray
  labels = np.array([0] * 100 + [1] * 100, np.int64)  # documented order: faces first
  return images.astype(np.uint8), labels, ["face", "non_face"]


def split(labels: np.ndarray, test_per_class: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Per class, `test_per_class` seeded-random indices to "test", the rest to "train"."""
  rng = np.random.default_rng(seed)
  parts: dict[str, list] = {"train": [], "test": []}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    parts["test"].append(idx[:test_per_class])
    parts["train"].append(idx[test_per_class:])
  return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str],
                 test_per_class: int) -> dict[str, int]:
  """Writes root/{train,test}/<class>/<index>.png; returns images per split."""
  counts = {}
  for part, idx in split(labels, test_per_class).items():
    for i in idx:
      d = root / part / names[labels[i]]
      d.mkdir(parents=True, exist_ok=True)
      Image.fromarray(images[i], mode="L").save(d / f"{i:04d}.png")
    counts[part] = len(idx)
  return counts


DATASETS = {"digits": (digits, 50), "lfw": (lfw, 25)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="/tmp/notes/folders")
  ap.add_argument("--datasets", default="digits,lfw")
  args = ap.parse_args()
  for name in args.datasets.split(","):
    load, test_per_class = DATASETS[name]
    root = Path(args.out) / name
    if root.exists() and any(root.rglob("*.png")):
      raise SystemExit(f"{root} already has images; delete it to rewrite it")
    images, labels, names = load()
    print(name, write_folder(root, images, labels, names, test_per_class), "->", root)


if __name__ == "__main__":
  main()
