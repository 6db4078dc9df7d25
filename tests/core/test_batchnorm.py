"""Precise BatchNorm / AdaBN: statistics recomputed as population moments
(Linen, a Linen adapter, NNX), layers skipped, and inside `fit`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest
from beyond_models import TinyCNN, images, init, labels

import jtl
from jtl import train


def test_recompute_changes_only_statistics_and_matches_population_moments():
  model = TinyCNN(4)
  v = init(model, images(4))
  target = images(24, seed=7, shift=3.0)
  batches = [{"inputs": target[:10]}, {"inputs": target[10:16]},
             {"inputs": np.concatenate([target[16:], target[:4]]),
              "mask": np.array([True] * 8 + [False] * 4)}]
  adapted = jtl.recompute_batchnorm(model, v, batches)
  jax.tree.map(np.testing.assert_array_equal, adapted["params"], v["params"])
  # The first BatchNorm's input is conv0(x): its stored statistics are the
  # population moments over all 24 unmasked rows.
  conv = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.conv0(x)))
  h = np.asarray(conv(v["params"], target), np.float64)
  np.testing.assert_allclose(adapted["batch_stats"]["bn0"]["mean"], h.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(adapted["batch_stats"]["bn0"]["var"], h.var((0, 1, 2)), rtol=1e-3, atol=1e-5)
  assert not np.allclose(adapted["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])
  # Recomputed on one batch, inference mode normalises it exactly as training mode does.
  whole = jtl.recompute_batchnorm(model, v, [{"inputs": target}])
  eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(whole, target)
  train_out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, target)
  np.testing.assert_allclose(eval_out, train_out, atol=2e-3)
  # A skipped layer keeps its statistics; the others match the full recompute.
  kept = jtl.recompute_batchnorm(model, v, [{"inputs": target}], skip=["bn0"])
  jax.tree.map(np.testing.assert_array_equal, kept["batch_stats"]["bn0"], v["batch_stats"]["bn0"])
  assert not np.allclose(kept["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])
  with pytest.raises(jtl.errors.ConfigError, match="batch_stats"):
    jtl.recompute_batchnorm(model, {"params": v["params"]}, batches)
  with pytest.raises(jtl.errors.ConfigError, match="no .*unmasked.* rows"):
    jtl.recompute_batchnorm(model, v, [{"inputs": target[:2], "mask": np.zeros(2, bool)}])


def test_recompute_through_a_linen_adapter_with_attribute_style_batchnorm():
  import flax.linen as nn

  class Net(nn.Module):  # use_running_average as an attribute, flag "deterministic"
    @nn.compact
    def __call__(self, x, deterministic=True):
      x = nn.Dense(3)(x)
      x = nn.Dropout(0.5, deterministic=deterministic)(x)
      return nn.BatchNorm(use_running_average=deterministic, name="bn")(x)

  x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32) + 2.0
  v = jax.jit(lambda x: Net().init(jax.random.PRNGKey(0), x))(x)
  model = jtl.LinenModel(Net(), train_kwarg="deterministic")
  out = jtl.recompute_batchnorm(model, v, [{"inputs": x[:6]}, {"inputs": x[6:]}])
  h = np.asarray(x, np.float64) @ np.asarray(v["params"]["Dense_0"]["kernel"], np.float64) \
      + np.asarray(v["params"]["Dense_0"]["bias"])  # dropout off: evaluation mode
  np.testing.assert_allclose(out["batch_stats"]["bn"]["mean"], h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["batch_stats"]["bn"]["var"], h.var(0), rtol=1e-4, atol=1e-5)


def test_recompute_batchnorm_subclass_calling_flax_batchnorm():
  # The zoo's BatchNorm subclasses nn.BatchNorm and calls its __call__ in
  # evaluation mode: one layer, recorded once, on its real input.
  import flax.linen as nn

  from jtl.models.layers import BatchNorm

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = BatchNorm(name="bn0")(nn.Dense(3)(x), use_running_average=not train)
      return BatchNorm(name="bn1")(x * 2.0 + 1.0, use_running_average=not train)

  x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32) * 3.0
  v = jax.jit(lambda x: Net().init(jax.random.PRNGKey(0), x))(x)
  out = jtl.recompute_batchnorm(Net(), v, [{"inputs": x}])["batch_stats"]
  h = np.asarray(x, np.float64) @ np.asarray(v["params"]["Dense_0"]["kernel"]) \
      + np.asarray(v["params"]["Dense_0"]["bias"])
  np.testing.assert_allclose(out["bn0"]["mean"], h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["bn0"]["var"], h.var(0), rtol=1e-4, atol=1e-5)
  g = 2.0 * (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) + 1.0  # bn0's scale 1, bias 0
  np.testing.assert_allclose(out["bn1"]["mean"], g.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["bn1"]["var"], g.var(0), rtol=1e-3, atol=1e-4)


def test_recompute_variance_is_accurate_for_a_large_mean():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.BatchNorm(use_running_average=not train, name="bn")(x)

  x = (1000.0 + 0.01 * np.random.default_rng(0).normal(size=(64, 3))).astype(np.float32)
  v = jax.jit(lambda x: Net().init(jax.random.PRNGKey(0), x))(x)
  out = jtl.recompute_batchnorm(Net(), v, [{"inputs": x[:32]}, {"inputs": x[32:]}])
  # E[x^2] - E[x]^2 in float32 would lose every digit of a 1e-4 variance at a mean of 1000.
  np.testing.assert_allclose(out["batch_stats"]["bn"]["var"], np.asarray(x, np.float64).var(0),
                             rtol=1e-2)


def test_recompute_nnx_batchnorm_matches_linen_moments():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 3, rngs=rngs)
      self.bn0 = nnx.BatchNorm(3, rngs=rngs)
      self.bn1 = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
      return self.bn1(nnx.relu(self.bn0(self.lin(x))) * 2.0)

  net = Net(nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32) - 1.0
  v = jtl.adapter.variables_of(net)
  # The second batch is padded with 4 masked rows of garbage: they are not counted.
  padded = {"inputs": np.concatenate([x[8:], np.full((4, 4), 1e3, np.float32)]),
            "mask": np.arange(16) < 12}
  out = jtl.recompute_batchnorm(net, v, [{"inputs": x[:8]}, padded])
  h = np.asarray(x, np.float64) @ np.asarray(net.lin.kernel[...]) + np.asarray(net.lin.bias[...])
  np.testing.assert_allclose(out["state"]["bn0"]["mean"], h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["state"]["bn0"]["var"], h.var(0), rtol=1e-4, atol=1e-5)
  # bn1 sees bn0's output normalised with each batch's own statistics.
  parts = [h[:8], h[8:]]
  g = np.concatenate([2 * np.maximum((p - p.mean(0)) / np.sqrt(p.var(0) + 1e-5), 0) for p in parts])
  np.testing.assert_allclose(out["state"]["bn1"]["mean"], g.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["state"]["bn1"]["var"], g.var(0), rtol=1e-3, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, out["params"], v["params"])

  def no_pass():  # every layer skipped (a phase where all are frozen): not iterated
    raise AssertionError("the batches were read")
    yield
  assert jtl.recompute_batchnorm(net, v, no_pass(), skip=["bn0", "bn1"]) is v


def test_recompute_nnx_subclass_and_nothing_global_is_replaced():
  # A user's nnx.BatchNorm subclass doubles its input before the base call: the
  # statistics are those of what nnx.BatchNorm sees, and nnx.BatchNorm itself
  # (what other modules and threads call) is never replaced during the trace.
  from flax import nnx

  seen = []

  class Doubling(nnx.BatchNorm):
    def __call__(self, x, use_running_average=None):
      seen.append(nnx.BatchNorm.__call__)
      return super().__call__(2.0 * x, use_running_average)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.bn = Doubling(3, rngs=rngs)

    def __call__(self, x):
      return self.bn(x)

  original = nnx.BatchNorm.__call__
  net = Net(nnx.Rngs(0))
  x = np.random.default_rng(2).normal(size=(10, 3)).astype(np.float32) + 3.0
  out = jtl.recompute_batchnorm(net, jtl.adapter.variables_of(net), [{"inputs": x}])
  np.testing.assert_allclose(out["state"]["bn"]["mean"], 2 * x.astype(np.float64).mean(0),
                             rtol=1e-5)
  np.testing.assert_allclose(out["state"]["bn"]["var"], 4 * x.astype(np.float64).var(0),
                             rtol=1e-4)
  assert seen and all(f is original for f in seen)
  assert type(net.bn) is Doubling and nnx.BatchNorm.__call__ is original


def test_recompute_bridged_linen_module_equals_linen_and_nested_bridge_is_refused():
  import flax.linen as nn
  from flax import nnx

  from jtl.models.creation import to_nnx

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))

  class Net(nn.Module):  # what jtl.models.create(..., api="nnx") wraps in nnx.bridge.ToNNX
    @nn.compact
    def __call__(self, x, train=False):
      x = Block(name="block")(nn.Dense(3)(x), train)
      return nn.BatchNorm(use_running_average=not train)(x)

  x = np.random.default_rng(2).normal(size=(20, 4)).astype(np.float32) + 1.0
  v = jax.jit(lambda x: Net().init(jax.random.PRNGKey(0), x))(x)
  batches = [{"inputs": x[:8]}, {"inputs": x[8:], "mask": np.arange(12) < 9}]
  linen = jtl.recompute_batchnorm(Net(), v, batches, skip=["BatchNorm_0"])
  bridged = to_nnx(Net(), v)
  out = jtl.recompute_batchnorm(bridged, jtl.adapter.variables_of(bridged), batches, skip=["BatchNorm_0"])
  assert not np.allclose(linen["batch_stats"]["block"]["bn"]["var"], v["batch_stats"]["block"]["bn"]["var"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out["state"],
               linen["batch_stats"])

  class Outer(nnx.Module):  # Linen paths inside a nested bridge are not the state's
    def __init__(self):
      self.inner = to_nnx(Net(), v)

    def __call__(self, x):
      return self.inner(x)

  with pytest.raises(jtl.errors.ConfigError, match="'inner' is a Linen module inside nnx.bridge.ToNNX"):
    jtl.recompute_batchnorm(Outer(), jtl.adapter.variables_of(Outer()), batches)


def _fit(tmp_path, labels_rules, **kwargs):
  model = TinyCNN(4)
  x, y = images(16), labels(16)
  v = init(model, x)
  lab = jtl.label_params(v["params"], labels_rules)
  tx = jtl.make_optimizer(lab, learning_rate=0.05, optimizer="adam")
  batch = {"inputs": x, "label": y}
  result = train.fit(module=model, variables=v, labels=lab, tx=tx,
                     train_batches=lambda start: iter([batch] * 10), num_steps=4,
                     workdir=tmp_path, eval_batches=lambda: [dict(batch, mask=np.ones(16, bool))],
                     progress=False, async_checkpoints=False, **kwargs)
  return model, v, x, result


def test_fit_recomputes_trained_batchnorm_statistics_before_eval_and_save(tmp_path):
  pool = [{"inputs": images(8, seed=s)} for s in (3, 4)]
  model, v, x, result = _fit(tmp_path / "run", [("bn0/.*|conv0/.*", jtl.partition.FROZEN), (".*", "all")],
                             batchnorm_batches=lambda: iter(pool))
  state = result.state
  # bn0 is frozen: its statistics stay; bn1's are the population moments
  # under the final params (not the moving average of 4 training batches).
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state)["batch_stats"]["bn0"],
               v["batch_stats"]["bn0"])
  expected = jtl.recompute_batchnorm(model, jax.device_get(state.variables), pool, skip=["bn0"])
  np.testing.assert_allclose(state.model_state["batch_stats"]["bn1"]["mean"],
                             expected["batch_stats"]["bn1"]["mean"], rtol=1e-6)
  # The saved checkpoint holds them too, and the eval metrics were taken with them.
  restored, _ = jtl.restore_variables(tmp_path / "run")
  np.testing.assert_array_equal(restored["batch_stats"]["bn1"]["var"],
                                np.asarray(state.model_state["batch_stats"]["bn1"]["var"]))
  step = jax.jit(jtl.make_eval_step(model))
  batch = {"inputs": x, "label": labels(16), "mask": np.ones(16, bool)}
  direct = train.evaluate(step, expected, [batch])
  assert result.eval_metrics["accuracy"] == pytest.approx(direct["accuracy"])
  # Without batchnorm_batches the statistics are the moving averages: different.
  _, _, _, plain = _fit(tmp_path / "plain", [("bn0/.*|conv0/.*", jtl.partition.FROZEN), (".*", "all")])
  assert not np.allclose(plain.state.model_state["batch_stats"]["bn1"]["mean"],
                         expected["batch_stats"]["bn1"]["mean"], atol=1e-3)


def test_fit_recomputes_nnx_statistics_on_the_mesh():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 3, rngs=rngs)
      self.bn = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.lin(x))

  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(16, 4)).astype(np.float32), rng.integers(0, 3, 16).astype(np.int32)
  net = Net(nnx.Rngs(0))
  lab = jtl.label_params(jtl.adapter.variables_of(net)["params"], [(".*", "all")])
  batch = {"inputs": x, "label": y, "mask": np.ones(16, bool)}
  result = train.fit(module=net, variables=None, labels=lab,
                     tx=jtl.make_optimizer(lab, learning_rate=0.1, optimizer="adam"),
                     train_batches=lambda start: iter([batch] * 4), num_steps=4,
                     eval_batches=lambda: [batch], eval_every=2, progress=False,
                     batchnorm_batches=lambda: [{"inputs": x[:8]}, {"inputs": x[8:]}])
  state = result.state
  expected = jtl.recompute_batchnorm(net, jax.device_get(state.variables), [{"inputs": x}])
  np.testing.assert_allclose(state.model_state["state"]["bn"]["var"],
                             expected["state"]["bn"]["var"], rtol=1e-5)
  # Placed like the rest of the state (replicated over the mesh's devices).
  assert state.model_state["state"]["bn"]["mean"].sharding == state.params["lin"]["bias"].sharding


def test_fit_batchnorm_batches_needs_batchnorm_statistics():
  with pytest.raises(jtl.errors.ConfigError, match="batchnorm_batches"):
    train.fit(module=lambda p, x: x @ p["w"], variables={"params": {"w": jnp.ones((2, 2))}},
              labels={"w": "all"}, tx=optax.sgd(0.1), train_batches=lambda s: iter([]),
              num_steps=1, batchnorm_batches=lambda: [])


def test_a_batchnorm_without_params_in_a_frozen_backbone_keeps_its_statistics():
  class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(8)(x)  # a BatchNorm with no scale or offset: no params to label
      return nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False)(x)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3, name="head")(Backbone(name="backbone")(x, train))

  variables = Net().init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
  labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", None)])
  tx = jtl.make_optimizer(labels)
  state = jtl.create_train_state(variables, labels, tx)
  batch = {"inputs": jnp.ones((8, 4)) + jnp.arange(8.0)[:, None], "label": jnp.arange(8) % 3}
  new, _ = jtl.make_train_step(Net(), tx, labels=labels)(state, batch)
  np.testing.assert_array_equal(new.model_state["batch_stats"]["backbone"]["BatchNorm_0"]["mean"],
                                np.zeros(8))
