"""DINOv2 against transformers' Dinov2Model: a tiny model saved by
`save_pretrained` (tests/fixtures/make_dinov2_reference.py) loads strictly and
gives its outputs at the native and at other resolutions; the full-size
ViT-S/14 and ViT-B/14 specs have the published key layout and shapes.

Real facebook/dinov2-* weights are not downloaded (tests run offline); their
layout is written out from transformers' Dinov2Config formulas
(`dinov2.hf_shapes`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import jtl
from jtl import models, tree, weights
from jtl.errors import ConfigError, LoadError
from jtl.models import dinov2, hub_models, preprocessing, registry

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY = FIXTURES / "dinov2_tiny"
REF = dict(np.load(FIXTURES / "dinov2_reference.npz"))
CONFIG = json.loads((TINY / "config.json").read_text())
TOL = 1e-4  # measured: at most 2.1e-6 (float32 on CPU)


def pixels(u8: np.ndarray) -> np.ndarray:
  """The fixture's input (u8 / 64 - 2), NCHW -> NHWC."""
  return np.transpose(u8.astype(np.float32) / 64 - 2, (0, 2, 3, 1))


def _like(spec, num_classes):
  module = spec.build(num_classes=num_classes)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), spec.example_input(1))
  return module, jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes)


@pytest.fixture(scope="module")
def tiny():
  spec = dinov2.hub_spec("fixture", CONFIG)
  module, like = _like(spec, 0)
  variables, report = weights.load_pretrained(
      TINY / "model.safetensors", like=like, converter=spec.converter)
  return spec, module, variables, report


def test_tiny_transformers_model_loads_strictly_and_matches(tiny):
  spec, module, variables, report = tiny
  assert report.ok and len(report.loaded) == 43 == len(load_file(TINY / "model.safetensors"))
  assert not (report.adapted or report.cast or report.skipped)
  assert (spec.image_size, spec.min_image_size, spec.normalization.preset) == (56, 14, "imagenet")

  @jax.jit
  def run(v, x, mask=None):
    seq = module.apply(v, x, mask=mask, method="tokens")
    return seq, module.clone(pool="cls").apply(v, x), module.apply(v, x)

  diffs = {}
  # native 4x4 grid; 70 px (5x5) and 56x84 (4x6): bicubic-interpolated positions.
  for name in ("x56", "x70", "x56x84"):
    seq, pooled, feats = map(np.asarray, run(variables, pixels(REF[name])))
    diffs[name] = np.abs(seq - REF[f"{name}_last"]).max()
    diffs[f"{name}_pool"] = np.abs(pooled - REF[f"{name}_pool"]).max()
    # The default features: [CLS, mean patch token] of the normed sequence.
    ref = REF[f"{name}_last"]
    expected = np.concatenate([ref[:, 0], ref[:, 1:].mean(axis=1)], axis=-1)
    diffs[f"{name}_features"] = np.abs(feats - expected).max()
    assert feats.shape == (len(ref), 64)
  seq, _, _ = run(variables, pixels(REF["x56"]), REF["mask56"])
  diffs["masked"] = np.abs(np.asarray(seq) - REF["x56_masked_last"]).max()
  assert max(diffs.values()) < TOL, diffs


def test_image_classification_checkpoint_head_sees_cls_and_mean_patch(tiny):
  """Dinov2ForImageClassification ("dinov2." prefix, classifier on 2 x hidden)."""
  spec, _, _, _ = tiny
  sd = {f"dinov2.{k}": v for k, v in load_file(TINY / "model.safetensors").items()}
  sd.update({"classifier.weight": REF["cls_weight"], "classifier.bias": REF["cls_bias"]})
  config = {**CONFIG, "architectures": ["Dinov2ForImageClassification"],
            "id2label": {"0": "a", "1": "b", "2": "c"}}
  clf_spec = dinov2.hub_spec("fixture-clf", config)
  assert clf_spec.default_num_classes == 3
  module, like = _like(clf_spec, 3)
  variables, report = weights.load_pretrained(sd, like=like, converter=clf_spec.converter)
  assert report.ok and len(report.loaded) == 45
  logits = np.asarray(jax.jit(module.apply)(variables, pixels(REF["x56"])))
  assert np.abs(logits - REF["x56_logits"]).max() < TOL
  # The same checkpoint into a backbone without a head: the classifier is skipped.
  _, like0 = _like(spec, 0)
  _, report0 = weights.load_pretrained(sd, like=like0, converter=spec.converter)
  assert report0.ok and sorted(e.path for e in report0.skipped) == ["params/head/bias",
                                                                    "params/head/kernel"]


_CONFIG_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers",
                  "num_attention_heads", "mlp_ratio", "patch_size", "image_size",
                  "num_channels", "hidden_act", "layer_norm_eps", "layerscale_value",
                  "qkv_bias", "use_swiglu_ffn", "use_mask_token", "apply_layernorm",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")


@pytest.mark.parametrize("with_head", [False, True])
def test_hf_export_rewrites_the_transformers_files(tiny, tmp_path, with_head):
  """export_hf of the loaded tiny model gives back, bit for bit, the tensors
  transformers' save_pretrained wrote (Dinov2Model; with a head the
  Dinov2ForImageClassification state dict: "dinov2." + backbone, classifier),
  and a config.json with transformers' values that maps back to the same spec."""
  from jtl.export import hf_export
  _, module, variables, _ = tiny
  want = dict(load_file(TINY / "model.safetensors"))
  config = dict(CONFIG)
  if with_head:
    want = {f"dinov2.{k}": v for k, v in want.items()}
    want.update({"classifier.weight": REF["cls_weight"], "classifier.bias": REF["cls_bias"]})
    config["architectures"] = ["Dinov2ForImageClassification"]
    module = module.clone(num_classes=3)
    head = {"kernel": REF["cls_weight"].T, "bias": REF["cls_bias"]}
    variables = {"params": {**variables["params"], "head": head}}
  out = hf_export.export_hf(module, variables, tmp_path)
  got = load_file(out / "model.safetensors")
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  written = json.loads((out / "config.json").read_text())
  assert {k: written[k] for k in _CONFIG_FIELDS} == {k: config[k] for k in _CONFIG_FIELDS}
  assert len(written.get("id2label", {})) == (3 if with_head else 0)
  back = dinov2.hub_spec("exported", written)
  assert back.default_num_classes == (3 if with_head else 0)
  assert back.build(num_classes=module.num_classes) == module
  # No run's inputs: the preprocessor_config.json is the published view, as without one.
  processor = json.loads((out / "preprocessor_config.json").read_text())
  assert dinov2.hub_spec("exported", written, processor).normalization == back.normalization


def test_hf_export_refuses_what_transformers_cannot_hold(tiny, tmp_path):
  from jtl.export import hf_export
  _, module, variables, _ = tiny
  with pytest.raises(ConfigError, match="pool='mean'"):
    hf_export.export_hf(module.clone(num_classes=3, pool="mean"), variables, tmp_path)
  with pytest.raises(ConfigError, match="integer mlp_ratio"):
    hf_export.hub_config(module.clone(mlp_ratio=2.5))
  extra = {"params": {**variables["params"], "register_tokens": np.zeros((1, 4, 32))}}
  with pytest.raises(jtl.errors.CheckpointError, match="register_tokens"):
    hf_export.export_hf(module, extra, tmp_path)


def test_position_embedding_interpolation_is_torch_bicubic(tiny):
  _, _, variables, _ = tiny
  pos = variables["params"]["pos_embedding"]
  assert dinov2.interpolate_pos_embed(pos, (4, 4)) is pos  # native grid: unchanged
  # The original DINOv2 code's scale_factor=(5 + 0.1) / 4 (interpolate_offset).
  offset = np.asarray(dinov2.interpolate_pos_embed(pos, (5, 5), offset=0.1))
  plain = np.asarray(dinov2.interpolate_pos_embed(pos, (5, 5)))
  np.testing.assert_array_equal(offset[:, :1], pos[:, :1])
  assert np.abs(offset[:, 1:] - REF["offset_pos70"]).max() < 1e-5
  assert np.abs(plain[:, 1:] - REF["offset_pos70"]).max() > 1e-2  # the quirk matters
  for n_in, n_out in ((4, 5), (37, 16), (37, 64)):
    m = dinov2.bicubic_matrix(n_in, n_out)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)  # a partition of unity
  np.testing.assert_allclose(dinov2.bicubic_matrix(37, 37), np.eye(37), atol=1e-7)


def published_config(width: int, heads: int) -> bytes:
  """config.json of facebook/dinov2-small / -base as published (transformers 4.31)."""
  return json.dumps({
      "architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0,
      "drop_path_rate": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
      "hidden_size": width, "image_size": 518, "initializer_range": 0.02,
      "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4,
      "model_type": "dinov2", "num_attention_heads": heads, "num_channels": 3,
      "num_hidden_layers": 12, "patch_size": 14, "qkv_bias": True,
      "torch_dtype": "float32", "transformers_version": "4.31.0.dev0",
      "use_swiglu_ffn": False}).encode()


# facebook/dinov2-small's and -base's preprocessor_config.json as published.
PUBLISHED_PROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}}


def test_published_preprocessor_config_is_jtls_default_dinov2_preprocessing(fake_hub):
  """A Hub repo's preprocessor_config.json picks the preprocessing now; the
  published one must give exactly the zoo's (resize 256, crop 224, bicubic,
  ImageNet), and one jtl cannot reproduce is refused by file and key."""
  zoo = registry.get_spec("dinov2_s14").normalization
  assert preprocessing.from_image_processor(PUBLISHED_PROCESSOR, "x") == zoo == dinov2.NORMALIZATION
  assert preprocessing.image_processor_config(zoo) == PUBLISHED_PROCESSOR  # written back as is
  fake_hub.add("test-org/dinov2-small", {
      "config.json": published_config(384, 6),
      "preprocessor_config.json": json.dumps(PUBLISHED_PROCESSOR).encode()})
  assert hub_models.spec_for("hf-hub:test-org/dinov2-small").normalization == zoo
  for key, value in (("resample", 0), ("size", {"height": 224, "width": 200}),
                     ("do_center_crop", False), ("crop_size", {"height": 300, "width": 300}),
                     ("image_processor_type", "ViTImageProcessor"), ("image_std", [0.2, 0])):
    with pytest.raises(ConfigError, match=f"x/preprocessor_config.json: {key}="):
      preprocessing.from_image_processor({**PUBLISHED_PROCESSOR, key: value},
                                         "x/preprocessor_config.json")
  square = {**PUBLISHED_PROCESSOR, "size": {"height": 256, "width": 256}}  # squashed, then cut
  with pytest.raises(ConfigError, match="crop_size="):
    preprocessing.from_image_processor(square, "x")


@pytest.mark.parametrize("name,width,heads,params", [
    ("dinov2_s14", 384, 6, 22_056_576), ("dinov2_b14", 768, 12, 86_580_480)])
@pytest.mark.parametrize("via_hub", [False, True])
def test_published_layout_loads_strictly_into_the_full_size_specs(
    fake_hub, name, width, heads, params, via_hub):
  """Every key of facebook/dinov2-{small,base} (shapes from the config
  formulas: 518 px, patch 14, MLP ratio 4, 12 layers) maps to a variable of
  the same shape, and every variable is loaded; the same through the zoo name
  and through the Hub repo's config.json."""
  repo = dinov2.HUB_REPOS[name[7]]
  spec = registry.get_spec(name)
  if via_hub:
    fake_hub.add(repo, {"config.json": published_config(width, heads)})
    spec = hub_models.spec_for(f"hf-hub:{repo}")
  assert spec.pretrained == f"hf-hub:{repo}"
  assert (spec.image_size, spec.default_num_classes, spec.normalization.preset) == (224, 0, "imagenet")
  module, like = _like(spec, 0)
  assert (module.width, module.depth, module.num_heads, module.patch_size,
          module.image_size, module.mlp_ratio, module.layer_norm_eps,
          module.pool) == (width, 12, heads, 14, 518, 4.0, 1e-6, "cls_mean")
  shapes = dinov2.hf_shapes(hidden_size=width, num_hidden_layers=12)
  assert shapes["embeddings.position_embeddings"] == (1, 1 + 37 * 37, width)
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory
  _, report = weights.load_pretrained(sd, like=like, converter=spec.converter)
  assert report.ok and len(report.loaded) == len(shapes) == 223
  assert sum(int(np.prod(s)) for s in shapes.values()) == params
  assert sum(x.size for x in jax.tree.leaves(like)) == params
  patterns = [p for _, p in spec.groups]
  hit = [tree.first_match(p, patterns) for p in tree.flatten(like["params"])]
  assert None not in hit and set(hit) == set(range(len(patterns) - 1))  # no head
  # A wrong shape is reported, not reshaped: a checkpoint of the other size.
  wrong = dict(sd, **{"encoder.layer.0.mlp.fc1.weight": np.zeros((8, width), np.float32)})
  with pytest.raises(LoadError, match="mismatched"):
    weights.load_pretrained(wrong, like=like, converter=spec.converter)


def test_create_from_the_hub_and_train_only_the_head(fake_hub):  # noqa: F811
  fake_hub.add("test-org/dinov2-tiny", {
      "config.json": (TINY / "config.json").read_bytes(),
      "model.safetensors": (TINY / "model.safetensors").read_bytes()})
  created = models.create("hf-hub:test-org/dinov2-tiny", num_classes=3)
  assert created.report.ok and len(created.report.loaded) == 43
  assert [e.path for e in created.report.reinitialised] == ["params/head/bias",
                                                            "params/head/kernel"]
  module, variables = created.module, created.variables
  x = pixels(REF["x70"])
  feats = np.asarray(jax.jit(lambda v, x: module.apply(v, x, method="features"))(variables, x))
  ref = REF["x70_last"]
  np.testing.assert_allclose(feats, np.concatenate([ref[:, 0], ref[:, 1:].mean(1)], -1),
                             atol=TOL)
  # Frozen-feature transfer: a linear probe on [CLS, mean patch] trains the head only.
  labels = jtl.label_params(variables["params"], [(r"head/.*", "head"), (r".*", None)])
  tx = jtl.make_optimizer(labels, learning_rate=0.1)
  state = jtl.create_train_state(variables, labels, tx)
  step = jax.jit(jtl.make_train_step(module, tx, labels=labels))
  state, metrics = step(state, {"inputs": x, "label": np.array([0, 2])})
  assert np.isfinite(metrics["loss"])
  after = tree.flatten(jax.device_get(state.variables["params"]))
  before = tree.flatten(variables["params"])
  moved = sorted(p for p in before if not np.array_equal(after[p], before[p]))
  assert moved == ["head/bias", "head/kernel"]


def test_unsupported_configs_name_what_was_found(fake_hub):  # noqa: F811
  for extra in ({"use_swiglu_ffn": True}, {"hidden_act": "relu"}):
    with pytest.raises(ConfigError, match=next(iter(extra))):
      dinov2.hub_spec("x", {**CONFIG, **extra})
  with pytest.raises(ConfigError, match="hidden_size"):
    dinov2.hub_spec("x", {k: v for k, v in CONFIG.items() if k != "hidden_size"})
  fake_hub.add("test-org/registers", {"config.json": json.dumps(
      {**CONFIG, "model_type": "dinov2_with_registers"}).encode()})
  with pytest.raises(ConfigError, match="model_type 'dinov2'"):  # listed as supported
    hub_models.spec_for("hf-hub:test-org/registers")
