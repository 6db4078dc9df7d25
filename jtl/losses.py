"""Losses and per-row counts over a batch, shared by the train and eval steps.

Batches are dicts: {"inputs": ..., "label": int [B] or soft [B, C],
"mask": bool [B] (optional; only rows with mask=True count)}; other keys
pass on to a `loss_fn` or `batch_transform` (a method's batches carry more).
Both steps refuse any other batch at trace time (`check_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jtl.errors import StepError

Batch = dict[str, Any]
LossFn = Callable[[Any, Batch], Any]  # -> scalar, or (scalar, {name: scalar metric})


# Keys a batch of another library's convention gives for the two jtl reads.
_NEAR_MISSES = {"inputs": ("input", "image", "images", "img", "x", "pixel_values", "features"),
                "label": ("labels", "y", "target", "targets", "class", "label_ids")}


def check_batch(batch: Any, *, needs_label: bool = True, what: str = "A batch") -> None:
  """Refuses a batch that is not a dict with "inputs" (and "label" when
  `needs_label`), naming the keys to rename ("image" -> "inputs", "labels" ->
  "label"). Other keys pass. Types and keys only: free at trace time.

  >>> check_batch({"image": 0, "labels": 0})  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jtl.errors.StepError: A batch must be a dict ... Rename 'image' -> 'inputs', 'labels' -> 'label'.
  """
  if isinstance(batch, Mapping):
    missing = [k for k in ("inputs", "label") if k not in batch and (needs_label or k == "inputs")]
    if not missing:
      return
    got = (f"a dict with keys {sorted(map(str, batch))}, without "
           f"{' and '.join(map(repr, missing))}")
    renames = [f"{k!r} -> {want!r}" for want in missing for k in batch
               if str(k).lower() in _NEAR_MISSES[want]]
    fix = f" Rename {', '.join(renames)}." if renames else ""
  elif isinstance(batch, (tuple, list)):
    got = f"a {type(batch).__name__} of {len(batch)}"
    fix = " Turn (x, y) pairs into {'inputs': x, 'label': y} in the data pipeline."
  else:
    got, fix = type(batch).__name__, ""
  raise StepError(
      f"{what} must be a dict with 'inputs' and 'label' (class indices [B] or soft labels "
      "[B, C]) and optionally 'mask' (bool [B], the rows that count; other keys pass on to "
      f"loss_fn and batch_transform); got {got}.{fix}")


def describe_outputs(outputs: Any) -> str:
  """A model's outputs in a few words, for errors about where the logits are."""
  if isinstance(outputs, dict):
    return f"a dict with keys {sorted(map(str, outputs))}"
  if isinstance(outputs, (tuple, list)):
    return f"a {type(outputs).__name__} of {len(outputs)} whose first element is not logits"
  return f"{type(outputs).__name__} of shape {jnp.shape(outputs)}"


def cross_entropy_loss(outputs: Any, batch: Batch, *, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy over the rows with mask=True.

  `outputs`: the logits, or a tuple / list whose first element they are
  (what evaluation scores, `logits_of`); other outputs (a dict) raise a
  StepError at trace time that says to pass `loss_fn=` or an adapter's
  `output=`. Accepts integer labels [B] or soft labels [B, C] (e.g. from mixup).
  """
  logits = logits_of(outputs)
  if logits is None:
    raise StepError(
        "The default loss (jtl.losses.cross_entropy_loss) needs the logits: the model's "
        f"output or the first element of a tuple; the model returned "
        f"{describe_outputs(outputs)}. Pass loss_fn=(outputs, batch) -> loss, e.g. lambda out, "
        "b: jtl.losses.cross_entropy_loss(out['logits'], b), or pick the logits for training "
        "and evaluation alike with an adapter: jtl.LinenModel(module, output='logits') "
        "(jtl.NnxModel and jtl.FunctionModel take output= too).")
  return masked_mean(per_example_cross_entropy(logits, batch["label"], label_smoothing),
                     batch.get("mask"))


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array,
                              label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy of each row: class indices `logits.shape[:-1]` or
  soft labels of the logits' shape (a StepError at trace time otherwise)."""
  check_labels(logits.shape, labels)
  if labels.shape == logits.shape:
    targets = labels.astype(jnp.float32)
  else:
    targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def check_labels(logits_shape: tuple[int, ...], labels: Any) -> None:
  """Refuses labels that are neither class indices of shape `logits_shape[:-1]`
  nor soft labels of shape `logits_shape` (shapes only: works at trace time).

  >>> check_labels((4, 3), jnp.zeros((4, 1), jnp.int32))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jtl.errors.StepError: Labels of shape (4, 1) (int32) do not fit logits of shape (4, 3): ...
  """
  shape, dtype = tuple(jnp.shape(labels)), jnp.result_type(labels)
  hard = shape == tuple(logits_shape[:-1])
  soft = shape == tuple(logits_shape) and jnp.issubdtype(dtype, jnp.floating)
  if hard or soft:
    return
  hint = ""
  if shape == tuple(logits_shape[:-1]) + (1,):
    hint = " Squeeze the last axis of the labels (label.reshape(-1))."
  elif shape == tuple(logits_shape):
    hint = " Soft labels must be floating point probabilities."
  raise StepError(
      f"Labels of shape {shape} ({dtype}) do not fit logits of shape {tuple(logits_shape)}: "
      f"expected class indices of shape {tuple(logits_shape[:-1])} or soft labels (float "
      f"probabilities) of shape {tuple(logits_shape)}.{hint}")


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """The mean of `values` over the rows with mask=True (all rows without a mask)."""
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def logits_of(outputs: Any) -> jax.Array | None:
  """The float32 logits among a model's outputs (an array, or the first of a tuple)."""
  if isinstance(outputs, (tuple, list)) and outputs:
    outputs = outputs[0]
  return outputs.astype(jnp.float32) if hasattr(outputs, "astype") else None


def hard_labels(batch: Batch) -> jax.Array:
  """The batch's class indices [B] (the argmax of soft labels)."""
  label = batch["label"]
  return jnp.argmax(label, -1) if label.ndim == 2 else label


def row_mask(batch: Batch) -> jax.Array:
  """The batch's mask as float32 [B] (ones without a mask)."""
  mask = batch.get("mask")
  if mask is None:
    return jnp.ones(batch["label"].shape[0], jnp.float32)
  return mask.astype(jnp.float32)


def correct_count(logits: jax.Array, batch: Batch) -> jax.Array:
  """How many rows with mask=True the logits' argmax classifies right."""
  hit = (jnp.argmax(logits, -1) == hard_labels(batch)).astype(jnp.float32)
  return jnp.sum(hit * row_mask(batch))


def row_count(batch: Batch) -> jax.Array:
  """How many rows have mask=True."""
  return jnp.sum(row_mask(batch))
