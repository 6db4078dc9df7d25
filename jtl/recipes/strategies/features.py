"""Linear probe on cached features.

When the backbone is frozen and the input pipeline applies no random
augmentation, every epoch feeds the head the same features. So compute them
once, `extract_features` (jit-compiled, batches split over all devices of the
mesh, padded rows dropped), and train only the head on the cache with
`train_head`: an epoch then costs a Dense layer instead of a backbone pass.
Features come from `module.apply(..., method="features", train=False)`:
frozen BatchNorm uses its stored statistics and dropout is off, as in a
frozen backbone.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jtl import losses, parallel, partition, phases, steps
from jtl import tree as jtree
from jtl.adapter import NnxModel, as_model, is_nnx_module
from jtl.errors import ConfigError, DataError
from jtl.state import TrainState, create_train_state
from jtl.tree import PyTree


class Head(nn.Module):
  """The classifier alone: a Dense named "head", as in every zoo model."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    return nn.Dense(self.num_classes, name="head")(x).astype(jnp.float32)


def cache_problems(labels: PyTree, *, head_pattern: str = r"head/.*",
                   augment: bool = False) -> list[str]:
  """Why features cannot be cached ([] when they can)."""
  import re  # pylint: disable=g-import-not-at-top
  problems = []
  trainable = [p for p, l in jtree.leaves_with_paths(labels)
               if not partition.is_frozen(l) and not re.fullmatch(head_pattern, p)]
  if trainable:
    problems.append(f"{len(trainable)} backbone leaves are trainable (e.g. {trainable[:3]})")
  if augment:
    problems.append("the training pipeline applies random augmentation")
  return problems


def extract_features(module: Any, variables: PyTree, batches: Iterable[dict[str, Any]], *,
                     mesh: jax.sharding.Mesh | None = None, method: str = "features"
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Runs `module.<method>` over every batch; returns (features [N, D], labels [N]).

  `module` is a Linen module, an NNX module (its `<method>(x)` in eval mode),
  or any model adapter whose outputs are the features (`jtl.as_model`).

  Batches are {"inputs", "label", "mask"?} (an evaluation pass of
  `jtl.data.make_dataset`); rows with mask=False are dropped. Batch sizes
  must be divisible by the number of devices of `mesh` (default: all). In a
  multi-host run each process passes its rows and gets every process's
  (the global batches' features, in the mesh's row order).
  """
  return feature_extractor(module, variables, mesh=mesh, method=method)(batches)


def feature_extractor(module: Any, variables: PyTree, *, mesh: jax.sharding.Mesh | None = None,
                      method: str = "features"
                      ) -> Callable[[Iterable[dict[str, Any]]], tuple[np.ndarray, np.ndarray]]:
  """`extract_features` for several passes over one model: returns
  `extract(batches) -> (features, labels)`, compiled once for all of them
  (per batch shape) and with `variables` placed on the mesh once."""
  mesh = mesh or parallel.make_mesh()
  variables = jax.device_put(variables, parallel.replicated(mesh))
  fn = jax.jit(_feature_fn(module, method))

  def extract(batches: Iterable[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for batch in batches:
      feat, label, keep = _batch_features(fn, variables, batch, mesh)
      feats.append(feat[keep])
      labels.append(label[keep])
    if not feats:
      raise DataError("extract_features got no batches; pass one evaluation pass of the data.")
    return np.concatenate(feats), np.concatenate(labels)
  return extract


def _batch_features(fn: Callable, variables: PyTree, batch: dict[str, Any],
                    mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(features, labels, mask) of a batch's rows. In a multi-host run, of every
  process's rows (the global batch, the same on every process: each trains
  the same head on all examples), labels and mask gathered with the features
  through the same sharding, so their rows stay paired."""
  mask = np.ones(len(batch["label"]), bool) if batch.get("mask") is None \
      else np.asarray(batch["mask"], bool)
  if jax.process_count() == 1:
    out = fn(variables, parallel.shard_batch(batch["inputs"], mesh))
    return np.asarray(jax.device_get(out)), np.asarray(batch["label"]), mask
  local = {"inputs": batch["inputs"], "label": batch["label"], "mask": mask}
  sharded = parallel.shard_batch(local, mesh)
  out = fn(variables, sharded["inputs"])
  rows = multihost_utils.process_allgather(
      {"features": out, "label": sharded["label"], "mask": sharded["mask"]}, tiled=True)
  return np.asarray(rows["features"]), np.asarray(rows["label"]), np.asarray(rows["mask"], bool)


def _feature_fn(module: Any, method: str):
  """(variables, x) -> features of any model kind, in inference mode."""
  if isinstance(module, nn.Module) or (hasattr(module, "apply") and not callable(module)
                                       and not getattr(module, "jtl_adapter", False)):
    return lambda v, x: module.apply(v, x, train=False, method=method)
  model = NnxModel(module, call=lambda m, x: getattr(m, method)(x)) \
      if is_nnx_module(module) else as_model(module)

  def run(v, x):
    state = {k: s for k, s in v.items() if k != "params"}
    return model.apply(v["params"], state, x, train=False, rng=None)[0]
  return run


def feature_batches(features: np.ndarray, labels: np.ndarray, batch_size: int, *,
                    seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled batches of cached features, a new permutation per epoch."""
  n = len(features)
  if not 1 <= batch_size <= n:
    raise DataError(f"batch_size={batch_size}: expected 1..{n} (the cached examples).")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      yield {"inputs": features[idx], "label": labels[idx]}


def head_variables(variables: PyTree) -> dict[str, Any]:
  """{"params": {"head": ...}} taken from a full model's variables."""
  head = variables["params"].get("head") if isinstance(variables["params"], dict) else None
  if head is None:
    raise ConfigError("The model's params have no 'head' entry; build it with "
                      "num_classes > 0 to train a linear probe.")
  return {"params": {"head": head}}


def with_head(variables: PyTree, head_params: PyTree) -> dict[str, Any]:
  """The model's variables with `head_params` (a {"head": ...} tree) put in."""
  return {**variables, "params": {**variables["params"], **head_params}}


def head_trainer(variables: PyTree, tx: optax.GradientTransformation, *,
                 loss_fn: losses.LossFn = losses.cross_entropy_loss):
  """Compiles head training on cached features once; returns
  `train(features, labels, *, num_steps, batch_size, seed=0, timings=None) -> TrainState`.

  All `num_steps` steps run inside one jit-compiled `lax.scan` over batch
  indices (the order of `feature_batches`), with the features on the device:
  an epoch costs the head's arithmetic only, no per-step dispatch or
  host-to-device copy. Calls with the same (num_steps, batch_size) and
  feature shapes reuse the compiled program. A `timings` dict receives
  "compile_seconds" (0 when the program is reused), so callers can time the
  steps apart from the compilation.
  """
  head_vars = head_variables(variables)
  module = Head(head_vars["params"]["head"]["kernel"].shape[-1])
  hlabels = jax.tree.map(lambda _: "head", head_vars["params"])
  step = steps.make_train_step(module, tx, loss_fn=loss_fn)

  @functools.partial(jax.jit, donate_argnums=0)
  def run(state, features, labels, order):
    def body(state, idx):
      state, metrics = step(state, {"inputs": features[idx], "label": labels[idx]})
      return state, metrics["loss"]
    return jax.lax.scan(body, state, order)

  compiled: dict[tuple[Any, ...], Any] = {}  # per argument shapes, like jit's own cache

  def train(features: np.ndarray, labels: np.ndarray, *, num_steps: int, batch_size: int,
            seed: int = 0, timings: dict[str, float] | None = None) -> TrainState:
    it = feature_batches(np.arange(len(features)), labels, batch_size, seed=seed)
    order = np.stack([next(it)["inputs"] for _ in range(num_steps)])
    # Copied (create_train_state's default): `run` donates the state, and the
    # head's arrays are the caller's (an NNX module's own, after `jtl.variables_of`).
    state = create_train_state(head_vars, hlabels, tx, rng=seed)
    args = (state, jnp.asarray(features), jnp.asarray(labels), order)
    key = tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in jax.tree.leaves(args))
    t0 = time.perf_counter()
    if key not in compiled:  # compiled ahead of the call, so the compilation is timed alone
      compiled[key] = run.lower(*args).compile()
    if timings is not None:
      timings["compile_seconds"] = time.perf_counter() - t0
    state, _ = compiled[key](*args)
    return state

  return train


def train_head(features: np.ndarray, labels: np.ndarray, variables: PyTree,
               tx: optax.GradientTransformation, *, num_steps: int, batch_size: int,
               seed: int = 0, loss_fn: losses.LossFn = losses.cross_entropy_loss) -> TrainState:
  """Trains the model's head on cached features; returns the head's TrainState.

  `variables` are the full model's; its head initialises the probe. Put the
  result back with `with_head(variables, state.params)`. To train repeatedly
  without recompiling, use `head_trainer`.
  """
  return head_trainer(variables, tx, loss_fn=loss_fn)(
      features, labels, num_steps=num_steps, batch_size=batch_size, seed=seed)


def probe_head(module: Any, variables: PyTree, train_pass: Iterable[dict[str, Any]],
               head_tx: optax.GradientTransformation, *, num_steps: int, batch_size: int,
               seed: int = 0, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[dict[str, Any], dict[str, float]]:
  """The probe phase of LP-FT on cached features: one backbone pass over
  `train_pass` (unaugmented), then `num_steps` head steps on the cache.

  Returns (the model's variables with the trained head, {"extract_seconds",
  "head_seconds", "cached_examples"}).
  """
  t0 = time.perf_counter()
  feats, ys = extract_features(module, variables, train_pass, mesh=mesh)
  t1 = time.perf_counter()
  head = head_trainer(variables, head_tx)(feats, ys, num_steps=num_steps,
                                          batch_size=min(batch_size, len(ys)), seed=seed)
  params = jax.device_get(head.params)
  return with_head(variables, params), {"extract_seconds": t1 - t0,
                                        "head_seconds": time.perf_counter() - t1,
                                        "cached_examples": len(ys)}


def cached_head_phase(module: Any, train_pass: Iterable[dict[str, Any]] | None,
                      head_tx: optax.GradientTransformation, *, head_steps: int, steps: int,
                      batch_size: int, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                      train_features: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> phases.SelfTrained:
  """The head trained on cached features, as `jtl.train.fit`'s first phase
  (`first_phase=`): one backbone pass over `train_pass` (unaugmented) on all
  devices of the mesh, then `head_steps` steps of `batch_size` on the cache
  in one compiled scan (`head_trainer`, optimizer `head_tx` over
  {"head": ...}). It counts `steps` of the run's steps: the run's num_steps
  for a linear probe (the whole run), 0 for LP-FT's probe phase (its
  fine-tuning runs every step).

  `train_features`: (features, labels) that `extract_features` gave for this
  backbone and this same pass (e.g. `model="auto"`'s selection,
  `jtl.recipes.selection.Selection.train_features`); then there is no
  backbone pass (`train_pass` may be None) and the head trains exactly as
  after one. Its metrics row: extract_seconds (0 when given), head_seconds,
  head_compile_seconds, steps_per_second (head steps), cached_examples,
  reused_features (1.0 when given, else 0.0). Each batch read of the pass,
  and its end, is a stop point (`jtl.phases.SelfTrained`)."""
  if train_pass is None and train_features is None:
    raise ValueError("cached_head_phase needs train_pass or train_features.")

  def run(variables: PyTree, stop_point: Callable[[str], None]
          ) -> tuple[dict[str, Any], dict[str, float]]:
    t0 = time.perf_counter()
    if train_features is None:
      feats, ys = extract_features(module, variables, _each_read(train_pass, stop_point),
                                   mesh=mesh)
      stop_point("after extracting the features")
    else:
      feats, ys = train_features
    t1 = time.perf_counter()
    timings: dict[str, float] = {}
    head = head_trainer(variables, head_tx)(feats, ys, num_steps=head_steps,
                                            batch_size=min(batch_size, len(ys)), seed=seed,
                                            timings=timings)
    jax.block_until_ready(head.params)
    t2 = time.perf_counter()
    return with_head(variables, jax.device_get(head.params)), {
        "extract_seconds": 0.0 if train_features is not None else t1 - t0,
        "head_seconds": t2 - t1, "head_compile_seconds": timings["compile_seconds"],
        "steps_per_second": head_steps / (t2 - t1), "cached_examples": len(ys),
        "reused_features": float(train_features is not None)}
  return phases.SelfTrained(run, steps)


def _each_read(batches: Iterable[dict[str, Any]], stop_point: Callable[[str], None]
               ) -> Iterator[dict[str, Any]]:
  """`batches`, with `stop_point` called at each batch read: under `fit` it beats
  the workdir lock's heartbeat (a pass over a big split can outlast its
  `STALL_S`) and stops a preempted single-process run there, not after the
  whole pass. (JAX's multi-host preemption service agrees on a step number
  past the largest reported one, so a multi-host run stops at its first
  training step instead, every process together.)"""
  for n, batch in enumerate(batches, 1):
    stop_point(f"while extracting the features (at batch {n})")
    yield batch


def fit_cached_probe(*, module: Any, variables: PyTree, labels: PyTree,
                     tx: optax.GradientTransformation, head_tx: optax.GradientTransformation,
                     train_pass: Iterable[dict[str, Any]], num_steps: int, batch_size: int,
                     workdir: Any = None, eval_batches: Any = None, keep: int = 2,
                     best_metric: str | None = "accuracy", meta: dict[str, Any] | None = None,
                     seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Any:
  """A linear probe run by `jtl.train.fit` on cached features: its first
  phase (`cached_head_phase`) is the whole run; `fit` then evaluates, logs
  and checkpoints it in `workdir` (a full TrainState over `labels`/`tx` at
  step `num_steps`, so `scripts/evaluate.py` and resuming work unchanged),
  holds the lock and handles SIGTERM/SIGINT as for any run. A workdir that
  already holds step `num_steps` is evaluated, not retrained; an unfinished
  one is retrained from the start (the run is short). Returns a
  `jtl.train.FitResult` whose `steps_per_second` counts head steps.
  """
  # In the function: jtl.train imports Orbax, which `from jtl.recipes import strategies`
  # does not load (Orbax loads when a run's checkpoint is written or restored).
  from jtl import train as jtrain  # pylint: disable=g-import-not-at-top
  first = cached_head_phase(module, train_pass, head_tx, head_steps=num_steps, steps=num_steps,
                            batch_size=batch_size, seed=seed, mesh=mesh)
  return jtrain.fit(module=module, variables=variables, labels=labels, tx=tx,
                    train_batches=lambda start: iter(()), num_steps=num_steps, workdir=workdir,
                    eval_batches=eval_batches, keep=keep, best_metric=best_metric, meta=meta,
                    seed=seed, mesh=mesh, progress=False, first_phase=first)
