"""Gradient checkpointing (`remat` model option): the same params and the same
gradients as the plain model; the transformers' blocks run as one
checkpointed scan (`jtl.models.remat`), which keeps less memory on every
backend; with dropout and stochastic depth its gradients are those of its
own masks."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jtl.app import preflight
from jtl.models import bert, dinov2, registry, vit

# No dropout: the scanned blocks draw their masks per block from the step's
# key, the plain model per module name (`test_remat_dropout_gradients_...`).
TINY_VIT = dict(patch_size=4, width=16, depth=2, mlp_dim=32, num_heads=2, image_size=8)
TINY_DINO = dict(patch_size=4, width=16, depth=2, num_heads=2, image_size=8)
TINY_BERT = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=32, max_position=16, dropout=0.0,
                            attention_dropout=0.0)
IMAGES = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
TEXT = {"input_ids": jax.random.randint(jax.random.PRNGKey(2), (4, 6), 0, 50),
        "attention_mask": jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] * 2 + [0] * 4])}
CASES = {
    "vit": (lambda remat: vit.ViT(num_classes=3, remat=remat, **TINY_VIT), IMAGES),
    "dinov2": (lambda remat: dinov2.Dinov2(num_classes=3, remat=remat, **TINY_DINO), IMAGES),
    "bert": (lambda remat: bert.Bert(num_classes=3, config=TINY_BERT, remat=remat), TEXT),
}


def loss_fn(module, variables, inputs):
  labels = jnp.arange(4) % 3

  def loss(params):
    logits = module.apply({**variables, "params": params}, inputs, train=True,
                          rngs={"dropout": jax.random.PRNGKey(7)})
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels])
  return loss


def grads(module, variables, inputs):
  return jax.jit(jax.value_and_grad(loss_fn(module, variables, inputs)))(variables["params"])


def test_remat_scans_the_blocks_with_the_plain_gradients_and_less_memory():
  """ViT (and so DINOv2's encoder): the blocks are one scanned loop in the
  train step (a while loop in the program), the gradients are the plain
  model's, and the compiled step's temporary memory drops (XLA:CPU keeps
  every activation of per-block `nn.remat`; BENCHMARKS.md)."""
  kw = dict(patch_size=4, width=32, depth=3, mlp_dim=128, num_heads=2, image_size=16)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3))
  plain, checkpointed = vit.ViT(num_classes=0, **kw), vit.ViT(num_classes=0, remat=True, **kw)
  variables = plain.init(jax.random.PRNGKey(0), x)
  steps, temp = {}, {}
  for name, module in (("plain", plain), ("remat", checkpointed)):
    step = jax.jit(jax.value_and_grad(lambda p, m=module: jnp.mean(
        m.apply({"params": p}, x, train=True) ** 2)))
    compiled = step.lower(variables["params"]).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
    steps[name] = compiled(variables["params"])
  assert "while" in jax.jit(lambda p: checkpointed.apply({"params": p}, x, train=True)).lower(
      variables["params"]).as_text()
  (loss, g), (loss_r, g_r) = steps["plain"], steps["remat"]
  np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
  for (path, a), (_, b) in zip(jax.tree.leaves_with_path(g), jax.tree.leaves_with_path(g_r),
                               strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert temp["remat"] < 0.7 * temp["plain"], temp  # -43% here; per-block nn.remat: 0%


@pytest.mark.parametrize("name", ["vit", pytest.param("bert", marks=pytest.mark.slow)])
def test_remat_dropout_gradients_are_those_of_its_masks(name):
  """With dropout and stochastic depth on, the recomputed blocks use the
  forward pass's masks: the gradient matches a central finite difference of
  the same (fixed-key) loss along it."""
  build, inputs = CASES[name]
  model = build(True).clone(**(
      {"dropout": 0.2, "drop_path_rate": 0.3} if name == "vit" else
      {"config": dataclasses.replace(TINY_BERT, dropout=0.2, attention_dropout=0.2)}))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), inputs)
  variables = {**variables, "params": jax.jit(lambda params: jax.tree.map(  # a nonzero head
      lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(3), a.shape), params))(
          variables["params"])}
  loss = loss_fn(model, variables, inputs)
  value, g = jax.jit(jax.value_and_grad(loss))(variables["params"])
  norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
  eps = 1e-2
  shifted = jax.jit(lambda s: loss(jax.tree.map(lambda p, d: p + s * eps * d / norm,
                                                 variables["params"], g)))
  directional = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
  np.testing.assert_allclose(directional, norm, rtol=2e-2)
  plain = build(False).clone(**{k: getattr(model, k) for k in ("dropout", "drop_path_rate")}
                             ) if name == "vit" else None
  if plain is not None:  # dropout is on: the plain model's masks are others
    assert not np.isclose(value, jax.jit(loss_fn(plain, variables, inputs))(variables["params"]))


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


@pytest.mark.slow  # 11 s; the float32 scan test stays in the fast set
def test_remat_under_mixed_precision_trains_like_the_plain_model():
  """bfloat16 compute (`compute_dtype`): BERT's first layer turns the
  bfloat16 embeddings into float32 states, so it runs before the scanned
  loop (whose carry keeps one type); the step's loss is the plain model's."""
  import jtl
  build, inputs = CASES["bert"]
  variables = build(False).init(jax.random.PRNGKey(0), inputs)
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-3, optimizer="adamw")
  batch = {"inputs": inputs, "label": jnp.arange(4) % 3}
  losses = []
  for remat in (False, True):
    step = jtl.make_train_step(build(remat), tx, labels=labels, compute_dtype=jnp.bfloat16)
    _, metrics = jax.jit(step)(jtl.create_train_state(variables, labels, tx), batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
