"""Unsupervised domain adaptation: labelled source, unlabelled target.

- DANN (Ganin & Lempitsky, 2015): a domain classifier on the features, fed
  through a gradient reversal layer, so the features learn to fool it while
  the class head learns the source labels.
- CORAL (Sun & Saenko, 2016): a penalty on the distance between the source
  and target feature covariances.
- AdaBN (Li et al., 2016): after training, re-estimate every BatchNorm's
  statistics on target data (`jtl.recompute_batchnorm` on target batches);
  the params are untouched.

Adaptation batches are {"inputs": source images, "label": source labels,
"target_inputs": target images}; the target's labels are never read.

>>> import jax, jax.numpy as jnp
>>> jax.grad(lambda x: jnp.sum(gradient_reversal(x, 0.5) * 3.0))(jnp.ones(2))
Array([-1.5, -1.5], dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jtl.adapter import LinenModel
from jtl.errors import ConfigError, StepError
from jtl.state import TrainState
from jtl.losses import Batch, cross_entropy_loss, masked_mean
from jtl.steps import make_train_step
from jtl.tree import PyTree

METHODS = ("source_only", "dann", "coral")
BATCHNORM_MODES = ("joint", "separate")


@jax.custom_vjp
def gradient_reversal(x: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
  """Identity forward; multiplies the incoming gradient by -scale backward."""
  return x


def _grl_fwd(x, scale):
  return x, scale


def _grl_bwd(scale, g):
  return (jax.tree.map(lambda t: -scale * t, g), jnp.zeros_like(jnp.asarray(scale)))


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


def dann_schedule(num_steps: int, *, gamma: float = 10.0, max_scale: float = 1.0
                  ) -> Callable[[jax.Array], jax.Array]:
  """The DANN paper's reversal scale max_scale * (2 / (1 + exp(-gamma p)) - 1),
  p = step / num_steps: 0 at the start (the domain classifier learns first),
  near max_scale from p ~ 0.5 on."""
  if num_steps < 1:
    raise ConfigError(f"num_steps={num_steps}: expected a positive number of steps.")
  def schedule(step):
    p = jnp.clip(jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)
    return max_scale * (2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0)
  return schedule


def dann_lr_schedule(learning_rate: float, num_steps: int, *, alpha: float = 10.0,
                     beta: float = 0.75) -> optax.Schedule:
  """The DANN paper's annealing lr / (1 + alpha p)^beta, p = step / num_steps
  (with SGD, momentum 0.9): lr at the start, lr / 11^0.75 ~ 0.166 lr at the end."""
  if num_steps < 1 or learning_rate <= 0:
    raise ConfigError(f"learning_rate={learning_rate}, num_steps={num_steps}: "
                      "expected both positive.")
  def schedule(step):
    p = jnp.clip(jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)
    return learning_rate / (1.0 + alpha * p) ** beta
  return schedule


def coral_loss(source: jax.Array, target: jax.Array, source_mask: jax.Array | None = None,
               target_mask: jax.Array | None = None) -> jax.Array:
  """||Cov(source) - Cov(target)||_F^2 / (4 d^2) over [N, d] features; the
  covariances of the rows a mask marks real (all rows without one)."""
  def cov(f, mask):
    f = f.astype(jnp.float32)
    w = (jnp.ones(f.shape[:1]) if mask is None else mask.astype(jnp.float32))[:, None]
    n = jnp.sum(w)
    c = (f - jnp.sum(w * f, axis=0, keepdims=True) / jnp.maximum(n, 1.0)) * w
    return c.T @ c / jnp.maximum(n - 1, 1.0)
  d = source.shape[-1]
  return jnp.sum(jnp.square(cov(source, source_mask) - cov(target, target_mask))) / (4.0 * d * d)


def _keep_batchnorm_statistics(next_fun, args, kwargs, context):
  """Interceptor: each BatchNorm runs as asked, then its running statistics
  are put back as they were."""
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, nn.BatchNorm):
    return next_fun(*args, **kwargs)
  saved = {name: module.get_variable("batch_stats", name) for name in ("mean", "var")
           if module.has_variable("batch_stats", name)}
  out = next_fun(*args, **kwargs)
  if module.is_mutable_collection("batch_stats"):
    for name, value in saved.items():
      module.put_variable("batch_stats", name, value)
  return out


class DomainClassifier(nn.Module):
  """MLP: features -> one logit (source = 0, target = 1).

  `depth` hidden layers of `hidden` ReLU units, each followed by dropout
  (active only with train=True), as in the DANN paper's 1024-1024 head: a
  classifier too strong for the features reaches 100% and leaves the
  reversed gradient nothing to push against.
  """
  hidden: int = 1024
  depth: int = 2
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for i in range(self.depth):
      x = nn.relu(nn.Dense(self.hidden, name=f"fc{i + 1}")(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(1, name="out")(x)[..., 0]


class AdaptModel(nn.Module):
  """A zoo-style model (params "model/...") plus, if domain_hidden > 0, a
  DANN domain classifier ("domain/...").

  `__call__` is the wrapped model's, so eval steps, AdaBN and export see the
  plain classifier. `outputs` gives (logits, features, domain logits).
  """
  model: nn.Module
  domain_hidden: int = 0
  domain_dropout: float = 0.5

  def setup(self) -> None:
    if self.domain_hidden:
      self.domain = DomainClassifier(self.domain_hidden, dropout=self.domain_dropout)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.model(x, train=train)

  def outputs(self, x: jax.Array, *, train: bool = False, grl_scale: Any = 1.0,
              target: jax.Array | None = None):
    """(logits, features, domain logits) of the rows of x, then of `target`'s.

    `target` goes through the network on its own: in training every
    BatchNorm normalises it with its own batch statistics (domain-specific
    normalisation) and keeps the running statistics those of x.
    """
    if not hasattr(self.model, "features"):
      raise StepError(f"{type(self.model).__name__} has no features(x, *, train) method.")
    feats = self.model.features(x, train=train)
    if target is not None:
      with nn.intercept_methods(_keep_batchnorm_statistics):
        feats = jnp.concatenate([feats, self.model.features(target, train=train)], axis=0)
    logits = self.model.head(feats).astype(jnp.float32)
    dom = None
    if self.domain_hidden:
      dom = self.domain(gradient_reversal(feats, grl_scale), train=train).astype(jnp.float32)
    return logits, feats.astype(jnp.float32), dom


def wrap(model: nn.Module, variables: PyTree, example_input: jax.Array, *,
         method: str = "dann", domain_hidden: int = 1024, domain_dropout: float = 0.5,
         rng: int = 0) -> tuple[AdaptModel, PyTree]:
  """(AdaptModel, variables) for `method`; the model's variables are kept.

  The domain classifier (DANN only: `domain_hidden` units in each of its two
  hidden layers, dropout `domain_dropout`) is initialised from `rng`.
  """
  if domain_hidden < 1 or not 0.0 <= domain_dropout < 1.0:
    raise ConfigError(f"domain_hidden={domain_hidden}, domain_dropout={domain_dropout}: "
                      "expected domain_hidden >= 1 and 0 <= domain_dropout < 1.")
  if method not in METHODS:
    raise ConfigError(f"method={method!r}: expected one of {METHODS}.")
  if not isinstance(model, nn.Module):
    raise ConfigError(
        f"Domain adaptation wraps a Flax Linen module; got a {type(model).__name__} (a strategy's "
        "model wrapper: LoRA, or freeze_batchnorm='statistics'). Use a strategy that keeps the "
        "module (e.g. full or bitfit with strategy.freeze_batchnorm=True or False).")
  hidden = domain_hidden if method == "dann" else 0
  wrapped = {k: {"model": v} for k, v in variables.items()}
  if hidden:
    fshape = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, method=model.features),
                            variables, jnp.asarray(example_input))
    dom = DomainClassifier(hidden, dropout=domain_dropout).init(
        jax.random.PRNGKey(rng), jnp.zeros((1, fshape.shape[-1])))
    wrapped["params"]["domain"] = dom["params"]
  return AdaptModel(model, hidden, domain_dropout), wrapped


def _adapt_call(module: AdaptModel, inputs: Any, train: bool = False, *,
                batchnorm: str = "joint") -> Any:
  """Training batches ({"source", "target", "grl_scale"}) give (logits,
  features, domain logits) over source rows then target rows; plain inputs
  (evaluation) give the classifier's logits."""
  if not isinstance(inputs, dict):
    return module(inputs, train=train)
  x, target = inputs["source"], inputs.get("target")
  scale = inputs["grl_scale"][0]
  if target is not None and batchnorm == "separate":
    return module.outputs(x, train=train, grl_scale=scale, target=target)
  if target is not None:
    x = jnp.concatenate([x, target], axis=0)
  return module.outputs(x, train=train, grl_scale=scale)


def _adapt_transform(method: str, schedule: Callable[[jax.Array], jax.Array]):
  """batch_transform: {"inputs", "target_inputs"} -> one model input per row
  pair (so micro-batches keep source and target rows together)."""
  def transform(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[Batch, dict]:
    del rng
    tgt = batch.get("target_inputs")
    if method != "source_only" and tgt is None:
      raise StepError(f"method={method!r} needs batch['target_inputs'] (keys: {sorted(batch)}).")
    scale = jnp.asarray(schedule(state.step), jnp.float32)
    n = batch["label"].shape[0]
    inputs = {"source": batch["inputs"], "grl_scale": jnp.full((n,), scale)}
    if method != "source_only":
      inputs["target"] = tgt
    rest = {k: v for k, v in batch.items() if k not in ("inputs", "target_inputs")}
    return {**rest, "inputs": inputs}, {"grl_scale": scale}
  return transform


def _domain_rows(source_mask: jax.Array | None, target_mask: jax.Array | None, n_source: int,
                 n_target: int) -> jax.Array | None:
  """The real rows of [source; target] (None: all); a domain without a mask
  is all real, so a target_mask counts without a source mask too."""
  if source_mask is None and target_mask is None:
    return None
  real = lambda mask, n: jnp.ones((n,), jnp.float32) if mask is None else (  # noqa: E731
      mask.astype(jnp.float32))
  return jnp.concatenate([real(source_mask, n_source), real(target_mask, n_target)])


def _adapt_objective(method: str, weight: float):
  def loss_fn(outputs: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits, feats, dom = outputs
    n = batch["label"].shape[0]
    cls_loss = cross_entropy_loss(logits[:n], batch)
    adapt = jnp.zeros(())
    metrics = {}
    # A padded batch's mask marks its real rows; target rows by their own, if given.
    source_mask = batch.get("mask")
    target_mask = batch.get("target_mask", source_mask)
    if method == "dann":
      domain_label = jnp.concatenate([jnp.zeros(n), jnp.ones(logits.shape[0] - n)])
      rows = _domain_rows(source_mask, target_mask, n, logits.shape[0] - n)
      adapt = masked_mean(optax.sigmoid_binary_cross_entropy(dom.reshape(-1), domain_label),
                          rows)
      metrics["domain_accuracy"] = masked_mean(
          jnp.concatenate([dom[:n] < 0, dom[n:] >= 0]).reshape(-1).astype(jnp.float32), rows)
    elif method == "coral":
      adapt = coral_loss(feats[:n], feats[n:], source_mask, target_mask)
    hit = (jnp.argmax(logits[:n], -1) == batch["label"]).astype(jnp.float32)
    return cls_loss + weight * adapt, {"class_loss": cls_loss, "adapt_loss": adapt,
                                       "accuracy": masked_mean(hit, batch.get("mask")),
                                       **metrics}
  return loss_fn


def adapt_parts(module: AdaptModel, *, method: str = "dann", weight: float = 1.0,
                grl_scale: float | Callable[[jax.Array], jax.Array] = 1.0,
                batchnorm: str = "joint") -> tuple[LinenModel, Callable, Callable]:
  """(model, loss_fn, batch_transform) of source-only / DANN / CORAL training,
  for `jtl.make_train_step` or `jtl.train.fit`; arguments as for
  `make_adapt_train_step`. The model evaluates as the plain classifier."""
  if method not in METHODS:
    raise ConfigError(f"method={method!r}: expected one of {METHODS}.")
  if not (isinstance(weight, (int, float)) and weight >= 0):
    raise ConfigError(f"weight={weight!r}: expected a number >= 0 (the adaptation loss's "
                      "weight; a negative one would maximise it).")
  if not callable(grl_scale) and not (isinstance(grl_scale, (int, float)) and grl_scale >= 0):
    raise ConfigError(f"grl_scale={grl_scale!r}: expected a number >= 0 or a schedule.")
  if batchnorm not in BATCHNORM_MODES:
    raise ConfigError(f"batchnorm={batchnorm!r}: expected one of {BATCHNORM_MODES}.")
  if method == "dann" and not module.domain_hidden:
    raise ConfigError("method='dann' needs an AdaptModel with a domain classifier "
                      "(jtl.recipes.domain.wrap(..., method='dann')).")
  schedule = grl_scale if callable(grl_scale) else (lambda step: jnp.float32(grl_scale))
  call = functools.partial(_adapt_call, batchnorm=batchnorm)
  return (LinenModel(module, call=call), _adapt_objective(method, weight),
          _adapt_transform(method, schedule))


def make_adapt_train_step(
    module: AdaptModel, tx: optax.GradientTransformation, *, labels: PyTree | None = None,
    method: str = "dann", weight: float = 1.0,
    grl_scale: float | Callable[[jax.Array], jax.Array] = 1.0, batchnorm: str = "joint",
    **train_step_kwargs: Any,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`jtl.make_train_step` for source-only, DANN or CORAL training.

  The class loss uses source rows only. Loss = CE(source) + weight *
  (domain BCE | CORAL). With batchnorm="joint", source and target images go
  through the network as one batch (the BatchNorm statistics mix both
  domains); with "separate", each domain is normalised with its own batch
  statistics and the running statistics stay the source's: evaluate the
  target after `jtl.recompute_batchnorm` on target data (AdaBN).

  Args:
    module: an `AdaptModel` (from `wrap`); DANN needs its domain classifier.
    method: "source_only", "dann" or "coral".
    weight: weight of the adaptation term.
    grl_scale: reversal scale, a float or a function of the step (e.g.
      `dann_schedule(num_steps)`).
    batchnorm: "joint" or "separate" (see above).
    **train_step_kwargs: microbatches, compute_dtype, axis_name.
  """
  model, loss_fn, transform = adapt_parts(module, method=method, weight=weight,
                                          grl_scale=grl_scale, batchnorm=batchnorm)
  return make_train_step(model, tx, labels=labels, loss_fn=loss_fn, batch_transform=transform,
                         **train_step_kwargs)


def unwrap(variables: PyTree) -> PyTree:
  """The plain model's variables from an AdaptModel's ({"model": ...} dropped)."""
  return {k: v["model"] for k, v in variables.items() if "model" in v}
