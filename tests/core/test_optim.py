import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtl
from jtl.errors import OptimizerError


def params():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  return {"body": {"kernel": jax.random.normal(k[0], (64, 64)), "bias": jnp.zeros(64)},
          "head": {"kernel": jax.random.normal(k[1], (64, 10)), "bias": jnp.zeros(10)}}


def labels_head_only(p):
  return jtl.label_params(p, [("head/.*", "head"), (".*", "frozen")])


@pytest.mark.parametrize("name,buffers", [("adam", 2), ("adamw", 2), ("sgd", 0), ("lion", 1)])
def test_optimizer_state_only_for_trainable(name, buffers):
  p = params()
  labels = labels_head_only(p)
  tx = jtl.make_optimizer(labels, learning_rate=1e-3, optimizer=name, weight_decay=1e-4,
                          clip_norm=1.0)
  trainable, _ = jtl.partition.split(p, labels)
  state = tx.init(trainable)
  trainable_bytes = (64 * 10 + 10) * 4
  counters = jtl.optim.tree_bytes(state) - buffers * trainable_bytes
  assert 0 <= counters <= 16, (name, jtl.optim.tree_bytes(state))
  # And the full-model state would be 100x larger: the frozen body is absent.
  assert jtl.optim.tree_bytes(state) < 0.2 * buffers * jtl.optim.tree_bytes(p) + 16


def test_clipping_reads_trainable_grads_only():
  p = params()
  labels = labels_head_only(p)
  tx = jtl.make_optimizer(labels, learning_rate=1.0, optimizer="sgd", clip_norm=1.0)
  trainable, _ = jtl.partition.split(p, labels)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  # Head grad norm = 0.01 * sqrt(650) < 1: no clipping, update equals -grad.
  np.testing.assert_allclose(updates["head"]["kernel"], -0.01, rtol=1e-6)
  big = jax.tree.map(lambda x: jnp.full_like(x, 10.0), trainable)
  updates, _ = tx.update(big, tx.init(trainable), trainable)
  assert abs(float(optax.tree.norm(updates)) - 1.0) < 1e-5


def test_weight_decay_touches_trainable_matrices_only():
  p = params()
  labels = labels_head_only(p)
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd", weight_decay=0.5)
  trainable, _ = jtl.partition.split(p, labels)
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  updates, _ = tx.update(zeros, tx.init(trainable), trainable)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.05 * p["head"]["kernel"], rtol=1e-5)
  np.testing.assert_array_equal(updates["head"]["bias"], 0.0)  # ndim 1: not decayed
  assert updates["body"]["kernel"] is None


def test_lr_multipliers_scale_each_label():
  p = params()
  labels = jtl.label_params(p, [("head/.*", "head"), ("body/.*", "body")])
  tx = jtl.make_optimizer(labels, learning_rate=1.0, optimizer="sgd",
                          lr_multipliers={"body": 0.1})
  grads = jax.tree.map(jnp.ones_like, p)
  updates, _ = tx.update(grads, tx.init(p), p)
  np.testing.assert_allclose(updates["body"]["kernel"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -1.0, rtol=1e-6)


def test_per_label_optimizers_and_errors_show_both_sides():
  p = params()
  labels = jtl.label_params(p, [("head/.*", "head"), ("body/.*", "body")])
  tx = jtl.make_optimizer(labels, per_label={"head": optax.sgd(1.0), "body": optax.sgd(0.5)})
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
  np.testing.assert_allclose(updates["body"]["bias"], -0.5)
  with pytest.raises(OptimizerError, match=r"Trainable labels with no entry: \['body'\]"):
    jtl.make_optimizer(labels, per_label={"head": optax.sgd(1.0)})
  with pytest.raises(OptimizerError, match=r"'hed'"):
    jtl.make_optimizer(labels, lr_multipliers={"hed": 2.0})
  with pytest.raises(OptimizerError, match="nothing to optimize"):
    jtl.make_optimizer(jtl.label_params(p, [(".*", None)]))
  with pytest.raises(OptimizerError, match="Unknown optimizer 'adamm'"):
    jtl.make_optimizer(labels, optimizer="adamm")


def test_scale_by_tree_per_slice():
  updates = {"stack": jnp.ones((3, 2, 2))}
  tx = jtl.optim.scale_by_tree({"stack": jnp.array([0.25, 0.5, 1.0]).reshape(3, 1, 1)})
  out, _ = tx.update(updates, tx.init(updates))
  np.testing.assert_allclose(out["stack"][:, 0, 0], [0.25, 0.5, 1.0])
