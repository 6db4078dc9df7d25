"""What a source's examples must be, checked before a source is built:
labels (class indices within the classes, or soft labels: distributions
over them), in-memory texts (str or UTF-8 bytes) and audio clips ([N,
samples]). Each check names every problem at once in one DataError.
`class_differences` compares two lists of class names where label i is class i.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jtl.errors import DataError, bullet_list

log = logging.getLogger(__name__)


def check_soft_labels(name: str, labels: Mapping[str, np.ndarray],
                      num_classes: int | None) -> int:
  """Checks soft labels: float [N, C] rows of non-negative numbers summing to
  1, C = num_classes (when given) in every split; returns C."""
  problems = []
  widths = {y.shape[1] for y in labels.values() if y.ndim == 2}
  for split, y in labels.items():
    if y.ndim != 2 or not np.issubdtype(y.dtype, np.floating):
      problems.append(f"split {split!r}: dtype {y.dtype} shape {y.shape}, expected float "
                      "[N, classes] like the other splits")
    elif (y < 0).any() or not np.allclose(y.sum(1), 1.0, atol=1e-4):
      bad = np.flatnonzero((y < 0).any(1) | ~np.isclose(y.sum(1), 1.0, atol=1e-4))
      problems.append(f"split {split!r}: rows {bad[:10].tolist()} are not distributions "
                      "(non-negative, summing to 1)")
  if len(widths) > 1 or (num_classes and widths and widths != {num_classes}):
    problems.append(f"label widths {sorted(widths)} differ from each other or from "
                    f"num_classes={num_classes}")
  if problems:
    raise DataError(f"Bad soft labels in dataset {name!r}:\n" + bullet_list(problems))
  return widths.pop()


def check_labels(name: str, labels: Mapping[str, np.ndarray],
                 num_classes: int | None) -> int:
  """Checks integer labels lie in [0, num_classes), or soft labels
  (`check_soft_labels`); returns num_classes."""
  if any(y.ndim == 2 for y in labels.values()):
    return check_soft_labels(name, labels, num_classes)
  problems = []
  for split, y in labels.items():
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      problems.append(f"split {split!r}: labels must be a 1-D integer array, got "
                      f"dtype {y.dtype} shape {y.shape}")
  if problems:
    raise DataError(f"Bad labels in dataset {name!r}:\n" + bullet_list(problems))
  if num_classes is None:
    num_classes = 1 + max((int(y.max()) for y in labels.values() if y.size), default=0)
  for split, y in labels.items():
    bad = np.unique(y[(y < 0) | (y >= num_classes)])
    if bad.size:
      problems.append(f"split {split!r}: label value(s) {bad[:20].tolist()} "
                      f"({int(np.isin(y, bad).sum())} example(s))")
  if problems:
    raise DataError(
        f"Labels outside [0, {num_classes}) in dataset {name!r}:\n"
        + bullet_list(problems) + "\nFix the labels or pass the right num_classes.")
  return num_classes


def checked_texts(split: str, values: Any, problems: list[str]) -> np.ndarray:
  """An object array of str from a 1-D array or list of str / UTF-8 bytes;
  what is not is added to `problems` (naming the indices)."""
  if isinstance(values, np.ndarray) and values.ndim != 1:
    problems.append(f"split {split!r}: texts must be 1-D (one string per example), got "
                    f"shape {values.shape}; join or pick the columns first")
    return np.array([], dtype=object)
  texts = np.empty(len(values), dtype=object)
  wrong, undecodable = [], []
  for i, value in enumerate(values):
    if isinstance(value, bytes):
      try:
        value = value.decode("utf-8")
      except UnicodeDecodeError:
        undecodable.append(i)
    elif not isinstance(value, str):
      wrong.append(i)
    texts[i] = str(value) if isinstance(value, str) else ""
  if wrong:
    kinds = sorted({type(values[i]).__name__ for i in wrong})
    problems.append(f"split {split!r}: texts {wrong[:10]} ({len(wrong)} in all) are {kinds}, "
                    "not str or bytes; drop them or replace them by strings")
  if undecodable:
    problems.append(f"split {split!r}: texts {undecodable[:10]} ({len(undecodable)} in all) "
                    "are bytes that are not UTF-8; decode them with their encoding first")
  return texts


def checked_audio(split: str, values: Any, problems: list[str]) -> np.ndarray:
  """Float32 clips [N, samples] in 16-bit units (a warning for [-1, 1] floats);
  ragged or wrongly shaped clips are added to `problems`."""
  try:
    x = np.asarray(values)
  except ValueError:
    x = None
  if x is None or x.dtype == object or x.ndim != 2:
    lengths = sorted({np.shape(c) for c in values})[:5] if x is None or x.dtype == object else ()
    found = f"clips of shapes {lengths}" if lengths else f"shape {x.shape}"
    problems.append(f"split {split!r}: audio must be [N, samples] (one length, mono), got "
                    f"{found}; pad or crop the clips to one length (jtl.data.audio.fit_length)")
    return np.zeros((0, 0), np.float32)
  if np.issubdtype(x.dtype, np.floating) and x.size and 0 < np.abs(x).max() <= 1.0:
    log.warning("Float audio of split %r lies in [-1, 1]; jtl expects 16-bit units "
                "(-32768..32767): multiply by 32768.", split)
  return x.astype(np.float32)


def class_differences(expected: Sequence[Any], found: Sequence[Any]
                      ) -> tuple[list[str], list[str]] | None:
  """None when `found` names the classes of `expected` in its order (label i
  is class i); else (the names only in `expected`, those only in `found`),
  both empty when only the order differs. Names that are only the label
  numbers ("0", "1", ...: a source without names, such as TFDS's cifar10_1)
  against names that are not numbers compare only the class counts (with a
  warning); numbers against other numbers are names like any others.

  >>> class_differences(["cat", "dog"], ["cat", "dog"]) is None
  True
  >>> class_differences(["cat", "dog"], ["dog", "ship"]), class_differences("ab", "ba")
  ((['cat'], ['ship']), ([], []))
  >>> class_differences(["cat", "dog"], ["0", "1"]) is None
  True
  """
  expected, found = [str(n) for n in expected], [str(n) for n in found]
  if expected == found:
    return None
  if len(expected) == len(found) and _numbered(expected) != _numbered(found) \
      and not (_integers(expected) and _integers(found)):
    numbered, named = (found, expected) if _numbered(found) else (expected, found)
    log.warning("The classes of one dataset are only numbered (%s, ...) and the other's are "
                "named (%s, ...): only their count, %d, could be compared. Check that label i "
                "is the same class in both.", numbered[0], named[0], len(found))
    return None
  return [n for n in expected if n not in found], [n for n in found if n not in expected]


def _integers(names: list[str]) -> bool:
  return all(n.isdigit() for n in names)


def _numbered(names: list[str]) -> bool:
  """Whether the names are only the label numbers, "0" to "n-1" in order."""
  return names == [str(i) for i in range(len(names))]
