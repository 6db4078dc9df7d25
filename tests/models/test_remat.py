"""Gradient checkpointing (`remat` model option): the same params and the same
gradients as the plain model, dropout and stochastic depth included."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jtl.app import preflight
from jtl.models import bert, dinov2, registry, vit

TINY_VIT = dict(patch_size=4, width=16, depth=2, mlp_dim=32, num_heads=2, image_size=8,
                dropout=0.1, drop_path_rate=0.2)
TINY_DINO = dict(patch_size=4, width=16, depth=2, num_heads=2, image_size=8, dropout=0.1,
                 drop_path_rate=0.2)
TINY_BERT = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=32, max_position=16)
IMAGES = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
TEXT = {"input_ids": jax.random.randint(jax.random.PRNGKey(2), (4, 6), 0, 50),
        "attention_mask": jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] * 2 + [0] * 4])}
CASES = {
    "vit": (lambda remat: vit.ViT(num_classes=3, remat=remat, **TINY_VIT), IMAGES),
    "dinov2": (lambda remat: dinov2.Dinov2(num_classes=3, remat=remat, **TINY_DINO), IMAGES),
    "bert": (lambda remat: bert.Bert(num_classes=3, config=TINY_BERT, remat=remat), TEXT),
}


def grads(module, variables, inputs):
  labels = jnp.arange(4) % 3

  def loss(params):
    logits = module.apply({**variables, "params": params}, inputs, train=True,
                          rngs={"dropout": jax.random.PRNGKey(7)})
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels])
  return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.slow  # zoo models at full width: make test-all
@pytest.mark.parametrize("name", sorted(CASES))
def test_remat_gives_the_plain_models_params_and_gradients(name):
  build, inputs = CASES[name]
  plain, checkpointed = build(False), build(True)
  variables = plain.init(jax.random.PRNGKey(0), inputs)
  # Same parameter tree: a remat run's checkpoints and pretrained weights are interchangeable.
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.PRNGKey(0), inputs))
  assert shapes(plain) == shapes(checkpointed)
  (loss, g), (loss_r, g_r) = grads(plain, variables, inputs), grads(checkpointed, variables, inputs)
  np.testing.assert_allclose(loss, loss_r, atol=1e-6)
  flat, flat_r = jax.tree.leaves_with_path(g), jax.tree.leaves_with_path(g_r)
  assert [p for p, _ in flat] == [p for p, _ in flat_r]
  assert any(float(jnp.abs(x).max()) > 1e-4 for _, x in flat)  # the gradients are not all ~0
  for (path, a), (_, b) in zip(flat, flat_r, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("model", ["vit_ti16", "dinov2_s14", "minilm_l6", "resnet18"])
def test_remat_is_a_model_kwargs_option(model):
  spec = registry.get_spec(model)
  assert "remat" in preflight.model_options(spec)
  config = ml_collections.ConfigDict({"model": model, "model_kwargs": {"remat": True}})
  assert preflight.model_kwargs_problems(config, spec) == []
  assert spec.build(num_classes=2, remat=True).remat is True


@pytest.mark.slow  # zoo model at full width: make test-all
def test_resnet_remat_trains_like_the_plain_model_with_frozen_batchnorm():
  """One train step of jtl's: params and BatchNorm statistics as the plain
  model's; a frozen block's BatchNorm keeps its statistics under remat too."""
  import jtl
  from jtl.models import resnet
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 16, 16, 3))
  batch = {"inputs": x, "label": jnp.arange(4) % 3}
  states = []
  for remat in (False, True):
    module = resnet.ResNet(num_classes=3, stage_sizes=(1, 1), remat=remat)
    variables = resnet.ResNet(num_classes=3, stage_sizes=(1, 1)).init(jax.random.PRNGKey(0), x)
    labels = jtl.label_params(variables["params"], [("layer1_0/.*", "frozen"), (".*", "all")])
    tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd")
    state = jtl.create_train_state(variables, labels, tx)
    state, _ = jax.jit(jtl.make_train_step(module, tx, labels=labels))(state, batch)
    states.append(state)
  plain, checkpointed = states
  for a, b in zip(jax.tree.leaves(plain.variables), jax.tree.leaves(checkpointed.variables),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  frozen = variables["batch_stats"]["layer1_0"]["bn1"]["mean"]
  np.testing.assert_array_equal(checkpointed.model_state["batch_stats"]["layer1_0"]["bn1"]["mean"],
                                frozen)
  assert not np.allclose(checkpointed.model_state["batch_stats"]["layer2_0"]["bn1"]["mean"],
                         variables["batch_stats"]["layer2_0"]["bn1"]["mean"])
