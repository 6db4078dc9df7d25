"""Which examples a split name means: "train", a slice ("train[:80%]",
"test[10:20]"; of an image folder, the same part of every class) or a
validation split and its rest ("train[val10%]", "train[-val10%]": each
example held out by the hash of its key, so it stays on its side when files
are added or removed). Bounds are checked before any data is read.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from jtl.errors import DataError

SLICE = re.compile(r"^([\w.-]+)(?:\[(-?[\d.]+%?)?:(-?[\d.]+%?)?\])?$")
_HOLDOUT = re.compile(r"^([\w.-]+)\[(-?)val(\d+)%\]$")
HOLDOUT_SEED = 0


def parse_holdout(split: str) -> tuple[str, bool, int] | None:
  """"train[val10%]" -> ("train", False, 10); "train[-val10%]" -> ("train", True, 10);
  None for any other split.

  >>> parse_holdout("train[-val10%]"), parse_holdout("train[:10%]")
  (('train', True, 10), None)
  """
  m = _HOLDOUT.match(split.replace(" ", ""))
  return (m.group(1), m.group(2) == "-", int(m.group(3))) if m else None


def holdout_fraction(key: bytes, seed: int = HOLDOUT_SEED) -> float:
  """A fixed number in [0, 1) for an example's key (its file's path inside
  the split folder, or its index): the example is held out below `percent`."""
  digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + key).digest()
  return int.from_bytes(digest[:8], "little") / 2**64


def holdout_indices(labels: np.ndarray, percent: int, *, keys: Sequence[bytes] | None = None,
                    rest: bool = False, seed: int = HOLDOUT_SEED) -> np.ndarray:
  """A validation split: each example is held out when the hash of its key
  (`keys`: the file's path inside the split folder; default: its index)
  falls in the first `percent`% (`holdout_fraction`), so about `percent`% of
  every class; the only example of a class always trains. Each example
  decides alone: adding or removing files never moves any other file
  between the splits (a resumed run's validation images stay unseen).
  `rest=True` gives the other examples. Sorted indices into `labels`.

  >>> y = np.array([0] * 1000 + [1] * 500 + [2])
  >>> v, r = holdout_indices(y, 20), holdout_indices(y, 20, rest=True)
  >>> np.bincount(y[v], minlength=3).tolist(), len(v) + len(r), set(v) & set(r)
  ([178, 102, 0], 1501, set())
  """
  if not 0 < percent < 100:
    raise DataError(f"A validation split takes 1..99% of each class, got {percent}%.")
  keys = [str(i).encode() for i in range(len(labels))] if keys is None else keys
  held = np.array([holdout_fraction(k, seed) < percent / 100 for k in keys], bool)
  classes, counts = np.unique(labels, return_counts=True)
  held &= ~np.isin(labels, classes[counts < 2])
  return np.flatnonzero(~held if rest else held)


def slice_split(split: str, sizes: Mapping[str, int]) -> tuple[str, slice]:
  """Parses "train", "train[:80%]" or "test[10:20]" into (name, slice).

  Validation splits ("train[val10%]", "train[-val10%]") are not slices: see
  `holdout_indices`, `split_size` and `ArraySource.indices`."""
  m = SLICE.match(split.replace(" ", ""))
  if not m or m.group(1) not in sizes:
    raise DataError(
        f"Unknown split {split!r}. Available splits: {sorted(sizes)} "
        "(slices like 'train[:80%]' or 'train[100:]' also work (of an image folder: of "
        "every class), and for image folders and "
        "arrays 'train[val10%]' / 'train[-val10%]': a 10% validation split of every "
        "class, fixed per file / the rest).")
  name, n = m.group(1), sizes[m.group(1)]
  start, stop = m.group(2), m.group(3)
  check_bounds(split, start, stop, n)
  return name, slice(_bound(start, n), _bound(stop, n))


def _bound(b: str | None, n: int) -> int | None:
  """A slice bound in examples of a split of `n`: a percent rounded to the
  closest (as TFDS's default "closest" rounding), a count as it is."""
  if b is None:
    return None
  return int(round(float(b[:-1]) * n / 100.0)) if b.endswith("%") else int(b)


def check_bounds(split: str, start: str | None, stop: str | None, n: int) -> None:
  """A slice's bounds are both percents in [-100, 100] or both counts within
  the split's `n` examples (TFDS reads a bound without "%" beside one with
  it as a percent too, and refuses counts past the split's end): a DataError
  otherwise, before any data is read."""
  given = [b for b in (start, stop) if b is not None]
  if len({b.endswith("%") for b in given}) > 1:
    raise DataError(f"Split {split!r}: write both bounds in percent ('train[10%:50%]') or "
                    "both as example counts ('train[100:500]'), not one of each.")
  for b in given:
    try:
      value = float(b[:-1]) if b.endswith("%") else int(b)
    except ValueError:
      what = "a number" if b.endswith("%") else "a whole number of examples"
      raise DataError(f"Split {split!r}: bound {b!r} is not {what}.") from None
    if b.endswith("%") and abs(value) > 100:
      raise DataError(f"Split {split!r}: percent bounds lie in [-100%, 100%], got {b}.")
    if not b.endswith("%") and abs(value) > n:
      raise DataError(f"Split {split!r}: bound {b} is past the split's {n} examples; use a "
                      f"count up to {n} or a percent.")


def class_order(labels: np.ndarray, keys: Sequence[bytes], seed: int = HOLDOUT_SEED
                ) -> list[np.ndarray]:
  """Each class's example indices in a seeded order fixed per example (the
  hash of its key, `holdout_fraction`), classes in label order."""
  fractions = np.array([holdout_fraction(k, seed) for k in keys])
  return [idx[np.argsort(fractions[idx], kind="stable")]
          for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]


def stratified_slice(labels: np.ndarray, keys: Sequence[bytes], start: str | None,
                     stop: str | None, seed: int = HOLDOUT_SEED) -> np.ndarray:
  """The examples of a folder split's slice ("train[90%:]" -> start "90%"):
  folders list files class by class, so a plain slice would hold few classes.
  Percent bounds take that part of every class (rounded per class; "[:90%]"
  and "[90%:]" are complementary); count bounds ("[:24]") take the first of
  an order that interleaves the classes evenly. Within a class the order is
  seeded (`class_order`). Sorted indices.

  >>> y = np.array([0] * 8 + [1] * 8 + [2] * 8)
  >>> keys = [str(i).encode() for i in range(24)]
  >>> v = stratified_slice(y, keys, "90%", None)
  >>> np.bincount(y[v]).tolist(), len(stratified_slice(y, keys, None, "90%"))
  ([1, 1, 1], 21)
  >>> np.bincount(y[stratified_slice(y, keys, None, "6")]).tolist()
  [2, 2, 2]
  """
  per_class = class_order(labels, keys, seed)
  if all(b is None or b.endswith("%") for b in (start, stop)):
    parts = [idx[_bound(start, len(idx)):_bound(stop, len(idx))] for idx in per_class]
    return np.sort(np.concatenate(parts)).astype(np.int64)
  # One order over all classes: class c's k-th example at (k + 0.5) / n_c.
  idx = np.concatenate(per_class)
  position = np.concatenate([(np.arange(len(c)) + 0.5) / len(c) for c in per_class])
  order = idx[np.argsort(position, kind="stable")]
  _, sl = slice_split(f"s[{start or ''}:{stop or ''}]", {"s": len(order)})
  return np.sort(order[sl]).astype(np.int64)
