"""Strategies on a tiny model: which leaves change after a step, LLRD, L2-SP."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from strategies_helpers import GROUPS, SPEC, batch, changed, tiny

import jtl
from jtl.errors import ConfigError, PartitionError
from jtl.recipes import strategies

ALL = {"stem/conv/kernel", "stem/bn/scale", "stem/bn/bias",
       "block_0/dense/kernel", "block_0/dense/bias", "block_0/norm/scale", "block_0/norm/bias",
       "block_1/dense/kernel", "block_1/dense/bias", "block_1/norm/scale", "block_1/norm/bias",
       "head/kernel", "head/bias"}
HEAD = {"head/kernel", "head/bias"}


def run_steps(strategy, n=1, lr=0.1, optimizer="sgd", history=None, **kw):
  labels = strategy.labels
  tx = strategy.make_optimizer(labels, learning_rate=lr, optimizer=optimizer, **kw)
  state = jtl.create_train_state(strategy.variables, labels, tx)
  step = jax.jit(jtl.make_train_step(strategy.module, tx, labels=labels))
  for i in range(n):
    state, metrics = step(state, batch(seed=i))
    if history is not None:
      history.append(state.params)
  return state, metrics


@pytest.mark.parametrize("config, expected", [
    ("linear_probe", HEAD),
    ({"name": "partial", "num_blocks": 1}, HEAD | {p for p in ALL if p.startswith("block_1")}),
    ({"name": "bitfit", "freeze_batchnorm": False},
     HEAD | {p for p in ALL if re.search(r"/(bias|scale)$", p)}),
    ({"name": "full", "freeze_batchnorm": False}, ALL),
    ({"name": "llrd", "freeze_batchnorm": False}, ALL),
])
def test_only_trainable_leaves_change(config, expected, capsys):
  module, variables = tiny()
  strategy = strategies.build(config, module, variables, SPEC, verbose=True)
  printed = capsys.readouterr().out
  assert "trainable:" in printed and "frozen" in printed or expected == ALL
  state, metrics = run_steps(strategy)
  assert np.isfinite(float(metrics["loss"]))
  assert changed(variables["params"], state.params) == expected
  # Frozen BatchNorm (whole stem frozen) keeps its statistics; trained one updates them.
  stem_trains = "stem/bn/scale" in expected  # any trainable BN param: batch statistics
  assert bool(changed(variables["batch_stats"], state.model_state["batch_stats"])) == stem_trains
  n_trainable = sum(np.size(variables["params"][p.split("/")[0]][p.split("/")[1]][p.split("/")[2]])
                    if p.count("/") == 2 else np.size(variables["params"]["head"][p.split("/")[1]])
                    for p in expected)
  assert strategy.summary().trainable_params == n_trainable


def test_config_dict_and_errors():
  module, variables = tiny()
  config = ml_collections.ConfigDict({"name": "partial", "num_blocks": 2, "l2sp": 0.01,
                                      "freeze_batchnorm": True})
  s = strategies.build(config, module, variables, SPEC, verbose=False)
  # freeze_batchnorm=True puts the BatchNorm rule first
  assert s.rules[0] == ("(stem/bn)/.*", None)
  assert [l for _, l in s.rules[1:]] == [None, "block_0", "block_1", "head"]
  with pytest.raises(ConfigError, match=r"(?s)Unknown option.*'rank'.*num_blocks"):
    strategies.build({"name": "partial", "rank": 3}, module, variables, SPEC)
  with pytest.raises(ConfigError, match="expected one of"):
    strategies.build("lorax", module, variables, SPEC)
  with pytest.raises(ConfigError, match=r"num_blocks=7: expected an int in 0..3"):
    strategies.build({"name": "partial", "num_blocks": 7}, module, variables, SPEC)
  with pytest.raises(ConfigError, match="needs \\['steps_per_stage'\\]"):  # no default
    strategies.build({"name": "gradual", "steps_per_stage": None}, module, variables, SPEC)
  # None: the measured default (a config declares every strategy's options as None).
  lp_ft = strategies.build({"name": "lp_ft", "probe_steps": None}, module, variables, SPEC)
  assert lp_ft.phases[1].start == strategies.PROBE_STEPS
  assert lp_ft.options["probe_learning_rate"] == strategies.PROBE_LEARNING_RATE


def test_scratch_reinitialises():
  module, variables = tiny(seed=0)
  s = strategies.build({"name": "scratch", "seed": 5}, module, variables, SPEC, verbose=False)
  assert changed(variables["params"], s.variables["params"]) >= {"stem/conv/kernel", "head/kernel"}
  assert s.summary().trainable_fraction == 1.0


def test_layer_decay_scales_updates_per_group():
  module, variables = tiny()
  plain = strategies.build("full", module, variables, SPEC, verbose=False)
  decayed = strategies.build({"name": "full", "layer_decay": 0.5}, module, variables, SPEC,
                             verbose=False)
  p0 = jtl.tree.flatten(variables["params"])
  d_plain = {k: v - p0[k] for k, v in jtl.tree.flatten(run_steps(plain)[0].params).items()}
  d_decay = {k: v - p0[k] for k, v in jtl.tree.flatten(run_steps(decayed)[0].params).items()}
  depth = {"stem": 3, "block_0": 2, "block_1": 1, "head": 0}
  for path, d in d_plain.items():
    np.testing.assert_allclose(d_decay[path], d * 0.5 ** depth[path.split("/")[0]],
                               rtol=1e-5, atol=1e-7)
  # timm's param_groups_layer_decay: scale = decay ** (num_layers + 1 - layer_id).
  assert strategies.layer_decay_multipliers(GROUPS, 0.5) == {
      "stem": 0.125, "block_0": 0.25, "block_1": 0.5, "head": 1.0}


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(4, name="dense")(x)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.Dense(4, name="embed")(x)
    blocks = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


def test_layer_decay_per_slice_of_stacked_blocks():
  module = Scanned()
  x = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), x)
  assert variables["params"]["blocks"]["dense"]["kernel"].shape == (3, 4, 4)
  groups = [("embed", "embed/.*"), ("blocks", "blocks/.*"), ("head", "head/.*")]
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  b = {"inputs": x, "label": np.array([0, 1, 0, 1], np.int32)}
  deltas = []
  for tx in (optax.sgd(1.0), optax.chain(optax.sgd(1.0), strategies.layer_decay(
      variables["params"], groups, 0.5, stacked={"blocks": 3}))):
    state = jtl.create_train_state(variables, labels, tx)
    state, _ = jax.jit(jtl.make_train_step(module, tx))(state, b)
    deltas.append(jax.tree.map(jnp.subtract, state.params, variables["params"]))
  plain, decayed = deltas
  k_plain, k_dec = plain["blocks"]["dense"]["kernel"], decayed["blocks"]["dense"]["kernel"]
  for i, scale in enumerate([0.5 ** 3, 0.5 ** 2, 0.5 ** 1]):
    np.testing.assert_allclose(k_dec[i], k_plain[i] * scale, rtol=1e-4, atol=1e-7)
    assert np.abs(k_plain[i]).max() > 1e-4
  np.testing.assert_allclose(decayed["embed"]["kernel"], plain["embed"]["kernel"] * 0.5 ** 4,
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(decayed["head"]["kernel"], plain["head"]["kernel"], rtol=1e-5,
                             atol=1e-7)
  with pytest.raises(PartitionError, match="stacks 5 layers"):
    strategies.layer_decay_scales(variables["params"], groups, 0.5, stacked={"blocks": 5})


def test_l2sp_pulls_toward_pretrained():
  module, variables = tiny()
  lr, strength = 0.1, 0.5
  plain = strategies.build("full", module, variables, SPEC, verbose=False)
  reg = strategies.build({"name": "full", "l2sp": strength}, module, variables, SPEC,
                         verbose=False)
  history = []
  p2_plain = run_steps(plain, 2, lr, history=history)[0].params
  p1 = history[0]
  p2_reg = run_steps(reg, 2, lr)[0].params
  f0, f1 = jtl.tree.flatten(variables["params"]), jtl.tree.flatten(p1)
  fp, fr = jtl.tree.flatten(p2_plain), jtl.tree.flatten(p2_reg)
  for path in f0:
    expected = 0.0 if path.startswith("head/") else -lr * strength * (f1[path] - f0[path])
    np.testing.assert_allclose(fr[path] - fp[path], expected, atol=2e-6)
  assert max(np.abs(fr[p] - fp[p]).max() for p in f0 if not p.startswith("head")) > 1e-5
  # The penalty's gradient is the transformation's update.
  ref = variables["params"]
  grad = jax.grad(lambda p: strategies.l2sp_penalty(p, ref, strength))(p1)
  np.testing.assert_allclose(grad["stem"]["conv"]["kernel"],
                             strength * (f1["stem/conv/kernel"] - f0["stem/conv/kernel"]),
                             rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(grad["head"]["kernel"], 0.0)
