"""Precise BatchNorm: stored statistics recomputed as exact population moments.

Training keeps a BatchNorm layer's stored mean and variance as a moving
average (momentum 0.99 in the zoo) of batch statistics taken under earlier
weights. After a short fine-tuning run they lag the weights, so the network
that is evaluated is not the one that was trained (Wu & Johnson, 2021,
"Rethinking 'Batch' in BatchNorm"). `recompute_batchnorm` replaces them by
the mean and variance of each layer's input over given batches, each layer
seeing its inputs normalised with batch statistics, as in training. On
training images this is "precise BN" (`jtl.train.fit(batchnorm_batches=...)` does
it before each evaluation and save); on unlabelled target images it is AdaBN
(Li et al., 2016).

Linen BatchNorm layers (zoo models, Linen modules, their jtl wrappers, a
Linen module inside `nnx.bridge.ToNNX` as `jtl.models.create(..., api="nnx")`
makes) and NNX `nnx.BatchNorm` layers are supported, with masks and on a
multi-host mesh alike.

>>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
>>> class Net(nn.Module):
...   @nn.compact
...   def __call__(self, x, train=False):
...     return nn.BatchNorm(use_running_average=not train)(x)
>>> v = Net().init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
>>> x = np.array([[1.0, 0.0], [3.0, 4.0]], np.float32)
>>> stats = recompute_batchnorm(Net(), v, [{"inputs": x}])["batch_stats"]["BatchNorm_0"]
>>> stats["mean"], stats["var"]
(array([2., 2.], dtype=float32), array([1., 4.], dtype=float32))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl import parallel
from jtl.adapter import NnxModel, as_model, classes_swapped, split_nnx
from jtl.errors import ConfigError
from jtl.tree import PyTree, flatten, unflatten

Moments = dict[str, tuple[jax.Array, jax.Array]]  # module path -> (mean, variance)


def _reduce_axes(ndim: int, feature_axes: int | tuple[int, ...]) -> tuple[int, ...]:
  features = {a % ndim for a in (feature_axes if isinstance(feature_axes, tuple)
                                 else (feature_axes,))}
  return tuple(i for i in range(ndim) if i not in features)


def _batch_moments(h: jax.Array, mask: jax.Array, feature_axes: int | tuple[int, ...],
                   path: str) -> tuple[jax.Array, jax.Array]:
  """The mean and (centred, biased) variance of `h` over its rows where
  `mask` is True and its non-feature axes, with the features' axes kept."""
  axes = _reduce_axes(h.ndim, feature_axes)
  if 0 not in axes:
    raise ConfigError(f"recompute_batchnorm: BatchNorm {path!r} normalises over axes {axes}, "
                      "without the leading (batch) axis.")
  w = jnp.broadcast_to(jnp.reshape(mask, (-1,) + (1,) * (h.ndim - 1)), h.shape)
  count = jnp.maximum(jnp.sum(w, axes, keepdims=True), 1.0)
  mean = jnp.sum(h * w, axes, keepdims=True) / count
  return mean, jnp.sum(jnp.square(h - mean) * w, axes, keepdims=True) / count


def _as_batch_normalised(x: Any, mask: jax.Array, stored: tuple[Any, Any], epsilon: float,
                         feature_axes: int | tuple[int, ...], path: str, recorded: Moments) -> Any:
  """Records the batch moments of a BatchNorm's input `x` under `path`, and
  returns the input whose normalisation with the `stored` (mean, var) equals
  the normalisation of `x` with the batch's: the layer runs in evaluation
  mode (nothing is mutated) yet computes what training computes."""
  h = jnp.asarray(x, jnp.float32)
  mean, var = _batch_moments(h, mask, feature_axes, path)
  axes = _reduce_axes(h.ndim, feature_axes)
  recorded[path] = (jnp.squeeze(mean, axes), jnp.squeeze(var, axes))
  stored_mean, stored_var = (jnp.reshape(jnp.asarray(s, jnp.float32), mean.shape) for s in stored)
  h = stored_mean + (h - mean) * jnp.sqrt((stored_var + epsilon) / (var + epsilon))
  return h.astype(x.dtype)


@contextlib.contextmanager
def _linen_recording(mask: jax.Array, skip: frozenset[str], recorded: Moments):
  """Linen BatchNorm calls (in the zoo, user modules, a `nnx.bridge.ToNNX`)
  recorded and rewritten by `_as_batch_normalised`, keyed by scope path."""
  active: set[str] = set()  # a subclass's __call__ calling nn.BatchNorm's: once

  def record(next_fun, args, kwargs, context):
    module = context.module
    path = "/".join(module.scope.path) if module.scope else ""
    if (context.method_name != "__call__" or not isinstance(module, nn.BatchNorm)
        or path in skip or path in active):
      return next_fun(*args, **kwargs)
    stored = tuple(module.get_variable("batch_stats", n) for n in ("mean", "var"))
    x = _as_batch_normalised(args[0], mask, stored, module.epsilon, module.axis, path, recorded)
    active.add(path)
    try:
      return next_fun(x, *args[1:], **kwargs)
    finally:
      active.discard(path)

  token = _LINEN_RECORDING.set((mask, skip, recorded))  # NNX layers inside (`nnx_in_linen`)
  try:
    with nn.intercept_methods(record):
      yield
  finally:
    _LINEN_RECORDING.reset(token)


# The Linen recording of this thread's trace: (mask, skip, recorded), or None.
_LINEN_RECORDING: contextvars.ContextVar[tuple[Any, frozenset[str], Moments] | None] = (
    contextvars.ContextVar("jtl_batchnorm_linen_recording", default=None))


@contextlib.contextmanager
def nnx_in_linen(module: Any, prefix: str = ""):
  """Records the `nnx.BatchNorm` layers of an NNX `module` that a Linen
  module at scope path `prefix` builds and calls (`jtl.models.own_nnx`),
  when a recording is under way (Linen's interception does not reach them);
  else nothing."""
  recording = _LINEN_RECORDING.get()
  if recording is None:
    yield
    return
  mask, skip, recorded = recording
  with _nnx_recording(module, mask, skip, recorded, prefix=prefix):
    yield


@dataclasses.dataclass
class _NnxTrace:
  paths: dict[int, str]  # id of a layer of the merged copy -> its graph path
  rows: jax.Array
  recorded: Moments


# The trace being recorded in this thread (each thread has its own context).
_NNX_TRACE: contextvars.ContextVar[_NnxTrace | None] = contextvars.ContextVar(
    "jtl_batchnorm_nnx_trace", default=None)


@functools.cache
def _recorder() -> type:
  """`nnx.BatchNorm` whose call substitutes the input (`_as_batch_normalised`)
  for the layers of the trace being recorded, then runs on the stored statistics."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def call(self, x, use_running_average=None, **kwargs):
    trace = _NNX_TRACE.get()
    path = None if trace is None else trace.paths.get(id(self))
    if path is None:
      return nnx.BatchNorm.__call__(self, x, use_running_average, **kwargs)
    stored = (self.mean[...], self.var[...])
    x = _as_batch_normalised(x, trace.rows, stored, self.epsilon, self.axis, path,
                             trace.recorded)
    return nnx.BatchNorm.__call__(self, x, True, **kwargs)  # normalised with the stored stats

  return type("RecordingBatchNorm", (nnx.BatchNorm,), {"__call__": call})


@functools.cache
def _recording_class(cls: type) -> type:
  """`cls` (nnx.BatchNorm or a user's subclass) with the recorder placed just
  above nnx.BatchNorm in its MRO: a subclass's own `__call__` runs first and
  its `super().__call__` reaches the recorder."""
  recorder = _recorder()
  if cls is recorder.__mro__[1]:  # nnx.BatchNorm itself
    return recorder
  return type(f"Recording{cls.__name__}", (cls, recorder), {})


@contextlib.contextmanager
def _nnx_recording(module: Any, rows: jax.Array, skip: frozenset[str], recorded: Moments,
                   *, prefix: str = ""):
  """The `nnx.BatchNorm` layers of the merged `module` recorded and
  rewritten by `_as_batch_normalised`, keyed by graph path. NNX has no
  method interceptors (Linen's `nn.intercept_methods`), so each layer of
  this merged copy (made for the trace and dropped after it) is given a
  recording subclass of its own class; nothing global changes, and other
  modules and threads are untouched."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  layers: dict[int, tuple[Any, str]] = {}
  for path, layer in nnx.iter_modules(module):
    key = "/".join([prefix, *map(str, path)] if prefix else map(str, path))
    if isinstance(layer, nnx.bridge.ToNNX) and path:
      raise ConfigError(f"recompute_batchnorm: {key!r} is a Linen module inside "
                        "nnx.bridge.ToNNX, nested in an NNX module; pass the bridged module "
                        "itself or a model of one API.")
    if isinstance(layer, nnx.BatchNorm) and key not in skip:
      layers[id(layer)] = (layer, key)
  token = _NNX_TRACE.set(_NnxTrace({i: key for i, (_, key) in layers.items()}, rows, recorded))
  try:
    with classes_swapped([layer for layer, _ in layers.values()], _recording_class):
      yield
  finally:
    _NNX_TRACE.reset(token)


def _moments(adapted: Any, skip: frozenset[str]) -> Callable[..., tuple[Moments, jax.Array]]:
  """fn(params, model_state, x, mask) -> (each recorded layer's moments over
  the rows where mask is True, their number), the model running in
  evaluation mode with every BatchNorm layer not in `skip` normalising with
  its batch's statistics. The leading axis is the batch axis; a sharded
  batch gives global moments."""
  def moments(params: PyTree, model_state: dict[str, PyTree], x: Any, mask: jax.Array
              ) -> tuple[Moments, jax.Array]:
    recorded: Moments = {}
    if isinstance(adapted, NnxModel) and not adapted.bridged:
      module = adapted.merge(params, model_state)
      module.set_attributes(deterministic=True, use_running_average=True,
                            raise_if_not_found=False)
      with _nnx_recording(module, mask, skip, recorded):
        adapted.call_module(module, x)
    else:  # Linen, or a Linen module inside nnx.bridge.ToNNX
      with _linen_recording(mask, skip, recorded):
        adapted.apply(params, model_state, x, train=False, rng=None)
    return recorded, jnp.sum(mask)
  return moments


def _write_flat(variables: PyTree, collection: str,
                stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> PyTree:
  """Statistics written by path into `variables[collection]` ("batch_stats",
  or "state" of a bridged Linen module, whose paths are Linen's)."""
  stored = flatten(variables[collection])
  missing = [p for p in stats if f"{p}/mean" not in stored]
  if missing:
    raise ConfigError("recompute_batchnorm: BatchNorm layers whose statistics are not in "
                      f"variables[{collection!r}]: {sorted(missing)}.")
  for path, (mean, var) in stats.items():
    for leaf, value in (("mean", mean), ("var", var)):
      key = f"{path}/{leaf}"
      stored[key] = np.asarray(value, np.asarray(stored[key]).dtype)
  return {**variables, collection: unflatten(stored)}


def _write_nnx(model: NnxModel, variables: PyTree,
               stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> PyTree:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  module = model.merge(variables["params"], {k: v for k, v in variables.items() if k != "params"})
  for path, layer in nnx.iter_modules(module):
    key = "/".join(map(str, path))
    if key in stats:
      mean, var = stats[key]
      layer.mean.set_value(np.asarray(mean, layer.mean.get_value().dtype))
      layer.var.set_value(np.asarray(var, layer.var.get_value().dtype))
  rest = nnx.to_pure_dict(split_nnx(module)[3])
  return {**variables, "state": rest}


def _write(adapted: Any, variables: PyTree, stats: dict[str, tuple[np.ndarray, np.ndarray]]
           ) -> PyTree:
  if not isinstance(adapted, NnxModel):
    return _write_flat(variables, "batch_stats", stats)
  return _write_flat(variables, "state", stats) if adapted.bridged else _write_nnx(
      adapted, variables, stats)


def _batch_rows(batch: dict[str, Any], input_key: str) -> tuple[Any, np.ndarray]:
  x = batch[input_key]
  n = len(jax.tree.leaves(x)[0])
  mask = batch.get("mask")
  return x, (np.ones(n, np.float32) if mask is None else np.asarray(mask, np.float32))


def _compiled_moments(adapted: Any, skip: frozenset[str], mesh: jax.sharding.Mesh | None
                      ) -> Callable[..., tuple[Moments, Any]]:
  """fn(params, model_state, x, mask) -> (moments, unmasked rows), jitted."""
  if mesh is None:
    return jax.jit(_moments(adapted, skip))
  compiled = jax.jit(_moments(adapted, skip), out_shardings=parallel.replicated(mesh))
  return lambda p, s, x, m: compiled(p, s, *parallel.shard_batch((x, m), mesh))


def make_recompute_batchnorm(model: Any, *, skip: Iterable[str] = (), input_key: str = "inputs",
                             mesh: jax.sharding.Mesh | None = None
                             ) -> Callable[[PyTree, Iterable[dict[str, Any]]], PyTree]:
  """`recompute(variables, batches) -> variables`, compiled once for `model`
  (what `recompute_batchnorm` runs; `jtl.train.fit` keeps one per phase). With a
  `mesh`, each batch is split over its devices (`jtl.shard_batch`: in a
  multi-host run each process passes its own rows) and the moments are the
  global batch's."""
  adapted = as_model(model)
  skip = frozenset(skip)
  collection = "state" if isinstance(adapted, NnxModel) else "batch_stats"
  moments = _compiled_moments(adapted, skip, mesh)

  def recompute(variables: PyTree, batches: Iterable[dict[str, Any]]) -> PyTree:
    if collection not in variables:
      raise ConfigError(f"recompute_batchnorm: the variables have no {collection!r} collection "
                        f"(collections: {sorted(variables)}); the model has no BatchNorm.")
    layers = {k.rsplit("/", 1)[0] for k in flatten(variables[collection])
              if k.endswith(("/mean", "/var"))}
    if layers and layers <= skip:
      return variables  # every layer skipped (e.g. all frozen in this phase): no pass at all
    model_state = {k: v for k, v in variables.items() if k != "params"}
    # Per layer: sums over batches of n, n * mean, n * mean^2 and n * var.
    sums: dict[str, np.ndarray] = {}
    total = 0.0
    for batch in batches:
      x, mask = _batch_rows(batch, input_key)
      recorded, count = jax.device_get(moments(variables["params"], model_state, x, mask))
      for path, (mean, var) in recorded.items():
        mean = np.asarray(mean, np.float64)
        sums[path] = sums.get(path, 0.0) + float(count) * np.stack(
            [mean, np.square(mean), np.asarray(var, np.float64)])
      total += float(count)
    if total == 0:
      raise ConfigError("recompute_batchnorm: the batches held no (unmasked) rows.")
    if not sums:
      if skip:  # every BatchNorm layer is frozen: nothing to recompute
        return variables
      raise ConfigError("recompute_batchnorm: the model has no BatchNorm layer to recompute.")
    # The population variance: the mean within-batch variance plus the
    # variance of the batch means.
    stats = {p: (s[0] / total, s[2] / total + np.maximum(s[1] / total - np.square(s[0] / total), 0))
             for p, s in sums.items()}
    return _write(adapted, variables, stats)
  return recompute


def recompute_batchnorm(model: Any, variables: PyTree, batches: Iterable[dict[str, Any]], *,
                        skip: Iterable[str] = (), input_key: str = "inputs") -> PyTree:
  """Every BatchNorm's stored mean and var recomputed on `batches`.

  Each layer normalises with the statistics of the batch it sees (as in
  training), and its stored statistics become the exact population mean and
  (biased) variance of its input over all rows of all batches (rows with
  mask=False are dropped). Params and every other collection are unchanged.

  Args:
    model: a Flax Linen module (`__call__(x, *, train)`), an NNX module, or a
      `jtl.LinenModel`/`NnxModel` adapter, with BatchNorm layers.
    variables: {"params": ..., "batch_stats": ...} (Linen) or
      `jtl.adapter.variables_of(module)` (NNX: {"params": ..., "state": ...}).
    batches: only `batch[input_key]` (and "mask") is read.
    skip: module paths ("backbone/bn0") whose statistics stay as stored.
  """
  return make_recompute_batchnorm(model, skip=skip, input_key=input_key)(variables, batches)
