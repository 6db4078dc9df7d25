"""Linear probe on cached features equals the probe that recomputes them."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from strategies_helpers import SPEC, batch, changed, tiny

import jtl
from jtl.errors import DataError
from jtl.recipes import strategies


def eval_batches(inputs, labels, size):
  for i in range(0, len(inputs), size):
    x, y = inputs[i:i + size], labels[i:i + size]
    pad = size - len(x)
    yield {"inputs": np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]),
           "label": np.concatenate([y, np.zeros(pad, y.dtype)]),
           "mask": np.arange(size) < len(x)}


def test_cached_probe_matches_recomputed_probe():
  module, variables = tiny()
  data = batch(n=20, seed=3)
  feats, labels = strategies.extract_features(
      module, variables, eval_batches(data["inputs"], data["label"], 8))
  assert feats.shape == (20, 8) and labels.tolist() == data["label"].tolist()
  np.testing.assert_allclose(
      feats, module.apply(variables, data["inputs"], method="features"), atol=1e-5)

  s = strategies.build({"name": "linear_probe", "cache_features": True}, module, variables,
                       SPEC, verbose=False)
  assert s.cache_features and not strategies.cache_problems(s.labels)
  assert "augmentation" in strategies.cache_problems(s.labels, augment=True)[0]
  assert "backbone leaves" in strategies.cache_problems(
      strategies.build("full", module, variables, SPEC, verbose=False).labels)[0]

  tx = optax.sgd(0.5)
  head_state = strategies.train_head(feats, labels, variables, tx, num_steps=4, batch_size=8,
                                     seed=1)
  probed = strategies.with_head(variables, head_state.params)
  assert changed(variables["params"], probed["params"]) == {"head/kernel", "head/bias"}

  # The same 4 steps with the backbone run every time (frozen BN, stored statistics).
  full_tx = s.make_optimizer(learning_rate=0.5, optimizer="sgd")
  state = jtl.create_train_state(variables, s.labels, full_tx)
  step = jax.jit(jtl.make_train_step(module, full_tx, labels=s.labels))
  it = strategies.feature_batches(np.arange(20), labels, 8, seed=1)
  for _ in range(4):
    idx = next(it)["inputs"]
    state, _ = step(state, {"inputs": data["inputs"][idx], "label": data["label"][idx]})
  for a, b in zip(jax.tree.leaves(state.params["head"]), jax.tree.leaves(head_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not changed(variables["batch_stats"], state.model_state["batch_stats"])


def test_cached_head_phase_on_given_features_trains_the_same_head_without_a_backbone_pass():
  module, variables = tiny()
  data = batch(n=20, seed=3)
  given = strategies.extract_features(module, variables,
                                      eval_batches(data["inputs"], data["label"], 8))

  def no_backbone_pass():  # model="auto" hands over the selection's features instead
    raise AssertionError("the training pass was iterated")
    yield  # pylint: disable=unreachable

  kw = dict(head_steps=6, steps=0, batch_size=8, seed=1)
  stops = []
  extracted, row = strategies.cached_head_phase(
      module, eval_batches(data["inputs"], data["label"], 8), optax.sgd(0.5), **kw
  ).run(variables, stops.append)
  reused, reused_row = strategies.cached_head_phase(
      module, no_backbone_pass(), optax.sgd(0.5), train_features=given, **kw
  ).run(variables, stops.append)
  jax.tree.map(np.testing.assert_array_equal, reused, extracted)  # the same head, bit for bit
  assert changed(variables["params"], reused["params"]) == {"head/kernel", "head/bias"}
  assert row["reused_features"] == 0.0 and row["extract_seconds"] > 0
  assert reused_row["reused_features"] == 1.0 and reused_row["extract_seconds"] == 0.0
  assert reused_row["cached_examples"] == row["cached_examples"] == 20
  assert stops == [*(f"while extracting the features (at batch {n})" for n in (1, 2, 3)),
                   "after extracting the features"]  # the extracting phase's, none when reused
  with pytest.raises(ValueError, match="train_pass or train_features"):
    strategies.cached_head_phase(module, None, optax.sgd(0.5), **kw)


def test_feature_batches_cover_each_epoch_once():
  it = strategies.feature_batches(np.arange(12)[:, None], np.arange(12), 4, seed=0)
  epoch = np.concatenate([next(it)["label"] for _ in range(3)])
  assert sorted(epoch.tolist()) == list(range(12))
  with pytest.raises(DataError, match="batch_size=13"):
    next(strategies.feature_batches(np.zeros((12, 2)), np.zeros(12), 13))
