"""The data checks of a run's preflight (`jtl.app.preflight`): datasets, splits, image files.

`data_problems`: both datasets and splits, class counts and class names,
and, for image folders, every file decoded and hashed (copies across splits
warned about; eval classes without training examples too);
`workdir_in_data_problems`: a workdir inside an image folder the run reads.
Nothing here loads weights or builds a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jtl.data import folder, sources
from jtl.data.checks import class_differences
from jtl.errors import JtlError, bullet_list


def data_problems(config: ml_collections.ConfigDict) -> tuple[list[str], int]:
  """Checks both datasets, their splits and (for folders) every image file.

  Returns (problems, number of classes of the training data, 0 if unknown).
  Classes of the eval split absent from the train split are warned about.
  """
  problems, found = [], {}
  uses = {"train_split": (config.dataset, config.train_split),
          "eval_split": (config.eval_dataset or config.dataset,
                         config.eval_split)}
  for key, (dataset, split) in uses.items():
    try:
      source = sources.resolve_source(dataset, config.data_dir)
      size = sources.split_size(source, split)
      found[key] = source
      if key == "train_split" and not config.num_epochs and 0 < size < config.batch_size:
        logging.warning("batch_size=%d is larger than %s (%d examples): each batch repeats "
                        "examples; a smaller batch_size or num_epochs (which caps the batch "
                        "at the split) avoids it.", config.batch_size, split, size)
    except JtlError as e:  # a dataset's own problem is said once, not once per split
      if not any(str(e) in p and repr(dataset) in p for p in problems):
        problems.append(f"{key}={split!r} of dataset {dataset!r}: {e}")
  if config.test_split and not _optional_test_folder(config):
    dataset = config.eval_dataset or config.dataset
    try:
      sources.split_size(sources.resolve_source(dataset, config.data_dir), config.test_split)
    except JtlError as e:
      problems.append(f"test_split={config.test_split!r} of dataset {dataset!r}: {e} (an empty "
                      "--config.test_split= or None evaluates no test split)")
  classes = found["train_split"].info().num_classes if "train_split" in found else 0
  if "train_split" in found and classes < 2 and not config.num_classes:
    problems.append(f"dataset {config.dataset!r} has {classes} class(es); fine-tuning a "
                    "classifier needs at least 2")
  problems += num_classes_problems(config, found, classes)
  problems += class_name_problems(config, found)
  problems += image_file_problems(config, found)
  if len(found) == 2:
    _warn_unseen_classes(config, found["train_split"], found["eval_split"])
  return problems, classes


def _optional_test_folder(config: ml_collections.ConfigDict) -> bool:
  """An image folder's test split is optional: a folder without `test/`
  trains and validates, and has no final test evaluation."""
  dataset = config.eval_dataset or config.dataset
  return (config.test_split == "test" and isinstance(dataset, str)
          and dataset.startswith("folder:"))


def num_classes_problems(config: ml_collections.ConfigDict, found: dict[str, Any],
                         classes: int) -> list[str]:
  """`num_classes` below a dataset's class count: the labels at or above it
  would have no output (zero loss, never predicted), so it is refused."""
  outputs = int(config.num_classes or classes)
  datasets = {"train_split": config.dataset,
              "eval_split": config.eval_dataset or config.dataset}
  problems, seen = [], set()
  for key, source in found.items():
    dataset, n = datasets[key], source.info().num_classes
    if outputs and n > outputs and dataset not in seen:
      seen.add(dataset)
      given = (f"num_classes={outputs}" if config.num_classes else
               f"num_classes=0 (the {outputs} classes of dataset {config.dataset!r})")
      problems.append(f"{given} is smaller than the {n} classes of dataset {dataset!r} "
                      f"({key}; labels 0..{n - 1}): labels {outputs}..{n - 1} would have no "
                      f"output. Set num_classes={n} (or 0: from the dataset)")
  return problems


def class_name_problems(config: ml_collections.ConfigDict, found: dict[str, Any]) -> list[str]:
  """An eval_dataset (also the test split's dataset) whose classes are not the
  training dataset's, in the same order: labels are class indices, so its
  accuracy would score other classes and pick the best checkpoint on them."""
  if "train_split" not in found or "eval_split" not in found or \
      config.eval_dataset in (None, "", config.dataset):
    return []
  train = list(found["train_split"].info().class_names)
  other = list(found["eval_split"].info().class_names)
  differences = class_differences(train, other)
  if differences is None:
    return []
  only_train, only_eval = differences
  detail = (f"only in dataset: {only_train}; only in eval_dataset: {only_eval}"
            if only_train or only_eval else f"the same names in another order: {train} and {other}")
  return [f"eval_dataset {config.eval_dataset!r} has other classes than dataset "
          f"{config.dataset!r} ({detail}): its label i would be scored as the training data's "
          f"class i, so validation and test accuracy would mean nothing. Give both the same "
          f"class folders, or set eval_dataset=None"]


def image_file_problems(config: ml_collections.ConfigDict, found: dict[str, Any]) -> list[str]:
  """Image folders: every file decoded as the input pipeline decodes it
  (`folder.verify`: PIL, EXIF orientation applied) and hashed. A file that
  does not decode is a problem (it would stop the run at its first
  evaluation); evaluation files with the same bytes as a training file are
  warned about (`_warn_duplicates`)."""
  sources = {s.name: s for s in found.values() if getattr(s, "kind", None) == "file"}
  problems, digests = [], {}
  for source in sources.values():
    paths = [p for files in source.inputs.values() for p in files]
    bad, hashes = folder.verify(paths)
    if bad:
      problems.append(f"{len(bad)} file(s) of image folder {source.name!r} do not decode "
                      "(delete or replace them):\n" + bullet_list(bad, limit=20).replace(
                          "  - ", "      - "))
    digests.update(zip(paths, hashes))
  if not problems and "train_split" in found and found["train_split"].name in sources:
    _warn_duplicates(config, found, digests)
  return problems


def _warn_duplicates(config: ml_collections.ConfigDict, found: dict[str, Any],
                     digests: dict[str, str]) -> None:
  """Warns, with the count, when evaluation files (eval_split, test_split)
  have the same bytes as a training file: they are not held out."""
  train = found["train_split"]
  name, idx = train.indices(config.train_split)
  seen = {digests[train.inputs[name][i]]: train.inputs[name][i] for i in idx}
  evals = {"eval_split": (found.get("eval_split"), config.eval_split)}
  if config.test_split and config.test_split.split("[")[0] in train.labels:
    evals["test_split"] = (train, config.test_split)
  for key, (source, split) in evals.items():
    if source is None or getattr(source, "kind", None) != "file":
      continue
    name, idx = source.indices(split)
    copies = [(f, seen[digests[f]]) for f in source.inputs[name][idx]
              if digests.get(f) in seen]
    if copies:
      example = ", ".join(f"{folder_name(a)} = {folder_name(b)}" for a, b in copies[:3])
      logging.warning("%d image(s) of %s=%r have the same content as a training image of %r "
                      "(e.g. %s): they are not held out, so their accuracy overstates the "
                      "model's. Remove the copies from one side.", len(copies), key, split,
                      config.train_split, example)


def folder_name(path: str) -> str:
  """"<split>/<class>/<file>" of an image folder's file, printable."""
  return folder.shown("/".join(os.path.normpath(path).split(os.sep)[-3:]))


def _warn_unseen_classes(config: ml_collections.ConfigDict, train: Any, test: Any) -> None:
  labels = lambda src, split: getattr(src, "labels", {}).get(split.split("[")[0])
  seen = labels(train, config.train_split)
  wanted = labels(test, config.eval_split)
  if seen is None or wanted is None:
    return
  # Soft labels [N, classes]: a class is seen where it has weight.
  classes = lambda y: np.flatnonzero(y.sum(0)) if y.ndim == 2 else np.unique(y)
  unseen = sorted(set(classes(wanted).tolist()) - set(classes(seen).tolist()))
  if unseen:
    names = [test.class_names[i] if i < len(test.class_names) else i for i in unseen]
    logging.warning("Eval classes %s have no training examples in %s of %s: they cannot be "
                    "learned.", names, config.train_split, config.dataset)


def workdir_in_data_problems(config: ml_collections.ConfigDict, workdir: Any) -> list[str]:
  """A workdir equal to or inside an image folder the run reads: its
  checkpoints/ and tensorboard/ would be written among the photos, then read
  as class folders. (A dataset inside the workdir is fine, as is a workdir in
  a hidden folder of the dataset, which the scan skips.)"""
  if not str(workdir).strip() or "://" in str(workdir):
    return []
  work = os.path.realpath(os.path.expanduser(str(workdir)))
  read = ["dataset"] + (["eval_dataset"] if config.eval_dataset not in (None, "", config.dataset)
                        else [])
  problems = []
  for key in read:
    data = _folder_of(config[key])
    if data is None or os.path.commonpath([work, data]) != data:
      continue
    if _behind_a_hidden_folder(data, work):
      continue
    problems.append(
        f"the workdir is inside the dataset folder: workdir {workdir} is in {key}="
        f"{config[key]!r}, so the run's checkpoints/ and tensorboard/ would be written "
        f"among its images and read back as class folders. Put the workdir outside it, "
        f"e.g. --workdir={os.path.join(os.path.dirname(data), 'runs', 'run')}")
  return problems


def _behind_a_hidden_folder(data: str, work: str) -> bool:
  """Whether the run writes `work` only behind a hidden folder of `data`,
  which the scan skips (photos/.runs/a): one of its parts is hidden and every
  part before it exists already (photos/runs/.a would create the visible
  photos/runs, which the next scan reads as a class folder)."""
  path = Path(data)
  for part in Path(os.path.relpath(work, data)).parts:
    if folder.is_hidden(Path(part)):
      return True
    path = path / part
    if not path.exists():
      return False
  return False


def _folder_of(dataset: Any) -> str | None:
  """The local path of a 'folder:' dataset (None for any other dataset)."""
  if not isinstance(dataset, str) or not dataset.startswith("folder:"):
    return None
  path = dataset[len("folder:"):]
  return os.path.realpath(os.path.expanduser(path)) if path.strip() else None
