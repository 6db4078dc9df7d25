"""A fine-tuned run exported for deployment, and evaluated in the runtime.

App layer over `jtl.export.deploy` (which exports and runs a model): a finetune.py
workdir to ONNX / LiteRT float32 / LiteRT int8, with int8 calibrated on images
of the run's own training split, and an exported file evaluated on a split of
the run's data with the same pipeline as `jtl.app.evaluation.evaluate_workdir`.
`scripts/convert.py --workdir` and `scripts/evaluate.py --exported` call these.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtl import data, eval_steps, paths
from jtl.app import evaluation, experiment, methods, workdirs
from jtl.checkpoint import restore
from jtl.export.writers import write_atomic
from jtl.errors import ConfigError
from jtl.export import deploy


def _image_run(workdir: str | os.PathLike, step: int | str,
               data: dict[str, Any] | None = None) -> workdirs.Restored:
  run = workdirs.restore(workdir, step=step, data=data)
  if run.spec.input_kind != "image":
    raise ConfigError(f"{workdir}: model {run.config.model!r} takes {run.spec.input_kind}; "
                      "deployment export supports image models.")
  return run


def calibration_images(config: Any, spec: Any, count: int, *, split: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels): `count` shuffled, unaugmented images of the training
  split from jtl's own input pipeline (what the model takes)."""
  kwargs = experiment._pipeline_kwargs(config, spec)  # pylint: disable=protected-access
  batches = data.make_dataset(
      config.dataset, split=split or config.train_split,
      batch_size=min(count, 64), train=True, augment=False, flip=False, num_epochs=1,
      **kwargs)
  images, labels, n = [], [], 0
  for batch in batches:
    images.append(np.asarray(batch["inputs"], np.float32))
    labels.append(np.asarray(batch["label"]))
    n += len(images[-1])
    if n >= count:
      break
  if not images:
    raise ConfigError(f"No calibration images in {config.dataset!r} split "
                      f"{split or config.train_split!r}.")
  return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def export_workdir(workdir: str | os.PathLike, format: str, *,  # pylint: disable=redefined-builtin
                   out: str | os.PathLike | None = None, step: int | str = "best",
                   num_calibration: int = 300, input_pixels: bool = False,
                   max_drop: float = deploy.DEFAULT_MAX_ACCURACY_DROP,
                   data: dict[str, Any] | None = None) -> deploy.Exported:
  """Exports a fine-tuned checkpoint to `format` ("onnx", "tflite", "tflite_int8").

  The input size is the config's `image_size` (the size it was evaluated at);
  the model is the one evaluate.py scores (`Restored.deployable_variables`:
  LoRA merged, AdaBN applied where the method needs it, recorded as the
  sidecar's "adabn").
  For int8, `num_calibration` images of the training split calibrate the
  quantization and then check it: accuracy of the int8 file against the
  float32 model on them (`check_int8`, warns past `max_drop` points); the
  result goes into the sidecar JSON. `out` defaults to
  `<workdir>/export/model<suffix>`; a name of another format (m.tflite for
  "onnx") is refused first (`deploy.output_format`). `data`: where the run's
  data is now, if it moved (`workdirs.restore`; calibration and AdaBN read it).
  """
  if format not in deploy.FORMATS:
    raise ConfigError(f"format={format!r}: expected one of {deploy.FORMATS}.")
  out = os.fspath(out or paths.path(workdir) / "export" / ("model" + deploy.SUFFIX[format]))
  deploy.output_format(out, format)  # m.tflite holding ONNX: refused before any work
  run = _image_run(workdir, step, data)
  module, config, spec, classes = run.module, run.config, run.spec, run.num_classes
  variables, adabn = run.deployable_variables()  # the model evaluate.py scores
  size = int(config.image_size or spec.image_size)
  shape = (size, size, 3)
  affine = None
  images = labels = None
  if format == "tflite_int8" or input_pixels:
    affine = methods.pixel_affine(spec.normalization) if input_pixels else None
  if format == "tflite_int8":
    images, labels = calibration_images(config, spec, num_calibration)
  representative = None
  if images is not None:
    feed = _to_pixels(images, affine) if affine is not None else images
    representative = [feed[i:i + 1] for i in range(len(feed))]
  # The file's own resolution, not the model's native one.
  normalization = dataclasses.replace(spec.normalization, image_size=size)
  meta = {"model": config.model, "num_classes": classes, "workdir": os.fspath(workdir),
          **restore.step_record(run.meta), "normalize": normalization.describe(),
          **({"adabn": adabn} if adabn else {})}
  exported = deploy.export(module, variables, out, format=format, input_shape=shape,
                    representative=representative, pixel_affine=affine, meta=meta)
  if format == "tflite_int8":
    float_fn = jax.jit(deploy.inference_fn(module, variables))
    runtime = deploy.load(out)
    check = deploy.check_int8(float_fn, lambda x: runtime(_to_pixels(x, affine) if affine else x),
                       images, labels, max_drop=max_drop)
    meta = {**exported.meta, "calibration_check": check}
    deploy.write_meta(out, meta)
    exported = dataclasses.replace(exported, meta=meta)
  return exported


def _to_pixels(x: np.ndarray, affine: tuple[Any, Any]) -> np.ndarray:
  """Normalised inputs back to RGB 0..255 (the inverse of `x/255*mul + add`)."""
  mul, add = (np.asarray(a, np.float32).reshape(1, 1, 1, -1) for a in affine)
  return ((x - add) / mul * 255.0).astype(np.float32)


def evaluate_exported(workdir: str | os.PathLike, path: str | os.PathLike, *,
                      split: str | None = None, out_dir: str | os.PathLike | None = None,
                      step: int | str = "best", num_threads: int | None = None,
                      data: dict[str, Any] | None = None) -> dict[str, Any]:
  """Evaluates an exported file in its runtime on a split of the workdir's
  dataset, with the same pipeline as `evaluate_workdir`; writes
  eval_<split>_step<N>_<format>.json (accuracy, top-5, loss, per-class
  accuracy, confusion matrix) into `out_dir` (default: the workdir).

  The result records the step the file was exported from (its sidecar's,
  `convert.py --workdir`), and is named by it (`evaluation.results_name`), so
  evaluating another export never overwrites it. `step` picks the checkpoint
  whose config gives the data and pipeline; `data`, where that data is now
  (`workdirs.restore`; its classes checked as `evaluate_workdir` checks them,
  the result named `..._on_<folder>` as there).

  Raises:
    ConfigError: the sidecar names another model or class count than the
      workdir's run (before anything is scored).
  """
  run = _image_run(workdir, step, data)
  config, spec, classes = run.config, run.spec, run.num_classes
  meta = deploy.read_meta(path)
  _check_exported_from(path, meta, run, workdir)
  evaluated = evaluation.check_classes(run, workdir)
  runtime = deploy.load(path, num_threads=num_threads)
  split = split or config.eval_split
  size = int(config.image_size or spec.image_size)
  if runtime.input_shape[:2] != (size, size):
    raise ConfigError(f"{path} takes {runtime.input_shape} images; the workdir's pipeline "
                      f"makes {size}x{size}. Export it again from this workdir.")
  input_pixels = meta.get("input_pixels")
  affine = methods.pixel_affine(spec.normalization) if input_pixels else None
  confusion = np.zeros((classes, classes), np.int64)
  loss = correct5 = 0.0
  for batch in experiment.eval_batches(config, spec, split)():
    mask = np.asarray(batch["mask"], bool)
    x = np.asarray(batch["inputs"], np.float32)[mask]
    if not len(x):
      continue
    logits = runtime(_to_pixels(x, affine) if affine is not None else x)
    label = np.asarray(batch["label"])[mask]
    np.add.at(confusion, (label, logits.argmax(-1)), 1)
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    loss += float(-jnp.take_along_axis(logp, jnp.asarray(label)[:, None], axis=-1).sum())
    top5 = np.argsort(-logits, axis=-1)[:, :eval_steps.TOP_K]
    correct5 += float((top5 == label[:, None]).any(-1).sum())
  count = int(confusion.sum())
  run_step = evaluation.result_step(config)
  # Named and recorded by the file's step (None: no jtl sidecar), not the workdir's best.
  file_step = meta.get("step")
  name = evaluation.results_name(
      split, step=run_step if file_step is None else file_step, run_step=run_step,
      exported=runtime.format,
      dataset=config[evaluated] if evaluated in run.data_changed else None)
  target = paths.path(out_dir or workdir) / f"eval_{name}.json"
  result = {"workdir": os.fspath(workdir), **restore.step_record(meta),
            "exported": os.fspath(path), "exported_from": meta.get("workdir"),
            "model": meta.get("model", config.model),
            "format": runtime.format, "bytes": paths.size(path), "split": split,
            "loss": loss / max(count, 1), "accuracy": float(np.trace(confusion)) / max(count, 1),
            **({"top5_accuracy": correct5 / max(count, 1)} if classes > eval_steps.TOP_K else {}),
            "count": count,
            "per_class_accuracy": (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist(),
            "confusion_matrix": confusion.tolist(), "results_file": os.fspath(target)}
  write_atomic(target, json.dumps(result, indent=2).encode())
  return result


def _check_exported_from(path: Any, meta: dict[str, Any], run: workdirs.Restored,
                         workdir: Any) -> None:
  """A ConfigError when the exported file's sidecar names another model or
  class count than the run in `workdir`: its outputs would be scored against
  another run's labels."""
  theirs = (meta.get("model", run.config.model), meta.get("num_classes", run.num_classes))
  if theirs == (run.config.model, run.num_classes):
    return
  where = f" from the workdir {meta['workdir']}" if meta.get("workdir") else ""
  raise ConfigError(
      f"{path} was exported{where} from model {theirs[0]!r} with {theirs[1]} classes (its "
      f"sidecar {os.fspath(path)}.json), but the workdir {os.fspath(workdir)} holds a run of "
      f"{run.config.model!r} with {run.num_classes} classes. Pass the workdir the file was "
      "exported from (--workdir), or export this workdir's run (scripts/convert.py "
      "--workdir).")
