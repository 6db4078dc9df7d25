"""LP-FT and gradual unfreezing: one compile per phase, optimizer state carries over."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from strategies_helpers import GROUPS, SPEC, batch, changed, tiny

import jtl
from jtl.errors import ConfigError
from jtl.recipes import strategies


def test_lp_ft_compiles_once_per_phase_and_carries_state():
  module, variables = tiny()
  strategy = strategies.build({"name": "lp_ft", "probe_steps": 2}, module, variables, SPEC,
                              verbose=False)
  traces = []

  def loss_fn(logits, b):
    traces.append(1)  # runs only while tracing
    return jtl.losses.cross_entropy_loss(logits, b)

  def batches():
    i = 0
    while True:
      yield batch(seed=i)
      i += 1

  def make_tx(labels, learning_rate=0.05):  # the probe phase passes its own rate
    return strategy.make_optimizer(labels, learning_rate=learning_rate, optimizer="adam")

  seen = []
  result = strategies.train_phases(
      strategy.module, strategy.variables, strategy.phases,
      make_tx,
      batches(), num_steps=3, loss_fn=loss_fn, on_phase=lambda p, l: seen.append(p.name))
  assert seen == ["linear_probe", "full"]
  assert len(traces) == 2
  assert result.losses.shape == (3,) and np.all(np.isfinite(result.losses))
  assert int(result.state.step) == 3 and result.phase_starts == [0, 2]
  # Everything trained but BatchNorm, frozen by lp_ft's default (stored statistics too).
  bn = {k for k in jtl.tree.flatten(variables["params"]) if "/bn/" in k}
  assert bn and changed(variables["params"], result.state.params) == \
      set(jtl.tree.flatten(variables["params"])) - bn
  stats = result.state.variables["batch_stats"]
  np.testing.assert_array_equal(jtl.tree.flatten(stats)["stem/bn/mean"],
                                jtl.tree.flatten(variables["batch_stats"])["stem/bn/mean"])

  # Phase 1 alone, then switch by hand: the head's moments carry over, the rest start at 0.
  probe_rate = strategy.phases[0].learning_rate  # lp_ft's probe: its own constant rate
  assert probe_rate == strategies.PROBE_LEARNING_RATE != 0.05
  tx0 = strategy.make_optimizer(strategy.labels, learning_rate=probe_rate, optimizer="adam")
  state = jtl.create_train_state(strategy.variables, strategy.labels, tx0)
  step0 = jax.jit(jtl.make_train_step(strategy.module, tx0, labels=strategy.labels))
  for i in range(2):
    state, _ = step0(state, batch(seed=i))
  assert changed(variables["params"], state.params) == {"head/kernel", "head/bias"}
  full = jtl.label_params(state.params, list(strategy.phases[1].rules))
  tx1 = strategy.make_optimizer(full, learning_rate=0.05, optimizer="adam")
  new = strategies.switch_phase(state, full, tx1)
  old_mu, new_mu = state.opt_state[0].mu, new.opt_state[0].mu
  np.testing.assert_array_equal(new_mu["head"]["kernel"], old_mu["head"]["kernel"])
  assert np.abs(np.asarray(old_mu["head"]["kernel"])).max() > 0
  np.testing.assert_array_equal(new_mu["stem"]["conv"]["kernel"], 0.0)
  assert int(new.opt_state[0].count) == 2
  # Same numbers as the loop: phase 2's first step from the switched state.
  step1 = jax.jit(jtl.make_train_step(strategy.module, tx1, labels=full))
  new, _ = step1(new, batch(seed=2))
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(result.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # fit, with the phases in its form (Strategy.fit_phases), trains the same params.
  labels, tx, later = strategy.fit_phases(learning_rate=0.05, optimizer="adam")
  assert [start for start, _, _ in later] == [2]
  fitted = jtl.train.fit(module=strategy.module, variables=strategy.variables, labels=labels,
                         tx=tx, later_phases=later, train_batches=lambda start: batches(),
                         num_steps=3, progress=False).state
  for a, b in zip(jax.tree.leaves(fitted.params), jax.tree.leaves(result.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_phases_keep_the_probe_rate_under_a_wrapper_and_fit_refuses_phase_objects():
  """`Strategy.fit_phases` is fit's form of the phases (the app's one path):
  the probe at its own rate, also under a wrapping model's labels; fit names
  it when given the strategy's Phase objects (once a raw TypeError)."""
  module, variables = tiny()
  strategy = strategies.build({"name": "lp_ft", "probe_steps": 2}, module, variables, SPEC)
  wrapped = {"model": strategy.variables["params"], "disc": {"w": np.ones(2, np.float32)}}
  labels, tx, later = strategy.fit_phases(
      under="model", wrap_labels=lambda l: {"model": l, "disc": {"w": "disc"}},
      learning_rate=0.05, optimizer="sgd")
  bn = {p for p in jtl.tree.flatten(wrapped) if "/bn/" in p}  # frozen by lp_ft's default
  for phase_tx, phase_labels, rate, trains in (
      (tx, labels, strategies.PROBE_LEARNING_RATE,
       {"model/head/kernel", "model/head/bias", "disc/w"}),
      (later[0][2], later[0][1], 0.05, set(jtl.tree.flatten(wrapped)) - bn)):
    trainable, _ = jtl.partition.split(wrapped, phase_labels)
    ones = jax.tree.map(np.ones_like, trainable)
    updates, _ = phase_tx.update(ones, phase_tx.init(trainable), trainable)
    assert set(jtl.tree.flatten(updates)) == trains
    for path, update in jtl.tree.flatten(updates).items():
      np.testing.assert_allclose(update, -rate, rtol=1e-6, err_msg=path)
  with pytest.raises(ConfigError, match="give both or neither"):
    strategy.fit_phases(under="model", learning_rate=0.05)
  labels, tx, _ = strategy.fit_phases(learning_rate=0.05)
  for bad, says in ((strategy.phases[1:], r"later_phases\[0\] is a strategy's Phase \('full'"),
                    ([(0, labels, tx)], r"later_phases\[0\] starts at step 0"),
                    ([(2, labels)], r"later_phases\[0\] is tuple")):
    with pytest.raises(ConfigError, match=r"(?s)" + says + r".*strategy\.fit_phases\("):
      jtl.train.fit(module=strategy.module, variables=strategy.variables, labels=labels,
                    tx=tx, later_phases=bad, train_batches=lambda start: iter(()),
                    num_steps=3, progress=False)
  # Lists and generators of triples are phases as tuples are.
  for given in ([[2, labels, tx]], (p for p in [(2, labels, tx)])):
    assert [p[0] for p in jtl.train._phases(labels, tx, given).items] == [0, 2]


def test_gradual_unfreezing_phases_unfreeze_from_the_top():
  module, variables = tiny()
  strategy = strategies.build({"name": "gradual", "steps_per_stage": 3}, module, variables,
                              SPEC, verbose=False)
  assert [p.start for p in strategy.phases] == [0, 3, 6, 9]
  trainable_groups = []
  for phase in strategy.phases:
    labels = jtl.label_params(variables["params"], list(phase.rules))
    trainable_groups.append(sorted({p.split("/")[0] for p, l in jtl.tree.flatten(labels).items()
                                    if not jtl.partition.is_frozen(l)}))
  assert trainable_groups == [["head"], ["block_1", "head"], ["block_0", "block_1", "head"],
                              ["block_0", "block_1", "head", "stem"]]
  two = strategies.gradual_unfreezing_phases(GROUPS, 5, blocks_per_stage=2, max_blocks=2)
  assert [(p.start, p.name) for p in two] == [(0, "head"), (5, "head+block_1+block_0")]
  assert strategies.phase_index(two, 4) == 0 and strategies.phase_index(two, 5) == 1
  with pytest.raises(ConfigError) as e:
    strategies.gradual_unfreezing_phases(GROUPS, 5, max_blocks=9)
  # Only the bad value, with what the model has (the support matrix's run found
  # "steps_per_stage=1 and blocks_per_stage=1 must be >= 1 and max_blocks=4 in 0..3").
  assert "max_blocks=9 must be in 0..3: the model has 3 layer groups below the head " \
         "(stem, block_0, block_1)" in str(e.value) and "steps_per_stage" not in str(e.value)


def test_transfer_opt_state_matches_paths_shapes_and_dtypes():
  old = {"mu": {"a": np.ones(2), "b": np.ones(3)}, "count": np.int32(7)}
  new = {"mu": {"a": np.zeros(2), "b": np.zeros(4), "c": np.zeros(1)}, "count": np.int32(0)}
  out = strategies.transfer_opt_state(old, new)
  assert out["mu"]["a"].tolist() == [1, 1] and out["mu"]["b"].tolist() == [0] * 4
  assert out["mu"]["c"].tolist() == [0] and int(out["count"]) == 7
