"""Knowledge distillation: a frozen teacher's soft targets train a student.

The loss (Hinton et al., 2015) mixes the hard-label cross-entropy with the KL
divergence between the teacher's and the student's softened distributions,
scaled by T^2 so that its gradients keep their size as T grows:

    loss = (1 - alpha) * CE(student, label)
         + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

Optionally the student's pooled features, through a learned linear projection
("projection"), are pulled towards the teacher's features (FitNets-style MSE).

The teacher never changes, so for a dataset without random augmentation its
logits can be computed once (`cache_teacher_outputs`) and served with the data
(`array_batches`); `make_distill_loss` then plugs into the ordinary
`jtl.make_train_step` / `jtl.train.fit`. With feature matching, or a teacher
run on the fly, use `make_distill_train_step`.

>>> import jax.numpy as jnp
>>> s = jnp.array([[2.0, 0.0, -1.0]]); batch = {"label": jnp.array([0]), "teacher_logits": s}
>>> loss_fn = make_distill_loss(temperature=4.0, alpha=1.0)
>>> float(loss_fn(s, batch))  # student == teacher: no distillation loss
0.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtl.adapter import LinenModel
from jtl.errors import ConfigError, StepError
from jtl.state import TrainState
from jtl.losses import Batch, LossFn, cross_entropy_loss, masked_mean
from jtl.steps import make_train_step
from jtl.tree import PyTree, cast_floats, check_compute_dtype


def _check_options(temperature: float, alpha: float) -> None:
  problems = []
  if not temperature > 0:
    problems.append(f"temperature={temperature!r}: expected a positive number (e.g. 4.0)")
  if not 0.0 <= alpha <= 1.0:
    problems.append(f"alpha={alpha!r}: expected a weight in [0, 1] (1 = soft targets only)")
  if problems:
    raise ConfigError("Invalid distillation options:\n  " + "\n  ".join(problems))


def soft_target_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                     temperature: float) -> jax.Array:
  """Per-example T^2 * KL(softmax(teacher/T) || softmax(student/T)), shape [B]."""
  t = jnp.float32(temperature)
  log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return (t * t) * kl


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array | None, *, temperature: float = 4.0,
                      alpha: float = 0.9, mask: jax.Array | None = None,
                      hard_loss: LossFn = cross_entropy_loss) -> jax.Array:
  """Hinton's loss: (1 - alpha) * hard + alpha * T^2 * KL, masked mean.

  Args:
    student_logits, teacher_logits: [B, C].
    labels: int [B] or soft [B, C]; may be None when alpha == 1.
    temperature: softmax temperature T of the soft targets.
    alpha: weight of the soft-target term.
    mask: bool [B]; rows with False are ignored.
    hard_loss: `hard_loss(logits, batch)` for the label term.
  """
  _check_options(temperature, alpha)
  if student_logits.shape != teacher_logits.shape:
    raise StepError(
        f"Student logits {tuple(student_logits.shape)} and teacher logits "
        f"{tuple(teacher_logits.shape)} differ; the student needs the teacher's classes.")
  soft = masked_mean(soft_target_loss(student_logits, teacher_logits,
                                      temperature=temperature), mask)
  if alpha == 1.0:
    return alpha * soft
  if labels is None:
    raise StepError("alpha < 1 needs hard labels (batch['label']); got none.")
  batch = {"label": labels} if mask is None else {"label": labels, "mask": mask}
  return (1.0 - alpha) * hard_loss(student_logits, batch) + alpha * soft


def make_distill_loss(*, temperature: float = 4.0, alpha: float = 0.9,
                      teacher_key: str = "teacher_logits",
                      hard_loss: LossFn = cross_entropy_loss) -> LossFn:
  """A `loss_fn(logits, batch)` reading the teacher's logits from the batch.

  For `jtl.make_train_step` / `jtl.train.fit` with cached teacher logits.
  """
  _check_options(temperature, alpha)

  def loss_fn(logits: jax.Array, batch: Batch) -> jax.Array:
    if teacher_key not in batch:
      raise StepError(
          f"The batch has no {teacher_key!r} entry (keys: {sorted(batch)}). Add the "
          "teacher's logits with jtl.recipes.distill.cache_teacher_outputs + array_batches, "
          "or use make_distill_train_step with a teacher.")
    return distillation_loss(logits, batch[teacher_key], batch.get("label"),
                             temperature=temperature, alpha=alpha,
                             mask=batch.get("mask"), hard_loss=hard_loss)

  return loss_fn


def _features_and_logits(module: nn.Module, x: jax.Array, train: bool):
  """(pooled features, logits) of a zoo-style model: `features()` then "head"."""
  if not hasattr(module, "features"):
    raise StepError(f"{type(module).__name__} has no features(x, *, train) method; "
                    "feature matching needs a model with pooled features and a 'head'.")
  feats = module.features(x, train=train)
  try:
    head = module.head
  except AttributeError as e:
    raise StepError(f"{type(module).__name__} has no 'head' submodule defined in setup(); "
                    "feature matching needs it to get logits from the features.") from e
  return feats, head(feats).astype(jnp.float32)


def teacher_fn(module: nn.Module, variables: PyTree, *, features: bool = False,
               compute_dtype: Any = None) -> Callable[[jax.Array], Any]:
  """A jitted, frozen teacher: inputs -> logits (or (logits, features)).

  The teacher runs in inference mode (stored BatchNorm statistics, no dropout).
  """
  variables = jax.tree.map(jnp.asarray, variables)
  compute_dtype = check_compute_dtype(compute_dtype)

  def run(x):
    v = variables
    if compute_dtype is not None:
      v, x = cast_floats(v, compute_dtype), x.astype(compute_dtype)
    if features:
      f, logits = module.apply(v, x, False, method=_features_and_logits)
      return logits.astype(jnp.float32), f.astype(jnp.float32)
    return module.apply(v, x, train=False).astype(jnp.float32)

  return jax.jit(run)


def cache_teacher_outputs(teacher: Callable[[jax.Array], Any], inputs: np.ndarray, *,
                          batch_size: int = 256) -> Any:
  """Runs `teacher` once over `inputs` (in order) and returns numpy outputs.

  Only valid when training sees these exact inputs (no random augmentation).
  """
  outs = []
  n = len(inputs)
  for start in range(0, n, batch_size):
    chunk = np.asarray(inputs[start:start + batch_size])
    pad = batch_size - len(chunk) if n > batch_size else 0
    if pad:  # one compiled shape for every chunk
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out = jax.device_get(teacher(chunk))
    outs.append(jax.tree.map(lambda a: a[:len(a) - pad], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def array_batches(arrays: Mapping[str, np.ndarray], *, batch_size: int, seed: int = 0,
                  start_step: int = 0) -> Iterator[Batch]:
  """Endless shuffled full batches of aligned arrays, from batch `start_step`.

  Every key ("inputs", "label", "teacher_logits", ...) is indexed the same
  way, so cached teacher outputs stay with their examples. Epoch e uses the
  permutation of seed (seed, e).
  """
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ConfigError(f"array_batches: arrays of different lengths {sizes}; each key "
                      "must hold one row per example.")
  n = next(iter(sizes.values()))
  if batch_size > n:
    raise ConfigError(f"batch_size={batch_size} exceeds the {n} examples.")
  per_epoch = n // batch_size
  step = start_step
  while True:
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(n)
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {k: np.asarray(v)[idx] for k, v in arrays.items()}
    step += 1


class FeatureProjection(nn.Module):
  """Wraps a student with a learned linear map of its features to the teacher's.

  `__call__` gives the student's logits unchanged, so evaluation, export and
  the usual steps see the plain student under params "student/...". The
  projection ("projection/...") is only used by the feature-matching loss.
  """
  student: nn.Module
  teacher_dim: int

  def setup(self) -> None:
    self.projection = nn.Dense(self.teacher_dim)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.student(x, train=train)

  def outputs(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(logits, projected features)."""
    feats, logits = _features_and_logits(self.student, x, train)
    return logits, self.projection(feats).astype(jnp.float32)


def with_projection(student: nn.Module, student_variables: PyTree, teacher_dim: int,
                    example_input: jax.Array, *, rng: int = 0) -> tuple[FeatureProjection, PyTree]:
  """(FeatureProjection module, its variables), the student's variables kept as they are.

  Args:
    student: a model with `features(x, *, train)` and a "head" made in setup().
    student_variables: its variables ({"params": ..., "batch_stats": ...}).
    teacher_dim: size of the teacher's pooled features.
    example_input: one batch of inputs, to find the student's feature size.
  """
  fshape = jax.eval_shape(
      lambda v, x: student.apply(v, x, train=False, method=student.features),
      student_variables, jnp.asarray(example_input))
  proj = nn.Dense(teacher_dim).init(jax.random.PRNGKey(rng), jnp.zeros((1, fshape.shape[-1])))
  variables = {k: {"student": v} for k, v in student_variables.items()}
  variables["params"]["projection"] = proj["params"]
  return FeatureProjection(student, teacher_dim), variables


def _teacher_transform(teacher: Callable[[jax.Array], Any] | None, feature_weight: float):
  """batch_transform adding the teacher's targets (or checking they are there)."""
  def transform(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[Batch, dict]:
    del state, rng
    if teacher is None:
      if "teacher_logits" not in batch or (feature_weight and "teacher_features" not in batch):
        raise StepError("No teacher given and the batch lacks 'teacher_logits'"
                        + (" / 'teacher_features'" if feature_weight else "") +
                        f" (keys: {sorted(batch)}).")
      return batch, {}
    out = teacher(batch["inputs"])
    t_logits, t_feats = out if isinstance(out, tuple) else (out, None)
    if feature_weight and t_feats is None:
      raise StepError("feature_weight > 0 needs a teacher built with teacher_fn(..., features=True).")
    extra = {} if t_feats is None else {"teacher_features": t_feats}
    return {**batch, "teacher_logits": t_logits, **extra}, {}
  return transform


def _distill_objective(temperature: float, alpha: float, feature_weight: float) -> LossFn:
  """loss_fn(outputs, batch) -> (loss, metrics) over (logits[, projected features])."""
  def loss_fn(outputs: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits, proj = outputs if feature_weight else (outputs, None)
    mask = batch.get("mask")
    soft = masked_mean(soft_target_loss(logits, batch["teacher_logits"],
                                        temperature=temperature), mask)
    hard = cross_entropy_loss(logits, batch) if alpha < 1.0 else jnp.zeros(())
    loss = (1.0 - alpha) * hard + alpha * soft
    feat_loss = jnp.zeros(())
    if feature_weight:
      feat_loss = masked_mean(jnp.mean(jnp.square(proj - batch["teacher_features"]), axis=-1),
                              mask)
      loss = loss + feature_weight * feat_loss
    return loss, {"soft_loss": soft, "feature_loss": feat_loss}
  return loss_fn


def distill_parts(module: nn.Module, *, temperature: float = 4.0, alpha: float = 0.9,
                  feature_weight: float = 0.0, teacher: Callable[[jax.Array], Any] | None = None
                  ) -> tuple[Any, LossFn, Callable]:
  """(model, loss_fn, batch_transform) of distillation, for `jtl.make_train_step`
  or `jtl.train.fit`: see `make_distill_train_step` for the arguments."""
  _check_options(temperature, alpha)
  if feature_weight and not isinstance(module, FeatureProjection):
    raise ConfigError(
        f"feature_weight={feature_weight} needs the student wrapped in a "
        "FeatureProjection (see jtl.recipes.distill.with_projection).")
  model = LinenModel(module, call=FeatureProjection.outputs) if feature_weight else module
  return (model, _distill_objective(temperature, alpha, feature_weight),
          _teacher_transform(teacher, feature_weight))


def make_distill_train_step(
    module: nn.Module, tx: optax.GradientTransformation, *, labels: PyTree | None = None,
    temperature: float = 4.0, alpha: float = 0.9, feature_weight: float = 0.0,
    teacher: Callable[[jax.Array], Any] | None = None, **train_step_kwargs: Any,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`jtl.make_train_step` for distillation with feature matching.

  Args:
    module: the student; a `FeatureProjection` when feature_weight > 0.
    tx, labels: as for `jtl.make_train_step` (the teacher is never in them).
    temperature, alpha: see `distillation_loss`.
    feature_weight: weight of mean((projection(student features) -
      teacher features)^2); 0 turns feature matching off.
    teacher: `teacher_fn(...)` output, run on the fly (under stop_gradient);
      None reads batch["teacher_logits"] (and batch["teacher_features"]).
    **train_step_kwargs: microbatches, compute_dtype, axis_name.

  Metrics: loss, soft_loss, hard-label accuracy, feature_loss, grad_norm.
  """
  model, loss_fn, transform = distill_parts(module, temperature=temperature, alpha=alpha,
                                            feature_weight=feature_weight, teacher=teacher)
  return make_train_step(model, tx, labels=labels, loss_fn=loss_fn, batch_transform=transform,
                         **train_step_kwargs)
