import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jtl
from jtl.errors import PartitionError


def params():
  return {"backbone": {"block0": {"conv": {"kernel": np.ones((3, 3, 3, 8), np.float32),
                                           "bias": np.zeros(8, np.float32)}},
                       "block1": {"conv": {"kernel": np.ones((3, 3, 8, 8), np.float32)}}},
          "head": {"kernel": np.ones((8, 10), np.float32), "bias": np.zeros(10, np.float32)}}


def test_first_match_wins_and_none_freezes():
  with pytest.warns(jtl.partition.UnusedRuleWarning, match=r"\('\.\*', 'never'\)"):
    labels = jtl.label_params(params(), [
        (r"head/.*", "head"), (r"backbone/block1/.*", "top"), (r"backbone/.*", None),
        (r".*", "never")])
  assert jtl.tree.flatten(labels) == {
      "backbone/block0/conv/bias": "frozen", "backbone/block0/conv/kernel": "frozen",
      "backbone/block1/conv/kernel": "top", "head/bias": "head", "head/kernel": "head"}


def test_unmatched_leaves_are_all_listed():
  with pytest.raises(PartitionError) as e:
    jtl.label_params(params(), [(r"head/kernel", "head")])
  msg = str(e.value)
  for path in ["head/bias", "backbone/block0/conv/kernel", "backbone/block0/conv/bias",
               "backbone/block1/conv/kernel"]:
    assert path in msg
  assert "4 parameter path(s)" in msg


def test_invalid_rules_are_reported():
  with pytest.raises(PartitionError, match="not a valid regex"):
    jtl.label_params(params(), [("head/(", "head")])
  with pytest.raises(PartitionError, match="strings or None"):
    jtl.label_params(params(), [(".*", 3)])


def test_split_merge_round_trip_linen():
  module = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
  p = variables["params"]
  labels = jtl.label_params(p, [(r"layers_2/.*", "head"), (".*", "frozen")])
  trainable, frozen = jtl.partition.split(p, labels)
  assert [k for k, v in jtl.tree.flatten(trainable).items()] == ["layers_2/bias", "layers_2/kernel"]
  merged = jtl.partition.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(p)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(p)):
    assert a is b


def test_split_merge_round_trip_nnx_state():
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  labels = jtl.label_params(state, [(r".*bias.*", "frozen"), (".*", "train")])
  trainable, frozen = jtl.partition.split(state, labels)
  assert sorted(jtl.tree.flatten(trainable)) == ["kernel/value"]  # nnx leaves end in "/value"
  merged = jtl.partition.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(state)
  np.testing.assert_array_equal(merged["kernel"][...], state["kernel"][...])
  nnx.update(model, merged)  # the merged state is usable by nnx


def test_split_merge_plain_lists():
  p = {"layers": [np.ones(2), np.zeros(3)], "scale": np.float32(2.0)}
  labels = jtl.label_params(p, [(r"layers/0", "a"), (".*", "frozen")])
  t, f = jtl.partition.split(p, labels)
  assert t["layers"][1] is None and f["layers"][0] is None
  m = jtl.partition.merge(t, f)
  assert m["layers"][0] is p["layers"][0] and m["scale"] is p["scale"]


def test_structure_mismatch_errors_name_paths():
  p = params()
  labels = jtl.label_params(p, [(".*", "all")])
  del labels["head"]["bias"]
  with pytest.raises(PartitionError, match="head/bias"):
    jtl.partition.split(p, labels)
  t, f = jtl.partition.split(p, jtl.label_params(p, [(".*", "all")]))
  f["extra"] = np.ones(1)
  with pytest.raises(PartitionError, match="extra"):
    jtl.partition.merge(t, f)


def test_merge_rejects_leaf_on_both_sides():
  p = params()
  labels = jtl.label_params(p, [("head/.*", "head"), (".*", None)])
  t, f = jtl.partition.split(p, labels)
  _, f_all = jtl.partition.split(p, jtl.label_params(p, [(".*", None)]))
  with pytest.raises(PartitionError, match="head/kernel"):
    jtl.partition.merge(t, f_all)


def test_summary_counts_and_table():
  p = params()
  labels = jtl.label_params(p, [("head/.*", "head"), (".*", "frozen")])
  s = jtl.summarize(p, labels)
  data = s.as_dict()
  assert data["labels"]["head"] == {"label": "head", "leaves": 2, "params": 90, "bytes": 360}
  assert data["labels"]["frozen"]["params"] == 3 * 3 * 3 * 8 + 8 + 3 * 3 * 8 * 8
  assert data["total_params"] == 90 + 224 + 576
  assert abs(data["trainable_percent"] - 100 * 90 / 890) < 1e-9
  text = str(s)
  assert "head" in text and "frozen" in text and "10.11%" in text


def test_frozen_module_paths():
  labels = jtl.label_params(params(), [("head/kernel", "head"), (".*", None)])
  assert jtl.partition.frozen_module_paths(labels) == {"backbone/block0/conv", "backbone/block1/conv"}


def test_frozen_module_paths_with_statistics_only_layers():
  """A BatchNorm without scale and offset has no params: it is frozen with
  its nearest ancestor that has params, given the model's state."""
  labels = jtl.label_params(params(), [("head/kernel", "head"), (".*", None)])
  stats = {"mean": np.zeros(8), "var": np.ones(8)}
  state = {"batch_stats": {"backbone": {"block0": {"bn": stats}, "bn": stats}, "top_bn": stats}}
  frozen = {"backbone/block0/conv", "backbone/block1/conv"}
  assert jtl.partition.frozen_module_paths(labels, state) == frozen | {
      "backbone/block0/bn", "backbone/bn"}  # top_bn: the root trains (its head)
  assert jtl.partition.frozen_module_paths(labels, {"params": params(), **state}) == frozen | {
      "backbone/block0/bn", "backbone/bn"}
  trained = jtl.label_params(params(), [("backbone/block1/.*", "top"), (".*", None)])
  assert jtl.partition.frozen_module_paths(trained, state) == {
      "backbone/block0/conv", "backbone/block0/bn", "head"}  # backbone/bn: block1 trains


class BackboneNnx(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, use_scale=False, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.dense(x))


class NetNnx(nnx.Module):
  def __init__(self, rngs):
    self.backbone = BackboneNnx(rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.backbone(x))


def test_frozen_module_paths_of_an_nnx_statistics_only_batchnorm():
  variables = jtl.adapter.variables_of(nnx.eval_shape(lambda: NetNnx(nnx.Rngs(0))))
  labels = jtl.label_params(variables, [("head/.*", "head"), (".*", None)])
  frozen = jtl.partition.frozen_module_paths(labels, {"state": variables["state"]})
  assert frozen == {"backbone/dense", "backbone/bn"}  # NnxModel.apply's frozen_paths


def test_label_params_of_flax_variables_labels_their_params():
  module = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True), nn.Dense(2)])
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.ones((1, 3)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  rules = [("layers_2/.*", "head"), (".*", None)]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every rule labels a parameter
    labels = jtl.label_params(variables, rules)
  assert labels == jtl.label_params(variables["params"], rules)
  assert jtl.tree.flatten(labels)["layers_2/kernel"] == "head"
  assert jtl.partition.summarize(variables, labels).trainable_params == 4 * 2 + 2
  tx = jtl.make_optimizer(labels)
  state = jtl.create_train_state(variables, labels, tx)
  assert set(jtl.tree.flatten(state.trainable)) >= {"layers_2/kernel", "layers_2/bias"}
