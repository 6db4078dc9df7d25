"""Where examples come from: in-memory arrays, TFDS datasets, text corpora.

`resolve_source` turns the `source` argument of `make_dataset` into one of:

- `ArraySource`: examples addressable by index (in-memory arrays, image
  folders, the Rotten Tomatoes corpus, audio clips such as FSDD's); shuffled by exact per-epoch
  permutations, resumed in O(1).
- `TfdsSource`: a prepared TFDS dataset, read as a stream of records.

This module imports TensorFlow and TFDS only when a source needs them
(`host_tf`), so in-memory arrays, folders and text resolve without them.

Which examples a split name means ("train[:80%]", "train[val10%]") is
`jtl.data.splits`; the checks of labels and in-memory inputs are
`jtl.data.checks`.

>>> import numpy as np
>>> src = resolve_source({"train": {"image": np.zeros((4, 2, 2, 3), np.uint8),
...                                 "label": np.array([0, 1, 2, 1])}})
>>> src.info()
DatasetInfo(num_classes=3, num_examples={'train': 4}, class_names=['0', '1', '2'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from jtl import _optional
from jtl.data import audio, folder, ratings, text
from jtl.data.checks import checked_audio, checked_texts, check_labels
from jtl.data.splits import (
  SLICE,
  holdout_indices,
  parse_holdout,
  slice_split,
  stratified_slice,
)
from jtl.errors import DataError, bullet_list

if TYPE_CHECKING:
  import tensorflow as tf

log = logging.getLogger(__name__)


def plain(tf: Any, fn: Any) -> Any:
  """`fn` for `tf.data.Dataset.map` without AutoGraph: its control flow is
  Python's (on shapes, dtypes and options), and AutoGraph would write each
  converted function's source into the temp directory, which a killed run
  (SIGKILL: no exit handlers) leaves behind; nothing is written outside the
  workdir."""
  return tf.autograph.experimental.do_not_convert(fn)


def host_tf(feature: str = "jtl.data's input pipelines and TFDS datasets",
            extra: str | None = None) -> Any:
  """Imports TensorFlow for host-side input pipelines and returns the module.

  TensorFlow is imported here, when jtl first builds a pipeline or reads a
  TFDS dataset, never by `import jtl`. tf.data only runs on the host, so GPUs
  are hidden from TensorFlow (not from JAX) to keep it from taking the
  accelerator memory that JAX needs; a TensorFlow whose devices the user's
  own code has already initialised is left as it is.
  """
  tf = _optional.require("tensorflow", feature, extra)
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialised by the user's own TF code
    pass
  return tf


class DatasetInfo(NamedTuple):
  """What `dataset_info` reports; unpacks as (num_classes, sizes, names)."""
  num_classes: int
  num_examples: dict[str, int]
  class_names: list[str]


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Index-addressable examples: {split: (inputs, labels)}.

  `inputs[split]` holds images (uint8/float [N, H, W(, C)]), image file paths
  (`kind="file"`), strings (`kind="text"`) or audio clips (float32
  [N, samples], `kind="audio"`).
  """
  name: str
  kind: str  # "image", "file", "text" or "audio"
  inputs: Mapping[str, np.ndarray]
  labels: Mapping[str, np.ndarray]
  class_names: list[str]

  def info(self) -> DatasetInfo:
    return DatasetInfo(len(self.class_names),
                       {s: len(v) for s, v in self.labels.items()}, list(self.class_names))

  def soft(self) -> bool:
    """True when labels are distributions [N, classes] (float), not ints."""
    return any(y.ndim == 2 for y in self.labels.values())

  def keys(self, split: str) -> list[bytes] | None:
    """What decides an example's validation split: a file's path inside its
    split folder ("<class>/<file>"), so that it follows the file; None
    (the index) for arrays and text."""
    if self.kind != "file":
      return None
    return [os.fsencode("/".join(Path(p).parts[-2:])) for p in self.inputs[split]]

  def indices(self, split: str) -> tuple[str, np.ndarray]:
    """Returns (split name, example indices) for a possibly sliced split (of
    an image folder: a slice of every class, `stratified_slice`), or for a
    validation split ("train[val10%]", see `holdout_indices`) or its rest
    ("train[-val10%]")."""
    holdout = parse_holdout(split)
    if holdout is not None:
      name, rest, percent = holdout
      if name not in self.labels:
        raise DataError(f"Unknown split {split!r} of {self.name!r}. Available splits: "
                        f"{sorted(self.labels)}.")
      return name, holdout_indices(self.labels[name], percent, keys=self.keys(name),
                                   rest=rest)
    name, sl = slice_split(split, self.info().num_examples)
    if self.kind == "file" and "[" in split:  # a folder: every class in each slice
      m = SLICE.match(split.replace(" ", ""))
      return name, stratified_slice(self.labels[name], self.keys(name), m.group(2), m.group(3))
    return name, np.arange(len(self.labels[name]))[sl]

  def load(self, split: str, indices: tf.data.Dataset) -> tf.data.Dataset:
    """Maps a dataset of indices to {"image"|"text"|"audio": ..., "label": int32};
    image files are decoded here (`folder.load_image`), to uint8 [H, W, 3]."""
    tf = host_tf()
    labels = tf.constant(self.labels[split].astype(np.float32 if self.soft() else np.int32))
    if self.kind in ("image", "audio"):
      # Gather in numpy, a chunk at a time: a tf.constant copy of a large array
      # takes seconds per GB, and a graph constant is limited to 2 GB.
      array = self.inputs[split]
      dtype = tf.as_dtype(array.dtype)
      shape = list(array.shape[1:])

      def gather(i):
        x = tf.numpy_function(lambda j: array[j], [i], dtype, stateful=False)
        x.set_shape([None] + shape)
        return {self.kind: x, "label": tf.gather(labels, i)}

      return indices.batch(64).map(plain(tf, gather),
                                   num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    if self.kind == "file":
      # File names as bytes: a name that is not UTF-8 is still a file.
      paths = tf.constant(np.array([os.fsencode(p) for p in self.inputs[split]], object))

      def load_file(i):
        # The one decoder of the before-training check (folder.verify).
        image = tf.numpy_function(folder.load_image, [tf.gather(paths, i)], tf.uint8,
                                  stateful=False)
        image.set_shape([None, None, 3])
        return {"image": image, "label": tf.gather(labels, i)}

      return indices.map(plain(tf, load_file), num_parallel_calls=tf.data.AUTOTUNE)
    inputs = tf.constant(self.inputs[split])

    def load(i):
      return {"text": tf.gather(inputs, i), "label": tf.gather(labels, i)}

    return indices.map(plain(tf, load), num_parallel_calls=tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A prepared TFDS dataset with an input feature and a ClassLabel."""
  name: str
  kind: str  # "image" or "text"
  builder: Any
  input_key: str
  label_key: str
  class_names: list[str]
  num_classes: int

  def info(self) -> DatasetInfo:
    sizes = {s: int(v.num_examples) for s, v in self.builder.info.splits.items()}
    return DatasetInfo(self.num_classes, sizes, list(self.class_names))

  def num_examples(self, split: Any) -> int:
    if not self.builder.info.splits:  # under tfds.testing.mock_data: no metadata
      cardinality = int(self.builder.as_dataset(split=split).cardinality())
      if cardinality >= 0:
        return cardinality
    try:
      return int(self.builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
      raise DataError(
          f"Cannot read split {split!r} of TFDS dataset {self.name!r}: {e} Available "
          f"splits: {sorted(self.builder.info.splits)}.") from None


def _array_source(splits: Mapping[str, Any], num_classes: int | None) -> ArraySource:
  inputs, labels, problems = {}, {}, []
  kinds = set()
  for split, d in splits.items():
    if not isinstance(d, Mapping) or "label" not in d or not (
        {"image", "text", "audio"} & set(d)):
      problems.append(f"split {split!r}: expected a dict with 'image' (or 'text', 'audio') "
                      f"and 'label', got {type(d).__name__} "
                      f"{sorted(d) if isinstance(d, Mapping) else ''}")
      continue
    key = next(k for k in ("image", "text", "audio") if k in d)
    y = np.asarray(d["label"])
    if key == "text":
      x = checked_texts(split, d[key], problems)
    elif key == "audio":
      x = checked_audio(split, d[key], problems)
    else:
      x = np.asarray(d[key])
    if len(x) != len(y):
      problems.append(f"split {split!r}: {len(x)} {key}s but {len(y)} labels")
    if key == "image" and not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3))):
      problems.append(f"split {split!r}: images must be [N, H, W] or [N, H, W, 1|3], "
                      f"got shape {x.shape}")
    if key == "image" and x.dtype != np.uint8:
      x = x.astype(np.float32)  # taken as 0..255 values, like uint8
      if x.size and x.max() <= 1.0:
        log.warning("Float images of split %r lie in [0, 1]; jtl expects 0..255 values "
                    "(multiply by 255).", split)
    kinds.add(key)
    inputs[split], labels[split] = x, y
  if len(kinds) > 1:
    problems.append(f"splits mix {sorted(kinds)} inputs")
  if problems or not splits:
    raise DataError(
        "In-memory source must be {split: {'image', 'text' or 'audio': array, 'label': "
        "int array}}; problems:\n" + bullet_list(problems or ["no splits given"]))
  n = check_labels("in-memory arrays", labels, num_classes)
  return ArraySource("in-memory arrays", kinds.pop(), inputs, labels,
                     [str(c) for c in range(n)])


def _tfds_is_mocked() -> bool:
  # `tfds.testing.mock_data` serves random examples of the right features, so
  # that configs and pipelines can be checked offline without prepared files.
  tfds = _optional.require("tensorflow_datasets", "TFDS datasets")
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(prepare, "__name__", "") == "mock_download_and_prepare"


@contextlib.contextmanager
def _build_lock(builder: Any) -> Iterator[None]:
  """An exclusive lock on `<data_dir>/<name>/.jtl-build.lock` (fcntl: held
  per open file, so threads exclude each other as processes do; released
  by the OS when a process dies). No lock where there is no local file
  system (a gs:// data_dir) or no fcntl (Windows)."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:
    fcntl = None
  folder = Path(os.fspath(builder.data_dir)).parent
  if fcntl is None or "://" in os.fspath(builder.data_dir):
    yield
    return
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / ".jtl-build.lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build_local(name: str, data_dir: str | os.PathLike | None, builder: Any) -> Any:
  """Builds one of jtl's local datasets (no download) and returns its
  builder. Runs that start at once build it once: the others wait for the
  lock, then find it prepared (TFDS renames its finished folder into place,
  and a second rename would fail with FileExistsError)."""
  tfds = _optional.require("tensorflow_datasets", "TFDS datasets")
  try:
    with _build_lock(builder):
      builder = tfds.builder(name, data_dir=data_dir)  # what the lock's holder left
      if not builder.is_prepared():
        log.warning("Building the local dataset %s into %s (no download).",
                    builder.name, builder.data_dir)
        builder.download_and_prepare()
  except OSError as e:  # the lock file or the build: a data_dir not ours, read-only, a file
    where = data_dir or "~/tensorflow_datasets"
    raise DataError(
        f"Cannot build the local dataset {name!r} in data_dir {str(where)!r}: {e}. Pass a "
        f"data_dir you can write (--config.data_dir=/path/to/tfds_data), or build it there "
        f"once as a user who can.") from None
  return builder


def _tfds_source(name: str, data_dir: str | os.PathLike | None, input_key: str | None,
                 label_key: str, num_classes: int | None) -> TfdsSource:
  host_tf()
  tfds = _optional.require("tensorflow_datasets", "TFDS datasets")

  # Importing the builders registers jtl's local datasets ("jtl_mnist5k", ...). In the
  # function: builders imports TensorFlow/TFDS, and `import jtl` imports this module.
  from jtl.data import builders  # pylint: disable=g-import-not-at-top
  if name.startswith(("/", "./", "../", "~")) or ("/" in name and os.path.isdir(name)):
    raise DataError(
        f"dataset {name!r} is a path, not a TFDS name: for an image folder write "
        f"'folder:{name}'.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    known = list(tfds.list_builders(with_community_datasets=False))
    close = difflib.get_close_matches(name.split("/")[0].split(":")[0], known, n=6)
    raise DataError(
        f"TFDS does not know a dataset named {name!r}. Close names: {close or 'none'}. "
        "See https://www.tensorflow.org/datasets/catalog, or use "
        "'folder:/path' for an image folder or a dict of arrays.") from None
  except ValueError as e:  # a name TFDS cannot parse
    raise DataError(f"{name!r} is not a TFDS dataset name ({e}); use 'name', 'name:version' "
                    "or 'folder:/path' for an image folder.") from None
  if not builder.is_prepared() and not builder.info.splits and not _tfds_is_mocked():
    if builder.name in builders.LOCAL_BUILDERS:
      builder = _build_local(name, data_dir, builder)
    else:
      where = data_dir or "~/tensorflow_datasets"
      raise DataError(
          f"TFDS dataset {name!r} is not prepared in data_dir {str(where)!r} "
          f"(looked in {builder.data_dir}). Prepare it once on a machine with "
          f"network access: `tfds build {name} --data_dir {where}` (or "
          f"`tfds.builder({name!r}, data_dir={str(where)!r}).download_and_prepare()`), "
          "then copy the folder, or pass the data_dir that holds it.")
  features = builder.info.features
  keys = sorted(features.keys()) if hasattr(features, "keys") else []
  if input_key is None:
    input_key = next((k for k in ("image", "text", "sentence") if k in keys), None)
  label = features[label_key] if label_key in keys else None
  if input_key not in keys or not isinstance(label, tfds.features.ClassLabel):
    raise DataError(
        f"TFDS dataset {name!r} has features {keys}; expected an image or text "
        f"input (got input_key={input_key!r}) and a ClassLabel {label_key!r}. "
        "Pass input_key=/label_key= naming them.")
  kind = "image" if isinstance(features[input_key], tfds.features.Image) else "text"
  names = list(label.names)
  return TfdsSource(name, kind, builder, input_key, label_key, names,
                    num_classes if num_classes is not None else len(names))


def _names(names: list[str], n: int) -> list[str]:
  return names[:n] + [str(c) for c in range(len(names), n)]


def resolve_source(source: Any, data_dir: str | os.PathLike | None = None, *,
                   num_classes: int | None = None, input_key: str | None = None,
                   label_key: str = "label",
                   on_bad_file: str = "raise") -> ArraySource | TfdsSource:
  """Returns the source object for a TFDS name, folder, corpus or arrays.

  Args:
    source: a TFDS name ("cifar10", "imagenette/320px", "jtl_mnist5k"),
      "folder:/path" or a `Path` to an image folder, "rotten_tomatoes",
      "fsdd:/path" (the Free Spoken Digit Dataset's folder), "movielens100k"
      (`jtl.data.ratings`: movies with soft labels over users), or a dict
      {split: {"image", "text" or "audio": array, "label": int array}}.
    data_dir: TFDS data directory (TFDS's default when None).
    num_classes: expected class count; labels outside [0, num_classes) raise.
    input_key, label_key: TFDS feature names, when not "image"/"text", "label".
    on_bad_file: for folders, "raise" or "skip" unreadable image files.
  """
  if isinstance(source, Mapping):
    return _array_source(source, num_classes)
  if isinstance(source, Path) or (isinstance(source, str) and source.startswith("folder:")):
    if isinstance(source, str) and not source.removeprefix("folder:").strip():
      # Path("") is the current directory: a run would train on whatever is there.
      raise DataError(f"the folder path of {source!r} is empty (an unset shell variable?): "
                      "pass folder:/path/to/images (folder:. for the current directory).")
    path = Path(str(source).removeprefix("folder:")).expanduser()
    files, labels, names = folder.scan(path, on_bad_file=on_bad_file)
    n = check_labels(str(path), labels, num_classes)
    return ArraySource(f"folder:{path}", "file", files, labels, _names(names, n))
  if isinstance(source, str) and source.startswith(audio.FSDD + ":"):
    clips, labels = audio.fsdd(source[len(audio.FSDD) + 1:])
    # Ten digits, whatever a (partial) copy holds.
    n = check_labels(source, labels, num_classes or len(audio.FSDD_CLASSES))
    return ArraySource(source, "audio", clips, labels, _names(list(audio.FSDD_CLASSES), n))
  if isinstance(source, str) and source == ratings.MOVIELENS:
    data = ratings.movielens100k()
    n = check_labels(source, data.labels, num_classes)
    return ArraySource(source, "text", data.texts, data.labels,
                       _names([f"user {u}" for u in data.user_ids], n))
  if isinstance(source, str) and source == text.ROTTEN_TOMATOES:
    texts, labels = text.rotten_tomatoes()
    n = check_labels(source, labels, num_classes)
    return ArraySource(source, "text", texts, labels,
                       _names(list(text.ROTTEN_TOMATOES_CLASSES), n))
  if isinstance(source, str):
    return _tfds_source(source, data_dir, input_key, label_key, num_classes)
  raise DataError(
      f"Cannot use source of type {type(source).__name__}; expected a TFDS name, "
      "'folder:/path', a pathlib.Path, 'rotten_tomatoes', 'fsdd:/path' or a dict of arrays.")


def split_size(source: Any, split: str, data_dir: str | os.PathLike | None = None) -> int:
  """Number of examples of `split` (slices and validation splits included) of
  a source (a source object or anything `resolve_source` takes); raises
  DataError for an unknown or empty split."""
  src = source if isinstance(source, (ArraySource, TfdsSource)) else resolve_source(source, data_dir)
  if isinstance(src, ArraySource):
    n = len(src.indices(split)[1])
  elif parse_holdout(split) is not None:
    raise DataError(f"Split {split!r}: stratified validation splits work for image folders, "
                    f"arrays and text corpora, not for the TFDS dataset {src.name!r}; use a "
                    "slice such as 'train[:90%]' / 'train[90%:]' instead.")
  else:
    name, sl = slice_split(split, src.info().num_examples)
    n = len(range(src.info().num_examples[name])[sl])
  if not n:
    raise DataError(f"Split {split!r} of {src.name!r} has no examples.")
  return n


def dataset_info(source: Any, data_dir: str | os.PathLike | None = None,
                 **kwargs: Any) -> DatasetInfo:
  """Returns (num_classes, {split: num_examples}, class_names) of a source.

  Takes the same `source` forms and keywords as `resolve_source`.
  """
  return resolve_source(source, data_dir, **kwargs).info()
