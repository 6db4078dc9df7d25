"""Distillation: the loss is Hinton's formula, cached and on-the-fly teachers
agree, feature matching trains the projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beyond_models import TinyCNN, images, init, labels

import jtl
from jtl.recipes import distill


def _numpy_loss(s, t, y, temperature, alpha):
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  pt = np.exp(log_softmax(t / temperature))
  kl = (pt * (log_softmax(t / temperature) - log_softmax(s / temperature))).sum(-1)
  ce = -log_softmax(s)[np.arange(len(y)), y]
  return (1 - alpha) * ce.mean() + alpha * temperature ** 2 * kl.mean()


def test_loss_equals_formula():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(6, 5)), 3 * rng.normal(size=(6, 5))
  y = rng.integers(0, 5, 6)
  for temperature, alpha in [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (8.0, 1.0)]:
    got = distill.distillation_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                    jnp.asarray(y), temperature=temperature, alpha=alpha)
    np.testing.assert_allclose(float(got), _numpy_loss(s, t, y, temperature, alpha), rtol=1e-5)


def test_soft_gradient_zero_at_teacher_and_scaled_by_t_squared():
  t = jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
  soft = lambda s, temp: distill.distillation_loss(s, t, None, temperature=temp, alpha=1.0)
  g = jax.grad(soft)(t, 4.0)
  np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-6)
  s = t + 0.3 * jnp.array([[1.0, 0.0, -1.0], [0.5, -0.5, 0.0]])
  # Gradient of T^2 * KL w.r.t. the logits is T * (softmax(s/T) - softmax(t/T)) / B.
  g = jax.grad(soft)(s, 4.0)
  expected = 4.0 * (jax.nn.softmax(s / 4.0) - jax.nn.softmax(t / 4.0)) / 2
  np.testing.assert_allclose(np.asarray(g), np.asarray(expected), atol=1e-6)


def test_mask_and_bad_options():
  s, t = jnp.zeros((2, 3)), jnp.array([[5.0, 0, 0], [0, 0, 0]])
  masked = distill.distillation_loss(s, t, None, alpha=1.0, mask=jnp.array([False, True]))
  assert float(masked) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(jtl.errors.ConfigError, match="temperature=0"):
    distill.make_distill_loss(temperature=0, alpha=2.0)
  with pytest.raises(jtl.errors.StepError, match="teacher_logits"):
    distill.make_distill_loss()(s, {"label": jnp.zeros(2, jnp.int32)})


def test_cache_and_batches_keep_examples_aligned():
  teacher = TinyCNN(num_classes=4)
  tv = init(teacher, images(2))
  x = np.asarray(images(10, seed=3))
  fn = distill.teacher_fn(teacher, tv)
  cached = distill.cache_teacher_outputs(fn, x, batch_size=4)  # 10 = 4 + 4 + 2 (padded)
  np.testing.assert_allclose(cached, np.asarray(jax.jit(teacher.apply)(tv, x)), atol=1e-5)
  data = {"inputs": x, "label": np.arange(10), "teacher_logits": cached}
  it = distill.array_batches(data, batch_size=4, seed=1)
  seen = [next(it) for _ in range(5)]
  for b in seen:
    np.testing.assert_array_equal(b["inputs"], x[b["label"]])
    np.testing.assert_array_equal(b["teacher_logits"], cached[b["label"]])
  resumed = next(distill.array_batches(data, batch_size=4, seed=1, start_step=3))
  np.testing.assert_array_equal(resumed["label"], seen[3]["label"])


def test_cached_logits_train_with_core_step_and_match_on_the_fly_teacher():
  teacher, student = TinyCNN(4, width=16), TinyCNN(4, width=4)
  x, y = images(8, seed=5), labels(8)
  tv, sv = init(teacher, x, 1), init(student, x, 2)
  lab = jtl.label_params(sv["params"], [(".*", "all")])
  tx = jtl.make_optimizer(lab, learning_rate=0.05, optimizer="adam")
  t_logits = 20.0 * jax.jit(teacher.apply)(tv, x)  # a confident teacher
  batch = {"inputs": x, "label": y, "teacher_logits": t_logits}
  core = jax.jit(jtl.make_train_step(student, tx, labels=lab,
                                     loss_fn=distill.make_distill_loss(temperature=2.0, alpha=0.7)))
  confident = lambda x: 20.0 * distill.teacher_fn(teacher, tv)(x)
  own = jax.jit(distill.make_distill_train_step(student, tx, labels=lab, temperature=2.0,
                                                alpha=0.7, teacher=confident))
  s1 = s2 = jtl.create_train_state(sv, lab, tx)
  first = None
  for _ in range(15):
    s1, m1 = core(s1, batch)
    s2, m2 = own(s2, {"inputs": x, "label": y})
    first = first if first is not None else float(m1["loss"])
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-4)
  assert float(m1["loss"]) < 0.75 * first
  apply = jax.jit(student.apply)
  kl = distill.soft_target_loss(apply(s1.variables, x), t_logits, temperature=2.0)
  kl0 = distill.soft_target_loss(apply(sv, x), t_logits, temperature=2.0)
  assert float(kl.mean()) < 0.5 * float(kl0.mean())


def test_feature_matching_trains_projection_and_keeps_student_paths():
  teacher, student = TinyCNN(4, width=16), TinyCNN(4, width=4)
  x, y = images(8, seed=6), labels(8)
  tv, sv = init(teacher, x, 1), init(student, x, 2)
  module, variables = distill.with_projection(student, sv, teacher_dim=32, example_input=x)
  assert variables["params"]["projection"]["kernel"].shape == (8, 32)
  np.testing.assert_array_equal(jax.jit(module.apply)(variables, x), jax.jit(student.apply)(sv, x))
  lab = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(lab, learning_rate=0.02, optimizer="adam")
  step = jax.jit(distill.make_distill_train_step(
      module, tx, labels=lab, feature_weight=1.0,
      teacher=distill.teacher_fn(teacher, tv, features=True)))
  state = jtl.create_train_state(variables, lab, tx)
  losses = []
  for _ in range(20):
    state, m = step(state, {"inputs": x, "label": y})
    losses.append(float(m["feature_loss"]))
  assert losses[-1] < 0.5 * losses[0]
  moved = np.abs(np.asarray(state.params["projection"]["kernel"])
                 - np.asarray(variables["params"]["projection"]["kernel"])).max()
  assert moved > 1e-3
  with pytest.raises(jtl.errors.ConfigError, match="FeatureProjection"):
    distill.make_distill_train_step(student, tx, feature_weight=1.0)
