"""A BERT task model whole (issue 27): jtl's Bert(pool="cls_pooler") is
transformers' BertForSequenceClassification (head on the [CLS] pooler
output), so a PEFT adapter saved from one imports with its classifier as
jtl's head, and the export writes what BertForSequenceClassification loads;
against the logits of the real transformers 5.24.0 / peft 0.21.2
(tests/fixtures/make_bert_cls_reference.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from app_helpers import load_file

from jtl import tree as jtree
from jtl.app import preflight
from jtl.errors import CheckpointError
from jtl.export import hf_export, hf_layout, peft, peft_import
from jtl import models
from jtl.models import bert, registry, text
from jtl.recipes.strategies import lora

FIXTURES = Path(__file__).parents[1] / "fixtures"
DIR = FIXTURES / "peft" / "bert_cls"
gen = load_file(FIXTURES / "make_bert_cls_reference.py")
ref = gen.ref  # make_peft_reference.py: the tiny BERT, its seeded weights and input
REF = np.load(DIR / "reference.npz")
MANIFEST = json.loads((DIR / "manifest.json").read_text())
TOL = 1e-5  # float32 forward passes in two frameworks


@functools.cache
def base():
  return ref.base_variables("bert")


@functools.cache
def _apply():
  return jax.jit(gen.build().apply)  # one compile of the tiny BERT (eager: ~2x the CPU)


def _logits(variables):
  return np.asarray(_apply()(variables, ref.inputs("bert")))


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_peft_adapter_of_bert_for_sequence_classification_imports_whole():
  """PEFT's SEQ_CLS adapter (LoRA on query/value, classifier saved whole):
  jtl's logits after import == transformers' PeftModel's."""
  folder = DIR / "peft_trained"
  params, alpha = peft_import.import_peft(base()["params"], folder, layout="bert_cls")
  flat = jtree.flatten(params)
  assert sorted(p for p in flat if p.endswith("/lora_a")) == [
      f"layer_{i}/attention/{m}/lora_a" for i in (0, 1) for m in ("query", "value")]
  assert _max_diff(flat["head/kernel"], base()["params"]["head"]["kernel"]) > 1e-3
  logits = _logits({**base(), "params": lora.merge_lora(params, alpha)})
  diff = _max_diff(logits, REF["peft_trained/logits"])
  print(f"BertForSequenceClassification PEFT adapter in jtl: max |jtl - peft| = {diff:.2e}")
  assert diff < TOL
  # The adapter and the classifier changed the model: the comparison is not vacuous.
  assert _max_diff(REF["peft_trained/logits"], REF["base/logits"]) > 0.05
  assert _max_diff(_logits(base()), REF["base/logits"]) < TOL


def test_task_model_adapter_into_a_mean_pooled_head_names_the_kwarg():
  """layout="bert" (head on the mean-pooled features) refuses the classifier,
  naming the model kwarg and the layout that load it."""
  with pytest.raises(CheckpointError, match=r"\['classifier'\].*pool='cls_pooler'.*"
                     r"model_kwargs=\{'pool': 'cls_pooler'\}.*layout='bert_cls'"):
    peft_import.import_peft(base()["params"], DIR / "peft_trained", layout="bert")
  # ... and a BertModel adapter into "bert_cls" says which layout its keys are.
  with pytest.raises(CheckpointError, match=r"not under 'bert\.'.*BertModel, layout='bert'"):
    peft_import.import_peft(base()["params"], FIXTURES / "peft" / "jtl_adapter" / "bert",
                            layout="bert_cls")


def test_export_is_what_bert_for_sequence_classification_loaded(tmp_path):
  """export_hf / export_peft of a cls_pooler Bert: the base file transformers
  loaded (same sha256), the merged layout and config it loaded strictly, the
  adapter PeftModel loaded (same bytes); jtl's adapted logits == both."""
  module = gen.build()
  assert hf_layout.layout_of(module) == "bert_cls"
  assert hf_layout.layout_of(module.clone(num_classes=0)) == "bert"  # BertModel
  out = hf_export.export_hf(module, base(), tmp_path / "base")
  assert (hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
          == MANIFEST["base_sha256"])
  assert not (out / "head.safetensors").exists()  # the classifier is in model.safetensors
  adapted = ref.adapted_variables("bert")
  out = hf_export.export_hf(module, adapted, tmp_path / "merged", alpha=ref.ALPHA)
  import safetensors.numpy
  tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
  assert {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items()} == (
      MANIFEST["merged"]["tensors"])
  assert json.loads((out / "config.json").read_text()) == MANIFEST["merged"]["config.json"]
  out = peft.export_peft(lora.LoraModel(module, ref.ALPHA), adapted, tmp_path / "adapter",
                         base_model_name_or_path="jtl-fixture/bert_cls")
  for f in (peft.CONFIG_FILE, peft.WEIGHTS_FILE):
    assert (out / f).read_bytes() == (DIR / "jtl_adapter" / f).read_bytes(), f
  logits = _logits({**adapted, "params": lora.merge_lora(adapted["params"], ref.ALPHA)})
  for source in ("merged", "jtl_adapter"):
    assert _max_diff(logits, REF[f"{source}/logits"]) < TOL, source
  # The merged file maps back through jtl's converter ("bert." and classifier) ...
  back = bert.convert_torch(tensors)
  merged = jtree.flatten({"params": lora.merge_lora(adapted["params"], ref.ALPHA)})
  assert sorted(back) == sorted(merged)
  for k, v in merged.items():
    np.testing.assert_array_equal(back[k], np.asarray(v), err_msg=k)
  # ... and the folder is a model again: its config.json says the head and the pool.
  created = models.create(str(tmp_path / "merged"))
  assert created.module == module and created.report.ok  # num_classes 3, pool="cls_pooler"
  np.testing.assert_allclose(_logits(created.variables), logits, atol=1e-6)


def test_pool_is_a_model_kwarg_checked_before_training():
  spec = registry.get_spec("minilm_l6")
  assert "pool" in preflight.model_options(spec)
  assert spec.build(num_classes=3, pool="cls_pooler").pool == "cls_pooler"
  config = ml_collections.ConfigDict({"model": "minilm_l6", "model_kwargs": {"pool": "cls"}})
  assert "Bert.pool must be one of ('mean', 'cls_pooler'); found 'cls'" in (
      preflight.model_kwargs_problems(config, spec)[0])


def test_an_hf_export_of_a_mean_pooled_head_reloads_with_its_head_and_max_length(tmp_path):
  config = bert.BertConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                           max_position=32)
  module = bert.Bert(num_classes=3, config=config)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), bert.example_input(1))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  tokenizer = text.minilm_dir() / "tokenizer.json"
  out = hf_export.export_hf(module, variables, tmp_path / "hf", tokenizer=tokenizer,
                            max_length=16)
  saved = json.loads((out / "tokenizer.json").read_text())
  assert saved["truncation"]["max_length"] == 16 and saved["padding"]["strategy"] == {
      "Fixed": 16}
  created = models.create(str(out), num_classes=3)
  assert not created.report.reinitialised
  batch = created.spec.preprocess(["a fine film", "word " * 40])
  assert batch["input_ids"].shape == (2, 16)
  apply = jax.jit(module.apply)  # the same module config: one compilation
  np.testing.assert_allclose(apply(created.variables, batch), apply(variables, batch),
                             atol=1e-5)
