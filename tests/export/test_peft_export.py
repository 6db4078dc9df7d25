"""PEFT-format LoRA adapters and HF/timm-layout merged weights, against the
real consumers' recorded outputs (tests/fixtures/make_peft_reference.py:
peft 0.21.2, transformers 5.24.0, timm 1.0.31, torch 2.13.0 and torchvision
0.28.0 (PyPI builds, run on the CPU)).

Fixture models: tiny BERT (HF BertModel layout), tiny ViT (timm
VisionTransformer), a ResNet with one BasicBlock per stage (timm resnet18
layout) and a tiny DINOv2 with a head (transformers
Dinov2ForImageClassification: separate q/k/v/o Linears, layer scale, mask
token), seeded numpy weights, LoRA on every exportable layer kind (Dense,
DenseGeneral attention output, query/key/value as timm's fused qkv or as
DINOv2's separate projections, patch-embedding conv, 3x3/7x7/strided 1x1
convs) with mixed ranks, and a changed head.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from app_helpers import colour_photos, load_file, run_script
from run_helpers import saved_run

from configs import default
from jtl import models
from jtl import tree as jtree
from jtl.app import workdirs
from jtl.export import hf_export, peft, peft_import
from jtl.errors import CheckpointError, ConfigError
from jtl.models import bert, dinov2, hub_models, resnet
from jtl.recipes.strategies import lora

FIXTURES = Path(__file__).parents[1] / "fixtures"
PEFT_DIR = FIXTURES / "peft"


def _load_ref():
  return load_file(FIXTURES / "make_peft_reference.py")


ref = _load_ref()
REF = np.load(PEFT_DIR / "reference.npz")
MANIFEST = json.loads((PEFT_DIR / "manifest.json").read_text())
LAYOUT = {"bert": "bert", "vit": "timm_vit", "resnet": "timm_resnet", "dinov2": "dinov2_cls"}
TOL = 1e-5  # float32 forward passes in two frameworks; measured <= 2.4e-6


@functools.cache
def base(name):
  return ref.base_variables(name)


@functools.cache
def adapted(name):
  return ref.adapted_variables(name)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("name", ref.MODELS)
def test_adapter_export_is_the_file_peft_loaded(name, tmp_path):
  """Re-exporting gives byte-identical files to the ones PeftModel loaded."""
  module = lora.LoraModel(ref.build(name), ref.ALPHA)
  out = peft.export_peft(module, adapted(name), tmp_path,
                         base_model_name_or_path=f"jtl-fixture/{name}")
  committed = PEFT_DIR / "jtl_adapter" / name
  files = sorted(p.name for p in committed.iterdir())
  assert sorted(p.name for p in out.iterdir()) == files
  for f in files:
    assert (out / f).read_bytes() == (committed / f).read_bytes(), f
  config = json.loads((out / peft.CONFIG_FILE).read_text())
  assert config["peft_type"] == "LORA" and config["lora_alpha"] == ref.ALPHA
  assert config["task_type"] == ("FEATURE_EXTRACTION" if name == "bert" else None)
  assert config["modules_to_save"] == {"bert": None, "vit": ["head"], "resnet": ["fc"],
                                      "dinov2": ["classifier"]}[name]


@pytest.mark.parametrize("name", ref.MODELS)
def test_jtl_outputs_match_peft_and_merged_consumers(name):
  """jtl's adapted model == PeftModel(base, jtl adapter) == BertModel/timm(merged)."""
  outs = ref.jtl_outputs(name, adapted(name))
  for key, value in outs.items():
    for source in ("jtl_adapter", "merged"):
      recorded = REF[f"{name}/{source}/{key}"]
      assert recorded.shape == value.shape
      diff = _max_diff(value, recorded)
      print(f"{name} {source} {key}: max |jtl - torch| = {diff:.2e}")
      assert diff < TOL, (name, source, key, diff)
  # The adapters change the model, so these comparisons are not vacuous.
  plain = ref.build(name).apply(base(name), ref.inputs(name))
  assert _max_diff(plain, outs["logits"]) > 0.05
  if name == "vit":  # timm's default erf GELU vs jtl's tanh GELU, stated
    assert 1e-5 < _max_diff(outs["logits"], REF["vit/merged/logits_erf"]) < 1e-2


def test_lora_model_interceptor_gives_the_same_outputs_as_merging():
  """LoraModel (what training runs) agrees with the merged model PEFT matched."""
  name = "bert"
  module = lora.LoraModel(ref.build(name), ref.ALPHA)
  logits = np.asarray(module.apply(adapted(name), ref.inputs(name)))
  assert _max_diff(logits, REF["bert/jtl_adapter/logits"]) < TOL


@pytest.mark.parametrize("name", ref.MODELS)
def test_merged_export_has_the_layout_the_consumer_loaded(name, tmp_path):
  module = ref.build(name)
  out = hf_export.export_hf(module, adapted(name), tmp_path, alpha=ref.ALPHA)
  import safetensors.numpy
  tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
  recorded = MANIFEST["merged"][name]
  assert {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items()} == recorded["tensors"]
  assert json.loads((out / "config.json").read_text()) == recorded["config.json"]
  if name == "bert":  # what transformers' BertModel.from_pretrained reported missing
    assert MANIFEST["bert_missing_keys"] == []  # (the pooler, before jtl kept it)
  # ... and maps back through jtl's importers to the merged variables exactly.
  if name == "bert":
    head = safetensors.numpy.load_file(str(out / "head.safetensors"))
    back = bert.convert_torch({**tensors, **head})
  elif name == "vit":
    back = hub_models.convert_timm_vit(tensors, num_heads=2)
  elif name == "dinov2":
    back = dinov2.convert_hf(tensors, num_heads=2)
  else:
    back = resnet.convert_torch(tensors)
  merged = adapted(name)
  merged = jtree.flatten({**merged, "params": lora.merge_lora(merged["params"], ref.ALPHA)})
  assert sorted(back) == sorted(merged)
  for k, v in merged.items():
    np.testing.assert_array_equal(back[k], np.asarray(v), err_msg=k)


@pytest.mark.parametrize("name", ref.MODELS)
def test_peft_trained_adapter_loads_into_jtl(name, caplog):
  """An adapter PEFT trained and saved gives PEFT's outputs in jtl."""
  folder = PEFT_DIR / "peft_trained" / name
  with caplog.at_level(logging.WARNING):
    params, alpha = peft_import.import_peft(base(name)["params"], folder, layout=LAYOUT[name])
  config = json.loads((folder / peft.CONFIG_FILE).read_text())
  assert alpha == config["lora_alpha"]
  n_adapters = sum(p.endswith("/lora_a") for p in jtree.flatten(params))
  # ViT: PEFT's qkv adapter (rank 4, dense B) -> query, key and value adapters.
  # DINOv2: q/k/v/o, fc1, fc2 in each of 2 layers and the patch projection.
  # BERT: PEFT's "dense" also hit BertModel's pooler, imported (it was skipped).
  assert n_adapters == {"bert": 11, "vit": 13, "resnet": 12, "dinov2": 13}[name]
  assert "skipped" not in caplog.text
  variables = {**base(name), "params": lora.merge_lora(params, alpha)}
  methods = {"bert": ["features"], "dinov2": [None, "tokens"]}.get(name, [None])
  for method in methods:
    key = method or "logits"
    out = ref.build(name).apply(variables, ref.inputs(name), method=method)
    diff = _max_diff(out, REF[f"{name}/peft_trained/{key}"])
    print(f"{name} PEFT-trained adapter in jtl: max |jtl - peft| {key} = {diff:.2e}")
    assert diff < TOL
  # The trained adapter changed the model, so the comparison is not vacuous.
  plain = ref.build(name).apply(base(name), ref.inputs(name), method=methods[0])
  assert _max_diff(plain, REF[f"{name}/peft_trained/{methods[0] or 'logits'}"]) > 1e-3


def test_peft_adapter_on_berts_pooler_is_imported(tmp_path):
  """BertModel's pooler.dense adapter (PEFT's "dense" target hits it) was
  skipped with a warning; its merged kernel is PEFT's W + (alpha / r) B A as
  [in, out], so the exported pooler_output carries it. The PEFT-trained
  folder with the pooler's B (zero there: PEFT's loss never used the pooler)
  set to nonzero numbers."""
  import shutil
  import safetensors.numpy
  folder = tmp_path / "bert"
  shutil.copytree(PEFT_DIR / "peft_trained" / "bert", folder)
  tensors = safetensors.numpy.load_file(str(folder / peft.WEIGHTS_FILE))
  key = "base_model.model.pooler.dense.lora_B.weight"  # [out, r]
  tensors[key] = np.random.default_rng(0).normal(size=tensors[key].shape).astype(np.float32)
  safetensors.numpy.save_file(tensors, str(folder / peft.WEIGHTS_FILE))
  a, b = tensors["base_model.model.pooler.dense.lora_A.weight"], tensors[key]  # [r, in]
  params, alpha = peft_import.import_peft(base("bert")["params"], folder, layout="bert")
  config = json.loads((folder / peft.CONFIG_FILE).read_text())
  scale = config["alpha_pattern"]["dense"] / a.shape[0]  # PEFT's scale for "dense"
  kernel = np.asarray(base("bert")["params"]["pooler"]["kernel"])
  merged = np.asarray(lora.merge_lora(params, alpha)["pooler"]["kernel"])
  np.testing.assert_allclose(merged, kernel + scale * (b @ a).T, rtol=1e-5, atol=1e-6)
  assert np.abs(merged - kernel).max() > 0.1


def test_bert_task_model_adapter_imports_under_bertmodels_names(tmp_path):
  """PEFT saves a BertForSequenceClassification adapter under "bert."
  (base_model.model.bert.pooler.dense.lora_A.weight, ...): the same adapters
  as BertModel's; its classifier (on the [CLS] pooler) is refused by name with
  layout="bert" (test_peft_bert_cls.py loads it whole, layout="bert_cls")."""
  import shutil
  import safetensors.numpy
  source = PEFT_DIR / "peft_trained" / "bert"
  folder = tmp_path / "seq_cls"
  shutil.copytree(source, folder)
  tensors = safetensors.numpy.load_file(str(source / peft.WEIGHTS_FILE))
  renamed = {k.replace(peft.PREFIX, peft.PREFIX + "bert.", 1): v for k, v in tensors.items()}
  assert "base_model.model.bert.pooler.dense.lora_A.weight" in renamed
  safetensors.numpy.save_file(renamed, str(folder / peft.WEIGHTS_FILE))
  want, _ = peft_import.import_peft(base("bert")["params"], source, layout="bert")
  got, _ = peft_import.import_peft(base("bert")["params"], folder, layout="bert")
  want, got = jtree.flatten(want), jtree.flatten(got)
  assert sorted(got) == sorted(want) and "pooler/lora_a" in got
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  renamed["base_model.model.classifier.weight"] = np.zeros((2, 32), np.float32)
  safetensors.numpy.save_file(renamed, str(folder / peft.WEIGHTS_FILE))
  with pytest.raises(CheckpointError, match=r"\['classifier'\].*\[CLS\] pooler output"):
    peft_import.import_peft(base("bert")["params"], folder, layout="bert")


@pytest.mark.parametrize("name", ["vit", "resnet", "dinov2"])
def test_export_then_import_restores_the_adapters_exactly(name, tmp_path):
  peft.export_peft(lora.LoraModel(ref.build(name), ref.ALPHA), adapted(name), tmp_path)
  params, alpha = peft_import.import_peft(base(name)["params"], tmp_path, layout=LAYOUT[name])
  assert alpha == ref.ALPHA
  want, got = jtree.flatten(adapted(name)["params"]), jtree.flatten(params)
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def _renamed_adapter(src, dst, rename, config_names):
  """A copy of a PEFT adapter folder with its keys renamed (and the short
  module names in target_modules / rank_pattern / alpha_pattern)."""
  import safetensors.numpy
  dst.mkdir()
  config = json.loads((src / peft.CONFIG_FILE).read_text())
  config["target_modules"] = [config_names.get(n, n) for n in config["target_modules"]]
  for key in ("rank_pattern", "alpha_pattern"):
    config[key] = {config_names.get(n, n): v for n, v in config[key].items()}
  (dst / peft.CONFIG_FILE).write_text(json.dumps(config))
  tensors = safetensors.numpy.load_file(str(src / peft.WEIGHTS_FILE))
  hf_export.write_safetensors({rename(k): v for k, v in tensors.items()}, dst / peft.WEIGHTS_FILE)
  return dst


def test_dinov2_adapter_with_transformers_4_names_imports_the_same(tmp_path):
  """PEFT with transformers 4 saved DINOv2 adapters under the file names
  (attention.attention.query, attention.output.dense; config patterns like
  {"dense": 16}); they map to the same jtl adapters as transformers 5's
  in-memory names (q_proj, o_proj)."""
  folder = PEFT_DIR / "peft_trained" / "dinov2"
  v4_names = {"q": "query", "k": "key", "v": "value"}
  v4 = _renamed_adapter(folder, tmp_path / "v4", lambda k: re.sub(
      r"attention\.([qkv])_proj", lambda m: "attention.attention." + v4_names[m.group(1)],
      k).replace("attention.o_proj", "attention.output.dense"),
      {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "dense"})
  import safetensors.numpy
  assert any("attention.attention.key" in k for k in
             safetensors.numpy.load_file(str(v4 / peft.WEIGHTS_FILE)))
  want, alpha = peft_import.import_peft(base("dinov2")["params"], folder, layout="dinov2_cls")
  got, alpha_v4 = peft_import.import_peft(base("dinov2")["params"], v4, layout="dinov2_cls")
  want, got = jtree.flatten(want), jtree.flatten(got)
  assert alpha_v4 == alpha and sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_dinov2_backbone_adapter_and_layout_mismatch(tmp_path):
  """A Dinov2 without a head exports a Dinov2Model adapter (no "dinov2."
  prefix, no modules_to_save); importing an adapter with the other layout
  names the right one."""
  module = ref.build("dinov2").clone(num_classes=0)
  flat = {p: v for p, v in jtree.flatten(adapted("dinov2")["params"]).items()
          if not p.startswith("head/")}
  out = peft.export_peft(module, {"params": jtree.unflatten(flat)}, tmp_path / "a",
                         alpha=ref.ALPHA)
  config = json.loads((out / peft.CONFIG_FILE).read_text())
  assert config["modules_to_save"] is None and config["task_type"] is None
  assert config["auto_mapping"]["base_model_class"] == "Dinov2Model"
  import safetensors.numpy
  keys = safetensors.numpy.load_file(str(out / peft.WEIGHTS_FILE))
  assert "base_model.model.encoder.layer.1.attention.k_proj.lora_A.weight" in keys
  assert not any(k.startswith("base_model.model.dinov2.") for k in keys)
  base_flat = {p: v for p, v in flat.items() if "lora" not in p}
  back, _ = peft_import.import_peft(jtree.unflatten(base_flat), out, layout="dinov2")
  for p, v in flat.items():
    np.testing.assert_array_equal(np.asarray(jtree.flatten(back)[p]), v, err_msg=p)
  with pytest.raises(CheckpointError, match="layout='dinov2_cls'"):
    peft_import.import_peft(base("dinov2")["params"], PEFT_DIR / "peft_trained" / "dinov2",
                            layout="dinov2")
  with pytest.raises(CheckpointError, match="layout='dinov2'"):
    peft_import.import_peft(base("dinov2")["params"], out, layout="dinov2_cls")
  # A head on the class token alone is not Dinov2ForImageClassification's.
  with pytest.raises(ConfigError, match="pool='cls'"):
    peft.export_peft(ref.build("dinov2").clone(pool="cls"), adapted("dinov2"), tmp_path / "b",
                     alpha=ref.ALPHA)


def test_peft_trained_qkv_adapter_folded_or_as_adapters_gives_the_same_model():
  folder = PEFT_DIR / "peft_trained" / "vit"
  as_adapters, alpha = peft_import.import_peft(base("vit")["params"], folder, layout="timm_vit")
  folded, _ = peft_import.import_peft(base("vit")["params"], folder, layout="timm_vit",
                                      fold_unsupported=True)
  flat = jtree.flatten(as_adapters)
  q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query"
  assert flat[f"{q}/lora_a"].shape == (32, 4) and flat[f"{q}/lora_b"].shape == (4, 32)
  assert not any(p.endswith("query/lora_a") for p in jtree.flatten(folded))
  x = ref.inputs("vit")
  one = ref.build("vit").apply({**base("vit"), "params": lora.merge_lora(as_adapters, alpha)}, x)
  two = ref.build("vit").apply({**base("vit"), "params": lora.merge_lora(folded, alpha)}, x)
  assert _max_diff(one, two) < 1e-6


def test_qkv_loras_export_as_one_block_diagonal_qkv_lora(tmp_path):
  """LoRAs on query/key/value -> timm's fused qkv: A = concat(A_q, A_k, A_v),
  B = block diagonal, rank_pattern / alpha_pattern keep jtl's alpha / r."""
  out = peft.export_peft(ref.build("vit"), adapted("vit"), tmp_path, alpha=ref.ALPHA)
  config = json.loads((out / peft.CONFIG_FILE).read_text())
  import safetensors.numpy
  tensors = safetensors.numpy.load_file(str(out / peft.WEIGHTS_FILE))
  flat = jtree.flatten(adapted("vit")["params"])
  mha = "Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/{}/lora_{}"
  # block 0: query and value rank 2 (key rows zero); block 1: query, key 2, value 4.
  a0 = tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"]
  b0 = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
  assert a0.shape == (4, 32) and b0.shape == (96, 4)
  np.testing.assert_array_equal(a0, np.concatenate([flat[mha.format(0, "query", "a")].T,
                                                    flat[mha.format(0, "value", "a")].T]))
  np.testing.assert_array_equal(b0[:32, :2], flat[mha.format(0, "query", "b")].T)
  np.testing.assert_array_equal(b0[64:, 2:], flat[mha.format(0, "value", "b")].T)
  assert not b0[32:64].any() and not b0[:32, 2:].any() and not b0[64:, :2].any()
  b1 = tensors["base_model.model.blocks.1.attn.qkv.lora_B.weight"]
  assert b1.shape == (96, 8)  # value's rank 4 block carries r / r_v = 1/2 (one alpha/r)
  np.testing.assert_array_equal(b1[64:, 4:], flat[mha.format(1, "value", "b")].T * 0.5)
  assert config["r"] == 2 and config["rank_pattern"]["blocks.0.attn.qkv"] == 4
  assert config["rank_pattern"]["blocks.1.attn.qkv"] == 8
  # PEFT's scale alpha_pattern / rank_pattern is jtl's alpha / r = 2 on both.
  assert config["alpha_pattern"] == {"blocks.0.attn.qkv": 8.0, "blocks.1.attn.qkv": 16.0}
  assert "qkv" in config["target_modules"]
  # PeftModel applied those qkv LoRAs: without them jtl is far from its output.
  no_qkv = {p: v for p, v in flat.items()
            if not re.search(r"/(query|key|value)/lora_[ab]$", p)}
  params = lora.merge_lora(jtree.unflatten(no_qkv), ref.ALPHA)
  logits = ref.build("vit").apply({**adapted("vit"), "params": params}, ref.inputs("vit"))
  assert _max_diff(logits, REF["vit/jtl_adapter/logits"]) > 1e-2


def test_head_split_qkv_lora_exports_exactly_with_a_larger_rank(tmp_path):
  """add_lora's split of a [width, heads, head_dim] kernel ([width*heads, r] x
  [r, head_dim]) is a rank heads*r LoRA of the Linear: exported exactly."""
  flat = jtree.flatten(base("vit")["params"])
  rng = np.random.default_rng(5)
  k = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/key"
  flat[f"{k}/lora_a"] = rng.standard_normal((64, 2)).astype(np.float32)
  flat[f"{k}/lora_b"] = rng.standard_normal((2, 16)).astype(np.float32)
  params = jtree.unflatten(flat)
  peft.export_peft(ref.build("vit"), {"params": params}, tmp_path, alpha=4)
  config = json.loads((tmp_path / peft.CONFIG_FILE).read_text())
  assert config["r"] == 4 and config["alpha_pattern"] == {"blocks.1.attn.qkv": 8.0}
  back, alpha = peft_import.import_peft(base("vit")["params"], tmp_path, layout="timm_vit")
  got = jtree.flatten(back)
  assert got[f"{k}/lora_a"].shape == (32, 4) and f"{k.replace('key', 'query')}/lora_a" not in got
  want = jtree.flatten(lora.merge_lora(params, 4.0))[f"{k}/kernel"]
  np.testing.assert_allclose(jtree.flatten(lora.merge_lora(back, alpha))[f"{k}/kernel"], want,
                             rtol=0, atol=1e-6)


def test_tanh_gelu_vit_exports_act_layer_gelu_tanh(tmp_path):
  """timm builds the same network from config.json alone: gelu_tanh for jtl's
  default ViT, timm's default (erf) for exact_gelu=True; and back through
  the Hub spec."""
  from jtl.models import vit
  tanh = hf_export.hub_config(ref.build("vit"))
  assert tanh["model_args"]["act_layer"] == "gelu_tanh"
  assert MANIFEST["merged"]["vit"]["config.json"]["model_args"]["act_layer"] == "gelu_tanh"
  erf = hf_export.hub_config(vit.ViT(num_classes=3, patch_size=8, width=32, depth=2, mlp_dim=64,
                                     num_heads=2, image_size=32, exact_gelu=True))
  assert "act_layer" not in erf["model_args"]
  for cfg, exact in ((tanh, False), (erf, True)):
    spec = hub_models._timm_vit_spec(  # pylint: disable=protected-access
        "hf-hub:x/y", hub_models.parse_timm_vit(cfg["architecture"]),
        dict(cfg["model_args"]), cfg["pretrained_cfg"], cfg["num_classes"], "x/y")
    assert spec.build().exact_gelu is exact
  with pytest.raises(ConfigError, match="act_layer 'relu'"):
    hub_models._timm_vit_spec("hf-hub:x/y", ("ti", 8, 32), {"act_layer": "relu"}, {}, 3, "x/y")  # pylint: disable=protected-access


def test_unrepresentable_or_mismatched_adapters_are_named(tmp_path):
  # A LoRA that splits a [width, heads, head_dim] query kernel inside its input axis.
  flat = jtree.flatten(base("vit")["params"])
  q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query"
  flat[f"{q}/lora_a"] = np.ones((16, 2), np.float32)
  flat[f"{q}/lora_b"] = np.ones((2, 64), np.float32)
  with pytest.raises(CheckpointError, match=f"{q}: adapter .* does not split kernel"):
    peft.export_peft(ref.build("vit"), {"params": jtree.unflatten(flat)}, tmp_path, alpha=4)
  # A BERT adapter into a BERT of another width: every shape problem listed.
  wrong = ref.build("bert").__class__(3, bert.BertConfig(
      vocab_size=100, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=64,
      max_position=64))
  import jax
  shapes = jax.eval_shape(lambda: wrong.init(jax.random.PRNGKey(0), ref.inputs("bert")))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  with pytest.raises(CheckpointError, match="does not fit kernel") as e:
    peft_import.import_peft(zeros["params"], PEFT_DIR / "jtl_adapter" / "bert", layout="bert")
  assert str(e.value).count("does not fit") >= 7
  # Not a LoRA adapter / not a folder.
  (tmp_path / "cfg").mkdir()
  (tmp_path / "cfg" / peft.CONFIG_FILE).write_text(json.dumps({"peft_type": "IA3"}))
  (tmp_path / "cfg" / peft.WEIGHTS_FILE).write_bytes(
      (PEFT_DIR / "jtl_adapter" / "bert" / peft.WEIGHTS_FILE).read_bytes())
  with pytest.raises(CheckpointError, match="peft_type 'IA3'"):
    peft_import.import_peft(base("bert")["params"], tmp_path / "cfg", layout="bert")
  with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
    peft_import.import_peft(base("bert")["params"], tmp_path, layout="bert")
  with pytest.raises(ConfigError, match="pass alpha"):
    hf_export.export_hf(ref.build("bert"), adapted("bert"), tmp_path / "m")


def _lora_workdir(root):
  """A LoRA run's workdir as scripts/finetune.py leaves it (config in the meta)."""
  import jax
  import optax

  import configs.default
  from jtl import models, state
  from jtl.app import experiment
  from jtl.checkpoint import manager
  config = configs.default.get_config()
  config.update({"model": "vit_ti16", "pretrained": False, "image_size": 32})
  config.strategy = {"name": "lora", "rank": 2, "alpha": 4.0}
  created = models.create("vit_ti16", num_classes=2, pretrained=False, seed=0)
  flat = jtree.flatten(created.variables["params"])
  rng = np.random.default_rng(0)
  for i in range(12):
    module = f"Transformer/encoderblock_{i}/MlpBlock_0/Dense_0"
    flat[f"{module}/lora_a"] = rng.standard_normal((192, 2)).astype(np.float32)
    flat[f"{module}/lora_b"] = rng.standard_normal((2, 768)).astype(np.float32)
  flat["head/kernel"] = rng.standard_normal((192, 2)).astype(np.float32)
  variables = {**created.variables, "params": jtree.unflatten(flat)}
  labels = jax.tree.map(lambda _: "all", variables["params"])
  train_state = state.create_train_state(variables, labels, optax.sgd(0.0))
  mngr = manager.CheckpointManager(root / "run", best_metric="accuracy", async_save=False)
  mngr.save(1, train_state, metrics={"accuracy": 0.5}, meta=experiment.run_meta(config, 2),
            force=True)
  mngr.close()
  return root / "run", variables


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_convert_script_exports_a_lora_workdir(tmp_path):
  workdir, variables = _lora_workdir(tmp_path)
  result = run_script("convert.py", f"--workdir={workdir}", "--format=peft")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "adapter_model.safetensors" in result.stdout
  config = json.loads((workdir / "export" / "peft" / peft.CONFIG_FILE).read_text())
  assert config["target_modules"] == ["fc1"] and config["modules_to_save"] == ["head"]
  assert config["base_model_name_or_path"] is None  # a pretrained=False run's base
  params, alpha = peft_import.import_peft(jtree.unflatten(
      {p: v for p, v in jtree.flatten(variables["params"]).items() if "lora" not in p}),
      workdir / "export" / "peft", layout="timm_vit")
  assert alpha == 4.0
  for p, v in jtree.flatten(variables["params"]).items():
    np.testing.assert_array_equal(np.asarray(jtree.flatten(params)[p]), v, err_msg=p)
  # Merged weights in timm's layout from the same workdir (library call, no 2nd process).
  out = workdirs.export_hub_format(workdir, "hf")
  import safetensors.numpy
  back = hub_models.convert_timm_vit(
      safetensors.numpy.load_file(str(out / "model.safetensors")), num_heads=3)
  merged = jtree.flatten(lora.merge_lora(variables["params"], 4.0))
  np.testing.assert_allclose(back["params/Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel"],
                             merged["Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel"])
  assert json.loads((out / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
  # evaluate.py --format: the same library call, the same files.
  result = run_script("evaluate.py", f"--workdir={workdir}", "--format=peft",
                      f"--export_dir={tmp_path / 'from_evaluate'}", "--step=best")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "adapter_model.safetensors" in result.stdout
  for name in (peft.CONFIG_FILE, peft.WEIGHTS_FILE):
    assert ((tmp_path / "from_evaluate" / name).read_bytes()
            == (workdir / "export" / "peft" / name).read_bytes()), name
  with pytest.raises(ConfigError, match="format 'onnx'"):
    workdirs.export_hub_format(workdir, "onnx")
  # What evaluate.py evaluates: the plain model with the adapters folded in.
  run = workdirs.restore(workdir)
  assert run.alpha == 4.0
  folded = jtree.flatten(run.merged_variables()["params"])
  assert not any("lora" in p for p in folded)
  np.testing.assert_allclose(folded["Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel"],
                             merged["Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """`_lora_workdir`, made once for the module (vit_ti16's init: ~10 s on 2 cores)."""
  return _lora_workdir(tmp_path_factory.mktemp("lora"))[0]


def test_peft_base_model_is_the_runs_pretrained_source(lora_run, tmp_path, caplog):
  """Audit: a pretrained=False run's adapter_config named the published weights
  ('vit_ti16/augreg_in21k') as the base its adapters were trained on."""
  workdir = shutil.copytree(lora_run, tmp_path / "run")  # pretrained=False
  for pretrained, base in ((False, None), (True, "vit_ti16/augreg_in21k"),
                           ("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k",
                            "timm/vit_tiny_patch16_224.augreg_in21k")):
    for meta in workdir.glob("checkpoints/*/meta/metadata"):
      saved = json.loads(meta.read_text())
      saved["config"]["pretrained"] = pretrained
      meta.write_text(json.dumps(saved))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      out = workdirs.export_hub_format(workdir, "peft", out=tmp_path / str(pretrained))
    config = json.loads((out / peft.CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == base
    assert ("random initialisation (pretrained=False)" in caplog.text) == (base is None)


def test_hf_export_of_a_run_reloads_with_the_runs_preprocessing(lora_run, tmp_path):
  """Audit: config.json recorded the published preprocessing (224 px, crop_pct
  0.875 / 0.9), not the run's (32 px, the whole image resized): the folder
  reloaded gave logits 3.28 away from workdirs.load's, top-1 agreement 50%."""
  workdir = lora_run  # vit_ti16 (224 px) fine-tuned at 32 px
  out = workdirs.export_hub_format(workdir, "hf", out=tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["model_args"]["img_size"] == 32
  assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
  assert {k: config["pretrained_cfg"][k] for k in ("crop_pct", "crop_mode", "interpolation",
                                                    "mean", "std")} == {
      "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear",
      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
  rebuilt = models.create(str(out), num_classes=2)
  assert rebuilt.variables["params"]["pos_embedding"].shape == (1, 1 + 2 * 2, 192)
  images = np.random.default_rng(0).integers(0, 256, (3, 40, 52, 3), np.uint8)
  ready = workdirs.load(workdir)
  want = np.asarray(ready.model(ready.preprocess(images)))
  got = rebuilt.module.apply(rebuilt.variables, rebuilt.preprocess(images))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_hf_export_of_a_dinov2_run_reloads_with_the_runs_preprocessing(tmp_path):
  """Audit: a DINOv2 folder had no preprocessor_config.json, so it reloaded with
  the published view (shorter side 64, central 56, bicubic for this 56 px
  model), not the run's (the whole image resized to 42 px, bilinear)."""
  config = default.get_config()  # the tiny transformers folder, fine-tuned at 42 px
  config.update({"model": str(FIXTURES / "dinov2_tiny"), "pretrained": True, "image_size": 42})
  v = models.create(config.model, num_classes=2, seed=0).variables
  rng = np.random.default_rng(0)
  head = {"kernel": rng.standard_normal((64, 2)).astype(np.float32),
          "bias": np.zeros((2,), np.float32)}
  workdir = saved_run(tmp_path / "run", config, {"params": {**v["params"], "head": head}})
  out = workdirs.export_hub_format(workdir, "hf", out=tmp_path / "hf")
  assert json.loads((out / "config.json").read_text())["image_size"] == 56  # the embeddings'
  processor = json.loads((out / "preprocessor_config.json").read_text())
  assert {k: processor[k] for k in ("size", "do_center_crop", "resample", "image_mean")} == {
      "size": {"height": 42, "width": 42}, "do_center_crop": False, "resample": 2,
      "image_mean": [0.485, 0.456, 0.406]}
  rebuilt = models.create(str(out))
  images = rng.integers(0, 256, (3, 40, 52, 3), np.uint8)
  ready = workdirs.load(workdir)
  want = np.asarray(ready.model(ready.preprocess(images)))
  got = rebuilt.module.apply(rebuilt.variables, rebuilt.preprocess(images))
  np.testing.assert_allclose(got, want, atol=1e-5)


def _dann_resnet_workdir(root):
  """A LoRA run (no adapter trained yet) of DANN with method.batchnorm='separate'
  on resnet18 at 32 px: its running statistics are the source domain's
  (shifted by 3 from the target's)."""
  photos = colour_photos(root / "photos", ("cat", "dog"), {"train": 4, "test": 2},
                         size=(40, 40))
  config = default.get_config()
  config.update({"model": "resnet18", "pretrained": False, "image_size": 32,
                 "dataset": f"folder:{photos}", "train_split": "train", "eval_split": "test",
                 "batch_size": 8, "eval_batch_size": 8})
  config.strategy = {"name": "lora", "rank": 2, "alpha": 4.0}
  config.method = {"name": "dann", "target_dataset": f"folder:{photos}",
                   "batchnorm": "separate"}
  v = jax.tree.map(np.asarray, models.create("resnet18", num_classes=2, pretrained=False,
                                             seed=0).variables)
  domain_head = {"Dense_0": {"kernel": np.zeros((512, 1), np.float32),
                             "bias": np.zeros((1,), np.float32)}}
  wrapped = {"params": {"model": v["params"], "domain": domain_head},
             "batch_stats": {"model": jax.tree.map(lambda a: a + 3.0, v["batch_stats"])}}
  return saved_run(root / "run", config, wrapped), photos


@pytest.mark.slow  # builds resnet18, two AdaBN passes (10 s); test_deploy checks ONNX fast
def test_hub_exports_of_a_separate_batchnorm_dann_run_are_the_evaluated_model(tmp_path):
  """Audit: --format hf shipped the source-domain statistics, not the AdaBN
  ones evaluate.py scores with; --format peft cannot carry them."""
  workdir, _ = _dann_resnet_workdir(tmp_path)
  out = workdirs.export_hub_format(workdir, "hf", out=tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["adabn"]["why"] == "method.batchnorm='separate'"
  rebuilt = models.create(str(out), num_classes=2)
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  ready = workdirs.load(workdir)
  loaded = np.asarray(ready.model(x))
  np.testing.assert_allclose(rebuilt.module.apply(rebuilt.variables, x), loaded, atol=1e-4)
  run = workdirs.restore(workdir)
  source = np.asarray(run.module.apply(run.merged_variables(), x, train=False))
  assert np.abs(loaded - source).max() > 0.1  # AdaBN changed the model
  # The folder's own preprocessing is the run's (32 px, the whole image resized).
  images = np.random.default_rng(1).integers(0, 256, (3, 40, 52, 3), np.uint8)
  np.testing.assert_allclose(rebuilt.module.apply(rebuilt.variables, rebuilt.preprocess(images)),
                             ready.model(ready.preprocess(images)), atol=1e-4)
  with pytest.raises(ConfigError, match=r"AdaBN(.|\n)*Use --format hf"):
    workdirs.export_hub_format(workdir, "peft", out=tmp_path / "peft")
  assert not (tmp_path / "peft").exists()


def _edited_adapter(tmp_path, name, config_edit=None, weights=None, tensors_edit=None):
  """A copy of the jtl-exported fixture adapter `name` with its config or
  weights changed."""
  src, dst = PEFT_DIR / "jtl_adapter" / name, tmp_path / name
  dst.mkdir()
  config = json.loads((src / peft.CONFIG_FILE).read_text())
  text = config_edit(config) if config_edit else None
  (dst / peft.CONFIG_FILE).write_text(text if isinstance(text, str) else json.dumps(config))
  data = (src / peft.WEIGHTS_FILE).read_bytes()
  if tensors_edit is not None:
    from safetensors.numpy import load, save
    tensors = dict(load(data))
    tensors_edit(tensors)
    data = save(tensors)
  (dst / peft.WEIGHTS_FILE).write_bytes(weights(data) if weights else data)
  return dst


def test_regex_pattern_keys_match_as_peft_does(tmp_path):
  """alpha_pattern / rank_pattern keys are regexes matched on the module name
  or a part of it after a ".": written as regexes they give the same import."""
  want, _ = peft_import.import_peft(base("vit")["params"], PEFT_DIR / "jtl_adapter" / "vit",
                                    layout="timm_vit")

  def regexes(config):
    config["alpha_pattern"] = {r"^blocks\.0\.attn\.qkv$": 8.0, r"(?:.*)1\.attn\.qkv": 16.0}
    config["rank_pattern"] = {r"blocks\.[0]\.attn\.qkv": 4, r"attn.proj": 4, r"\d\.attn\.qkv": 8}
  got, _ = peft_import.import_peft(base("vit")["params"], _edited_adapter(tmp_path, "vit", regexes),
                                   layout="timm_vit")
  want, got = jtree.flatten(want), jtree.flatten(got)
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


@pytest.mark.parametrize("key", [r"(.+)+Z", r"(\w|.)*Z", r"(a*)*b", r"(?=blocks).*", r"(x)\1"])
def test_pattern_keys_that_could_backtrack_for_ever_are_refused(tmp_path, key):
  """Nested quantifiers ((.*.*)*Z takes hours on 'blocks.0.mlp.fc1' with
  PEFT's re.match), alternatives under a quantifier, look-arounds and
  back-references: a CheckpointError naming the field and key, at once."""
  def hostile(config):
    config["alpha_pattern"] = {key: 2.0, **config["alpha_pattern"]}
  folder = _edited_adapter(tmp_path, "vit", hostile)
  with pytest.raises(CheckpointError, match=rf"adapter_config.json alpha_pattern key "
                     rf"{re.escape(repr(key))}"):
    peft_import.import_peft(base("vit")["params"], folder, layout="timm_vit")


def _zero_rank(tensors):
  key = "base_model.model.blocks.0.mlp.fc1.lora_A.weight"
  tensors[key] = tensors[key][:0]


@pytest.mark.parametrize("edit,where", [
    (dict(config_edit=lambda c: "{not json"), r"adapter_config.json: not a readable JSON"),
    (dict(config_edit=lambda c: "[1, 2]"), r"adapter_config.json: a JSON list"),
    (dict(config_edit=lambda c: c.update(alpha_pattern=["x"])),
     r"adapter_config.json alpha_pattern is list"),
    (dict(config_edit=lambda c: c.update(rank_pattern={"(": 4})),
     r"adapter_config.json rank_pattern key '\(': not a usable regex"),
    (dict(config_edit=lambda c: c.update(alpha_pattern={"blocks.0.mlp.fc1": 0})),
     r"alpha_pattern key 'blocks.0.mlp.fc1'.*value 0; expected a positive number"),
    (dict(config_edit=lambda c: c.update(lora_alpha=0)),
     r"adapter_config.json lora_alpha=0; expected a positive number"),
    (dict(config_edit=lambda c: c.update(lora_alpha="abc")), r"lora_alpha='abc'"),
    (dict(config_edit=lambda c: c.update(r=0)), r"adapter_config.json r=0"),
    (dict(config_edit=lambda c: c.update(use_rslora="yes")), r"use_rslora='yes'"),
    (dict(config_edit=lambda c: c.update(r=3)),
     r"blocks.0.mlp.fc1: adapter_config.json gives rank 3 .* lora_A has rank 2"),
    (dict(tensors_edit=_zero_rank), r"blocks.0.mlp.fc1: lora_A \(0, 32\) .* not a LoRA pair"),
    (dict(weights=lambda d: d[:len(d) // 2]), r"adapter_model.safetensors"),
    (dict(weights=lambda d: b"\xff" * 8 + d[8:]), r"adapter_model.safetensors"),
])
def test_damaged_adapter_folder_is_one_checkpoint_error(tmp_path, edit, where):
  """A damaged adapter folder (JSON, config fields, r=0 / alpha=0, a bad regex,
  truncated safetensors): one CheckpointError naming the file and field, not
  a JSONDecodeError, AttributeError, ZeroDivisionError, re.error or
  SafetensorError."""
  folder = _edited_adapter(tmp_path, "vit", **edit)
  with pytest.raises(CheckpointError, match=where):
    peft_import.import_peft(base("vit")["params"], folder, layout="timm_vit")


def _peft_targets(target_modules, name):
  """peft's `check_target_module_exists` (peft/tuners/tuners_utils.py): a
  string is re.fullmatch'ed against the module name; a list matches the name
  itself or a name ending with "." + an entry."""
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, name) is not None
  return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def _torch_module_kinds(name):
  """{module name: "Conv2d" | "Linear" | "other" | "container"} of the torch
  model PEFT loaded (the fixture's tensor names: every prefix is a module)."""
  kinds = {}
  for key, (shape, _) in MANIFEST["merged"][name]["tensors"].items():
    module, _, leaf = key.rpartition(".")
    parts = module.split(".")
    for i in range(1, len(parts)):
      kinds.setdefault(".".join(parts[:i]), "container")
    if leaf == "weight":
      kinds[module] = {4: "Conv2d", 2: "Linear"}.get(len(shape), "other")
    kinds.setdefault(module, "other")
  return kinds


@pytest.mark.parametrize("name,adapt", [("vit", "fixture"), ("resnet", "fixture"),
                                        ("resnet", "every_conv")])
def test_target_modules_pick_exactly_the_adapted_linear_and_conv_modules(name, adapt, tmp_path):
  """Issue 27, bug 2: a ResNet with LoRA on every conv (what strategy lora
  does) was written with target_modules ["0", "conv1", "conv2"]; PEFT matches
  "0" against layer1.0, a BasicBlock, and PeftModel.from_pretrained raises.
  (timm layouts: the file's tensor names are the module names PEFT matches.)"""
  variables = adapted(name)
  if adapt == "every_conv":
    convs = [p.rpartition("/")[0] for p, v in jtree.flatten(base(name)["params"]).items()
             if p.endswith("/kernel") and v.ndim == 4]
    variables = lora.add_lora(ref.build(name), base(name), ref.inputs(name), rank=2,
                              targets=[re.escape(c) for c in convs])
  out = peft.export_peft(lora.LoraModel(ref.build(name), ref.ALPHA), variables, tmp_path)
  config = json.loads((out / peft.CONFIG_FILE).read_text())
  import safetensors.numpy
  saved = {k[len(peft.PREFIX):].rsplit(".lora_", 1)[0]
           for k in safetensors.numpy.load_file(str(out / peft.WEIGHTS_FILE)) if ".lora_" in k}
  kinds = _torch_module_kinds(name)
  matched = {m for m in kinds if _peft_targets(config["target_modules"], m)}
  assert matched == saved, (config["target_modules"], sorted(matched ^ saved))
  assert {kinds[m] for m in matched} <= {"Conv2d", "Linear"}
  if adapt == "every_conv":  # the stem, two per block, three downsamples
    assert len(saved) == 1 + 2 * 4 + 3 and "layer2.0.downsample.0" in saved
