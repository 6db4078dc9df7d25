"""What `fit` refuses: options out of range, variables that do not fit an NNX
module (paths and shapes), variables without the BatchNorm statistics precise
BatchNorm needs, a first training batch the model cannot train or evaluate on
(checked before the first step), a workdir whose checkpoints belong to another
model, and a diverged run (a NaN or inf loss or gradient norm,
`DivergenceError` naming the step).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from jtl import parallel
from jtl.adapter import NnxModel, is_nnx_module, sown_paths, variables_of
from jtl.checkpoint.manager import CheckpointManager
from jtl.errors import CheckpointError, ConfigError, DivergenceError, StepError
from jtl.losses import Batch, check_batch
from jtl.state import TrainState
from jtl.tree import PyTree, check_compute_dtype
from jtl.variable_checks import MERGE_LORA, check_variables


def first_batch_checked(train_batches: Callable[[int], Iterator[Batch]],
                        eval_step: Callable | None,
                        output_classes: Callable[..., int | None],
                        variables: Callable[[], PyTree],
                        trace_train_step: Callable[[Batch], Any] | None = None
                        ) -> Callable[[int], Iterator[Batch]]:
  """`train_batches` whose first batch is checked before the first training
  step: its format (`jtl.losses.check_batch`), its trace through the train
  step (`trace_train_step(batch)`, e.g. `trace_first_step`: shapes only, so
  that a loss that cannot take the model's outputs fails now), its labels
  against the classes of the model's logits (shapes and values), and its
  trace through `eval_step` (shapes only, `jax.eval_shape`), so that outputs
  evaluation cannot score (a dict without eval_output=, ...) fail now
  instead of at the first evaluation."""
  if not callable(train_batches):
    raise StepError(
        f"fit(train_batches=...) takes a function start_step -> iterator of batches (the "
        f"input position on resume), got {type(train_batches).__name__}; e.g. "
        "train_batches=lambda start: itertools.islice(itertools.cycle(batches), start, None).")

  def make(start_step: int) -> Iterator[Batch]:
    batches = iter(train_batches(start_step))
    first = next(batches, None)
    if first is None:
      return batches
    if trace_train_step is not None:
      trace_train_step(first)  # the step checks the batch it reads (a transform's output)
    else:
      check_batch(first, what="A training batch (from train_batches)")
    if not _plain(first):  # built into one by a batch_transform, or a loss without labels
      return itertools.chain([first], batches)
    probe = {**first, "mask": np.ones(np.shape(first["label"])[:1], bool)}
    try:
      classes = output_classes(variables(), probe)
    except Exception:  # noqa: BLE001 - e.g. a method's training batch: its loss decides
      classes = None
    if classes is not None:
      _check_label_values(first["label"], first.get("mask"), classes)
    if eval_step is not None:
      try:
        jax.eval_shape(eval_step, variables(), probe)
      except StepError:
        raise
      except Exception:  # noqa: BLE001 - e.g. a method's training batch: the evaluation decides
        pass
    return itertools.chain([first], batches)
  return make


def _plain(batch: Batch) -> bool:
  """Whether `batch` is one that evaluation could read too: "inputs" and "label"."""
  try:
    check_batch(batch)
  except StepError:
    return False
  return True


def trace_first_step(train_step: Callable, state: TrainState, batch: Batch,
                     mesh: jax.sharding.Mesh) -> None:
  """Traces the jitted `train_step` on `batch` placed as the step loop places
  it (`jax.eval_shape`: no computation; the first step reuses this trace), so
  that what only the training pass reads (the loss of the model's outputs, a
  batch_transform) fails before the first step."""
  jax.eval_shape(train_step, state, parallel.shard_batch(batch, mesh))


def _check_label_values(label: Any, mask: Any, num_classes: int) -> None:
  """Integer labels of the rows that count (mask) must be class indices of the
  model's `num_classes` logits: one out of range would train on an all-zero
  target (a loss of 0)."""
  label = np.asarray(label)
  if mask is not None and np.shape(mask) == label.shape[:1]:
    label = label[np.asarray(mask, bool)]
  if not np.issubdtype(label.dtype, np.integer) or label.size == 0:
    return
  low, high = int(label.min()), int(label.max())
  if low < 0 or high >= num_classes:
    raise StepError(
        f"The first training batch has labels from {low} to {high}, but the model's logits "
        f"have {num_classes} classes (labels 0..{num_classes - 1}). Give the head as many "
        "outputs as the dataset has classes (num_classes), or map the labels to 0..C-1.")


def check_meta(mngr: CheckpointManager, meta: dict[str, Any], workdir: Any) -> None:
  """Refuses to resume a checkpoint made by a different model setup."""
  if mngr.latest_step() is None:
    return
  saved = mngr.meta()
  clashes = [f"{k}: checkpoint has {saved.get(k)!r}, this run {v!r}"
             for k, v in meta.items() if (k in ("model", "num_classes") and saved.get(k) != v)
             or (k == "class_names" and None not in (v, saved.get(k)) and saved[k] != v)]
  if clashes:
    raise CheckpointError(
        f"{workdir}: the checkpoint there belongs to a different model:\n  "
        + "\n  ".join(clashes) + "\nUse a new --workdir, or the same model settings.")


def _nonfinite_step(steps_and_metrics: list[tuple[int, dict[str, Any]]]
                    ) -> tuple[int, dict[str, float]] | None:
  """The first (step, metrics) whose loss or grad_norm is NaN or inf."""
  for step, metrics in jax.device_get(steps_and_metrics):
    values = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics}
    if not all(np.isfinite(v) for v in values.values()):
      return step, values
  return None


def _divergence(step: int, values: dict[str, float], last_saved: int | None,
                workdir: Any) -> DivergenceError:
  shown = ", ".join(f"{k} {v}" for k, v in values.items())
  kept = (f"The last checkpoint, step {last_saved} in {workdir}, is from before it and is kept."
          if last_saved is not None else "Nothing was saved by this run after it.")
  return DivergenceError(
      f"Training diverged at step {step}: {shown}. The run stops and saves nothing from "
      f"step {step} on. {kept} Lower the learning rate, add clip_norm or warmup, or set "
      "on_nonfinite='skip' (config key on_nonfinite) to skip such updates instead.")


def stop_if_diverged(unchecked: list[tuple[int, dict[str, Any]]], last_saved: int | None,
                     workdir: Any) -> None:
  """Raises DivergenceError at the first of these steps with a NaN/inf loss or
  gradient norm (this reads the metrics back from the device)."""
  bad = _nonfinite_step(unchecked)
  if bad is not None:
    raise _divergence(*bad, last_saved, workdir)


def check_options(*, on_nonfinite: str, ema_decay: float | None, log_every: int,
                  compute_dtype: Any, **batch_fns: Any) -> None:
  """Refuses invalid values of `fit`'s options."""
  check_compute_dtype(compute_dtype)
  for name, given_fn in batch_fns.items():
    if given_fn is not None and not callable(given_fn):
      raise StepError(
          f"fit({name}=...) takes a function that returns one pass of batches (called at each "
          f"evaluation), got {type(given_fn).__name__}; e.g. {name}=lambda: batches.")
  if on_nonfinite not in ("stop", "skip"):
    raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
  if ema_decay is not None and (isinstance(ema_decay, bool) or not 0.0 <= ema_decay < 1.0):
    raise ConfigError(f"ema_decay must be a number in [0, 1) (e.g. 0.999; None: no weight "
                      f"EMA), got {ema_decay!r}.")
  if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
    raise ConfigError(f"log_every must be an integer >= 1 (steps between logged training "
                      f"metrics), got {log_every!r}.")


def initial_variables(module: Any, variables: PyTree | None,
                      batchnorm_batches: Callable[[], Iterable[Batch]] | None) -> PyTree:
  """The given variables, or an NNX module's own; refuses variables that are
  not an NNX module's (every path, the same shapes), and precise BatchNorm
  for variables without BatchNorm statistics."""
  if variables is None:
    variables = variables_of(module)
  elif isinstance(module, NnxModel) or is_nnx_module(module):
    # The module fills what the variables lack with its own weights, which the
    # checkpoints would not hold: refused, as another module's shapes are.
    check_variables(
        variables, variables_of(module), what=f"fit(module={type(module).__name__}, variables=...)",
        advice="Pass the module's own variables: variables=None (its weights as they are), "
        "jtl.adapter.variables_of(module) after loading weights into it (with "
        "jtl.load_pretrained(source, module), which loads into the module).",
        lora_advice="train them with module=jtl.recipes.strategies.LoraWeights(module, alpha), "
        f"or {MERGE_LORA}", sown=sown_paths(module) if is_nnx_module(module) else ())
  if batchnorm_batches is not None and set(variables) == {"params"}:
    raise ConfigError("fit(batchnorm_batches=...): the variables hold no BatchNorm statistics "
                      "(only 'params'); drop batchnorm_batches for a model without BatchNorm.")
  return variables
