"""A zoo model built smaller with model_kwargs (a ViT / DINOv2 with depth=2, a
VGG with 2 blocks) has the layer groups of its blocks as built: partial,
gradual unfreezing and layer-wise decay see them, not the registered depth's."""

import jax
import numpy as np
import pytest

from jtl import models, partition
from jtl.models import registry
from jtl.recipes import strategies

TINY_VIT = dict(depth=2, width=16, mlp_dim=32, num_heads=2, image_size=32)


def _built(name, **kwargs):
  """(module, variables as numpy) without an init (shapes only: no compile)."""
  spec = models.get_spec(name)
  module = spec.build(num_classes=3, **kwargs)
  shapes = registry.abstract_variables(spec, module)
  rng = np.random.default_rng(0)
  return module, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def vit():
  return _built("vit_ti16", **TINY_VIT)


@pytest.mark.slow  # an init: about 3 s on quiet cores
def test_create_gives_the_spec_with_the_groups_of_the_built_blocks():
  names = [g for g, _ in models.create("vit_ti16", pretrained=False, num_classes=3,
                                       **TINY_VIT).spec.groups]
  assert names == ["embedding", "encoderblock_0", "encoderblock_1", "encoder_norm", "head"]


def test_the_groups_are_those_of_the_built_blocks(vit):
  names = [g for g, _ in registry.layer_groups(models.get_spec("vit_ti16"), vit[1]["params"])]
  assert names == ["embedding", "encoderblock_0", "encoderblock_1", "encoder_norm", "head"]
  dino = registry.layer_groups(models.get_spec("dinov2_s14"), _built(
      "dinov2_s14", depth=3, width=16, num_heads=2, image_size=28)[1]["params"])
  assert [g for g, _ in dino][1:4] == ["encoderblock_0", "encoderblock_1", "encoderblock_2"]
  assert len(dino) == 6
  vgg = registry.layer_groups(models.get_spec("vgg16"), _built(
      "vgg16", blocks=((1, 4), (1, 8)))[1]["params"])
  assert [g for g, _ in vgg] == ["block1", "block2", "fc6", "fc7", "head"]


def _trainable_blocks(strategy, labels=None):
  trainable, _ = partition.split(strategy.variables["params"],
                                 strategy.labels if labels is None else labels)
  blocks = trainable["Transformer"]
  return sorted(k for k, v in blocks.items()
                if k.startswith("encoderblock_") and jax.tree.leaves(v))


def test_strategies_see_the_blocks_a_depth_2_vit_has(vit):
  module, variables = vit
  registered = models.get_spec("vit_ti16")  # 12 block groups: the builder derives the 2
  assert len(registered.groups) == 15
  partial = strategies.build({"name": "partial", "num_blocks": 2}, module, variables,
                             registered)
  # The 2 groups below the head: encoder_norm and the last block. Before, the
  # last block was encoderblock_11, which does not exist: both blocks froze.
  assert _trainable_blocks(partial) == ["encoderblock_1"]
  gradual = strategies.build({"name": "gradual", "steps_per_stage": 1, "max_blocks": 3},
                             module, variables, registered)
  stages = [_trainable_blocks(gradual, partition.label_params(
      gradual.variables["params"], list(p.rules))) for p in gradual.phases]
  assert stages == [[], [], ["encoderblock_1"], ["encoderblock_0", "encoderblock_1"]]


def test_layer_decay_scales_follow_the_built_blocks(vit):
  module, variables = vit
  llrd = strategies.build({"name": "llrd", "layer_decay": 0.5}, module, variables,
                          models.get_spec("vit_ti16"))
  tx = llrd.make_optimizer(learning_rate=1.0, optimizer="sgd")
  params = llrd.variables["params"]
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  scale = lambda *path: abs(float(np.ravel(
      jax.tree.leaves(_get(updates, path))[0])[0]))
  # timm's param_groups_layer_decay (and BEiT's, MAE's): the final norm at the
  # head's rate 1, block 1 1/2, block 0 1/4, embedding 1/8.
  got = [scale("Transformer", "encoder_norm") / scale("head")]
  got += [scale("Transformer", f"encoderblock_{i}") / scale("head") for i in (1, 0)]
  np.testing.assert_allclose(got + [scale("embedding") / scale("head")],
                             [1.0, 0.5, 0.25, 0.125], rtol=1e-6)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree
