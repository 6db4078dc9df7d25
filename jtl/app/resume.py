"""Resuming a workdir: the run there must be this config's run.

A preemptible VM reruns the same command, so `finetune` resumes whatever
checkpoints the workdir holds. Before anything is built or loaded,
`check_same_run` compares what makes a run that run (the model, the strategy,
the method, the dataset's classes) with the newest checkpoint's saved config,
and refuses another run's workdir naming each difference. The data's path is
not compared: a VM that comes back may mount it elsewhere
(`workdirs.DATA_KEYS`).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from jtl import data
from jtl.app import keys, methods, model_choice
from jtl.checkpoint import layout
from jtl.errors import ConfigError, JtlError, bullet_list


def dataset_classes(config: ml_collections.ConfigDict) -> list[str] | None:
  """The class names of the config's training dataset (None: unknown)."""
  try:
    return list(data.dataset_info(config.dataset, config.data_dir).class_names)
  except JtlError:
    return None


def _strategy_name(saved: dict[str, Any]) -> str:
  return (saved.get("strategy") or {}).get("name") or "rules"


def _dataset_name(dataset: Any) -> str | None:
  """A TFDS dataset's name (without version or path); None for a folder."""
  if not isinstance(dataset, str) or dataset.startswith("folder:"):
    return None
  return dataset.split(":")[0].split("/")[0]


def check_same_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Raises a ConfigError when `workdir` holds checkpoints of another run.

  >>> import tempfile
  >>> check_same_run(keys.complete(ml_collections.ConfigDict({"model": "vit_ti16"})),
  ...                tempfile.mkdtemp())  # an empty workdir: nothing to compare
  """
  meta = layout.latest_meta(workdir) or {}
  saved = meta.get("config")
  if not saved:
    return
  ours = {"model": config.model, "strategy": keys.strategy_config(config).get("name") or "rules",
          "method": methods.method_name(config)}
  theirs = {"model": saved.get("model"), "strategy": _strategy_name(saved),
            "method": methods.method_name(ml_collections.ConfigDict(
                {"method": saved.get("method") or {}}))}
  if config.model == model_choice.AUTO:  # the workdir's run has the model it chose
    del ours["model"], theirs["model"]
  clashes = [f"{k}: the workdir's run has {theirs[k]!r}, this config {ours[k]!r}"
             for k in ours if ours[k] != theirs[k]]
  name, saved_name = _dataset_name(config.dataset), _dataset_name(saved.get("dataset"))
  if name != saved_name:
    clashes.append(f"dataset: the workdir's run has {saved.get('dataset')!r}, this config "
                   f"{config.dataset!r}")
  elif meta.get("class_names") is not None:
    classes = dataset_classes(config)
    if classes is not None and classes != meta["class_names"]:
      clashes.append(f"dataset classes: the workdir's run has {len(meta['class_names'])} "
                     f"({', '.join(meta['class_names'][:5])}...), this config's dataset "
                     f"{len(classes)} ({', '.join(classes[:5])}...)")
  if clashes:
    raise ConfigError(
        f"{workdir} holds checkpoints of another run (step {meta.get('step')}), which this "
        f"command would resume:\n{bullet_list(clashes)}\nUse a new --workdir for this run, or "
        "the workdir's settings to resume it. (A dataset at a new path is fine: only its "
        "classes are compared.)")
