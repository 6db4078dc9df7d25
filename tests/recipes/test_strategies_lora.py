"""LoRA: only adapters and head train; merge/unmerge; adapter-only checkpoints."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from flax import nnx
from strategies_helpers import SPEC, batch, changed, tiny

import jtl
from jtl.errors import CheckpointError, ConfigError
from jtl.recipes import strategies

ADAPTED = ["stem/conv", "block_0/dense", "block_1/dense"]


def test_lora_trains_only_adapters_and_head_and_merges(tmp_path, capsys):
  module, variables = tiny()
  s = strategies.build({"name": "lora", "rank": 2, "alpha": 4.0}, module, variables, SPEC,
                       verbose=True)
  assert "lora" in capsys.readouterr().out
  lora_paths = {f"{m}/lora_{x}" for m in ADAPTED for x in "ab"}
  assert lora_paths <= set(jtl.tree.flatten(s.variables["params"]))
  assert s.summary().trainable_params == sum(
      np.size(v) for p, v in jtl.tree.flatten(s.variables["params"]).items()
      if p in lora_paths or p.startswith("head/"))
  # B starts at 0: the adapted model is the pretrained one.
  x = batch()["inputs"]
  np.testing.assert_allclose(s.module.apply(s.variables, x), module.apply(variables, x),
                             atol=1e-6)

  tx = s.make_optimizer(learning_rate=0.1, optimizer="sgd")
  state = jtl.create_train_state(s.variables, s.labels, tx)
  step = jax.jit(jtl.make_train_step(s.module, tx, labels=s.labels))
  for i in range(2):
    state, _ = step(state, batch(seed=i))
  # Step 1 moves B (A gets no gradient while B = 0), step 2 moves A too.
  assert changed(s.variables["params"], state.params) == lora_paths | {"head/kernel", "head/bias"}
  assert not changed(s.variables["batch_stats"], state.model_state["batch_stats"])

  params = state.params
  adapted_out = s.module.apply(state.variables, x)
  merged = s.export_params(params)
  assert set(jtl.tree.flatten(merged)) == set(jtl.tree.flatten(variables["params"]))
  merged_out = module.apply({**state.model_state, "params": merged}, x)
  np.testing.assert_allclose(merged_out, adapted_out, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(adapted_out) - np.asarray(module.apply(variables, x))).max() > 1e-3

  adapters = strategies.adapter_params(params)
  unmerged = strategies.unmerge_lora(merged, adapters, 4.0)
  for path, value in jtl.tree.flatten(params).items():
    np.testing.assert_allclose(jtl.tree.flatten(unmerged)[path], value, atol=1e-6)

  for suffix in ("npz", "safetensors"):
    path = tmp_path / f"adapters.{suffix}"
    strategies.save_adapters(params, path, alpha=4.0)
    saved = jtl.weights.read(path)
    assert set(saved) == lora_paths | {"head/kernel", "head/bias", "__lora_alpha__"}
    loaded, alpha = strategies.load_adapters(variables["params"], path)
    assert alpha == 4.0
    out = s.module.apply({**state.model_state, "params": loaded}, x)
    np.testing.assert_allclose(out, adapted_out, atol=1e-6)


class _OwnNnx(nnx.Module):
  """An own NNX model (no Linen `apply`): two Linear layers."""

  def __init__(self, rngs):
    self.body = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.body(x)))


def test_lora_strategy_trains_an_own_nnx_model_and_merges():
  """build("lora") on an NNX module folds the adapters in (LoraWeights); it
  once wrapped it in the Linen-only LoraModel and the first step failed with
  an AttributeError (no `apply`)."""
  model = _OwnNnx(nnx.Rngs(0))
  # No example_input: an NNX module's layers are found without a trace.
  spec = types.SimpleNamespace(groups=[("body", r"body/.*"), ("head", r"head/.*")])
  s = strategies.build({"name": "lora", "rank": 2, "alpha": 4.0}, model,
                       jtl.adapter.variables_of(model), spec)
  assert isinstance(s.module, strategies.LoraWeights)
  tx = s.make_optimizer(learning_rate=0.1, optimizer="sgd")
  state = jtl.create_train_state(s.variables, s.labels, tx)
  step = jax.jit(jtl.make_train_step(s.module, tx, labels=s.labels))
  rng = np.random.default_rng(0)
  for _ in range(2):  # B moves at step 1, A (no gradient while B = 0) at step 2
    state, _ = step(state, {"inputs": rng.normal(size=(8, 4)).astype(np.float32),
                            "label": rng.integers(0, 3, 8).astype(np.int32)})
  before, after = jtl.tree.flatten(s.variables["params"]), jtl.tree.flatten(state.params)
  for path in ("body/kernel", "body/bias"):  # the base weights: bit-equal
    np.testing.assert_array_equal(after[path], before[path])
  assert changed(s.variables["params"], state.params) == {
      "body/lora_a", "body/lora_b", "head/kernel", "head/bias"}
  x = rng.normal(size=(5, 4)).astype(np.float32)
  adapted, _ = s.module.apply(state.params, {}, x, train=False, rng=None)
  jtl.adapter.update_module(model, {"params": s.export_params(state.params)})
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(adapted), rtol=1e-5, atol=1e-6)


def test_lora_errors_name_the_problem(tmp_path):
  module, variables = tiny()
  with pytest.raises(ConfigError, match=r"(?s)match no Dense/Conv.*block_0/dense"):
    strategies.add_lora(module, variables, SPEC.example_input(1), targets=["nope/.*"], rank=2)
  with pytest.raises(ConfigError, match="rank=0"):
    strategies.add_lora(module, variables, SPEC.example_input(1), targets=[".*"], rank=0)
  v = strategies.add_lora(module, variables, SPEC.example_input(1), targets=["block_0/dense"],
                          rank=2)
  path = tmp_path / "a.npz"
  strategies.save_adapters(v["params"], path)
  other = strategies.add_lora(module, variables, SPEC.example_input(1),
                              targets=["block_0/dense"], rank=3)
  with pytest.raises(CheckpointError, match=r"block_0/dense/lora_a: file has shape \(4, 2\), params \(4, 3\)"):
    strategies.load_adapters(other["params"], path)
  with pytest.raises(CheckpointError, match="no LoRA adapters"):
    strategies.save_adapters(variables["params"], tmp_path / "b.npz")


def test_lora_model_refuses_adapters_it_cannot_apply():
  import flax.linen as nn
  import jax.numpy as jnp

  from jtl.recipes.strategies import LoraModel, LoraWeights, merge_lora

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.DenseGeneral((2, 3), name="proj")(x).reshape(x.shape[0], -1)

  x = jnp.ones((2, 4))
  params = Net().init(jax.random.PRNGKey(0), x)["params"]
  params["proj"]["lora_a"] = jnp.ones((8, 2)) * 0.1  # kernel (4, 2, 3) as (4*2, 3)
  params["proj"]["lora_b"] = jnp.ones((2, 3)) * 0.1
  folded = LoraWeights(Net(), alpha=2.0).apply(params, {}, x, train=False, rng=None)[0]
  merged = Net().apply({"params": merge_lora(params, 2.0)}, x)
  # float32 rounding of two summation orders: a relative bound alone fails
  # on entries near 0 (1.4e-6 relative on 0.06 was seen).
  np.testing.assert_allclose(folded, merged, rtol=1e-6, atol=1e-6)
  # A DenseGeneral (attention's projections) runs in LoraModel too, split
  # after its input axis (low rank) or, as here, after another (its update).
  got = LoraModel(Net(), alpha=2.0).apply({"params": params}, x)
  np.testing.assert_allclose(got, merged, rtol=1e-6, atol=1e-6)

  class Batched(nn.Module):  # a DenseGeneral with batch_dims: no LoRA path for it
    @nn.compact
    def __call__(self, x, train=False):
      return nn.DenseGeneral(3, batch_dims=(0,), name="proj")(x)

  params = Batched().init(jax.random.PRNGKey(0), x)["params"]
  params["proj"]["lora_a"] = jnp.ones((8, 2)) * 0.1
  params["proj"]["lora_b"] = jnp.ones((2, 3)) * 0.1
  with pytest.raises(ConfigError, match=r"LoRA adapters at proj \(DenseGeneral\).*LoraWeights"):
    LoraModel(Batched(), alpha=2.0).apply({"params": params}, x)


def test_dora_starts_at_base_trains_m_a_b_merges_and_saves(tmp_path):
  module, variables = tiny()
  s = strategies.build({"name": "lora", "rank": 2, "alpha": 4.0, "dora": True}, module,
                       variables, SPEC)
  flat = jtl.tree.flatten(s.variables["params"])
  dora_paths = {f"{m}/lora_{x}" for m in ADAPTED for x in ("a", "b", "magnitude")}
  assert dora_paths <= set(flat)
  for m in ADAPTED:  # m starts at the column norms of W ([fan_in, out])
    kernel = np.asarray(flat[f"{m}/kernel"])
    np.testing.assert_allclose(flat[f"{m}/lora_magnitude"],
                               np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0),
                               rtol=1e-6)
  x = batch()["inputs"]
  # B = 0: exactly the pretrained model.
  np.testing.assert_array_equal(s.module.apply(s.variables, x), module.apply(variables, x))

  tx = s.make_optimizer(learning_rate=0.1, optimizer="sgd")
  state = jtl.create_train_state(s.variables, s.labels, tx)
  step = jax.jit(jtl.make_train_step(s.module, tx, labels=s.labels))
  for i in range(2):
    state, _ = step(state, batch(seed=i))
  # Only m, A, B (and the head) move; kernels and biases stay frozen.
  assert changed(s.variables["params"], state.params) == dora_paths | {"head/kernel",
                                                                       "head/bias"}
  adapted_out = s.module.apply(state.variables, x)
  merged = s.export_params(state.params)
  assert set(jtl.tree.flatten(merged)) == set(jtl.tree.flatten(variables["params"]))
  # The merge (m * V / ||V||_c in weight space) equals the unmerged forward
  # (PEFT's activation-space form in the interceptor).
  merged_out = module.apply({**state.model_state, "params": merged}, x)
  np.testing.assert_allclose(merged_out, adapted_out, rtol=1e-5, atol=1e-5)
  plain_lora = strategies.merge_lora(
      {p: v for p, v in jtl.tree.flatten(state.params).items()
       if not p.endswith("lora_magnitude")}, 4.0)
  plain_out = module.apply({**state.model_state, "params": jtl.tree.unflatten(plain_lora)}, x)
  assert np.abs(np.asarray(plain_out) - np.asarray(merged_out)).max() > 1e-4  # m matters
  with pytest.raises(CheckpointError, match="DoRA magnitude"):
    strategies.unmerge_lora(merged, strategies.adapter_params(state.params), 4.0)

  path = tmp_path / "dora.safetensors"
  strategies.save_adapters(state.params, path, alpha=4.0)
  assert set(jtl.weights.read(path)) == dora_paths | {"head/kernel", "head/bias",
                                                      "__lora_alpha__"}
  loaded, alpha = strategies.load_adapters(variables["params"], path)
  out = s.module.apply({**state.model_state, "params": loaded}, x)
  np.testing.assert_allclose(out, adapted_out, atol=1e-6)
  # LoraWeights (any model kind) folds DoRA in too.
  weights_out, _ = strategies.LoraWeights(module, 4.0).apply(
      loaded, dict(state.model_state), x, train=False, rng=None)
  np.testing.assert_allclose(weights_out, adapted_out, rtol=1e-5, atol=1e-5)


def test_dora_gradients_reach_only_magnitude_and_adapters():
  module, variables = tiny()
  v = strategies.add_lora(module, variables, SPEC.example_input(1), targets=["block_0/dense"],
                          rank=2, dora=True, seed=1)
  flat = dict(jtl.tree.flatten(v["params"]))
  flat["block_0/dense/lora_b"] = np.full_like(flat["block_0/dense/lora_b"], 0.1)
  params = jtl.tree.unflatten(flat)
  model = strategies.LoraModel(module, 4.0)
  x = batch()["inputs"]
  labels = jtl.partition.label_params(params, strategies.lora_rules(head_pattern=None))
  trainable, frozen = jtl.partition.split(params, labels)

  def loss(t):
    out = model.apply({**v, "params": jtl.partition.merge(t, frozen)}, x)
    return (out ** 2).sum()

  grads = jtl.tree.flatten(jax.grad(loss)(trainable))
  assert set(grads) == {f"block_0/dense/lora_{x}" for x in ("a", "b", "magnitude")}
  assert all(np.abs(np.asarray(g)).max() > 0 for g in grads.values())
  with pytest.raises(ConfigError, match="dora='yes'"):
    strategies.add_lora(module, variables, SPEC.example_input(1), targets=[".*"], rank=2,
                        dora="yes")


def test_lora_on_an_apply_function_asks_for_its_layers():
  """A plain function has no modules to inspect: add_lora says to pass
  `layers=` (with the paths its params hold a kernel at), and then works."""
  import jax.numpy as jnp

  def apply_fn(params, x):
    h = jnp.tanh(x @ params["body"]["kernel"] + params["body"]["bias"][None])
    return h @ params["head"]["kernel"]

  variables = {"params": {"body": {"kernel": np.ones((4, 8), np.float32),
                                   "bias": np.zeros(8, np.float32)},
                          "head": {"kernel": np.zeros((8, 3), np.float32)}}}
  x = np.ones((2, 4), np.float32)
  assert strategies.adaptable_layers(apply_fn, variables, x) == []
  with pytest.raises(ConfigError, match=r"(?s)layers of an apply function \(apply_fn\) cannot "
                     r"be discovered.*layers=\['body', 'head'\].*- body\n  - head"):
    strategies.add_lora(apply_fn, variables, x, targets=["body"], rank=2)
  with pytest.raises(ConfigError, match=r"(?s)apply function \(apply_fn\).*layers="):
    strategies.add_lora(jtl.FunctionModel(apply_fn), variables, x, targets=["body"], rank=2)
  with pytest.raises(ConfigError, match=r"(?s)\['body/kernel'\] hold no \"kernel\".*- body"):
    strategies.add_lora(apply_fn, variables, x, targets=".*", rank=2, layers=["body/kernel"])
  adapted = strategies.add_lora(apply_fn, variables, x, targets=["body"], rank=2,
                                layers=["body", "head"])
  assert sorted(adapted["params"]["body"]) == ["bias", "kernel", "lora_a", "lora_b"]
  assert sorted(adapted["params"]["head"]) == ["kernel"]


def test_a_lora_runs_restored_params_warn_and_merge_into_the_trained_model(tmp_path, caplog):
  """`restore_variables` gives a LoRA run's params as trained (adapters apart),
  which a plain `module.apply` ignores: it warns, naming the layers and
  merge_lora, and merge_lora of them is the trained LoRA model."""
  import logging

  import flax.linen as nn

  from jtl.checkpoint import restore

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      h = nn.relu(nn.Dense(8, name="body")(x.reshape(x.shape[0], -1)))
      return nn.Dense(3, name="head")(nn.Dense(8, name="neck")(h))

  module = Mlp()
  variables = module.init(jax.random.PRNGKey(0), SPEC.example_input(1))
  v = strategies.add_lora(module, variables, SPEC.example_input(1), targets=["body", "neck"],
                          rank=2)
  labels = jtl.label_params(v["params"], strategies.lora_rules())
  lora = strategies.LoraModel(module, 4.0)
  result = jtl.train.fit(module=lora, variables=v, labels=labels,
                         tx=jtl.make_optimizer(labels, learning_rate=0.1),
                         train_batches=lambda start: (batch(seed=i) for i in range(start, 9)),
                         num_steps=2, workdir=tmp_path / "run", progress=False)
  with caplog.at_level(logging.WARNING, logger=restore.__name__):
    restored, _ = jtl.restore_variables(tmp_path / "run")
  (message,) = [r.getMessage() for r in caplog.records if "LoRA adapters" in r.getMessage()]
  for part in ("2 layer(s) unmerged: body, neck", "ignores them",
               "LoraModel(module, alpha)", "LoraWeights(model, alpha)",
               'jtl.recipes.strategies.merge_lora(variables["params"], alpha)',
               "does not record it"):
    assert part in message, part
  x = batch()["inputs"]
  trained = lora.apply(jax.device_get(result.state).variables, x)
  merged = {**restored, "params": strategies.merge_lora(restored["params"], 4.0)}
  np.testing.assert_allclose(module.apply(merged, x), trained, rtol=1e-5, atol=1e-5)
  assert np.abs(module.apply(restored, x) - trained).max() > 1e-3  # what the warning is about
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=restore.__name__):
    jtl.restore_variables(tmp_path / "run", warn_lora=False)  # the caller merges them
    restore._warn_unmerged_lora(tmp_path, restored["params"],  # an app run's saved config
                                {"config": {"strategy": {"name": "lora", "alpha": 16.0}}})
  (message,) = [r.getMessage() for r in caplog.records]
  assert "the run's alpha=16.0 (its config's strategy.alpha)" in message
