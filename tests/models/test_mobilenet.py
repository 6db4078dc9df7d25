"""MobileNetV2: torchvision layout converter and parity with a PyTorch port."""

from __future__ import annotations

import os
import zlib

import jax
import numpy as np
import pytest

from jtl import tree, weights
from jtl.errors import LoadError
from jtl.models import mobilenet, registry

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures",
                       "efficientnet_lite0_reference.npz")


def torchvision_mobilenet_v2_layout(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """The key names and shapes of torchvision's mobilenet_v2() state dict."""
  layout: dict[str, tuple[int, ...]] = {}

  def bn(prefix: str, c: int) -> None:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      layout[f"{prefix}.{leaf}"] = (c,)
    layout[f"{prefix}.num_batches_tracked"] = ()

  layout["features.0.0.weight"] = (32, 3, 3, 3)
  bn("features.0.1", 32)
  cin, idx = 32, 1
  for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
    for _ in range(n):
      p, hidden = f"features.{idx}.conv", cin * t
      if t == 1:
        layout[f"{p}.0.0.weight"] = (hidden, 1, 3, 3)
        bn(f"{p}.0.1", hidden)
        layout[f"{p}.1.weight"] = (c, hidden, 1, 1)
        bn(f"{p}.2", c)
      else:
        layout[f"{p}.0.0.weight"] = (hidden, cin, 1, 1)
        bn(f"{p}.0.1", hidden)
        layout[f"{p}.1.0.weight"] = (hidden, 1, 3, 3)
        bn(f"{p}.1.1", hidden)
        layout[f"{p}.2.weight"] = (c, hidden, 1, 1)
        bn(f"{p}.3", c)
      cin, idx = c, idx + 1
  layout["features.18.0.weight"] = (1280, 320, 1, 1)
  bn("features.18.1", 1280)
  layout["classifier.1.weight"] = (num_classes, 1280)
  layout["classifier.1.bias"] = (num_classes,)
  return layout


def mobilenet_weight(key: str, shape: tuple[int, ...]) -> np.ndarray:
  """Same seeded weights as tests/fixtures/make_efficientnet_reference.py."""
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  leaf = key.rsplit(".", 1)[-1]
  if leaf == "num_batches_tracked":
    return np.zeros(shape, np.int64)
  if leaf in ("running_var",) or (leaf == "weight" and len(shape) == 1):
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if leaf in ("running_mean", "bias"):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  fan_in = int(np.prod(shape[1:]))
  return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _state_dict(num_classes: int = 1000) -> dict[str, np.ndarray]:
  return {k: mobilenet_weight(k, s)
          for k, s in torchvision_mobilenet_v2_layout(num_classes).items()}


def _like(num_classes: int = 1000):
  """Variables of the right structure without compiling `init`."""
  shapes = jax.eval_shape(mobilenet.mobilenet_v2(num_classes).init,
                          jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  return jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)


def test_layout_matches_the_pytorch_port_of_the_fixture():
  ref = np.load(FIXTURE)
  layout = torchvision_mobilenet_v2_layout()
  assert list(layout) == [str(k) for k in ref["mobilenet_keys"]]
  assert [",".join(map(str, s)) for s in layout.values()] == [
      str(s) for s in ref["mobilenet_shapes"]]
  assert len(layout) == 314
  assert sum(int(np.prod(s)) for k, s in layout.items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
             ) == 3_504_872


def test_every_key_maps_and_strict_load_is_clean():
  sd = _state_dict()
  converted = mobilenet.convert_torch(sd)
  like = _like()
  flat_like = tree.flatten(like)
  assert set(converted) == set(flat_like)
  for path, value in converted.items():
    assert value.shape == flat_like[path].shape, path
  variables, report = weights.load_pretrained(sd, like=like, converter=mobilenet.convert_torch)
  assert report.ok and not report.missing and not report.unexpected
  assert len(report.loaded) == len(flat_like) == 262
  np.testing.assert_array_equal(variables["params"]["blocks_1"]["dw"]["kernel"][:, :, 0, 5],
                                sd["features.2.conv.1.0.weight"][5, 0])


def test_logits_match_pytorch_port():
  ref = np.load(FIXTURE)
  like = _like()
  variables, _ = weights.load_pretrained(_state_dict(), like=like,
                                            converter=mobilenet.convert_torch)
  x = np.random.default_rng(1).standard_normal((2, 96, 96, 3)).astype(np.float32)
  model = mobilenet.mobilenet_v2()
  logits = np.asarray(jax.jit(model.apply)(variables, x))
  expected = ref["mobilenet_logits"]
  scale = np.abs(expected).max()
  assert np.abs(logits - expected).max() < 1e-4 * max(scale, 1.0), (
      np.abs(logits - expected).max(), scale)


def test_new_head_is_reinitialised_and_bad_keys_are_reported():
  sd = _state_dict()
  like10 = _like(10)
  variables, report = weights.load_pretrained(sd, like=like10, converter=mobilenet.convert_torch)
  assert {e.path for e in report.reinitialised} == {"params/head/kernel", "params/head/bias"}
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                like10["params"]["head"]["kernel"])
  sd["features.5.conv.9.weight"] = np.zeros((3,), np.float32)
  del sd["features.3.conv.1.1.running_var"]
  with pytest.raises(LoadError) as e:
    weights.load_pretrained(sd, like=_like(), converter=mobilenet.convert_torch)
  assert "batch_stats/blocks_2/dw_bn/var" in str(e.value)
  assert "features.5.conv.9.weight" in str(e.value)


def test_features_groups_and_shapes():
  model = mobilenet.mobilenet_v2(num_classes=0)
  x = np.zeros((1, 32, 32, 3), np.float32)
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert jax.eval_shape(model.apply, v, x).shape == (1, 1280)
  spec = registry.get_spec("mobilenet_v2")
  names = [n for n, _ in spec.groups]
  assert names[0] == "stem" and names[-1] == "head" and len(names) == 20
  for path in tree.flatten(v["params"]):
    hits = [n for n, rx in spec.groups if tree.first_match(path, [rx]) is not None]
    assert len(hits) == 1, (path, hits)
  x = mobilenet.preprocess(np.full((50, 60, 3), 255, np.uint8), size=16)
  np.testing.assert_allclose(x[0, 0, 0], (1 - mobilenet.IMAGENET_MEAN) / mobilenet.IMAGENET_STD,
                             rtol=1e-5)
