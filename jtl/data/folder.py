"""Image folders: `root/<split>/<class>/*.jpg` (or `root/<class>/*.jpg`).

Class names are the sorted union of class folder names over all splits, so a
class gets the same label in every split. Files are listed in sorted order.

Unreadable files. Every image file is checked when the folder is scanned,
before any training step: its header must parse (PIL reads the header only),
its size must stay within `max_pixels` (a 10,000 x 10,000 PNG would cost
gigabytes once decoded), and it must end the way its format ends (JPEG's EOI
marker, PNG's IEND chunk, GIF's trailer, BMP's and WebP's declared size); a file that
does not is decoded in full to tell a truncated image from harmless trailing
bytes. Decoding is `load_image`'s everywhere: the input pipeline, this check
and `verify` (the before-training check of every file: the decode, and a
content hash to find the same image in training and evaluation splits) use
the one function, so a file that passes cannot fail later. It applies the
EXIF orientation (a phone photo is used upright, as a viewer shows it).
With `on_bad_file="raise"` (default) a `DataError` names every bad file
and why; with `on_bad_file="skip"` they are left out and a warning gives their
count and names. Files without an image extension (README; the extensions:
`IMAGE_EXTENSIONS`) are ignored with a warning, once per folder and process; hidden files and folders (".DS_Store", "._photo.jpg",
"__MACOSX") are ignored silently and never decide the layout (only visible
image files make a folder a class folder). File names need not be UTF-8
(they are read as bytes); class folder names must be (they are printed and
saved as the class names).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jtl import _optional
from jtl.errors import DataError, bullet_list

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
IMAGE_FORMATS = "JPEG/PNG/GIF/BMP/WebP"
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold (about 9,459 x 9,459)
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_warned_ignored: set[tuple[str, ...]] = set()  # (root, *files): warned once per process


def _image_head(head: bytes) -> bool:
  """Whether a file's first 12 bytes start an image (WebP: a RIFF "WEBP" file)."""
  return any(head.startswith(sig) for sig in _SIGNATURES) or (
      head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _ends_complete(path: Path, image_format: str | None) -> bool:
  """Whether the file ends as its format ends (cheap: reads the last bytes)."""
  with open(path, "rb") as f:
    size = f.seek(0, 2)
    f.seek(max(size - 16, 0))
    tail = f.read().rstrip(b"\0")
    if image_format == "BMP":
      f.seek(2)
      return size >= int.from_bytes(f.read(4), "little")
    if image_format == "WEBP":  # the RIFF size counts the bytes after its first 8
      f.seek(4)
      return size >= int.from_bytes(f.read(4), "little") + 8
  ends = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}
  return tail.endswith(ends[image_format]) if image_format in ends else True


def image_problem(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
  """Why `path` is not a usable image, or None: not an image, too many
  pixels, or cut short (see the module docstring)."""
  import warnings  # pylint: disable=g-import-not-at-top

  Image = _optional.require("PIL.Image", "Image folders")  # noqa: N806
  try:
    with open(path, "rb") as f:
      head = f.read(12)
    if not _image_head(head):
      return f"not a {IMAGE_FORMATS} file (its first bytes are no image signature)"
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path) as im:  # reads the header only
        (width, height), image_format = im.size, im.format
  except Image.DecompressionBombError:
    return f"more than twice PIL's pixel limit; at most max_pixels={max_pixels:,} allowed"
  except (OSError, ValueError, SyntaxError) as e:
    return f"its header does not parse ({e})"
  if width * height > max_pixels:
    return (f"{width} x {height} = {width * height:,} pixels, above max_pixels={max_pixels:,}: "
            "downscale it first")
  if not _ends_complete(path, image_format) and find_undecodable([path], max_pixels=max_pixels):
    return f"a truncated or damaged {image_format} (it does not decode to the end)"
  return None


# Folders that file managers and archivers leave behind, never classes.
_SYSTEM_DIRS = ("__MACOSX", "$RECYCLE.BIN", "System Volume Information")


def is_hidden(path: Path) -> bool:
  """Hidden (".DS_Store", "._x.jpg", ".ipynb_checkpoints") or system files and
  folders, which an image folder's scan skips."""
  return path.name.startswith(".") or path.name in _SYSTEM_DIRS


def _class_dirs(split_dir: Path) -> list[Path]:
  return sorted(p for p in split_dir.iterdir() if p.is_dir() and not is_hidden(p))


def _holds_images(folder: Path) -> bool:
  return any(f.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(f) and f.is_file()
             for f in folder.iterdir())


def _layout(root: Path) -> dict[str, Path]:
  """Maps split name -> folder of class folders."""
  children = _class_dirs(root)
  if not children:
    raise DataError(
        f"Image folder {root} has no sub-folders. Expected {root}/<split>/<class>/"
        f"*.jpg (e.g. train/ and test/) or {root}/<class>/*.jpg.")
  # A folder whose children hold image files directly is a class folder. Only
  # visible image files count: a .DS_Store or README in train/ decides nothing.
  if any(_holds_images(c) for c in children):
    return {"train": root}
  return {c.name: c for c in children}


def _refuse_untrained_classes(root: Path, splits: dict[str, Path]) -> None:
  """A class folder in another split but not in train/ would be an output the
  model never learns, scored as errors: refused, naming the folders."""
  if "train" not in splits or len(splits) == 1:
    return
  trained = {c.name for c in _class_dirs(splits["train"])}
  untrained = [shown(c) for split, d in splits.items() for c in _class_dirs(d)
               if c.name not in trained]
  if untrained:
    raise DataError(f"Class folder(s) of image folder {root} have no folder of the same name in "
                    f"{splits['train']}, so no example trains them:\n" + bullet_list(untrained)
                    + "\nAdd training images of those classes, or fix the folder names.")


def scan(root: Path, *, on_bad_file: str = "raise", max_pixels: int = MAX_PIXELS
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
  """Lists an image folder: ({split: paths}, {split: labels}, class_names).

  Args:
    root: the folder.
    on_bad_file: "raise" or "skip" files that are not usable images.
    max_pixels: the largest width x height accepted.
  """
  if on_bad_file not in ("raise", "skip"):
    raise DataError(f"on_bad_file must be 'raise' or 'skip', got {on_bad_file!r}.")
  if not root.is_dir():
    raise DataError(f"Image folder {root} does not exist or is not a directory.")
  splits = _layout(root)
  class_names = sorted({c.name for d in splits.values() for c in _class_dirs(d)})
  _refuse_untrained_classes(root, splits)
  not_utf8 = [shown(n) for n in class_names if n != os.fsencode(n).decode("utf-8", "replace")]
  if not_utf8:
    raise DataError(f"Class folder names of image folder {root} must be UTF-8 text (they are "
                    f"the class names, printed and saved with the model); rename these "
                    f"folders:\n" + bullet_list(not_utf8))
  files, labels, bad, ignored = {}, {}, [], []
  for split, split_dir in splits.items():
    paths, ys = [], []
    empty = []
    for c in _class_dirs(split_dir):
      before = len(paths) + len(bad)
      for f in sorted(c.iterdir()):
        if is_hidden(f):
          continue
        if f.is_symlink() and not f.exists():
          bad.append(f"{shown(f)}: a symbolic link to a missing file")
          continue
        if not f.is_file():
          continue
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
          ignored.append(shown(f))
        elif (problem := image_problem(f, max_pixels)) is not None:
          bad.append(f"{shown(f)}: {problem}")
        else:
          paths.append(str(f))
          ys.append(class_names.index(c.name))
      if len(paths) + len(bad) == before:
        empty.append(shown(c))
    if empty and split == "train":  # a class no example trains: an output never learnt
      raise DataError(f"Class folder(s) of image folder {root} without image files: "
                      f"{empty[:10]}. Add images or remove the folder(s).")
    if not paths:
      raise DataError(f"Split {split!r} of image folder {root} ({split_dir}) has no "
                      f"image files with extensions {IMAGE_EXTENSIONS}.")
    files[split] = np.array(paths, dtype=object)
    labels[split] = np.array(ys, np.int64)
  if ignored and (key := (str(root), *ignored)) not in _warned_ignored:
    _warned_ignored.add(key)  # the folder is scanned again for each split and evaluation
    log.warning("Ignored %d file(s) without an image extension %s in %s:\n%s",
                len(ignored), IMAGE_EXTENSIONS, root, bullet_list(ignored, limit=10))
  if bad and on_bad_file == "raise":
    raise DataError(
        f"{len(bad)} file(s) in image folder {root} are not usable {IMAGE_FORMATS} "
        "images:\n" + bullet_list(bad) +
        "\nDelete or replace them (library code can leave them out with "
        "on_bad_file='skip').")
  if bad:
    log.warning("Skipped %d unreadable image file(s) in %s:\n%s", len(bad), root,
                bullet_list(bad, limit=10))
  return files, labels, class_names


def shown(path: str | bytes | os.PathLike) -> str:
  """A file name to print: bytes that are not UTF-8 shown as \\xNN escapes."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def _rgb(im: Any) -> np.ndarray:
  """uint8 [H, W, 3] of a PIL image of any mode; 16-bit grey keeps its high
  byte (as TensorFlow's decoders do), alpha is dropped."""
  if im.mode.startswith("I") or im.mode == "F":
    a = np.asarray(im)
    a = a >> 8 if im.mode.startswith("I") else a
    a = np.clip(a, 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  return np.asarray(im.convert("RGB"))


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Decodes JPEG/PNG/GIF/BMP/WebP bytes to uint8 [H, W, 3], upright: PIL decodes
  the whole file (any damage raises), the first frame of an animation, the
  EXIF orientation applied (as `PIL.ImageOps.exif_transpose`)."""
  import warnings  # pylint: disable=g-import-not-at-top

  Image = _optional.require("PIL.Image", "Image folders")  # noqa: N806
  ImageOps = _optional.require("PIL.ImageOps", "Image folders")  # noqa: N806
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    with Image.open(io.BytesIO(data)) as im:
      if im.size[0] * im.size[1] > max_pixels:
        raise ValueError(f"{im.size[0]} x {im.size[1]} pixels, above max_pixels={max_pixels:,}")
      im.load()
      return _rgb(ImageOps.exif_transpose(im))


def load_image(path: str | bytes | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """The input pipeline's image: `decode` of the file's bytes. Raises
  ValueError naming the file when it does not decode."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:  # moved or deleted since the scan
    raise ValueError(f"{shown(path)}: does not decode (it cannot be read: {e.strerror or e}; "
                     "was it moved or deleted after the folder was listed?).") from None
  try:
    return decode(data, max_pixels)
  except Exception as e:  # noqa: BLE001 - any decoder failure is the file's
    raise ValueError(f"{shown(path)}: does not decode ({type(e).__name__}: {e}). Delete or "
                     "replace it.") from None


def _digest_and_problem(path: str, max_pixels: int) -> tuple[str, str | None]:
  try:
    with open(path, "rb") as f:
      data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    decode(data, max_pixels)
    return digest, None
  except Exception as e:  # noqa: BLE001 - any failure makes the file unusable
    return "", f"{shown(path)}: does not decode ({type(e).__name__}: {e})"


def verify(paths: Sequence[str], *, max_pixels: int = MAX_PIXELS,
           workers: int | None = None) -> tuple[list[str], list[str]]:
  """Decodes every file exactly as the input pipeline will (`decode`), in
  threads (PIL decodes without the GIL), and hashes its bytes.

  Returns (problems: one line per file that does not decode, naming it;
  digests: the sha256 of each file's bytes, "" for a file that cannot be read).
  """
  workers = workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(lambda p: _digest_and_problem(p, max_pixels), paths))
  return [p for _, p in results if p], [d for d, _ in results]


def find_undecodable(paths: Any, limit: int = 20, *, max_pixels: int = MAX_PIXELS) -> list[str]:
  """Returns up to `limit` of `paths` that `load_image` cannot decode, as
  printable names."""
  bad = []
  for p in paths:
    try:
      load_image(p, max_pixels)
    except (OSError, ValueError):
      bad.append(shown(p))
      if len(bad) >= limit:
        break
  return bad
