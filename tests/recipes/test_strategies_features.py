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


def test_feature_batches_cover_each_epoch_once():
  it = strategies.feature_batches(np.arange(12)[:, None], np.arange(12), 4, seed=0)
  epoch = np.concatenate([next(it)["label"] for _ in range(3)])
  assert sorted(epoch.tolist()) == list(range(12))
  with pytest.raises(DataError, match="batch_size=13"):
    next(strategies.feature_batches(np.zeros((12, 2)), np.zeros(12), 13))
