"""scripts/benchmarks/benchmark_strategies.py's bookkeeping, without data: resumable
results, seeded labelled subsets, stratified validation splits, and the
learning rate written into the optimizer state (one compiled step serves
every swept learning rate)."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

spec = importlib.util.spec_from_file_location(
    "benchmark_strategies", Path(__file__).parents[1] / "scripts" / "benchmarks" / "benchmark_strategies.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_results_are_resumable(tmp_path):
  path = tmp_path / "rows.jsonl"
  results = bench.Results(path)
  key = dict(kind="final", strategy="full", per_class=10, seed=1, lr=1e-3, steps=10,
             image_size=128)
  assert results.get(**key) is None
  results.add({**key, "acc": 0.5})
  again = bench.Results(path)  # a rerun reads the finished rows back
  assert again.get(**key)["acc"] == 0.5
  assert again.get(**{**key, "seed": 2}) is None


def test_labelled_subsets_and_holdout():
  y = np.repeat(np.arange(3), 50)
  a, b = bench.labelled_subset(y, 10, 0), bench.labelled_subset(y, 10, 1)
  assert np.bincount(y[a]).tolist() == [10, 10, 10] and not np.array_equal(a, b)
  fit, val = bench.stratified_holdout(y[a], 0.2)
  assert np.bincount(y[a][val]).tolist() == [2, 2, 2]
  assert not set(fit) & set(val) and len(fit) + len(val) == 30


def test_learning_rate_lives_in_the_optimizer_state():
  params = {"w": jnp.zeros(3)}
  tx = bench._INJECTED_ADAM(1e-3)
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  grads = {"w": jnp.ones(3)}
  for lr in (1e-3, 5e-2):
    updates, _ = step(grads, bench.set_learning_rate(state, lr))
    assert float(jnp.abs(updates["w"][0])) == pytest.approx(lr, rel=1e-3)
  assert step._cache_size() == 1  # one program for both learning rates
