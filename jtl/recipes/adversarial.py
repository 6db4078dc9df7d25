"""Adversarial examples (FGSM, PGD under an L-infinity ball) for training and evaluation.

`eps`, `step_size` and `bounds` are in the units of the model's inputs (after
normalisation); `input_scale` converts from pixel units: with inputs
(x - 127) / 128 and eps = 8/255 of the pixel range, pass `eps=8/255,
input_scale=255/128`. With per-channel normalisation (x - mean) / std, pass
arrays: `input_scale=1/std` and `bounds=(-mean/std, (1-mean)/std)` for pixels
in [0, 1]; they broadcast over the inputs' last (channel) axis, so each
channel's pixel radius is exactly eps.

- `fgsm` / `pgd`: perturb inputs to raise a loss, staying within eps.
- `make_adversarial_train_step`: `jtl.make_train_step` on adversarial inputs
  (made with the current params, in inference mode), optionally mixed with
  the clean batch (Madry et al. 2018; Goodfellow et al. 2015).
- `make_robust_eval_step`: `jtl.make_eval_step` sums under attack.

>>> import jax.numpy as jnp
>>> loss = lambda x: jnp.sum(x * jnp.array([1.0, -2.0, 0.5]))
>>> fgsm(loss, jnp.zeros(3), eps=0.1)
Array([ 0.1, -0.1,  0.1], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtl import adapter as jadapter
from jtl import eval_steps as jeval_steps
from jtl import losses as jlosses
from jtl import steps as jsteps
from jtl.errors import ConfigError
from jtl.state import TrainState
from jtl.losses import Batch
from jtl.tree import PyTree

# A number, or one per channel (broadcast over the inputs' last axis).
Radius = float | np.ndarray
Bounds = tuple[Radius, Radius] | None
ATTACKS = ("fgsm", "pgd")


def _check(eps: Radius, step_size: Radius | None, num_steps: int, bounds: Bounds) -> None:
  problems = []
  if not np.all(np.asarray(eps) >= 0):
    problems.append(f"eps={eps!r}: expected a non-negative radius")
  if step_size is not None and not np.all(np.asarray(step_size) > 0):
    problems.append(f"step_size={step_size!r}: expected a positive number (e.g. eps / 4)")
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
      or num_steps < 1:
    problems.append(f"steps={num_steps!r}: expected an int >= 1")
  if bounds is not None and not np.all(np.asarray(bounds[0]) < np.asarray(bounds[1])):
    problems.append(f"bounds={bounds!r}: expected (low, high) with low < high")
  if problems:
    raise ConfigError("Invalid attack options:\n  " + "\n  ".join(problems))


def _like(value: Radius, x: jax.Array) -> jax.Array:
  """`value` in x's dtype (float32 per-channel values must not promote bf16
  inputs), a per-channel array shaped to broadcast over x's last axis (explicit
  ranks: `jax_numpy_rank_promotion="raise"` refuses implicit ones)."""
  value = jnp.asarray(value, x.dtype)
  return value.reshape((1,) * (x.ndim - 1) + value.shape) if value.ndim else value


def _project(x_adv: jax.Array, x: jax.Array, eps: Radius, bounds: Bounds) -> jax.Array:
  eps = _like(eps, x)
  x_adv = jnp.clip(x_adv, x - eps, x + eps)
  if bounds is not None:
    x_adv = jnp.clip(x_adv, _like(bounds[0], x), _like(bounds[1], x))
  return x_adv


def fgsm(loss_of_inputs: Callable[[jax.Array], jax.Array], x: jax.Array, *, eps: Radius,
         bounds: Bounds = None) -> jax.Array:
  """One signed-gradient step of size eps: x + eps * sign(grad loss(x))."""
  _check(eps, None, 1, bounds)
  g = jax.grad(loss_of_inputs)(x)
  return jax.lax.stop_gradient(_project(x + _like(eps, x) * jnp.sign(g), x, eps, bounds))


def pgd(loss_of_inputs: Callable[[jax.Array], jax.Array], x: jax.Array, *, eps: Radius,
        step_size: Radius, steps: int, rng: jax.Array | None = None,
        bounds: Bounds = None) -> jax.Array:
  """Projected gradient ascent in the L-inf ball of radius eps around x.

  Args:
    loss_of_inputs: scalar loss as a function of the inputs (summed over
      examples, so each example ascends its own loss).
    x: clean inputs.
    eps, step_size, steps: ball radius, signed step length, iterations
      (eps and step_size: numbers or per-channel arrays).
    rng: a key for a uniform random start in the ball; None starts at x.
    bounds: (low, high) valid input range (numbers or per-channel arrays), or None.
  """
  _check(eps, step_size, steps, bounds)
  x = jax.lax.stop_gradient(x)
  x_adv = x
  if rng is not None:
    radius = _like(eps, x)
    x_adv = _project(x + jax.random.uniform(rng, x.shape, x.dtype, -radius, radius), x, eps,
                     bounds)
  grad = jax.grad(loss_of_inputs)

  def body(_, xa):
    return _project(xa + _like(step_size, x) * jnp.sign(grad(xa)), x, eps, bounds)

  return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, x_adv))


def _predict(module: Any, variables: PyTree, x: jax.Array) -> jax.Array:
  """The logits of any model (`jtl.as_model`) in inference mode."""
  state = {k: v for k, v in variables.items() if k != "params"}
  out = jadapter.as_model(module).apply(variables["params"], state, x, train=False, rng=None)[0]
  return out.astype(jnp.float32)


def model_loss(module: Any, variables: PyTree, batch: Batch) -> Callable[[jax.Array], jax.Array]:
  """inputs -> summed cross-entropy of the model in inference mode on `batch`'s labels."""
  mask = batch.get("mask")

  def loss(x):
    logits = _predict(module, variables, x)
    per_example = jlosses.per_example_cross_entropy(logits, batch["label"])
    if mask is not None:
      per_example = per_example * mask.astype(per_example.dtype)
    return jnp.sum(per_example)

  return loss


def _input_scale(input_scale: Radius) -> Radius:
  """`input_scale` checked: a positive number, or a 1-D array of them (per channel)."""
  scale = None
  if not isinstance(input_scale, (str, bool)):
    try:
      scale = np.asarray(input_scale, np.float64)
    except (TypeError, ValueError):
      pass
  if scale is None or scale.ndim > 1 or scale.size == 0 \
      or not np.all(np.isfinite(scale) & (scale > 0)):
    raise ConfigError(f"input_scale={input_scale!r}: expected a positive number, or one per "
                      "channel (model input units per pixel unit).")
  return float(scale) if scale.ndim == 0 else scale


def make_attack(*, attack: str = "pgd", eps: float, step_size: float | None = None,
                steps: int = 10, random_start: bool = True, bounds: Bounds = None,
                input_scale: Radius = 1.0
                ) -> Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array], jax.Array]:
  """`attack(loss_of_inputs, x, rng) -> x_adv` from config-style options.

  eps and step_size are multiplied by `input_scale` (a number, or an array per
  channel; see module doc); bounds are in input units already; step_size
  defaults to 2.5 * eps / steps (Madry et al.).
  """
  if attack not in ATTACKS:
    raise ConfigError(f"attack={attack!r}: expected one of {ATTACKS}.")
  _check(eps, step_size, steps, bounds)  # the options given, before any derived from them
  input_scale = _input_scale(input_scale)
  step_size = 2.5 * eps / steps if step_size is None else step_size
  eps_in, step_in = eps * input_scale, step_size * input_scale

  def run(loss_of_inputs, x, rng):
    if attack == "fgsm":
      return fgsm(loss_of_inputs, x, eps=eps_in, bounds=bounds)
    return pgd(loss_of_inputs, x, eps=eps_in, step_size=step_in, steps=steps,
               rng=rng if random_start else None, bounds=bounds)

  return run


def _adversarial_transform(module: Any, run_attack: Callable, clean_fraction: float):
  """batch_transform: the batch's inputs replaced by (or, with clean_fraction,
  joined by) adversarial inputs made with the current params."""
  def transform(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[Batch, dict]:
    del rng  # the attack's own stream: the same examples under jit, mesh and pmap
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, 0x5EED), state.step)
    variables = state.variables
    x_adv = run_attack(model_loss(module, variables, batch), batch["inputs"], rng)
    logits = _predict(module, variables, x_adv)
    adv_acc = jlosses.masked_mean(
        (jnp.argmax(logits, -1) == jlosses.hard_labels(batch)).astype(jnp.float32),
        batch.get("mask"))
    if not clean_fraction:
      return {**batch, "inputs": x_adv}, {"adv_accuracy": adv_acc}
    n = batch["label"].shape[0]
    # Rows carry their weight, so micro-batches of the joined batch stay exact.
    weights = {"loss_weight": jnp.concatenate([jnp.full((n,), clean_fraction),
                                               jnp.full((n,), 1.0 - clean_fraction)])}
    joined = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch, {**batch, "inputs": x_adv})
    return {**joined, **weights}, {"adv_accuracy": adv_acc}
  return transform


def _weighted_cross_entropy(logits: jax.Array, batch: Batch) -> jax.Array:
  """f * CE(clean rows) + (1 - f) * CE(adversarial rows), as row weights (the
  two halves are the same examples, so their masked counts are equal)."""
  per_example = jlosses.per_example_cross_entropy(logits, batch["label"])
  return 2.0 * jlosses.masked_mean(per_example * batch["loss_weight"], batch.get("mask"))


def make_adversarial_train_step(
    module: nn.Module, tx: optax.GradientTransformation, *, labels: PyTree | None = None,
    attack: str = "pgd", eps: float, step_size: float | None = None, steps: int = 7,
    random_start: bool = True, bounds: Bounds = None, input_scale: Radius = 1.0,
    clean_fraction: float = 0.0, loss_fn: jlosses.LossFn | None = None,
    **train_step_kwargs: Any,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`jtl.make_train_step` whose batch inputs are first attacked.

  The attack uses the current params in inference mode and its gradients
  never reach the params. With `clean_fraction` f > 0, the step trains on the
  clean and the adversarial batch together, weighting them f and 1 - f
  (cross-entropy; a custom `loss_fn` needs clean_fraction=0).

  Metrics: those of `make_train_step` (on the batch trained on), plus
  "adv_accuracy" of the pre-step model on the attacked inputs.
  """
  model, loss, transform = adversarial_parts(
      module, attack=attack, eps=eps, step_size=step_size, steps=steps,
      random_start=random_start, bounds=bounds, input_scale=input_scale,
      clean_fraction=clean_fraction, loss_fn=loss_fn)
  return jsteps.make_train_step(model, tx, labels=labels, loss_fn=loss, batch_transform=transform,
                                **train_step_kwargs)


def adversarial_parts(module: Any, *, attack: str = "pgd", eps: float,
                      step_size: float | None = None, steps: int = 7, random_start: bool = True,
                      bounds: Bounds = None, input_scale: Radius = 1.0,
                      clean_fraction: float = 0.0, loss_fn: jlosses.LossFn | None = None
                      ) -> tuple[Any, jlosses.LossFn, Callable]:
  """(model, loss_fn, batch_transform) of adversarial training, for
  `jtl.make_train_step` or `jtl.train.fit`; see `make_adversarial_train_step`."""
  if not 0.0 <= clean_fraction < 1.0:
    raise ConfigError(f"clean_fraction={clean_fraction!r}: expected a value in [0, 1).")
  if clean_fraction and loss_fn is not None:
    raise ConfigError("clean_fraction > 0 weights cross-entropy rows; a custom loss_fn needs "
                      "clean_fraction=0.")
  run_attack = make_attack(attack=attack, eps=eps, step_size=step_size, steps=steps,
                           random_start=random_start, bounds=bounds, input_scale=input_scale)
  loss = _weighted_cross_entropy if clean_fraction else (loss_fn or jlosses.cross_entropy_loss)
  return module, loss, _adversarial_transform(module, run_attack, clean_fraction)


def _batch_salt(inputs: jax.Array) -> jax.Array:
  """A uint32 hash of `inputs` that no split over devices changes: their bits
  summed as integers, whose wrapping addition is associative (a float sum
  rounds by the order a mesh reduces in)."""
  bits = inputs
  if jnp.issubdtype(inputs.dtype, jnp.floating):
    bits = jax.lax.bitcast_convert_type(inputs.astype(jnp.float32), jnp.uint32)
  return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


def make_robust_eval_step(module: nn.Module, *, attack: str = "pgd", eps: float,
                          step_size: float | None = None, steps: int = 20,
                          random_start: bool = True, bounds: Bounds = None,
                          input_scale: Radius = 1.0, seed: int = 0,
                          ) -> Callable[[PyTree, Batch], dict[str, jax.Array]]:
  """`eval_step(variables, batch) -> sums` (as `jtl.make_eval_step`) under attack.

  The random start is seeded by `seed` and the batch's inputs, so the result
  is deterministic, on one device as on a mesh.
  """
  run_attack = make_attack(attack=attack, eps=eps, step_size=step_size, steps=steps,
                           random_start=random_start, bounds=bounds, input_scale=input_scale)
  clean_eval = jeval_steps.make_eval_step(module)

  def eval_step(variables: PyTree, batch: Batch) -> dict[str, jax.Array]:
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), _batch_salt(batch["inputs"]))
    x_adv = run_attack(model_loss(module, variables, batch), batch["inputs"], rng)
    return clean_eval(variables, {**batch, "inputs": x_adv})

  eval_step.axis_name = None  # no pmap axis: jtl.parallel.pmap_eval_step refuses it
  return eval_step
