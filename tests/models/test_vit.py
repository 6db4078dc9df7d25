"""ViT: both published .npz layouts, position-embedding resize, parity with PyTorch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from zoo_helpers import REF, layouts, zeros_like_model

from jtl import tree, weights
from jtl.weights.adapt import resize_pos_embed
from jtl.errors import LoadError
from jtl.models import registry, vit


@pytest.mark.parametrize("variant,params", [
    ("ti", 5_717_416 - 1000 * 193 + 21843 * 193),
    ("s", 22_050_664 - 1000 * 385 + 21843 * 385),
    ("b", 86_567_656 - 1000 * 769 + 21843 * 769),
])
def test_vision_transformer_npz_maps_completely(variant, params):
  layout = layouts.vit_npz(variant)
  assert "Transformer/encoderblock_11/MlpBlock_3/Dense_1/kernel" in {k for k, _, _ in layout}
  npz = {k: np.zeros(s, np.float32) for k, s, _ in layout}
  like = zeros_like_model(vit.vit(variant, 21843), vit.example_input(1, 224))
  converted = vit.convert_npz(npz)
  flat = tree.flatten(like)
  assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in flat.items()}
  assert sum(v.size for v in converted.values()) == params
  _, report = weights.load_pretrained(npz, like, converter=vit.convert_npz)
  assert report.ok and len(report.loaded) == len(layout) == 200
  assert not report.adapted


def test_npz_file_round_trip_with_pre_logits_and_new_resolution(tmp_path):
  # The original ViT-B/16 imagenet21k release has a tanh pre_logits layer.
  layout = layouts.vit_npz("ti", representation_size=192, num_classes=21843, depth=2)
  arrays = layouts.random_arrays(layout, seed=9)
  path = tmp_path / "ViT-Ti_16.npz"
  np.savez(path, **arrays)
  model = vit.ViT(num_classes=10, width=192, depth=2, mlp_dim=768, num_heads=3,
                  image_size=384, representation_size=192)
  like = zeros_like_model(model, vit.example_input(1, 384))
  variables, report = weights.load_pretrained(path, like, converter=vit.convert_npz)
  assert report.ok
  assert [(e.path, e.source_shape, e.model_shape) for e in report.adapted] == [
      ("params/pos_embedding", (1, 197, 192), (1, 577, 192))]
  assert {e.path for e in report.reinitialised} == {"params/head/kernel", "params/head/bias"}
  np.testing.assert_array_equal(variables["params"]["pre_logits"]["kernel"],
                                arrays["pre_logits/kernel"])
  # Without pre_logits in the model, a strict load names the extra arrays.
  plain = vit.ViT(num_classes=10, width=192, depth=2, mlp_dim=768, num_heads=3)
  with pytest.raises(LoadError, match="pre_logits/kernel"):
    weights.load_pretrained(path, zeros_like_model(plain, vit.example_input(1, 224)),
                               converter=vit.convert_npz)


def _load(layout, seed, model, size=64):
  arrays = layouts.random_arrays(layout, seed)
  variables, report = weights.load_pretrained(
      arrays, zeros_like_model(model, vit.example_input(1, size)), converter=vit.convert_npz)
  return variables, report


def test_vit_ti_224_checkpoint_at_64px_matches_pytorch():
  # A 224-px checkpoint (14x14 patches) fine-tuned at 64 px (4x4 patches).
  model = vit.vit("ti", 1000, image_size=64)
  variables, report = _load(layouts.vit_npz("ti", num_classes=1000), 3, model)
  assert [e.path for e in report.adapted] == ["params/pos_embedding"]

  @jax.jit
  def run(v, x):
    return model.apply(v, x), model.apply(v, x, method=vit.ViT.features)

  logits, feats = map(np.asarray, run(variables, REF["vit_images"]))
  want = REF["vit_ti16_logits"]
  assert np.abs(logits - want).max() < 1e-4 * np.abs(want).max()
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-4)


def test_model_sized_for_224_resizes_in_graph_for_other_inputs():
  # Same numbers as resizing the checkpoint: the 2-block big_vision model
  # below, sized for 224 px, run on 64-px images.
  layout = layouts.vit_npz("ti", num_classes=10, layout="big_vision", depth=2)
  model = vit.ViT(num_classes=10, width=192, depth=2, mlp_dim=768, num_heads=3)
  variables, report = _load(layout, 4, model, size=224)
  assert report.ok and not report.adapted
  logits = np.asarray(jax.jit(model.apply)(variables, REF["vit_images"]))
  want = REF["vit_ti16_bv_logits"]
  assert np.abs(logits - want).max() < 1e-4 * np.abs(want).max()


def test_big_vision_layout_matches_pytorch():
  # big_vision: "params/" prefix, no class-token row in pos_embedding.
  layout = layouts.vit_npz("ti", num_classes=10, layout="big_vision", depth=2)
  assert ("params/pos_embedding", (1, 196, 192), "token") in layout
  model = vit.ViT(num_classes=10, width=192, depth=2, mlp_dim=768, num_heads=3, image_size=64)
  variables, report = _load(layout, 4, model)
  assert report.ok and len(report.loaded) == len(layout)
  logits = np.asarray(jax.jit(model.apply)(variables, REF["vit_images"]))
  want = REF["vit_ti16_bv_logits"]
  assert np.abs(logits - want).max() < 1e-4 * np.abs(want).max()


def test_in_graph_resize_equals_checkpoint_resize():
  posemb = np.random.RandomState(0).normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  for grid in (4, 20):
    got = np.asarray(jax.jit(lambda p, g=grid: vit._resize_grid(p, (g, g), 1))(posemb))
    np.testing.assert_allclose(got, resize_pos_embed(posemb, grid), atol=1e-5)


def test_gap_pooling_without_class_token():
  model = vit.ViT(num_classes=0, width=12, depth=1, mlp_dim=24, num_heads=2, patch_size=4,
                  image_size=16, pool="gap")
  x = np.random.RandomState(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  assert "cls" not in shapes["params"]
  assert shapes["params"]["pos_embedding"].shape == (1, 16, 12)
  rng = np.random.RandomState(1)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.3, shapes)
  # Mean of the normalised patch tokens: recompute it from the token states.
  tokens_fn = lambda m, x: m.Transformer(m.embedding(x).reshape(2, 16, 12) + m.pos_embedding,
                                         train=False)
  feats, tokens = map(np.asarray, jax.jit(lambda v: (
      model.apply(v, x), model.apply(v, x, method=tokens_fn)))(variables))
  np.testing.assert_allclose(feats, tokens.mean(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,width", [("vit_ti16", 192), ("vit_s16", 384), ("vit_b16", 768)])
def test_specs(name, width):
  spec = registry.get_spec(name)
  assert spec.pretrained in weights.list_sources()
  assert spec.converter is vit.convert_npz and spec.default_num_classes == 21843
  model = spec.build(num_classes=5)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), spec.example_input(1)))
  assert shapes["params"]["cls"].shape == (1, 1, width)
  names = [n for n, _ in spec.groups]
  assert names[0] == "embedding" and names[-2:] == ["encoder_norm", "head"]
  assert len(names) == 12 + 3
  patterns = [p for _, p in spec.groups]
  hit = [tree.first_match(p, patterns) for p in tree.flatten(shapes["params"])]
  assert None not in hit and set(hit) == set(range(len(patterns)))


def test_preprocess_maps_to_minus_one_one():
  images = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)])
  out = np.asarray(vit.preprocess(images, size=16))
  assert out.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(out[0], -1.0, atol=1e-6)
  np.testing.assert_allclose(out[1], 1.0, atol=1e-6)


def test_bad_config_names_the_choices():
  from jtl.errors import ConfigError
  with pytest.raises(ConfigError, match=r"'xl'.*\['b', 's', 'ti'\]"):
    vit.vit("xl")
  model = vit.ViT(num_classes=0, width=8, depth=1, mlp_dim=8, num_heads=2, pool="max")
  with pytest.raises(ConfigError, match="'max'"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), vit.example_input(1, 32)))


def test_fused_attention_option_keeps_parameters_and_outputs_off_gpu():
  """`fused_attention` changes only the attention kernel (cuDNN's on GPU): the
  same parameter tree, and off a GPU the same numbers as Flax's attention."""
  x = vit.example_input(2, 32)
  # ViT-Ti's width and heads in 2 blocks: each block runs the same code (12 took twice the CPU).
  plain = vit.vit("ti", 5, image_size=32, patch_size=8, depth=2)
  fused = vit.vit("ti", 5, image_size=32, patch_size=8, depth=2, fused_attention=True)
  variables = jax.jit(plain.init)(jax.random.PRNGKey(0), x)
  fused_shapes = jax.eval_shape(fused.init, jax.random.PRNGKey(0), x)
  assert jax.tree.structure(fused_shapes) == jax.tree.structure(variables)
  variables = jax.tree.map(lambda v: v + 0.01, variables)  # a non-zero head
  np.testing.assert_allclose(jax.jit(fused.apply)(variables, x),
                             jax.jit(plain.apply)(variables, x), atol=1e-6)


def test_attention_over_tokens_padded_to_eight_is_flax_attention():
  """The GPU program's attention (`xla_attention` lowered for CUDA: 197 tokens
  padded to 200, the padded keys masked) gives Flax's outputs and gradients;
  lowered for the CPU, the padding is not there."""
  import flax.linen as nn
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (2, 197, 3, 16)) for key in keys)

  def grads(attention):
    loss = lambda *qkv: (attention(*qkv) ** 2).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  np.testing.assert_allclose(vit._aligned_attention(q, k, v),
                             nn.dot_product_attention(q, k, v), atol=1e-6)
  for padded, plain in zip(grads(vit._aligned_attention), grads(nn.dot_product_attention)):
    np.testing.assert_allclose(padded, plain, atol=1e-5)
  scores = lambda platform: jax.jit(vit.xla_attention).trace(q, k, v).lower(
      lowering_platforms=(platform,)).as_text()
  cuda, cpu = scores("cuda"), scores("cpu")
  assert "3x200x200xf32" in cuda and "3x197x197xf32" not in cuda
  assert "3x197x197xf32" in cpu and "3x200x200xf32" not in cpu


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_drop_path_drops_whole_residual_branches_in_training_only(family):
  """drop_path_rate=1 on a 2-block model: block 0 keeps its branches (rate 0),
  block 1 drops both for every example (rate 1), so training-mode outputs equal
  the eval outputs of the same weights with block 1's branches zeroed; eval
  mode is untouched and the parameter tree is the same as without it."""
  from jtl.models import dinov2
  kw = dict(num_classes=3, patch_size=8, width=32, depth=2, num_heads=2, image_size=16)
  if family == "vit":
    plain, dropping = vit.ViT(mlp_dim=64, **kw), vit.ViT(mlp_dim=64, drop_path_rate=1.0, **kw)
    outs = ("MultiHeadDotProductAttention_0/out", "MlpBlock_0/Dense_1")
  else:
    plain, dropping = dinov2.Dinov2(**kw), dinov2.Dinov2(drop_path_rate=1.0, **kw)
    outs = ("LayerScale_0", "LayerScale_1")
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  variables = plain.init(jax.random.PRNGKey(0), x)
  noise = np.random.default_rng(1)  # a random head and layer scales (zeros / ones at init)
  variables = jax.tree.map(lambda v: v + 0.1 * noise.normal(size=v.shape).astype(v.dtype),
                           variables)
  assert jax.tree.structure(dropping.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(variables)
  np.testing.assert_allclose(dropping.apply(variables, x), plain.apply(variables, x), atol=1e-6)
  trained = dropping.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  flat = tree.flatten(variables)
  skipped = {k: (np.zeros_like(v) if any(f"encoderblock_1/{o}/" in k for o in outs) else v)
             for k, v in flat.items()}
  np.testing.assert_allclose(trained, plain.apply(tree.unflatten(skipped), x), atol=1e-5)
  assert not np.allclose(trained, plain.apply(variables, x), atol=1e-3)
