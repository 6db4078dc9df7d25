"""EfficientNet-Lite0: real ImageNet weights, real photos, parity with PyTorch."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest
import skimage.data

from jtl import tree, weights
from jtl.errors import DataError, LoadError
from jtl.models import efficientnet, registry

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures",
                       "efficientnet_lite0_reference.npz")


def _center_crop(img: np.ndarray, size: int = 224) -> np.ndarray:
  h, w = img.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return img[top:top + size, left:left + size]


def _zeros_like_init(model, size: int = 32):
  """Variables of the right structure without compiling `init`."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          np.zeros((1, size, size, 3), np.float32))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@functools.lru_cache(maxsize=1)
def _pretrained():
  model = efficientnet.efficientnet_lite0()
  path = weights.resolve("efficientnet_lite0/imagenet")
  variables, report = weights.load_pretrained(
      weights.read(path), like=_zeros_like_init(model),
      converter=efficientnet.convert_torch)
  return model, variables, report


def _center_crops() -> np.ndarray:
  noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
  return np.stack([_center_crop(skimage.data.chelsea()),
                   _center_crop(skimage.data.coffee()), noise])


@functools.lru_cache(maxsize=1)
def _logits() -> dict[str, np.ndarray]:
  """One compiled forward pass for all the real-weight tests."""
  model, variables, _ = _pretrained()
  photos = np.concatenate([efficientnet.preprocess(skimage.data.chelsea()),
                           efficientnet.preprocess(skimage.data.coffee())])
  x = np.concatenate([photos, efficientnet.preprocess(_center_crops(), size=None)])
  logits = np.asarray(jax.jit(model.apply)(variables, x))
  return {"photos": logits[:2], "crops": logits[2:]}


def test_every_checkpoint_tensor_loads_strictly():
  _, variables, report = _pretrained()
  assert report.ok
  assert len(report.loaded) == 247  # 296 keys - 49 num_batches_tracked
  assert not report.missing and not report.unexpected and not report.mismatched
  n = sum(v.size for v in jax.tree.leaves(variables["params"]))
  assert n == 4_652_008


def test_real_photos_are_classified():
  logits = _logits()["photos"]
  cat_top5 = set(np.argsort(-logits[0])[:5])
  assert cat_top5 & {281, 282, 283, 284, 285}, cat_top5
  assert int(np.argmax(logits[1])) == 967  # espresso


def test_logits_match_pytorch_reference():
  ref = np.load(FIXTURE)
  np.testing.assert_array_equal(_center_crops().reshape(3, -1).astype(np.int64).sum(1),
                                ref["efficientnet_input_sums"])
  logits = _logits()["crops"]
  diff = np.abs(logits - ref["efficientnet_logits"]).max()
  assert diff < 1e-3, diff
  np.testing.assert_array_equal(logits.argmax(1), ref["efficientnet_logits"].argmax(1))


def test_features_head_and_groups():
  spec = registry.get_spec("efficientnet_lite0")
  x = np.zeros((2, 32, 32, 3), np.float32)
  headless = efficientnet.efficientnet_lite0(num_classes=0)
  v0 = jax.eval_shape(headless.init, jax.random.PRNGKey(0), x)
  assert "head" not in v0["params"]
  assert jax.eval_shape(headless.apply, v0, x).shape == (2, 1280)
  full = efficientnet.efficientnet_lite0(num_classes=7)
  v7 = jax.eval_shape(full.init, jax.random.PRNGKey(0), x)
  feats = jax.eval_shape(functools.partial(
      full.apply, method=efficientnet.EfficientNetLite.features), v7, x)
  assert feats.shape == (2, 1280)
  assert v7["params"]["head"]["kernel"].shape == (1280, 7)
  names = [n for n, _ in spec.groups]
  assert names[0] == "stem" and names[-2:] == ["top", "head"] and len(names) == 19
  for path in tree.flatten(v7["params"]):  # each parameter in exactly one group
    hits = [n for n, rx in spec.groups if tree.first_match(path, [rx]) is not None]
    assert len(hits) == 1, (path, hits)


def test_train_mode_updates_batch_stats_and_drops_paths():
  model = efficientnet.EfficientNetLite(
      num_classes=3, stages=((2, 3, 1, 1, 16),), top_channels=8,
      drop_connect_rate=0.9, dropout_rate=0.0)
  x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

  @jax.jit
  def train_apply(variables, rng):
    return model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": rng})

  (a, upd), (b, _) = train_apply(variables, jax.random.PRNGKey(1)), train_apply(
      variables, jax.random.PRNGKey(2))
  assert a.shape == (4, 3)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-6  # drop path is random
  before = variables["batch_stats"]["stem"]["bn"]["mean"]
  after = upd["batch_stats"]["stem"]["bn"]["mean"]
  assert np.abs(after - before).max() > 0


def test_converter_passes_unknown_keys_for_strict_report():
  sd = dict(weights.read(weights.resolve("efficientnet_lite0/imagenet")))
  sd["_blocks.99._depthwise_conv.weight"] = np.zeros((8, 1, 3, 3), np.float32)
  del sd["_fc.bias"]
  _, like, _ = _pretrained()
  with pytest.raises(LoadError) as e:
    weights.load_pretrained(sd, like=like, converter=efficientnet.convert_torch)
  assert "params/head/bias" in str(e.value) and "blocks_99" in str(e.value)


def test_preprocess_rejects_bad_shapes():
  with pytest.raises(DataError, match=r"\(2, 4, 4, 5\)"):
    efficientnet.preprocess(np.zeros((2, 4, 4, 5), np.uint8))
  x = efficientnet.preprocess(np.full((300, 400, 3), 255, np.uint8), size=64)
  assert x.shape == (1, 64, 64, 3)
  np.testing.assert_allclose(x, 1.0, atol=1e-5)  # (255 - 127) / 128


@pytest.mark.slow  # 9 s; tests/core/test_model_kinds checks Linen/NNX twins fast
def test_nnx_from_the_zoo_gives_the_linen_logits_and_fine_tunes():
  import jtl
  from jtl import models
  created = models.create("efficientnet_lite0", num_classes=None, api="nnx")
  photo = efficientnet.preprocess(skimage.data.chelsea())
  from flax import nnx
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(created.module, photo))
  np.testing.assert_allclose(logits, _logits()["photos"][:1], atol=1e-4)
  assert int(np.argmax(logits)) in {281, 282, 283, 284, 285}
  # Fine-tuned through the same calls: frozen stem BatchNorm statistics stay put.
  model = created.module
  labels = jtl.label_params(model, [(r"head/.*", "head"), (r"blocks_15/.*", "top"),
                                    (r".*", "frozen")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-3)
  state = jtl.create_train_state(model, labels, tx)
  x = np.concatenate([efficientnet.preprocess(skimage.data.chelsea(), size=64)] * 2)
  state, metrics = jax.jit(jtl.make_train_step(model, tx, labels=labels))(
      state, {"inputs": x, "label": np.array([281, 281])})
  before = jtl.adapter.variables_of(model)["state"]
  after = jax.device_get(state.model_state["state"])
  np.testing.assert_array_equal(after["stem"]["bn"]["mean"], before["stem"]["bn"]["mean"])
  assert not np.allclose(after["blocks_15"]["project_bn"]["mean"],
                         before["blocks_15"]["project_bn"]["mean"])
  assert np.isfinite(metrics["loss"])


# Full-size inference of two more ImageNet models (~6 s of CPU each): make
# test-all. Lite0's real photos and strict load stay in the default run.
@pytest.mark.slow
@pytest.mark.parametrize("n,params", [(1, 5_416_680), (2, 6_092_072)])
def test_lite1_lite2_real_weights_classify_real_photos(n, params):
  """Lite1/Lite2 from their pip packages: strict load, cat and espresso."""
  spec = registry.get_spec(f"efficientnet_lite{n}")
  model = spec.build(num_classes=1000)
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      model.init, jax.random.PRNGKey(0), spec.example_input(1)))
  variables, report = weights.load_pretrained(
      f"efficientnet_lite{n}/imagenet", like=like, converter=spec.converter)
  assert report.ok and len(report.loaded) == 322  # 386 keys - 64 num_batches_tracked
  assert sum(v.size for v in jax.tree.leaves(variables["params"])) == params
  x = np.concatenate([spec.preprocess(skimage.data.chelsea()),
                      spec.preprocess(skimage.data.coffee())])
  assert x.shape == (2, spec.image_size, spec.image_size, 3)
  logits = np.asarray(jax.jit(model.apply)(variables, x))
  cat_top5 = set(np.argsort(-logits[0])[:5].tolist())
  assert cat_top5 & {281, 282, 283, 284, 285}, cat_top5
  assert int(np.argmax(logits[1])) == 967  # espresso
