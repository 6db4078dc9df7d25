"""Pure, un-jitted train and eval steps over a TrainState.

Gradients are taken with respect to the trainable partition only; frozen
params enter the loss as plain inputs, so no frozen gradient is ever computed
and nothing downstream (clipping, gradient-norm logging, weight decay) reads
one. Frozen BatchNorm layers run with their stored statistics.

Batches are dicts: {"inputs": ..., "label": int [B] or soft [B, C],
"mask": bool [B] (optional; eval counts only mask=True rows)}.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jtl import partition
from jtl.errors import StepError
from jtl.state import TrainState

PyTree = Any
Batch = dict[str, Any]
LossFn = Callable[[jax.Array, Batch], jax.Array]


def cross_entropy_loss(logits: jax.Array, batch: Batch, *, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy over the rows with mask=True.

  Accepts integer labels [B] or soft labels [B, C] (e.g. from mixup).
  """
  return masked_mean(per_example_cross_entropy(logits, batch["label"], label_smoothing),
                     batch.get("mask"))


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array,
                              label_smoothing: float = 0.0) -> jax.Array:
  num_classes = logits.shape[-1]
  if labels.ndim == logits.ndim:
    targets = labels.astype(jnp.float32)
  else:
    targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@contextlib.contextmanager
def frozen_batchnorm(frozen_module_paths: Iterable[str]):
  """Within this context, BatchNorm layers at these module paths use their
  stored statistics (and do not update them), whatever `train` says.

  Models call `nn.BatchNorm(...)(x, use_running_average=not train)`; this
  interceptor rewrites that keyword for the frozen layers.
  """
  paths = frozenset(frozen_module_paths)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, nn.BatchNorm)
        and "/".join(module.scope.path) in paths):
      kwargs = {**kwargs, "use_running_average": True}
    return next_fun(*args, **kwargs)

  if not paths:
    yield
    return
  with nn.intercept_methods(interceptor):
    yield


def _cast_floats(tree: PyTree, dtype: Any) -> PyTree:
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _apply(module: nn.Module, params: PyTree, model_state: dict[str, PyTree], inputs: Any, *,
           train: bool, rng: jax.Array | None, frozen_paths: frozenset[str],
           compute_dtype: Any) -> tuple[jax.Array, dict[str, PyTree]]:
  variables = {"params": _cast_floats(params, compute_dtype), **model_state}
  inputs = _cast_floats(inputs, compute_dtype)
  rngs = {"dropout": rng} if rng is not None else {}
  mutable = list(model_state) if train and model_state else False
  with frozen_batchnorm(frozen_paths if train else ()):
    out = module.apply(variables, inputs, train=train, rngs=rngs, mutable=mutable)
  logits, new_state = out if mutable else (out, model_state)
  return logits.astype(jnp.float32), dict(new_state)


def _check_scalar(loss: Any) -> None:
  if jnp.shape(loss) != ():
    raise StepError(
        f"loss_fn must return a scalar, got shape {jnp.shape(loss)}. Reduce "
        "per-example losses with a (masked) mean, e.g. jtl.steps.masked_mean.")


def _split_microbatches(batch: Batch, n: int) -> Batch:
  def reshape(x):
    if x.shape[0] % n:
      raise StepError(
          f"Batch size {x.shape[0]} does not divide into {n} micro-batches; "
          "choose a batch size that is a multiple of microbatches.")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(reshape, batch)


def make_train_step(
    module: nn.Module,
    tx: optax.GradientTransformation,
    *,
    labels: PyTree | None = None,
    loss_fn: LossFn = cross_entropy_loss,
    microbatches: int = 1,
    compute_dtype: Any = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns `train_step(state, batch) -> (state, metrics)`, pure and un-jitted.

  Args:
    module: a Flax Linen module whose `__call__(x, train=...)` gives logits.
    tx: the optimizer over the trainable partition.
    labels: the label tree; BatchNorm layers whose params are all frozen run
      with stored statistics. Without labels every BatchNorm trains.
    loss_fn: `loss_fn(logits, batch) -> scalar`.
    microbatches: accumulate gradients over this many micro-batches (inside
      the compiled step, with `lax.scan`) before one update.
    compute_dtype: e.g. jnp.bfloat16 for mixed precision: params stay fp32
      (master copy), the forward/backward pass runs in this dtype.
    axis_name: set when running under `jax.pmap(..., axis_name=...)`:
      gradients, metrics and statistics are averaged across that axis and
      the dropout rng differs per device.

  Metrics: loss, accuracy, grad_norm (of the trainable gradients).
  """
  if microbatches < 1:
    raise StepError(f"microbatches must be >= 1, got {microbatches}.")
  frozen_paths = partition.frozen_module_paths(labels) if labels is not None else frozenset()

  def loss_and_aux(trainable, frozen, model_state, batch, rng):
    params = partition.merge(trainable, frozen)
    logits, new_model_state = _apply(
        module, params, model_state, batch["inputs"], train=True, rng=rng,
        frozen_paths=frozen_paths, compute_dtype=compute_dtype)
    loss = loss_fn(logits, batch)
    _check_scalar(loss)
    return loss, (new_model_state, logits)

  grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

  def train_step(state: TrainState, batch: Batch):
    rng, step_rng = jax.random.split(state.rng)
    if axis_name is not None:
      step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))

    if microbatches == 1:
      (loss, (model_state, logits)), grads = grad_fn(
          state.trainable, state.frozen, state.model_state, batch, step_rng)
      correct = _correct(logits, batch)
    else:
      micro = _split_microbatches(batch, microbatches)
      zeros = jax.tree.map(jnp.zeros_like, state.trainable)

      def accumulate(carry, xs):
        grad_sum, loss_sum, correct_sum, model_state = carry
        mb, i = xs
        (loss, (model_state, logits)), grads = grad_fn(
            state.trainable, state.frozen, model_state, mb, jax.random.fold_in(step_rng, i))
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, loss_sum + loss, correct_sum + _correct(logits, mb), model_state), None

      init = (zeros, jnp.zeros(()), jnp.zeros(()), state.model_state)
      (grad_sum, loss_sum, correct, model_state), _ = jax.lax.scan(
          accumulate, init, (micro, jnp.arange(microbatches)))
      grads = jax.tree.map(lambda g: g / microbatches, grad_sum)
      loss = loss_sum / microbatches

    count = _count(batch)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      loss = jax.lax.pmean(loss, axis_name)
      model_state = jax.lax.pmean(model_state, axis_name)
      correct = jax.lax.psum(correct, axis_name)
      count = jax.lax.psum(count, axis_name)

    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=trainable,
                              opt_state=opt_state, model_state=model_state, rng=rng)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "accuracy": correct / jnp.maximum(count, 1.0)}
    return new_state, metrics

  return train_step


def _hard_labels(batch: Batch) -> jax.Array:
  label = batch["label"]
  return jnp.argmax(label, -1) if label.ndim == 2 else label


def _mask(batch: Batch) -> jax.Array:
  mask = batch.get("mask")
  return jnp.ones(batch["label"].shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)


def _correct(logits: jax.Array, batch: Batch) -> jax.Array:
  hit = (jnp.argmax(logits, -1) == _hard_labels(batch)).astype(jnp.float32)
  return jnp.sum(hit * _mask(batch))


def _count(batch: Batch) -> jax.Array:
  return jnp.sum(_mask(batch))


def make_eval_step(
    module: nn.Module,
    *,
    compute_dtype: Any = None,
    axis_name: str | None = None,
) -> Callable[[dict[str, PyTree], Batch], dict[str, jax.Array]]:
  """Returns `eval_step(variables, batch) -> sums`, pure and un-jitted.

  `variables` is {"params": ..., "batch_stats": ...} (e.g. `state.variables`).
  The sums (loss, correct, correct_top5, count) cover only rows with
  mask=True, so a padded last batch counts every real example exactly once;
  divide by `count` after summing over batches.
  """

  def eval_step(variables: dict[str, PyTree], batch: Batch) -> dict[str, jax.Array]:
    variables = dict(variables)
    params = variables.pop("params")
    logits, _ = _apply(module, params, variables, batch["inputs"], train=False, rng=None,
                       frozen_paths=frozenset(), compute_dtype=compute_dtype)
    mask = _mask(batch)
    labels = _hard_labels(batch)
    losses = per_example_cross_entropy(logits, batch["label"])
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    in_top_k = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
    sums = {
        "loss": jnp.sum(losses * mask),
        "correct": _correct(logits, batch),
        "correct_top5": jnp.sum(in_top_k * mask),
        "count": jnp.sum(mask),
    }
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
  """Turns accumulated eval sums into loss, accuracy and top-5 accuracy."""
  count = max(float(sums["count"]), 1.0)
  return {"loss": float(sums["loss"]) / count,
          "accuracy": float(sums["correct"]) / count,
          "top5_accuracy": float(sums["correct_top5"]) / count,
          "count": int(sums["count"])}


def skip_nonfinite(train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Wraps a train step so that an update whose loss or gradient norm is NaN
  or inf is not applied: params, optimizer state and model statistics stay
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
  """
  def guarded(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    new, metrics = train_step(state, batch)
    ok = jnp.isfinite(metrics["loss"])
    if "grad_norm" in metrics:
      ok &= jnp.isfinite(metrics["grad_norm"])
    keep = lambda n, o: jnp.where(ok, n, o)
    new = new.replace(trainable=jax.tree.map(keep, new.trainable, state.trainable),
                      opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                      model_state=jax.tree.map(keep, new.model_state, state.model_state))
    return new, {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}
  return guarded
