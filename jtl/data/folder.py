"""Image folders: `root/<split>/<class>/*.jpg` (or `root/<class>/*.jpg`).

Class names are the sorted union of class folder names over all splits, so a
class gets the same label in every split. Files are listed in sorted order.

Unreadable files. Each image file's first bytes are checked against the JPEG,
PNG, GIF and BMP signatures when the folder is scanned (cheap: 12 bytes per
file). With `on_bad_file="raise"` (default) a `DataError` names every bad file;
with `on_bad_file="skip"` they are left out and a warning gives their count
and names. A file whose header is fine but whose body is damaged is found when
it is decoded: the pipeline then raises a `DataError` naming it (see
`find_undecodable`). Files without an image extension (README, .DS_Store) are
ignored with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from jtl.errors import DataError, bullet_list

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def _is_image_header(path: Path) -> bool:
  try:
    with open(path, "rb") as f:
      head = f.read(12)
  except OSError:
    return False
  return any(head.startswith(sig) for sig in _SIGNATURES)


def _class_dirs(split_dir: Path) -> list[Path]:
  return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _layout(root: Path) -> dict[str, Path]:
  """Maps split name -> folder of class folders."""
  children = _class_dirs(root)
  if not children:
    raise DataError(
        f"Image folder {root} has no sub-folders. Expected {root}/<split>/<class>/"
        f"*.jpg (e.g. train/ and test/) or {root}/<class>/*.jpg.")
  # A folder whose children hold image files directly is a class folder.
  has_files = [any(f.is_file() for f in c.iterdir()) for c in children]
  if any(has_files):
    return {"train": root}
  return {c.name: c for c in children}


def scan(root: Path, *, on_bad_file: str = "raise"
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
  """Lists an image folder: ({split: paths}, {split: labels}, class_names).

  Args:
    root: the folder.
    on_bad_file: "raise" or "skip" files that are not readable images.
  """
  if on_bad_file not in ("raise", "skip"):
    raise DataError(f"on_bad_file must be 'raise' or 'skip', got {on_bad_file!r}.")
  if not root.is_dir():
    raise DataError(f"Image folder {root} does not exist or is not a directory.")
  splits = _layout(root)
  class_names = sorted({c.name for d in splits.values() for c in _class_dirs(d)})
  files, labels, bad, ignored = {}, {}, [], []
  for split, split_dir in splits.items():
    paths, ys = [], []
    for c in _class_dirs(split_dir):
      for f in sorted(c.iterdir()):
        if not f.is_file() or f.name.startswith("."):
          continue
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
          ignored.append(f)
        elif not _is_image_header(f):
          bad.append(f)
        else:
          paths.append(str(f))
          ys.append(class_names.index(c.name))
    if not paths:
      raise DataError(f"Split {split!r} of image folder {root} ({split_dir}) has no "
                      f"image files with extensions {IMAGE_EXTENSIONS}.")
    files[split] = np.array(paths, dtype=object)
    labels[split] = np.array(ys, np.int64)
  if ignored:
    log.warning("Ignored %d file(s) without an image extension in %s:\n%s",
                len(ignored), root, bullet_list(ignored, limit=10))
  if bad and on_bad_file == "raise":
    raise DataError(
        f"{len(bad)} file(s) in image folder {root} are not readable JPEG/PNG/GIF/"
        "BMP images:\n" + bullet_list(bad) +
        "\nDelete or replace them, or pass on_bad_file='skip' to leave them out.")
  if bad:
    log.warning("Skipped %d unreadable image file(s) in %s:\n%s", len(bad), root,
                bullet_list(bad, limit=10))
  return files, labels, class_names


def find_undecodable(paths: np.ndarray, limit: int = 20) -> list[str]:
  """Returns up to `limit` paths that PIL cannot fully decode."""
  from PIL import Image  # only needed after a decode failure

  bad = []
  for p in paths:
    try:
      with Image.open(p) as im:
        im.load()
    except Exception:  # noqa: BLE001 - any failure means undecodable
      bad.append(str(p))
      if len(bad) >= limit:
        break
  return bad
