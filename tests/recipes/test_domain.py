"""Domain adaptation: gradient reversal, CORAL, DANN steps (AdaBN: test_batchnorm.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beyond_models import TinyCNN, images, init, labels

import jtl
from jtl.recipes import domain, strategies


def test_gradient_reversal_flips_feature_gradient():
  w = jnp.array([[0.5, -1.0], [2.0, 0.3], [-0.7, 1.1]])
  head = lambda f: jnp.sum(jnp.tanh(f @ w))
  f = jnp.array([[0.1, -0.4, 0.9], [1.0, 0.2, -0.3]])
  plain = jax.grad(head)(f)
  for scale in (1.0, 0.25):
    reversed_ = jax.grad(lambda f: head(domain.gradient_reversal(f, scale)))(f)
    np.testing.assert_allclose(np.asarray(reversed_), -scale * np.asarray(plain), rtol=1e-6)
  np.testing.assert_array_equal(domain.gradient_reversal(f, 3.0), f)  # identity forward


def test_dann_schedule_and_coral():
  s = domain.dann_schedule(100)
  assert float(s(0)) == 0.0 and 0.99 < float(s(100)) < 1.0
  assert float(s(50)) == pytest.approx(2 / (1 + np.exp(-5)) - 1, rel=1e-6)  # 0.9866
  assert float(domain.dann_schedule(100, max_scale=0.3)(50)) == pytest.approx(0.3 * float(s(50)))
  lr = domain.dann_lr_schedule(0.01, 100)  # the paper's 0.01 / (1 + 10 p)^0.75
  assert float(lr(0)) == pytest.approx(0.01)
  assert float(lr(50)) == pytest.approx(0.01 / 6 ** 0.75, rel=1e-6)
  assert float(lr(100)) == pytest.approx(0.01 / 11 ** 0.75, rel=1e-6)
  assert float(lr(500)) == pytest.approx(float(lr(100)))  # held after num_steps
  with pytest.raises(jtl.errors.ConfigError, match="num_steps=0"):
    domain.dann_schedule(0)
  rng = np.random.default_rng(0)
  a = rng.normal(size=(50, 3)).astype(np.float32)
  assert float(domain.coral_loss(a, a)) == pytest.approx(0.0, abs=1e-9)
  b = a * np.array([1.0, 2.0, 1.0], np.float32)  # var of column 1 x4
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected = np.sum((ca - cb) ** 2) / (4 * 9)
  assert float(domain.coral_loss(a, b)) == pytest.approx(expected, rel=1e-4)
  assert float(domain.coral_loss(a, a + 5.0)) == pytest.approx(0.0, abs=1e-6)  # shift-blind


def _train(method, steps=20, **kwargs):
  model = TinyCNN(4)
  x, y = images(8), labels(8)
  tgt = images(8, seed=9, shift=1.5) * np.linspace(0.2, 3.0, 3, dtype=np.float32)
  v = init(model, x)
  module, wv = domain.wrap(model, v, x, method=method, domain_hidden=16, domain_dropout=0.0)
  assert ("domain" in wv["params"]) == (method == "dann")
  lab = jtl.label_params(wv["params"], [(".*", "all")])
  tx = jtl.make_optimizer(lab, learning_rate=0.01, optimizer="adam")
  step = jax.jit(domain.make_adapt_train_step(module, tx, labels=lab, method=method, **kwargs))
  state = jtl.create_train_state(wv, lab, tx)
  batch = {"inputs": x, "label": y, "target_inputs": tgt}
  ms = []
  for _ in range(steps):
    state, m = step(state, batch)
    ms.append(jax.device_get(m))
  feats = jax.jit(lambda v, x: module.apply(v, x, train=False, method=domain.AdaptModel.outputs)[1])
  gap = float(domain.coral_loss(feats(state.variables, x), feats(state.variables, tgt)))
  return module, state, ms, gap


def test_dann_step_trains_class_head_and_domain_classifier():
  # Reversal scale 0: the domain classifier learns, the features ignore it.
  module, state, ms, _ = _train("dann", grl_scale=0.0)
  assert ms[-1]["class_loss"] < ms[0]["class_loss"]
  assert ms[-1]["adapt_loss"] < 0.8 * ms[0]["adapt_loss"] and ms[-1]["domain_accuracy"] > 0.6
  np.testing.assert_array_equal(
      jax.jit(module.apply)(state.variables, images(8)),
      jax.jit(module.model.apply)(domain.unwrap(state.variables), images(8)))
  plain = domain.unwrap(jax.device_get(state.variables))
  assert set(plain) == {"params", "batch_stats"} and "domain" not in plain["params"]


def test_coral_step_shrinks_covariance_gap_against_source_only():
  _, _, ms, coral_gap = _train("coral", weight=1000.0, grl_scale=domain.dann_schedule(20))
  _, _, base_ms, base_gap = _train("source_only")
  assert ms[0]["grl_scale"] == 0.0 and ms[-1]["grl_scale"] > 0.5
  assert base_ms[-1]["adapt_loss"] == 0.0 and ms[-1]["class_loss"] < ms[0]["class_loss"]
  assert coral_gap < 0.5 * base_gap


def test_dann_reverses_domain_gradient_into_the_features_only():
  model = TinyCNN(4)
  x = np.concatenate([images(4), images(4, seed=3, shift=1.0)])
  module, wv = domain.wrap(model, init(model, x), x, method="dann", domain_hidden=8)
  dlabel = jnp.array([0.0] * 4 + [1.0] * 4)

  @jax.jit
  def grads(params, scale):
    def loss(p):
      (_, _, dom), _ = module.apply({**wv, "params": p}, x, train=True, grl_scale=scale,
                                    mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)},
                                    method=domain.AdaptModel.outputs)
      return jnp.mean(jnp.logaddexp(0.0, dom) - dom * dlabel)
    return jax.grad(loss)(params)

  rev, plain = grads(wv["params"], 1.0), grads(wv["params"], -1.0)  # -1: no reversal
  half = grads(wv["params"], 0.5)
  for a, b, h in zip(jax.tree.leaves(rev["model"]["conv0"]), jax.tree.leaves(plain["model"]["conv0"]),
                     jax.tree.leaves(half["model"]["conv0"])):
    np.testing.assert_allclose(a, -b, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(h, -0.5 * b, rtol=1e-4, atol=1e-7)  # scaled by the schedule
    assert np.abs(b).max() > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               rev["domain"], plain["domain"])


def test_domain_classifier_shape_and_dropout():
  model = TinyCNN(4)
  x = np.concatenate([images(4), images(4, seed=3, shift=1.0)])
  module, wv = domain.wrap(model, init(model, x), x, method="dann", domain_hidden=32,
                           domain_dropout=0.5)
  dom = wv["params"]["domain"]
  nfeat = module.apply(wv, x, method=domain.AdaptModel.outputs)[1].shape[-1]
  assert dom["fc1"]["kernel"].shape == (nfeat, 32) and dom["fc2"]["kernel"].shape == (32, 32)
  assert dom["out"]["kernel"].shape == (32, 1)

  def logits(train, key):
    out, _ = module.apply(wv, x, train=train, mutable=["batch_stats"], rngs={"dropout": key},
                          method=domain.AdaptModel.outputs)
    return np.asarray(out[2])

  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  assert logits(True, k1).shape == (8,)
  assert not np.allclose(logits(True, k1), logits(True, k2))  # dropout in training
  eval_out = module.apply(wv, x, method=domain.AdaptModel.outputs)[2]
  np.testing.assert_array_equal(eval_out, module.apply(wv, x, method=domain.AdaptModel.outputs)[2])
  with pytest.raises(jtl.errors.ConfigError, match="domain_dropout=1.0"):
    domain.wrap(model, init(model, x), x, method="dann", domain_dropout=1.0)


def test_dann_needs_domain_classifier_and_target():
  model = TinyCNN(4)
  x = images(4)
  module, wv = domain.wrap(model, init(model, x), x, method="coral")
  lab = jtl.label_params(wv["params"], [(".*", "all")])
  tx = jtl.make_optimizer(lab, learning_rate=0.01)
  with pytest.raises(jtl.errors.ConfigError, match="domain classifier"):
    domain.make_adapt_train_step(module, tx, method="dann")
  with pytest.raises(jtl.errors.ConfigError, match="method='mmd'"):
    domain.wrap(model, init(model, x), x, method="mmd")
  wrapped = strategies.FrozenStatistics(model, ["bn"])
  with pytest.raises(jtl.errors.ConfigError, match=r"Linen module; got a FrozenStatistics"):
    domain.wrap(wrapped, init(model, x), x, method="dann")


def test_separate_batchnorm_normalises_each_domain_and_keeps_source_statistics():
  model = TinyCNN(4)
  xs, xt = images(4), images(4, seed=3, shift=2.0)
  module, wv = domain.wrap(model, init(model, xs), xs, method="dann", domain_hidden=8)
  outputs = jax.jit(lambda x, t: module.apply(
      wv, x, train=True, target=t, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)},
      method=domain.AdaptModel.outputs))
  (_, feats, dom), stats = outputs(xs, xt)
  (_, source_feats, _), source_stats = outputs(xs, None)
  (_, target_feats, _), _ = outputs(xt, None)
  (_, joint_feats, _), _ = outputs(np.concatenate([xs, xt]), None)
  assert dom.shape == (8,)
  np.testing.assert_allclose(feats[:4], source_feats, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(feats[4:], target_feats, rtol=1e-5, atol=1e-6)
  assert not np.allclose(joint_feats[4:], target_feats, atol=1e-3)  # "joint" mixes the domains
  jax.tree.map(np.testing.assert_array_equal, stats, source_stats)  # target left no trace
  lab = jtl.label_params(wv["params"], [(".*", "all")])
  tx = jtl.make_optimizer(lab, learning_rate=0.01)
  with pytest.raises(jtl.errors.ConfigError, match="batchnorm='per_domain'"):
    domain.make_adapt_train_step(module, tx, labels=lab, batchnorm="per_domain")


class NoBatchNorm(nn.Module):
  """TinyCNN without BatchNorm, whose batch statistics would see padded rows."""

  def setup(self):
    self.conv = nn.Conv(8, (3, 3))
    self.head = nn.Dense(4)

  def features(self, x, *, train: bool = False):
    return jnp.mean(nn.relu(self.conv(x)), axis=(1, 2))

  def __call__(self, x, *, train: bool = False):
    return self.head(self.features(x, train=train))


def _adapt_setup(method):
  """(source images, labels, target images, the jitted adaptation step, its
  start state) of a small model without BatchNorm, trained by SGD."""
  model = NoBatchNorm()
  x, y = images(8), labels(8)
  tgt = images(8, seed=9, shift=1.5)
  module, wv = domain.wrap(model, init(model, x), x, method=method, domain_hidden=16,
                           domain_dropout=0.0)
  lab = jtl.label_params(wv["params"], [(".*", "all")])
  tx = jtl.make_optimizer(lab, learning_rate=0.01, optimizer="sgd")
  step = jax.jit(domain.make_adapt_train_step(module, tx, labels=lab, method=method))
  state = jtl.create_train_state(wv, lab, tx)
  return x, y, tgt, step, state


@pytest.mark.parametrize("method", ["dann", "coral"])
def test_a_padded_batch_adapts_on_its_real_rows_only(method):
  x, y, tgt, step, state = _adapt_setup(method)
  real = {"inputs": x[:5], "label": y[:5], "target_inputs": tgt[:5]}
  # Rows 5..7 are padding (garbage inputs), masked out: the same step as on 5 rows.
  junk = lambda a: np.concatenate([a[:5], 100.0 + 0 * a[5:]]) if a.ndim > 1 else a
  padded = {"inputs": junk(x), "label": y, "target_inputs": junk(tgt),
            "mask": np.arange(8) < 5}
  (a, ma), (b, mb) = step(state, real), step(state, padded)
  assert float(ma["adapt_loss"]) == pytest.approx(float(mb["adapt_loss"]), rel=1e-5)
  for u, v in zip(jax.tree.leaves(a.params["domain"] if method == "dann" else a.params),
                  jax.tree.leaves(b.params["domain"] if method == "dann" else b.params)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["dann", "coral"])
def test_a_padded_target_adapts_on_its_real_rows_without_a_source_mask(method):
  """target_mask alone (a full source batch) masks the target's padding: DANN
  once put every target row into its domain loss when "mask" was absent."""
  x, y, tgt, step, state = _adapt_setup(method)
  padded_target = np.concatenate([tgt[:5], np.full_like(tgt[5:], 50.0)])
  (_, real), (_, padded) = (
      step(state, {"inputs": x, "label": y, "target_inputs": tgt[:5]}),
      step(state, {"inputs": x, "label": y, "target_inputs": padded_target,
                   "target_mask": np.arange(8) < 5}))
  assert float(padded["adapt_loss"]) == pytest.approx(float(real["adapt_loss"]), rel=1e-5)
  if method == "dann":
    assert float(padded["domain_accuracy"]) == pytest.approx(float(real["domain_accuracy"]))
