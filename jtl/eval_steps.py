"""The eval step: sums of loss, correct and top-5 over the rows with mask=True,
for a model's logits or for an `eval_fn`'s own scores."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jtl.adapter import Output, as_model, select_output
from jtl.errors import StepError
from jtl.losses import (Batch, check_batch, correct_count, describe_outputs, hard_labels,
                        logits_of, per_example_cross_entropy, row_mask)
from jtl.tree import PyTree, cast_floats, check_compute_dtype

# Top-k accuracy is reported for k = TOP_K, and only for more than TOP_K classes.
TOP_K = 5
# -> {name: sum over the batch's rows with mask=True}; divided by the count at the end.
EvalFn = Callable[[Any, Batch], dict[str, jax.Array]]


def eval_logits(outputs: Any, batch: Batch, eval_output: Output = None) -> jax.Array:
  """The logits [batch, classes] that evaluation scores, from a model's outputs.

  The contract: `eval_output` (a dict key, a tuple index or a function of
  the outputs) picks them; without it the outputs must be the logits
  themselves or a tuple / list whose first element they are. Anything else
  (a dict, a wrongly shaped array) raises a StepError at trace time that
  says to pass `eval_output=` or `eval_fn=`.
  """
  picked = select_output(outputs, eval_output) if eval_output is not None else logits_of(outputs)
  n = jnp.shape(batch["label"])[0]
  if picked is None or jnp.ndim(picked) != 2 or jnp.shape(picked)[0] != n:
    what = describe_outputs(outputs)
    got = "" if eval_output is None else (
        f"; eval_output={eval_output!r} gave {type(picked).__name__} of shape "
        f"{jnp.shape(picked) if picked is not None else None}")
    raise StepError(
        f"Evaluation needs logits [batch={n}, classes] from the model, which returned {what}"
        f"{got}. Pass eval_output= (a dict key such as 'logits', a tuple index, or a function "
        "of the outputs giving the logits) or eval_fn=(outputs, batch) -> {name: masked sum} "
        "to make_eval_step / fit.")
  return picked.astype(jnp.float32)


def _eval_outputs(adapter: Any, variables: dict[str, PyTree], batch: Batch,
                  compute_dtype: Any) -> Any:
  """The model's evaluation-mode outputs on `batch` (`variables`: params and state)."""
  variables = dict(variables)
  params = cast_floats(variables.pop("params"), compute_dtype)
  outputs, _ = adapter.apply(params, variables, cast_floats(batch["inputs"], compute_dtype),
                             train=False, rng=None)
  return outputs


def make_eval_step(
    model: Any,
    *,
    eval_output: Output = None,
    eval_fn: EvalFn | None = None,
    compute_dtype: Any = None,
    axis_name: str | None = None,
) -> Callable[[dict[str, PyTree], Batch], dict[str, jax.Array]]:
  """Returns `eval_step(variables, batch) -> sums`, pure and un-jitted.

  `model` is any model `make_train_step` takes (Linen, NNX, apply function,
  adapter). `variables` is {"params": ..., "batch_stats": ...} (e.g.
  `state.variables`).
  The sums (loss, correct, correct_top5, count) cover only rows with
  mask=True, so a padded last batch counts every real example exactly once;
  divide by `count` after summing over batches. `correct_top5` is there only
  for more than 5 classes (with 5 or fewer every label is in the top 5).

  What is scored: the logits that `eval_logits(outputs, batch, eval_output)`
  finds (the outputs, the first of a tuple, or what `eval_output` picks);
  or, with `eval_fn(outputs, batch) -> {name: sum over rows with mask=True}`,
  those sums (plus `count`), for outputs that are not class scores.

  `axis_name`: set under `jax.pmap` (`jtl.parallel.pmap_eval_step`): the sums
  are summed over that axis, so every device holds the whole batch's.
  """
  compute_dtype = check_compute_dtype(compute_dtype)
  adapter = as_model(model)

  def eval_step(variables: dict[str, PyTree], batch: Batch) -> dict[str, jax.Array]:
    # An eval_fn's sums need no labels where a mask counts the rows.
    check_batch(batch, needs_label=eval_fn is None or "mask" not in batch,
                what="An evaluation batch")
    outputs = _eval_outputs(adapter, variables, batch, compute_dtype)
    mask = row_mask(batch)
    if eval_fn is not None:
      sums = {**eval_fn(cast_floats(outputs, jnp.float32), batch), "count": jnp.sum(mask)}
      return jax.lax.psum(sums, axis_name) if axis_name is not None else sums
    logits = eval_logits(outputs, batch, eval_output)
    labels = hard_labels(batch)
    losses = per_example_cross_entropy(logits, batch["label"])
    sums = {
        "loss": jnp.sum(losses * mask),
        "correct": correct_count(logits, batch),
        "count": jnp.sum(mask),
    }
    if logits.shape[-1] > TOP_K:  # else always 1.0: no information
      top_k = jax.lax.top_k(logits, TOP_K)[1]
      in_top_k = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
      sums["correct_top5"] = jnp.sum(in_top_k * mask)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  eval_step.axis_name = axis_name  # checked by jtl.parallel's pmap_/jit_eval_step
  return eval_step


def output_classes(model: Any, variables: dict[str, PyTree], batch: Batch, *,
                   eval_output: Output = None, eval_fn: EvalFn | None = None,
                   compute_dtype: Any = None) -> int | None:
  """The number of classes of the logits `model` gives on `batch` (shapes only,
  `jax.eval_shape`), or None when its outputs are not logits evaluation can
  find (`eval_logits`) or are scored by an `eval_fn` (`make_eval_step`'s
  options)."""
  if eval_fn is not None:
    return None
  compute_dtype = check_compute_dtype(compute_dtype)
  adapter = as_model(model)
  logits = lambda v, b: eval_logits(_eval_outputs(adapter, v, b, compute_dtype), b,  # noqa: E731
                                    eval_output)
  try:
    return int(jax.eval_shape(logits, variables, batch).shape[-1])
  except StepError:
    return None


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
  """Turns accumulated eval sums into means per example: loss, accuracy (from
  "correct"), top-5 accuracy (from "correct_top5", more than 5 classes) and
  any other sum of an `eval_fn`, with the count. A non-finite loss makes the
  accuracies NaN too: NaN logits' argmax is class 0, a score of nothing.

  >>> summarize_eval({"loss": float("nan"), "correct": 3.0, "count": 8})
  {'loss': nan, 'accuracy': nan, 'count': 8}
  """
  count = max(float(sums["count"]), 1.0)
  names = {"correct": "accuracy", "correct_top5": "top5_accuracy"}
  out = {names.get(k, k): float(v) / count for k, v in sums.items() if k != "count"}
  if not math.isfinite(out.get("loss", 0.0)):
    out.update({names[k]: float("nan") for k in names if k in sums})
  return {**out, "count": int(sums["count"])}
