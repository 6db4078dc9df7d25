"""After a run: a checkpoint evaluated on a split, in the dataset's language.

`evaluate_workdir` restores a run's checkpoint (any device count), optionally
re-estimates BatchNorm on the unlabelled training split (AdaBN), quantizes it
and attacks it, and writes eval_<name>.json (metrics, per-class accuracy by
class name, the confusion matrix) and confusion_<name>.png, with the same
input pipeline as training (`jtl.app.experiment`). `scripts/evaluate.py` and
`scripts/finetune.py` (the test split after training) are its shells.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jtl import _optional, data, eval_steps, export, paths, train
from jtl.app import figures, keys, methods, workdirs
from jtl.app.experiment import eval_batches
from jtl.checkpoint import layout, restore
from jtl.data import sources
from jtl.data.checks import class_differences
from jtl.errors import ConfigError, DataError, JtlError, bullet_list
from jtl.export import quantize
from jtl.optim import tree_bytes
from jtl.recipes import adversarial
from jtl.recipes.strategies import wise


def evaluate_test_split(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                        ) -> dict[str, Any] | None:
  """After a run: the best checkpoint evaluated on `config.test_split` (if the
  key is set and the dataset has that split), written as eval_<split>.json
  and confusion_<split>.png; None otherwise."""
  config = keys.complete(config)
  split = config.test_split
  if not split:
    return None
  dataset = config.eval_dataset or config.dataset
  try:
    sources.split_size(dataset, split, config.data_dir)
  except JtlError as e:
    print(f"No final evaluation on test_split={split!r}: {e}", flush=True)
    return None
  return evaluate_workdir(workdir, split=split, step=result_step(config),
                          data={k: config[k] for k in workdirs.DATA_KEYS}, own_data=True)


def result_step(config: ml_collections.ConfigDict) -> str:
  """The checkpoint that is a run's result: "best", or "latest" for a run
  without best_metric (no checkpoint is "best" then)."""
  return "best" if config.best_metric else "latest"


def workdir_result_step(workdir: str | os.PathLike) -> str:
  """`result_step` of the run in `workdir`, from what its checkpoints record."""
  metric, _ = layout.recorded_metric(layout.checkpoint_dir(workdir))
  return "best" if metric else "latest"


def results_name(split: str, *, step: int | str = "best", run_step: str = "best",
                 precision: str = "float32", adabn: bool = False,
                 attack: str | None = None, dataset: str | None = None,
                 exported: str | None = None) -> str:
  """The name of an evaluation's files: the split, then whatever differs from
  the run's own evaluation of it (data other than where the run last found
  it, another checkpoint, precision, AdaBN asked for, an attack, an exported
  file's format: its runtime), so that no evaluation overwrites another's.

  >>> results_name("test"), results_name("test", step=1200, precision="int8")
  ('test', 'test_step1200_int8')
  >>> results_name("train[90%:]", step="latest", attack="pgd")
  'train_from90pct_latest_pgd'
  >>> results_name("test", dataset="folder:/mnt/photos_2024")
  'test_on_photos_2024'
  >>> results_name("test", step=2, exported="tflite_int8")
  'test_step2_tflite_int8'
  """
  parts = [file_safe(split)]
  parts += [f"on_{data_label(dataset)}"] if dataset else []
  if step != run_step:
    parts.append(f"step{step}" if isinstance(step, int) else str(step))
  parts += [precision] if precision != "float32" else []
  parts += ["adabn"] if adabn else []
  parts += [attack] if attack else []
  parts += [exported] if exported else []
  return "_".join(parts)


def data_label(dataset: str) -> str:
  """A dataset in file names: a folder's last name, a TFDS name as written.

  >>> data_label("folder:/mnt/photos/"), data_label("cifar10:3.0.2")
  ('photos', 'cifar10_3.0.2')
  """
  if dataset.startswith("folder:"):
    dataset = os.path.basename(dataset[len("folder:"):].rstrip("/\\")) or "folder"
  return file_safe(dataset) or "data"


def evaluate_workdir(workdir: str | os.PathLike, *, split: str | None = None,
                     step: int | str | None = None, out_dir: str | os.PathLike | None = None,
                     precision: str = "float32", save_quantized: str | os.PathLike | None = None,
                     adabn: bool = False, attack: str | None = None, eps: float = 0.1,
                     attack_steps: int = 20, data: dict[str, Any] | None = None,
                     own_data: bool = False) -> dict[str, Any]:
  """Restores a checkpoint (params only, any device count), evaluates it on
  `split` (default: `eval_split`), and writes eval_<name>.json and
  confusion_<name>.png, where the
  name is the split's, then what differs from the run's own evaluation
  (`results_name`: eval_test.json, eval_test_step1200_int8.json, ...); the
  result's "results_file" says which.

  The result records the step read, the step asked for and the damaged steps
  skipped to reach it (`restore.step_record`); a result of another step than
  the one asked for is named by the step read (eval_test_step4.json).

  `data` ({"dataset": "folder:/new/path", ...}, `workdirs.DATA_KEYS`): where
  the data is now, when it has moved since the run (`workdirs.restore`). Its
  classes must be the run's (`check_classes`, before anything is scored), and
  data other than where the run last found it gets its own files
  (eval_test_on_<folder name>.json), so the run's own results are never
  overwritten by an evaluation on other data; `own_data=True` (the run's own
  final evaluation, its config compared with the run's) keeps the run's names.

  Post-training options (their results go into the same JSON):
    precision: "float32", "bfloat16", "int8" or "int8_bfloat16"
      (`jtl.export.quantize`; int8 = per-channel weight quantization); the report
      adds the stored model size.
    save_quantized: also write the variables at `precision` to this
      .safetensors file (`jtl.export.quantize.load` reads it back; another
      suffix is refused before the evaluation).
    adabn: first re-estimate BatchNorm statistics on the unlabelled
      training split of the evaluated dataset (AdaBN, `jtl.recipes.domain`). Always
      done for a domain run with batchnorm "separate" (`methods.needs_adabn`):
      its running statistics are the source's.
    attack, eps, attack_steps: also report accuracy under "pgd" / "fgsm"
      with radius eps in pixel units ("adv_accuracy").
  """
  if save_quantized:  # model_int8.npz holding safetensors bytes: refused before any work
    quantize.check_save_path(save_quantized)
  step = workdir_result_step(workdir) if step is None else step
  run = workdirs.restore(workdir, step=step, data=data)
  evaluated = check_classes(run, workdir)
  out = out_dir or workdir
  problem = workdirs.writable_problem(out, "out_dir" if out_dir else "workdir")
  if problem:  # before the evaluation, not after it
    raise ConfigError(f"Cannot write the evaluation's results: {problem}.")
  split = split or run.config.eval_split
  other_data = not own_data and evaluated in run.data_changed
  # A damaged step asked for ("best") is not what was evaluated: the files say which was.
  read = run.meta["step"] if run.meta.get(restore.SKIPPED) else step
  name = results_name(split, step=read, run_step=result_step(run.config), precision=precision,
                      adabn=adabn, attack=attack,
                      dataset=run.config[evaluated] if other_data else None)
  variables, extra = _post_training(run, adabn=adabn, precision=precision,
                                    save_quantized=save_quantized)
  robust_step = _robust_eval_step(run, attack, eps, attack_steps) if attack else None
  metrics, robust, confusion = _eval_pass(run, variables, split, precision, robust_step)
  if robust is not None:
    extra["adv_accuracy"] = robust["accuracy"]
    extra["attack"] = {"name": attack, "eps": eps, "steps": attack_steps}
  names = _class_names(run.config, run.meta["num_classes"])
  per_class = (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist()
  result = {"workdir": str(workdir), **restore.step_record(run.meta), "split": split, **metrics,
            **extra, "class_names": names, "per_class_accuracy": per_class,
            "per_class_accuracy_by_name": dict(zip(names, per_class)),
            "confusion_matrix": confusion.tolist(),
            "results_file": os.fspath(paths.path(out) / f"eval_{name}.json")}
  try:
    _write_eval(paths.path(out), name, result, confusion, names,
                title=f"{run.config.model} {split}")
  except OSError as e:  # the numbers are not lost with the files
    shown = {k: result[k] for k in ("step", "split", "accuracy", "top5_accuracy", "loss", "count")
             if k in result}
    raise ConfigError(
        f"The evaluation finished ({json.dumps(shown)}) but its files could not be written "
        f"into {os.fspath(out)} ({type(e).__name__}: {e.strerror or e}). Pass --out_dir "
        "(out_dir=) a writable folder with free space to keep them.") from e
  return result


def check_classes(run: workdirs.Restored, workdir: Any = "the workdir") -> str:
  """Raises a DataError, before anything is scored, when the dataset `run`
  evaluates on has other classes than the run trained on (its checkpoint's
  "class_names"): its labels would be scored against other outputs. Returns
  the config key that names that dataset ("dataset" or "eval_dataset")."""
  config = run.config
  key = "eval_dataset" if config.eval_dataset else "dataset"
  dataset = config[key]
  try:
    names = [str(n) for n in data.dataset_info(dataset, config.data_dir).class_names]
  except JtlError as e:
    if key in run.data_changed:
      raise
    raise type(e)(
        f"{e}\nThe run last found its data at {key}={dataset!r}. If it has moved, pass where "
        "it is now: scripts/evaluate.py --dataset=folder:/new/path (--data_dir for a TFDS "
        "data folder; data={'dataset': ...} in Python).") from e
  if key == "eval_dataset" and key not in run.data_changed:
    return key  # a domain run's own target data, named as its source's or not
  problems = _class_differences(run.meta.get("class_names"), names, run.num_classes)
  if problems:
    raise DataError(
        f"The classes of {key}={dataset!r} are not those of the run in {os.fspath(workdir)} "
        f"(its checkpoint of step {run.meta.get('step')}):\n{bullet_list(problems)}\n"
        "Its labels would be scored against the wrong outputs of the model. Pass data with "
        "the run's classes, in its order (its folder names), e.g. "
        "--dataset=folder:<where the run's data is now>.")
  return key


def _class_differences(ours: list[str] | None, theirs: list[str], classes: int) -> list[str]:
  """What differs between the run's class names and the dataset's (any order
  change too: label i is output i)."""
  if ours is None:  # an older run's meta: only the count is known
    return [] if len(theirs) == classes else [
        f"the dataset has {len(theirs)} classes, the run's head {classes}"]
  differences = class_differences(ours, theirs)
  if differences is None:
    return []
  missing, extra = differences
  problems = []
  if missing:
    problems.append(f"missing (the run's, not in this dataset): {', '.join(missing)}")
  if extra:
    problems.append(f"extra (in this dataset, not the run's): {', '.join(extra)}")
  return problems or [f"reordered: the run's order is {', '.join(map(str, ours))}; this "
                      f"dataset's {', '.join(theirs)}"]


def _post_training(run: workdirs.Restored, *, adabn: bool, precision: str,
                   save_quantized: str | os.PathLike | None) -> tuple[Any, dict[str, Any]]:
  """`evaluate_workdir`'s variables: the plain model (LoRA folded in) after
  AdaBN when asked or when the method needs it (`Restored.deployable_variables`,
  what the exports ship too), quantized to `precision` (also saved when
  asked), and what was done, for the report."""
  config = run.config
  variables, adabn_record = run.deployable_variables(adabn=adabn)
  extra: dict[str, Any] = {"adabn": adabn_record} if adabn_record else {}
  variables = quantize.prepare(variables, precision)
  extra["precision"] = precision
  extra["model_bytes"] = tree_bytes(variables)
  if save_quantized:
    extra["saved_quantized"] = {"path": str(save_quantized), "bytes": quantize.save(
        save_quantized, variables, meta={"model": config.model,
                                          "num_classes": run.meta["num_classes"],
                                          "precision": precision})}
  return variables, extra


def _robust_eval_step(run: workdirs.Restored, attack: str, eps: float,
                      attack_steps: int) -> Callable:
  """The jitted eval step under a "pgd" / "fgsm" attack of radius `eps` in
  pixel units (on float variables)."""
  input_scale, bounds = methods.attack_units(run.spec.normalization)
  return jax.jit(adversarial.make_robust_eval_step(
      run.module, attack=attack, eps=eps, steps=attack_steps, input_scale=input_scale,
      bounds=bounds))


def _eval_pass(run: workdirs.Restored, variables: Any, split: str, precision: str,
               robust_step: Callable | None
               ) -> tuple[dict[str, float], dict[str, float] | None, np.ndarray]:
  """One pass over `split` at `precision`: the eval metrics, those under attack
  (None without `robust_step`) and the confusion matrix (true classes down)."""
  predict = quantize.make_inference_fn(run.module, variables, precision=precision)
  eval_step = jax.jit(quantize.make_quantized_eval_step(run.module, precision=precision))
  if robust_step is not None:
    float_variables = quantize.dequantize(variables, jnp.float32)
  classes = run.meta["num_classes"]
  confusion = np.zeros((classes, classes), np.int64)
  sums: dict[str, float] = {}
  robust_sums: dict[str, float] = {}
  for batch in eval_batches(run.config, run.spec, split)():
    logits = np.asarray(predict(batch["inputs"]))
    mask = np.asarray(batch["mask"], bool)
    labels = np.asarray(batch["label"])
    labels = labels.argmax(-1) if labels.ndim == 2 else labels  # soft labels: the top class
    np.add.at(confusion, (labels[mask], logits.argmax(-1)[mask]), 1)
    _add_sums(sums, eval_step(variables, batch))
    if robust_step is not None:
      _add_sums(robust_sums, robust_step(float_variables, batch))
  robust = eval_steps.summarize_eval(robust_sums) if robust_step is not None else None
  return eval_steps.summarize_eval(sums), robust, confusion


def _add_sums(total: dict[str, float], sums: dict[str, Any]) -> None:
  """Adds one batch's eval sums (device arrays) to `total`."""
  for k, v in jax.device_get(sums).items():
    total[k] = total.get(k, 0.0) + float(v)


def _write_eval(out: epath.Path, name: str, result: dict[str, Any], confusion: np.ndarray,
                names: list[str], *, title: str) -> None:
  """Writes eval_<name>.json and confusion_<name>.png into `out`."""
  paths.write_atomic(out / f"eval_{name}.json", json.dumps(result, indent=2).encode())
  _plot_confusion(confusion, out / f"confusion_{name}.png", names, title=title)

def file_safe(split: str) -> str:
  """A split name for file names, one name per split: a slice's start and
  end are marked ("from", "to"), so "train[:90%]" and "train[90%:]" differ.

  >>> file_safe("test[:64]"), file_safe("train[90%:]"), file_safe("train[10:20]")
  ('test_to64', 'train_from90pct', 'train_10to20')
  >>> file_safe("train[val10%]"), file_safe("test")
  ('train_val10pct', 'test')
  """
  def bounds(m: re.Match[str]) -> str:
    start, end = m.group(1), m.group(2)
    return "_" + (f"{start}to{end}" if start and end else f"to{end}" if end else f"from{start}")
  named = re.sub(r"\[([^\]:]*):([^\]:]*)\]", bounds, split)
  return re.sub(r"[^\w.-]+", "_", named.replace("%", "pct")).strip("_")


def _class_names(config: ml_collections.ConfigDict, classes: int) -> list[str]:
  """The evaluated dataset's class names (their indices if it has none)."""
  try:
    names = data.dataset_info(config.eval_dataset or config.dataset,
                              config.data_dir).class_names
  except JtlError:
    names = []
  return [str(n) for n in names] if len(names) == classes else [str(i) for i in range(classes)]


def _plot_confusion(confusion: np.ndarray, path: epath.Path, names: list[str], *,
                    title: str) -> None:
  plt = _optional.require("matplotlib.pyplot", "The confusion matrix PNG")
  fig = figures.confusion_figure(confusion, names, title=title)
  try:
    paths.save_figure(fig, path)
  finally:
    plt.close(fig)


def wise_workdir(workdir: str | os.PathLike, *, alphas: Any = None, step: int | str = "best",
                 test_split: str | None = None,
                 data: dict[str, Any] | None = None) -> dict[str, Any]:
  """WiSE-FT on an LP-FT run: `theta(alpha) = (1 - alpha) * theta_probe + alpha
  * theta_ft` (all variables, BatchNorm statistics too) for each alpha, scored
  on the run's validation split (its eval_split); the best alpha's model is
  written to <workdir>/export/wise.safetensors, and scored once on
  `test_split` when given. Writes and returns wise.json: the chosen alpha, a
  row per alpha, the test result. `data`: where the run's data is now, if it
  moved (`workdirs.restore`; its classes must be the run's)."""
  run = workdirs.restore(workdir, step=step, data=data)
  check_classes(run, workdir)
  probe, ft = workdirs.load_probe(workdir), run.merged_variables()
  if jax.tree.structure(probe) != jax.tree.structure(ft):
    raise ConfigError(f"{workdir}: the saved probe ({workdirs.PROBE_VARIABLES}) and the "
                      "checkpoint hold different variables; was the probe written by this run?")
  eval_step = jax.jit(eval_steps.make_eval_step(run.module))
  validation = run.config.eval_split
  score = lambda split: lambda v: train.evaluate(eval_step, v, eval_batches(
      run.config, run.spec, split)())
  alpha, rows = wise.choose_alpha(score(validation), probe, ft,
                                  wise.WISE_ALPHAS if alphas is None else tuple(alphas))
  chosen = wise.wise_ft(probe, ft, alpha)
  model = export.write(chosen, paths.path(workdir) / "export" / "wise.safetensors")
  result = {"workdir": str(workdir), **restore.step_record(run.meta),
            "validation_split": validation,
            "alpha": alpha, "rows": rows, "model": str(model)}
  if test_split:
    result["test"] = {"split": test_split, **{a: score(test_split)(v) for a, v in (
        ("wise", chosen), ("probe", probe), ("fine_tuned", ft))}}
  paths.write_atomic(paths.path(workdir) / "wise.json", json.dumps(result, indent=2).encode())
  return result
