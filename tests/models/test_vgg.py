"""VGG-16: torchvision layout, strict load, fc6 reordering, adaptive pooling."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from zoo_helpers import layouts

from jtl import tree, weights
from jtl.models import registry, vgg


def test_torchvision_state_dict_maps_completely():
  layout = layouts.torchvision_vgg16()
  assert len(layout) == 32
  sd = {k: np.zeros(s, np.float32) for k, s, _ in layout}
  shapes = jax.eval_shape(lambda: vgg.VGG().init(jax.random.PRNGKey(0), vgg.example_input(1)))
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  converted = vgg.convert_torch(sd)
  flat = tree.flatten(like)
  assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in flat.items()}
  assert sum(v.size for v in converted.values()) == 138_357_544
  _, report = weights.load_pretrained(sd, like, converter=vgg.convert_torch)
  assert report.ok and len(report.loaded) == 32


def test_fc6_rows_follow_the_channel_last_flatten():
  # torch flattens the pooled 512x7x7 map channel-first; our kernel must give
  # the same fc6 output on the channel-last flatten of the same map.
  rng = np.random.RandomState(0)
  w = rng.normal(size=(5, 512 * 49)).astype(np.float32)
  fmap = rng.normal(size=(2, 7, 7, 512)).astype(np.float32)
  kernel = vgg.convert_torch({"classifier.0.weight": w})["params/fc6/kernel"]
  torch_out = fmap.transpose(0, 3, 1, 2).reshape(2, -1) @ w.T
  np.testing.assert_allclose(fmap.reshape(2, -1) @ kernel, torch_out, rtol=1e-4, atol=1e-3)
  # And the conv kernels go OIHW -> HWIO.
  conv = rng.normal(size=(64, 3, 3, 3)).astype(np.float32)
  out = vgg.convert_torch({"features.0.weight": conv})["params/block1/conv1/kernel"]
  assert out[2, 1, 0, 7] == conv[7, 0, 2, 1]


@pytest.mark.parametrize("size,want", [
    (7, np.eye(7)),
    (14, np.kron(np.eye(7), [[0.5, 0.5]])),
    (1, np.ones((7, 1))),
])
def test_adaptive_pool_matrix_like_torch(size, want):
  np.testing.assert_allclose(vgg.adaptive_pool_matrix(size, 7), want)


def test_adaptive_pool_overlapping_windows():
  # torch: window i covers [floor(i*9/7), ceil((i+1)*9/7)).
  m = vgg.adaptive_pool_matrix(9, 7)
  starts = [int(np.flatnonzero(row)[0]) for row in m]
  ends = [int(np.flatnonzero(row)[-1]) + 1 for row in m]
  assert starts == [0, 1, 2, 3, 5, 6, 7] and ends == [2, 3, 4, 6, 7, 8, 9]
  np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
  x = np.arange(2 * 9 * 9 * 3, dtype=np.float32).reshape(2, 9, 9, 3)
  out = np.asarray(vgg.adaptive_avg_pool(x, 7))
  np.testing.assert_allclose(out[1, 4, 6], x[1, 5:7, 7:9].mean(axis=(0, 1)), rtol=1e-6)


def test_small_vgg_forward_features_and_head():
  # Narrow blocks keep this fast; fc6/fc7 keep their 4096 width.
  model = vgg.VGG(num_classes=3, blocks=((1, 4), (1, 8)))
  x = np.random.RandomState(1).normal(size=(2, 16, 16, 3)).astype(np.float32)

  # numpy weights: compiling jax's random init costs more than the test.
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  rng = np.random.RandomState(2)
  variables = jax.tree.map(
      lambda s: (rng.normal(size=s.shape) / np.sqrt(s.shape[0] if len(s.shape) == 2 else 9)
                 ).astype(np.float32), shapes)

  @jax.jit
  def run(variables, key):
    return (model.apply(variables, x), model.apply(variables, x, method=vgg.VGG.features),
            model.apply(variables, x, train=True, rngs={"dropout": key}))

  logits, feats, train_logits = map(np.asarray, run(variables, jax.random.key(0, impl="rbg")))
  assert variables["params"]["fc6"]["kernel"].shape == (7 * 7 * 8, 4096)
  assert logits.shape == (2, 3) and feats.shape == (2, 4096)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-5)
  assert np.abs(train_logits - logits).max() > 1e-4  # dropout is on in training


def test_spec():
  spec = registry.get_spec("vgg16")
  assert spec.pretrained == "vgg16/imagenet" and spec.pretrained in weights.list_sources()
  names = [n for n, _ in spec.groups]
  assert names == ["block1", "block2", "block3", "block4", "block5", "fc6", "fc7", "head"]
  shapes = jax.eval_shape(lambda: spec.build(num_classes=10).init(
      jax.random.PRNGKey(0), spec.example_input(1)))
  patterns = [p for _, p in spec.groups]
  hit = [tree.first_match(p, patterns) for p in tree.flatten(shapes["params"])]
  assert None not in hit and set(hit) == set(range(len(patterns)))
