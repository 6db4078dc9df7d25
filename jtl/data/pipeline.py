"""`make_dataset`: one input pipeline for TFDS names, folders, arrays and text.

A batch is a dict of numpy arrays:

- "inputs": float32 [B, H, W, 3] normalised images, for text a dict of
  int32 [B, L] "input_ids", "attention_mask", "token_type_ids", for audio
  float32 [B, samples] clips;
- "label": int32 [B] (float32 [B, num_classes] soft labels with mixup / CutMix);
- "mask": bool [B], False on padding rows.

`batch_size` is the global batch; each process gets `batch_size //
process_count` rows of its own shard. Training batches are full (the last
partial batch of a finite run is dropped); evaluation makes one pass whose last
batches are padded (mask False), with the same number of batches on every
process, so every example is counted exactly once.

Training order is a function of `seed` only. Arrays, folders and text corpora
are shuffled by an exact permutation per epoch, so `start_step=k` starts at
batch k at once; TFDS streams are shuffled with a buffer, reseeded each epoch,
and skip the records of batch k's epoch before it without decoding them. Augmentation is seeded per example
position, so a resumed run sees the very same pixels.

>>> import numpy as np
>>> data = {"test": {"image": np.zeros((10, 4, 4, 3), np.uint8),
...                  "label": np.arange(10) % 3}}
>>> batches = list(make_dataset(data, split="test", batch_size=4, train=False,
...                             image_size=2))
>>> [int(b["mask"].sum()) for b in batches], batches[0]["inputs"].shape
([4, 4, 2], (4, 2, 2, 3))
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jtl import _optional
from jtl.data import augment as augment_lib
from jtl.data import folder, images, text
from jtl.data.sources import (
  ArraySource,
  DatasetInfo,
  TfdsSource,
  host_tf,
  plain,
  resolve_source,
)
from jtl.errors import DataError, bullet_list

tf = _optional.require("tensorflow", "jtl.data's input pipelines")
tfds = _optional.require("tensorflow_datasets", "jtl.data's input pipelines")

Batch = dict[str, Any]
_FOREVER = 2**62


class BatchIterator:
  """Iterator of numpy batches; `num_batches` is None for endless training."""

  def __init__(self, dataset: tf.data.Dataset, source: ArraySource | TfdsSource,
               split: str, num_batches: int | None, tokenizer: Any = None):
    self.dataset = dataset
    self.info: DatasetInfo = source.info()
    self.num_batches = num_batches
    self._source, self._split, self._tokenizer = source, split, tokenizer
    self._it = iter(tfds.as_numpy(dataset))

  def __iter__(self) -> BatchIterator:
    return self

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("An endless training iterator has no length.")
    return self.num_batches

  def __next__(self) -> Batch:
    try:
      batch = next(self._it)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.UnknownError) as e:  # a file damaged, or gone, since the scan
      raise DataError(self._explain(e)) from None
    if self._tokenizer is not None:
      batch["inputs"] = text.tokenize(batch.pop("text"), self._tokenizer)
    return batch

  def _explain(self, error: Exception) -> str:
    src = self._source
    bad_label = re.search(r"label value:\] \[(-?\d+)\]", error.message)
    if bad_label:
      return (f"Label {bad_label.group(1)} lies outside [0, {self.info.num_classes}) in "
              f"split {self._split!r} of dataset {src.name!r}. Pass the right "
              "num_classes or fix the labels.")
    failed = f"Reading split {self._split!r} of dataset {src.name!r} failed"
    # folder.load_image names the file; TensorFlow wraps it in node names and tracebacks.
    undecodable = re.search(r"ValueError: (.*: does not decode .*)", error.message)
    if undecodable:
      return (f"{failed}: {undecodable.group(1)} `jtl.data.folder.verify(paths)` checks "
              "every file at once.")
    msg = f"{failed}: {error.message}"
    if isinstance(src, ArraySource) and src.kind == "file":
      bad = folder.find_undecodable(src.inputs[self._split.split("[")[0]])
      msg += ("\nThese files cannot be decoded:\n  - " + "\n  - ".join(bad) +
              "\nDelete or replace them.") if bad else ""
    return msg


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if pc < 1 or not 0 <= pi < pc:
    raise DataError(f"process_index={pi} must lie in [0, process_count={pc}).")
  return pi, pc


def _index_stream(indices: np.ndarray, *, train: bool, seed: int,
                  num_epochs: int | None, start: int) -> tf.data.Dataset:
  """Example indices: one pass, or per-epoch seeded permutations from `start`."""
  if not train:
    return tf.data.Dataset.from_tensor_slices(indices)
  epoch0, offset = divmod(start, len(indices))
  idx = tf.constant(indices)

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(
        idx, seed=tf.stack([tf.constant(seed, tf.int64), e]))
    return tf.data.Dataset.from_tensor_slices(perm)

  end = _FOREVER if num_epochs is None else num_epochs
  return tf.data.Dataset.range(epoch0, max(end, epoch0)).flat_map(plain(tf, epoch)).skip(offset)


def _tfds_stream(src: TfdsSource, split: Any, *, train: bool, seed: int,
                 num_epochs: int | None, start: int, shuffle_buffer: int,
                 n_local: int) -> tf.data.Dataset:
  decoders = {src.input_key: tfds.decode.SkipDecoding()} if src.kind == "image" else None
  # Files are shuffled once by `seed`; examples are reshuffled every epoch.
  read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
                                try_autocache=False)
  ds = src.builder.as_dataset(split=split, shuffle_files=train, decoders=decoders,
                              read_config=read_config)
  key = "image" if src.kind == "image" else "text"
  n = src.num_classes

  def pick(ex):
    label = tf.cast(ex[src.label_key], tf.int32)
    check = tf.debugging.Assert(
        tf.logical_and(label >= 0, label < n),
        [f"label outside [0, {n}) in TFDS dataset {src.name!r}; label value:", label])
    with tf.control_dependencies([check]):
      return {key: ex[src.input_key], "label": tf.identity(label)}

  ds = ds.map(plain(tf, pick), num_parallel_calls=tf.data.AUTOTUNE)
  if not train:
    return ds
  # Each epoch is its own seeded shuffle, so a resume skips at most one epoch
  # of (undecoded) records.
  epoch0, offset = divmod(start, n_local)

  def epoch(e):
    return ds.shuffle(shuffle_buffer, seed=seed * 1_000_003 + e,
                      reshuffle_each_iteration=False)

  end = _FOREVER if num_epochs is None else num_epochs
  return tf.data.Dataset.range(epoch0, max(end, epoch0)).flat_map(plain(tf, epoch)).skip(offset)


def _preprocess(ex: dict[str, tf.Tensor], index: tf.Tensor, *, kind: str, train: bool,
                seed: tf.Tensor, image_kwargs: dict[str, Any]) -> dict[str, tf.Tensor]:
  label = ex["label"]  # soft labels [C] stay float
  out = {"label": label if label.dtype.is_floating else tf.cast(label, tf.int32),
         "mask": tf.constant(True)}
  if kind == "text":
    out["text"] = ex["text"]
    return out
  if kind == "audio":  # fixed-length clips, fed as they are
    out["inputs"] = ex["audio"]
    return out
  image = ex["image"]
  if image.dtype == tf.string:
    image = images.decode(image)
  if train:
    ex_seed = tf.random.experimental.stateless_fold_in(seed, index)
    out["inputs"] = images.train_image(image, ex_seed, **image_kwargs)
  else:
    out["inputs"] = images.eval_image(image, **image_kwargs)
  return out


def _check_options(*, batch_size: int, process_count: int, start_step: int, train: bool,
                   num_epochs: int | None, mixup_alpha: float, crop_scale: Sequence[float],
                   crop_fraction: float, shuffle_buffer: int, cutmix_alpha: float = 0.0,
                   randaugment: tuple[int, float] | None = None) -> None:
  """One DataError listing every invalid make_dataset option."""
  problems = []
  if batch_size < 1 or batch_size % process_count:
    problems.append(f"batch_size={batch_size} must be a positive multiple of "
                    f"process_count={process_count}")
  if start_step < 0 or (start_step and not train):
    problems.append(f"start_step={start_step} must be >= 0, and 0 for evaluation")
  if num_epochs is not None and num_epochs < 1:
    problems.append(f"num_epochs={num_epochs} must be >= 1 or None (endless)")
  if not mixup_alpha >= 0:  # NaN too
    problems.append(f"mixup_alpha={mixup_alpha} must be >= 0 (0 = no mixup)")
  if not cutmix_alpha >= 0:
    problems.append(f"cutmix_alpha={cutmix_alpha} must be >= 0 (0 = no CutMix)")
  if randaugment is not None:
    ok = (len(randaugment) == 2 and isinstance(randaugment[0], int)
          and not isinstance(randaugment[0], bool) and randaugment[0] >= 0
          and isinstance(randaugment[1], (int, float))
          and 0 <= randaugment[1] <= augment_lib.MAX_MAGNITUDE)
    if not ok:
      problems.append(f"randaugment={randaugment!r} must be (n, m): n >= 0 ops (0 = off), "
                      f"magnitude 0 <= m <= {augment_lib.MAX_MAGNITUDE:g} (10: the paper's top; config: "
                      "augment.randaugment_n, augment.randaugment_m)")
  if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
    problems.append(f"crop_scale={tuple(crop_scale)} must be (low, high) with "
                    "0 < low <= high <= 1")
  if not 0 < crop_fraction <= 1:
    problems.append(f"crop_fraction={crop_fraction} must lie in (0, 1]")
  if shuffle_buffer < 1:
    problems.append(f"shuffle_buffer={shuffle_buffer} must be >= 1")
  if problems:
    raise DataError("Invalid make_dataset options:\n" + bullet_list(problems))


def _example_stream(src: Any, split: str, pi: int, pc: int, *, train: bool, seed: int,
                    num_epochs: int | None, start: int, shuffle_buffer: int
                    ) -> tuple[tf.data.Dataset, int, int]:
  """(examples of this process's shard from example `start` on, examples in
  the split, examples in this shard)."""
  if isinstance(src, ArraySource):
    name, indices = src.indices(split)
    local = indices[pi::pc]
    if not local.size:
      raise DataError(f"Split {split!r} of {src.name!r} has no examples for process {pi}.")
    ds = _index_stream(local, train=train, seed=seed, num_epochs=num_epochs, start=start)
    return src.load(name, ds), len(indices), len(local)
  total = src.num_examples(split)
  if not total:
    raise DataError(f"Split {split!r} of TFDS dataset {src.name!r} has no examples.")
  local_split = tfds.even_splits(split, n=pc)[pi] if pc > 1 else split
  local_n = src.num_examples(local_split)
  ds = _tfds_stream(src, local_split, train=train, seed=seed, num_epochs=num_epochs,
                    start=start, shuffle_buffer=shuffle_buffer, n_local=local_n)
  return ds, total, local_n


def _mixup(ds: tf.data.Dataset, *, seed: int, process_index: int, start_step: int,
           alpha: float, num_classes: int, cutmix_alpha: float = 0.0) -> tf.data.Dataset:
  """Mixup and/or CutMix of each batch (both on: one of the two per batch, at
  even odds, as timm), its randomness a function of (seed, process, step)."""
  mix_seed = tf.constant([seed, 10_000 + process_index], tf.int64)
  fold = tf.random.experimental.stateless_fold_in

  def mix(step: tf.Tensor, b: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    s = fold(mix_seed, step)  # mixup alone: the stream it always had
    mixup = lambda: images.mixup(b, s, alpha=alpha, num_classes=num_classes)
    cut = lambda: augment_lib.cutmix(b, fold(s, 2), alpha=cutmix_alpha, num_classes=num_classes)
    if not cutmix_alpha:
      return mixup()
    if not alpha:
      return cut()
    return tf.cond(tf.random.stateless_uniform([], fold(s, 1)) < 0.5, cut, mixup)

  return ds.enumerate(start_step).map(plain(tf, mix), num_parallel_calls=tf.data.AUTOTUNE)


def _padded_batches(ds: tf.data.Dataset, pad: int, batch_size: int) -> tf.data.Dataset:
  """Full batches of ds followed by `pad` masked filler examples."""
  filler = {k: tf.zeros(s.shape, s.dtype) if s.dtype != tf.string else tf.constant("")
            for k, s in ds.element_spec.items()}
  filler["mask"] = tf.constant(False)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(pad))
  return ds.batch(batch_size, drop_remainder=True)


def _check_kind(src: Any, *, mixup_alpha: float, cutmix_alpha: float,
                randaugment: tuple[int, float] | None) -> None:
  """Refuses image augmentations on a text or audio source."""
  if (mixup_alpha > 0 or cutmix_alpha > 0 or (randaugment and randaugment[0])) and (
      src.kind in ("text", "audio")):
    raise DataError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}, "
                    f"randaugment={randaugment}: image augmentations; {src.name!r} is "
                    f"{src.kind}.")


def _image_kwargs(train: bool, *, image_size: Any, normalize: Any, augment: bool, flip: bool,
                  crop_scale: Sequence[float], randaugment: tuple[int, float] | None,
                  crop_fraction: float) -> dict[str, Any]:
  """The options of `images.train_image` (train) or `images.eval_image`."""
  image_kwargs: dict[str, Any] = {"image_size": image_size, "normalize": normalize}
  if train:
    image_kwargs.update(augment=augment, flip=flip, crop_scale=crop_scale,
                        randaugment=tuple(randaugment) if randaugment else None)
  else:
    image_kwargs.update(crop_fraction=crop_fraction)
  return image_kwargs


def _preprocessed(ds: tf.data.Dataset, kind: str, *, train: bool, seed: int,
                  process_index: int, start: int, image_kwargs: dict[str, Any]
                  ) -> tf.data.Dataset:
  """Examples decoded and preprocessed; example i's augmentation seed is
  (seed, 1 + process_index) folded with its position `start + i`."""
  base = tf.constant([seed, 1 + process_index], tf.int64)
  prep = functools.partial(_preprocess, kind=kind, train=train, seed=base,
                           image_kwargs=image_kwargs)
  return ds.enumerate(start).map(plain(tf, lambda i, ex: prep(ex, i)),
                                 num_parallel_calls=tf.data.AUTOTUNE)


def _train_batches(ds: tf.data.Dataset, local_b: int, *, total: int, process_count: int,
                   num_epochs: int | None, start_step: int,
                   mix: Callable[[tf.data.Dataset], tf.data.Dataset] | None
                   ) -> tuple[tf.data.Dataset, int | None]:
  """Full batches (mixed by `mix` when given) and their count (None: endless)."""
  num_batches = None
  if num_epochs is not None:
    num_batches = max(0, num_epochs * (total // process_count) // local_b - start_step)
  ds = ds.batch(local_b, drop_remainder=True)
  ds = mix(ds) if mix is not None else ds
  # Every process the same count (shards differ by an example when the split
  # does not divide): a host with one batch more would wait in a collective.
  return (ds.take(num_batches) if num_batches is not None else ds), num_batches


def _eval_batches(ds: tf.data.Dataset, local_b: int, *, total: int, local_n: int,
                  process_count: int) -> tuple[tf.data.Dataset, int]:
  """One padded, masked pass and its batch count: the same count on every
  process (each shard is padded to the largest one)."""
  num_batches = math.ceil(math.ceil(total / process_count) / local_b)
  return _padded_batches(ds, num_batches * local_b - local_n, local_b), num_batches


def make_dataset(source: Any, *, split: str, batch_size: int, train: bool,
                 image_size: int | Sequence[int] = 224,
                 normalize: images.NormalizeSpec = None, seed: int = 0,
                 num_epochs: int | None = None, start_step: int = 0,
                 data_dir: str | os.PathLike | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_classes: int | None = None, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, randaugment: tuple[int, float] | None = None,
                 augment: bool = True, flip: bool = True,
                 crop_scale: Sequence[float] = (0.08, 1.0), crop_fraction: float = 1.0,
                 shuffle_buffer: int = 10_000, tokenizer: Any = None,
                 max_length: int | None = None, input_key: str | None = None,
                 label_key: str = "label", on_bad_file: str = "raise",
                 prefetch: int = 2) -> BatchIterator:
  """Returns an iterator of numpy batches (see the module docstring).

  Args:
    source: TFDS name, "folder:/path" or Path, "rotten_tomatoes", or a dict
      {split: {"image"|"text": array, "label": ints}} (see `resolve_source`).
    split: split name, TFDS-style slices allowed ("train[:90%]").
    batch_size: global batch size, divisible by process_count.
    train: shuffled, augmented, endless (or `num_epochs`) full batches if True;
      one padded, masked pass in file order if False.
    image_size: model resolution, int or (height, width).
    normalize: model normalisation: "efficientnet", "imagenet", "vit", a
      (mean, std) pair in 0..255 units, a `jtl.models.preprocessing.Normalization`
      (its affine; `image_size` and `crop_fraction` stay what is passed here),
      or a callable on tf tensors.
    seed: shuffling and augmentation seed.
    num_epochs: training epochs, None for endless.
    start_step: first training batch to yield (resume position).
    data_dir: TFDS data directory.
    process_index, process_count: this process's shard (default: jax's).
    num_classes: expected number of classes (default: the dataset's).
    mixup_alpha: if > 0, mixup with Beta(alpha, alpha); labels become soft.
    cutmix_alpha: if > 0, CutMix (`jtl.data.augment.cutmix`), box area from
      Beta(alpha, alpha); with mixup too, one of the two per batch.
    randaugment: (n, m): n RandAugment ops at magnitude m (0..30) per training
      image (`jtl.data.augment.randaugment`); None or n = 0: off.
    augment, flip, crop_scale: random resized crop (area fraction range) and
      horizontal flip for training.
    crop_fraction: central crop kept at evaluation before resizing.
    shuffle_buffer: TFDS shuffle buffer (arrays/folders shuffle exactly).
    tokenizer, max_length: for text; see `text.load_tokenizer`.
    input_key, label_key: TFDS feature names.
    on_bad_file: "raise" or "skip" unreadable files of an image folder.
    prefetch: batches tf.data prepares ahead.
  """
  host_tf()  # tf.data runs on the host: hide GPUs from TensorFlow, not from JAX
  pi, pc = _process(process_index, process_count)
  _check_options(batch_size=batch_size, process_count=pc, start_step=start_step, train=train,
                 num_epochs=num_epochs, mixup_alpha=mixup_alpha, crop_scale=crop_scale,
                 cutmix_alpha=cutmix_alpha, randaugment=randaugment,
                 crop_fraction=crop_fraction, shuffle_buffer=shuffle_buffer)
  normalize = images.get_normalizer(normalize)
  images.image_hw(image_size)
  local_b = batch_size // pc
  src = resolve_source(source, data_dir, num_classes=num_classes, input_key=input_key,
                       label_key=label_key, on_bad_file=on_bad_file)
  _check_kind(src, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, randaugment=randaugment)
  n_classes = src.info().num_classes
  start = start_step * local_b
  ds, total, local_n = _example_stream(src, split, pi, pc, train=train, seed=seed,
                                       num_epochs=num_epochs, start=start,
                                       shuffle_buffer=shuffle_buffer)
  image_kwargs = _image_kwargs(train, image_size=image_size, normalize=normalize,
                               augment=augment, flip=flip, crop_scale=crop_scale,
                               randaugment=randaugment, crop_fraction=crop_fraction)
  ds = _preprocessed(ds, src.kind, train=train, seed=seed, process_index=pi, start=start,
                     image_kwargs=image_kwargs)
  if train:
    mix = None if not (mixup_alpha > 0 or cutmix_alpha > 0) else functools.partial(
        _mixup, seed=seed, process_index=pi, start_step=start_step, alpha=mixup_alpha,
        num_classes=n_classes, cutmix_alpha=cutmix_alpha)
    ds, num_batches = _train_batches(ds, local_b, total=total, process_count=pc,
                                     num_epochs=num_epochs, start_step=start_step, mix=mix)
  else:
    ds, num_batches = _eval_batches(ds, local_b, total=total, local_n=local_n, process_count=pc)
  tok = text.load_tokenizer(tokenizer, max_length=max_length) if src.kind == "text" else None
  return BatchIterator(ds.prefetch(prefetch), src, split, num_batches, tok)
