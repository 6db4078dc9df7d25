"""Losses and per-row counts over a batch, shared by the train and eval steps.

Batches are dicts: {"inputs": ..., "label": int [B] or soft [B, C],
"mask": bool [B] (optional; only rows with mask=True count)}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jtl.errors import StepError

Batch = dict[str, Any]
LossFn = Callable[[Any, Batch], Any]  # -> scalar, or (scalar, {name: scalar metric})


def cross_entropy_loss(logits: jax.Array, batch: Batch, *, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy over the rows with mask=True.

  Accepts integer labels [B] or soft labels [B, C] (e.g. from mixup).
  """
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
