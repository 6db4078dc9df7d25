"""ResNet-18/50: torchvision layout, strict loads, parity with PyTorch."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from zoo_helpers import REF, layouts, zeros_like_model

from jtl import tree, weights
from jtl.errors import DataError, LoadError
from jtl.models import registry, resnet


@pytest.mark.parametrize("depth,keys,leaves", [(18, 122, 102), (50, 320, 267)])
def test_torchvision_state_dict_maps_completely(depth, keys, leaves):
  layout = layouts.torchvision_resnet(depth)
  assert len(layout) == keys
  sd = {k: np.zeros(s, np.int64 if kind == "count" else np.float32)
        for k, s, kind in layout}
  converted = resnet.convert_torch(sd)
  like = zeros_like_model(resnet.resnet(depth), resnet.example_input(1, 64), train=False)
  flat = tree.flatten(like)
  assert set(converted) == set(flat)
  assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in flat.items()}
  _, report = weights.load_pretrained(sd, like, converter=resnet.convert_torch)
  assert report.ok
  assert len(report.loaded) == leaves
  assert not report.unexpected and not report.missing and not report.adapted


def _load_random(depth, num_classes=1000):
  sd = layouts.random_arrays(layouts.torchvision_resnet(depth), seed={18: 1, 50: 2}[depth])  # as make_zoo_reference.py
  model = resnet.resnet(depth, num_classes)
  like = zeros_like_model(model, REF["images"][:1], train=False)
  variables, report = weights.load_pretrained(sd, like, converter=resnet.convert_torch)
  return model, variables, report


@pytest.fixture(scope="module")
def r18():
  """ResNet-18 with the reference weights; logits, features and the head-less
  model's output on the reference images, from one compiled function."""
  model, variables, _ = _load_random(18)
  bare = resnet.resnet(18, num_classes=0)

  @jax.jit
  def outputs(variables, x):
    no_head = {"params": {k: v for k, v in variables["params"].items() if k != "head"},
               "batch_stats": variables["batch_stats"]}
    return {"logits": model.apply(variables, x),
            "features": model.apply(variables, x, method=resnet.ResNet.features),
            "bare": bare.apply(no_head, x)}

  out = jax.tree.map(np.asarray, outputs(variables, REF["images"]))
  return model, variables, out


def _check_parity(logits, want):
  rel = np.abs(logits - want).max() / np.abs(want).max()
  assert rel < 2e-5, rel
  assert (logits.argmax(-1) == want.argmax(-1)).all()


def test_resnet18_logits_match_pytorch(r18):
  _check_parity(r18[2]["logits"], REF["resnet18_logits"])


def test_resnet50_logits_match_pytorch():
  model, variables, _ = _load_random(50)
  logits = np.asarray(jax.jit(model.apply)(variables, REF["images"]))
  _check_parity(logits, REF["resnet50_logits"])


def test_features_head_and_no_head(r18):
  _, variables, out = r18
  assert out["features"].shape == (2, 512) and out["features"].dtype == np.float32
  head = variables["params"]["head"]
  scale = np.abs(out["logits"]).max()
  np.testing.assert_allclose(out["logits"], out["features"] @ head["kernel"] + head["bias"],
                             atol=1e-5 * scale)
  np.testing.assert_array_equal(out["bare"], out["features"])


def test_batchnorm_takes_use_running_average_per_call():
  model, variables, _ = _load_random(18)
  x = REF["images"][:, :32, :32]
  seen = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      seen.append((context.module.use_running_average, kwargs.get("use_running_average")))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):  # the spy runs while jit traces
    _, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables)
  # 1 stem + 8 blocks x 2 + 3 downsample shortcuts.
  assert seen == [(None, False)] * 20
  # Train mode normalises with batch statistics and moves the running mean
  # 10% of the way towards them, as torch's momentum 0.1 does.
  x_nhwc = np.asarray(x, np.float64)
  kernel = variables["params"]["stem"]["conv"]["kernel"]
  conv = jax.lax.conv_general_dilated(x_nhwc, kernel.astype(np.float64), (2, 2),
                                      [(3, 3), (3, 3)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  before = variables["batch_stats"]["stem"]["bn"]["mean"]
  want = 0.9 * before + 0.1 * np.asarray(conv).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(updates["batch_stats"]["stem"]["bn"]["mean"], want,
                             rtol=1e-4, atol=1e-5)


def test_unknown_key_is_reported_by_strict_load():
  sd = {k: np.zeros(s, np.float32) for k, s, _ in layouts.torchvision_resnet(18)}
  sd["fc2.weight"] = np.zeros((3, 3), np.float32)
  like = zeros_like_model(resnet.resnet(18), resnet.example_input(1, 32), train=False)
  with pytest.raises(LoadError, match="fc2.weight"):
    weights.load_pretrained(sd, like, converter=resnet.convert_torch)


def test_new_head_is_reinitialised_and_the_rest_loaded():
  model, variables, report = _load_random(18, num_classes=7)
  assert {e.path for e in report.reinitialised} == {"params/head/kernel", "params/head/bias"}
  assert variables["params"]["head"]["kernel"].shape == (512, 7)
  sd = layouts.random_arrays(layouts.torchvision_resnet(18), seed=1)
  np.testing.assert_array_equal(variables["params"]["stem"]["conv"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_spec_groups_cover_every_param_in_order(name, blocks):
  spec = registry.get_spec(name)
  assert spec.pretrained == f"{name}/imagenet"
  assert spec.pretrained in weights.list_sources()
  assert spec.converter is resnet.convert_torch
  model = spec.build(num_classes=10)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), spec.example_input(1)))
  patterns = [p for _, p in spec.groups]
  names = [n for n, _ in spec.groups]
  assert names[0] == "stem" and names[-1] == "head" and len(names) == blocks + 2
  hit = {tree.first_match(p, patterns) for p in tree.flatten(params["params"])}
  assert None not in hit and hit == set(range(len(patterns)))


def test_preprocess_normalises_with_imagenet_constants():
  images = np.full((2, 8, 8, 3), 255, np.uint8)
  out = np.asarray(resnet.preprocess(images, size=4))
  assert out.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(out[0, 0, 0], (1 - resnet.IMAGENET_MEAN) / resnet.IMAGENET_STD,
                             rtol=1e-5)
  with pytest.raises(DataError, match=r"\(8, 8, 2\)"):  # grayscale and RGBA are taken
    resnet.preprocess(np.zeros((8, 8, 2), np.uint8))
