"""The pure, un-jitted train step over a TrainState (the eval step: `jtl.eval_steps`).

Gradients are taken with respect to the trainable partition only; frozen
params enter the loss as plain inputs, so no frozen gradient is ever computed
and nothing downstream (clipping, gradient-norm logging, weight decay) reads
one. Frozen BatchNorm layers run with their stored statistics.

Batches are dicts: {"inputs": ..., "label": int [B] or soft [B, C],
"mask": bool [B] (optional)}, other keys passed on; any other batch is
refused when the step is traced (`jtl.losses.check_batch`).

A training batch's mask takes its padding rows out of the losses and metrics,
not out of a BatchNorm layer in train mode: its batch statistics count every
row, so padding changes the real rows' normalisation, loss, gradients and the
running statistics. Do not pad training batches of a model whose BatchNorm
trains (freeze its statistics, or drop the last partial batch as
`jtl.data.make_dataset` does: its training batches are always full).

With `microbatches=k`, micro-batch i holds rows i, i + k, ...: on a mesh each
device's rows hold some of every micro-batch, so the step stays data parallel
(let the batch size be a multiple of k x devices). A BatchNorm that trains
normalises each micro-batch with its own batch statistics (as gradient
accumulation in PyTorch does), so the update is not the whole batch's; its
running averages take one momentum step per train step, with the mean of
the micro-batches' statistics.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jtl import partition
from jtl.adapter import as_model
from jtl.errors import StepError
from jtl.state import TrainState
from jtl.losses import (Batch, LossFn, check_batch, correct_count, cross_entropy_loss, logits_of,
                        row_count)
from jtl.tree import PyTree, cast_floats, check_compute_dtype


def _check_scalar(loss: Any) -> None:
  if jnp.shape(loss) != ():
    raise StepError(
        f"loss_fn must return a scalar, got shape {jnp.shape(loss)}. Reduce "
        "per-example losses with a (masked) mean, e.g. jtl.losses.masked_mean.")


def _split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B / n, ...] by stride: micro-batch i holds rows i, i + n, ...

  By stride, not contiguous rows: each device's block of a batch sharded over
  a mesh holds rows of every micro-batch, so the rows axis stays sharded and
  the scan over micro-batches stays data parallel (contiguous slices put the
  micro-batch axis on the devices: every device gathered and ran the whole
  batch). Every batch entry (labels, mask, ...) is split alike.
  """
  def reshape(x):
    if x.shape[0] % n:
      raise StepError(
          f"Batch size {x.shape[0]} does not divide into {n} micro-batches; "
          "choose a batch size that is a multiple of microbatches.")
    return jnp.moveaxis(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 1, 0)
  return jax.tree.map(reshape, batch)


BatchTransform = Callable[[TrainState, Batch, jax.Array], tuple[Batch, dict[str, Any]]]


def _loss_and_metrics(loss_fn: LossFn, outputs: Any, batch: Batch) -> tuple[jax.Array, dict]:
  out = loss_fn(outputs, batch)
  loss, aux = out if isinstance(out, tuple) else (out, {})
  _check_scalar(loss)
  return loss, dict(aux)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    *,
    labels: PyTree | None = None,
    loss_fn: LossFn = cross_entropy_loss,
    batch_transform: BatchTransform | None = None,
    microbatches: int = 1,
    compute_dtype: Any = None,
    axis_name: str | None = None,
    ema_decay: float | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns `train_step(state, batch) -> (state, metrics)`, pure and un-jitted.

  The one train step of jtl: fine-tuning and every method (distillation,
  domain adaptation, adversarial training) run through it, so microbatching,
  mixed precision, pmap/mesh, frozen BatchNorm and the frozen-partition
  guarantees hold for all of them.

  Args:
    model: a Flax Linen module whose `__call__(x, train=...)` gives logits,
      a Flax NNX module, an `apply_fn(params, inputs)`, or an adapter
      (`jtl.LinenModel`, `jtl.NnxModel`, `jtl.FunctionModel`) naming how to
      call it (see `jtl.adapter`).
    tx: the optimizer over the trainable partition.
    labels: the label tree; BatchNorm layers whose params are all frozen run
      with stored statistics. Without labels every BatchNorm trains. A training
      BatchNorm's statistics count every row, padding (mask=False) included:
      do not pad its training batches (module doc).
    loss_fn: `loss_fn(outputs, batch) -> scalar` or `-> (scalar, metrics)`,
      where `outputs` is what the model returns (logits, or a method's tuple)
      and metrics are extra scalars to report. The default,
      `jtl.losses.cross_entropy_loss`, takes the logits as evaluation does
      (the outputs or a tuple's first element) and refuses a dict.
    batch_transform: `batch_transform(state, batch, rng) -> (batch,
      metrics)`, run on the whole batch before the gradient, outside it (e.g.
      teacher targets, adversarial inputs, a schedule of the step); its
      metrics are reported.
    microbatches: accumulate gradients over this many micro-batches (inside
      the compiled step, with `lax.scan`) before one update (module doc).
    compute_dtype: a floating dtype (jnp.bfloat16, "bfloat16") for mixed precision:
      params stay fp32 (master copy), the forward/backward pass runs in it.
    axis_name: set when running under `jax.pmap(..., axis_name=...)`:
      gradients, metrics and statistics are averaged across that axis and
      the dropout rng differs per device. The step's `axis_name` attribute
      records it (`jtl.parallel.pmap_train_step` and `jit_train_step` check it).
    ema_decay: weight EMA after each update, `ema = ema_decay * ema + (1 -
      ema_decay) * trainable` (a state from `create_train_state(..., ema=True)`).

  Metrics: loss, accuracy (when the outputs are logits), grad_norm (of the
  trainable gradients), and those of `loss_fn` and `batch_transform`.
  """
  compute_dtype = _checked_options(microbatches, ema_decay, compute_dtype)
  adapter = as_model(model)

  def train_step(state: TrainState, batch: Batch):
    # With the state: a BatchNorm without params under a frozen module is frozen too.
    frozen_paths = (partition.frozen_module_paths(labels, state.model_state)
                    if labels is not None else frozenset())
    grad_fn = jax.value_and_grad(_make_loss(adapter, frozen_paths, loss_fn, compute_dtype),
                                 has_aux=True)
    rng, step_rng = jax.random.split(state.rng)
    if axis_name is not None:
      step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    batch, extra = _step_batch(batch_transform, loss_fn, state, batch, step_rng)
    (loss, (model_state, aux)), grads = _value_and_grad(grad_fn, state, batch, step_rng,
                                                        microbatches)
    count = row_count(batch)
    if axis_name is not None:
      grads, loss, model_state, aux, extra, count = _across_devices(
          axis_name, grads, loss, model_state, aux, extra, count, batch.get("mask") is not None)
    new_state = _apply_update(tx, state, grads, model_state, rng, ema_decay)
    if "correct" in aux:
      aux["accuracy"] = aux.pop("correct") / jnp.maximum(count, 1.0)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux, **extra}
    return new_state, metrics

  train_step.axis_name = axis_name  # checked by jtl.parallel's pmap_/jit_train_step
  return train_step


def _step_batch(batch_transform: BatchTransform | None, loss_fn: LossFn, state: TrainState,
                batch: Batch, step_rng: jax.Array) -> tuple[Batch, dict[str, Any]]:
  """The batch the step reads and the transform's metrics: `batch` checked, or
  what `batch_transform` makes of it (a dict given to it; the keys the step
  reads are checked after it, which may build them), outside the gradient."""
  if batch_transform is None or not isinstance(batch, Mapping):
    _check_train_batch(batch, loss_fn)
  if batch_transform is None:
    return batch, {}
  batch, extra = batch_transform(state, batch, jax.random.fold_in(step_rng, 1))
  _check_train_batch(batch, loss_fn, "A training batch (after batch_transform)")
  return jax.lax.stop_gradient(batch), extra


def _check_train_batch(batch: Batch, loss_fn: LossFn, what: str = "A training batch") -> None:
  """`check_batch` for the step: "label" is read by the default loss, and by the
  row count of a batch without a mask; a custom loss with a mask may go without."""
  check_batch(batch, needs_label=loss_fn is cross_entropy_loss or "mask" not in batch, what=what)


def _checked_options(microbatches: int, ema_decay: float | None, compute_dtype: Any) -> Any:
  """`make_train_step`'s options refused when out of range; the compute dtype."""
  if microbatches < 1:
    raise StepError(f"microbatches must be >= 1, got {microbatches}.")
  if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
    raise StepError(f"ema_decay must be in [0, 1) (e.g. 0.999), got {ema_decay!r}.")
  return check_compute_dtype(compute_dtype)


def _make_loss(adapter: Any, frozen_paths: frozenset, loss_fn: LossFn, compute_dtype: Any
               ) -> Callable[..., tuple[jax.Array, tuple[dict, dict]]]:
  """`loss(trainable, frozen, model_state, batch, rng) -> (loss, (model_state,
  metrics))`: the training forward pass in `compute_dtype`, the loss in float32,
  and the count of correct predictions when the outputs are logits."""
  def loss_and_aux(trainable, frozen, model_state, batch, rng):
    params = cast_floats(partition.merge(trainable, frozen), compute_dtype)
    outputs, new_model_state = adapter.apply(
        params, model_state, cast_floats(batch["inputs"], compute_dtype), train=True, rng=rng,
        frozen_paths=frozen_paths)
    outputs = cast_floats(outputs, jnp.float32)
    loss, aux = _loss_and_metrics(loss_fn, outputs, batch)
    logits = logits_of(outputs)
    if ("accuracy" not in aux and logits is not None and "label" in batch
        and logits.shape[0] == batch["label"].shape[0]):
      aux["correct"] = correct_count(logits, batch)
    return loss, (dict(new_model_state), aux)
  return loss_and_aux


def _apply_update(tx: optax.GradientTransformation, state: TrainState, grads: PyTree,
                  model_state: PyTree, rng: jax.Array, ema_decay: float | None) -> TrainState:
  """The state after one optimizer update of the trainable partition (and its EMA)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                       model_state=model_state, rng=rng,
                       ema=update_ema(state.ema, trainable, ema_decay))


def update_ema(ema: PyTree, trainable: PyTree, decay: float | None) -> PyTree:
  """`decay * ema + (1 - decay) * trainable`, leaf by leaf, in each EMA leaf's dtype."""
  if (ema is None) != (decay is None):
    raise StepError(
        "Weight EMA needs both a state made with create_train_state(..., ema=True) and a "
        f"train step made with ema_decay set; got ema {'set' if ema is not None else 'None'} "
        f"and ema_decay={decay!r}.")
  if ema is None:
    return None
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                      ema, trainable)


def _value_and_grad(grad_fn: Callable, state: TrainState, batch: Batch, rng: jax.Array,
                    microbatches: int) -> tuple[tuple[jax.Array, tuple[PyTree, dict]], PyTree]:
  """`grad_fn` on the whole batch, or gradients averaged over `microbatches`
  slices of it with `lax.scan`. Each slice starts from the step's statistics
  and the new ones are their mean (`_mean_model_state`)."""
  if microbatches == 1:
    return grad_fn(state.trainable, state.frozen, state.model_state, batch, rng)
  masked = batch.get("mask") is not None
  start = state.model_state

  def accumulate(carry, xs):
    grad_sum, moved = carry
    mb, i = xs
    (loss, (model_state, aux)), grads = grad_fn(
        state.trainable, state.frozen, start, mb, jax.random.fold_in(rng, i))
    # A slice's masked mean weighs by its rows: the whole batch's masked mean.
    weight = row_count(mb) if masked else jnp.float32(1.0)
    grads = jax.tree.map(lambda g: g * weight, grads) if masked else grads
    moved = jax.tree.map(lambda m, new, old: m + (new - old) if _floating(old) else new,
                         moved, model_state, start)
    return (jax.tree.map(jnp.add, grad_sum, grads), moved), (loss, aux, weight)

  init = (jax.tree.map(jnp.zeros_like, state.trainable),
          jax.tree.map(lambda x: jnp.zeros_like(x) if _floating(x) else x, start))
  (grad_sum, moved), (losses, auxes, counts) = jax.lax.scan(
      accumulate, init, (_split_microbatches(batch, microbatches), jnp.arange(microbatches)))
  total = jnp.maximum(jnp.sum(counts), 1.0) if masked else float(microbatches)
  grads = jax.tree.map(lambda g: g / total, grad_sum)
  aux = {k: (jnp.sum(v) if k == "correct" else jnp.sum(v * counts) / total)
         for k, v in auxes.items()}
  model_state = _mean_model_state(start, moved, microbatches)
  return (jnp.sum(losses * counts) / total, (model_state, aux)), grads


def _floating(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _mean_model_state(start: PyTree, moved: PyTree, microbatches: int) -> PyTree:
  """The mean of the micro-batches' new statistics (each from `start`; `moved`:
  the sum of their changes), for floating leaves; the last for the others.

  A running average updated once per micro-batch would move `microbatches`
  times per step (momentum 0.9 acting as 0.9**k); the mean of the updates is
  one momentum update with the mean of the micro-batches' batch statistics.
  Summed as changes, so statistics that do not train stay bit for bit.
  """
  return jax.tree.map(
      lambda x, m: (x + m / microbatches).astype(x.dtype) if _floating(x) else m, start, moved)


def _across_devices(axis_name: str, grads: PyTree, loss: jax.Array, model_state: PyTree,
                    aux: dict, extra: dict, count: jax.Array, masked: bool) -> tuple:
  """Means over the pmap axis (with a mask, each device's masked mean weighs
  by its rows: the global batch's masked mean); counts summed."""
  total = jax.lax.psum(count, axis_name)
  if masked:
    weight = count / jnp.maximum(total, 1.0)
    mean = lambda x: jax.lax.psum(jax.tree.map(lambda v: v * weight, x), axis_name)  # noqa: E731
  else:
    mean = lambda x: jax.lax.pmean(x, axis_name)  # noqa: E731
  aux = {k: (jax.lax.psum(v, axis_name) if k == "correct" else mean(v)) for k, v in aux.items()}
  return (mean(grads), mean(loss), jax.lax.pmean(model_state, axis_name), aux,
          jax.lax.pmean(extra, axis_name), total)


TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def skip_nonfinite(train_step: TrainStep) -> TrainStep:
  """Wraps a train step so that an update whose loss or gradient norm is NaN
  or inf, or that would make a trainable weight NaN or inf (an update that
  overflows), is not applied: params, optimizer state and model statistics
  stay
  as they were; the step counter and rng advance (the batch is consumed).
  The metrics gain "skipped" (1.0 for a skipped update, else 0.0).

  >>> import optax
  >>> state = TrainState(step=jnp.zeros((), jnp.int32), trainable={"w": jnp.ones(2)},
  ...                    frozen={}, opt_state=(), model_state={}, rng=jnp.zeros(2, jnp.uint32))
  >>> bad = lambda s, b: (s.replace(step=s.step + 1, trainable={"w": s.trainable["w"] * jnp.nan}),
  ...                     {"loss": jnp.float32(jnp.nan)})
  >>> new, metrics = skip_nonfinite(bad)(state, {})
  >>> new.trainable["w"].tolist(), int(new.step), float(metrics["skipped"])
  ([1.0, 1.0], 1, 1.0)
  >>> overflow = lambda s, b: (s.replace(trainable={"w": s.trainable["w"] * jnp.inf}),
  ...                          {"loss": jnp.float32(0.5), "grad_norm": jnp.float32(1.0)})
  >>> new, metrics = skip_nonfinite(overflow)(state, {})
  >>> new.trainable["w"].tolist(), float(metrics["skipped"])
  ([1.0, 1.0], 1.0)
  """
  def guarded(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    new, metrics = train_step(state, batch)
    ok = jnp.isfinite(metrics["loss"])
    if "grad_norm" in metrics:
      ok &= jnp.isfinite(metrics["grad_norm"])
    for leaf in jax.tree.leaves(new.trainable):  # not model_state: a running max may be inf
      if jnp.issubdtype(leaf.dtype, jnp.inexact):
        ok &= jnp.all(jnp.isfinite(leaf))
    keep = lambda n, o: jnp.where(ok, n, o)
    new = new.replace(trainable=jax.tree.map(keep, new.trainable, state.trainable),
                      ema=jax.tree.map(keep, new.ema, state.ema),
                      opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                      model_state=jax.tree.map(keep, new.model_state, state.model_state))
    return new, {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}
  if hasattr(train_step, "axis_name"):
    guarded.axis_name = train_step.axis_name
  return guarded


# Names this module held before the eval step and the losses had their own
# modules: still found here, with a DeprecationWarning naming the new place.
_MOVED = {**dict.fromkeys(("make_eval_step", "eval_logits", "summarize_eval", "output_classes",
                           "TOP_K", "EvalFn"), "jtl.eval_steps"),
          **dict.fromkeys(("cross_entropy_loss", "per_example_cross_entropy", "masked_mean",
                           "check_labels"), "jtl.losses"),
          "check_compute_dtype": "jtl.tree", "frozen_batchnorm": "jtl.adapter"}


def __getattr__(name: str) -> Any:
  if name not in _MOVED:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  warnings.warn(f"jtl.steps.{name} is now {_MOVED[name]}.{name}", DeprecationWarning,
                stacklevel=2)
  return getattr(importlib.import_module(_MOVED[name]), name)
