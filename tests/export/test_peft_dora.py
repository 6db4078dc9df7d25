"""DoRA adapters in the PEFT format, against real PEFT's recorded outputs
(tests/fixtures/make_peft_dora_reference.py: peft 0.21.2, timm 1.0.31, torch
2.13.0 on the CPU): jtl's DoRA adapter loaded by `PeftModel.from_pretrained`
gives jtl's outputs, and a DoRA adapter PEFT trained gives PEFT's in jtl.
Fixture models: make_peft_reference's tiny timm ViT (fused qkv, MLP, attention
output, patch conv) and one-block-per-stage ResNet (3x3/7x7/strided 1x1 convs).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jtl import tree as jtree
from jtl.errors import CheckpointError
from jtl.export import peft, peft_import
from jtl.recipes.strategies import lora

FIXTURES = Path(__file__).parents[1] / "fixtures"
DORA_DIR = FIXTURES / "peft" / "dora"
spec = importlib.util.spec_from_file_location("make_peft_dora_reference",
                                              FIXTURES / "make_peft_dora_reference.py")
dref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dref)
ref = dref.ref
REF = np.load(DORA_DIR / "reference.npz")
LAYOUT = {"vit": "timm_vit", "resnet": "timm_resnet"}
TOL = 1e-5  # float32 forward passes in two frameworks


@functools.cache
def dora(name):
  return dref.dora_variables(name)


def _logits(name, params, alpha=ref.ALPHA):
  variables = {**ref.base_variables(name), "params": lora.merge_lora(params, alpha)}
  return np.asarray(ref.build(name).apply(variables, ref.inputs(name)))


@pytest.mark.parametrize("name", dref.MODELS)
def test_jtl_dora_adapter_is_the_file_peft_loaded_and_gives_its_outputs(name, tmp_path):
  out = peft.export_peft(lora.LoraModel(ref.build(name), ref.ALPHA), dora(name), tmp_path,
                         base_model_name_or_path=f"jtl-fixture/{name}")
  committed = DORA_DIR / "jtl_adapter" / name
  for f in (peft.CONFIG_FILE, peft.WEIGHTS_FILE):
    assert (out / f).read_bytes() == (committed / f).read_bytes(), f
  assert json.loads((out / peft.CONFIG_FILE).read_text())["use_dora"] is True
  logits = _logits(name, dora(name)["params"])
  diff = float(np.abs(logits - REF[f"{name}/jtl_adapter/logits"]).max())
  print(f"{name}: max |jtl DoRA - PeftModel(jtl DoRA adapter)| = {diff:.2e}")
  assert diff < TOL
  # The magnitudes change the outputs: without them (plain LoRA) they differ.
  plain = {p: v for p, v in jtree.flatten(dora(name)["params"]).items()
           if not p.endswith("/lora_magnitude")}
  assert np.abs(_logits(name, jtree.unflatten(plain)) - logits).max() > 1e-3
  if name == "resnet":  # the training wrapper (activation-space DoRA) agrees too
    trained = lora.LoraModel(ref.build(name), ref.ALPHA).apply(dora(name), ref.inputs(name))
    assert float(np.abs(np.asarray(trained) - logits).max()) < TOL


@pytest.mark.parametrize("name", dref.MODELS)
def test_peft_trained_dora_adapter_imports_into_jtl(name):
  folder = DORA_DIR / "peft_trained" / name
  params, alpha = peft_import.import_peft(ref.base_variables(name)["params"], folder,
                                          layout=LAYOUT[name])
  flat = jtree.flatten(params)
  magnitudes = [p for p in flat if p.endswith("/lora_magnitude")]
  # ViT: qkv (-> query, key, value), proj, fc1, fc2 in 2 blocks and the patch
  # conv (patch_embed.proj); ResNet: conv1/conv2 of 4 blocks and the stem conv1.
  assert len(magnitudes) == {"vit": 13, "resnet": 9}[name]
  assert len(magnitudes) == sum(p.endswith("/lora_a") for p in flat)
  logits = _logits(name, params, alpha)
  recorded = REF[f"{name}/peft_trained/logits"]
  diff = float(np.abs(logits - recorded).max())
  print(f"{name}: max |jtl - PEFT| of a PEFT-trained DoRA adapter = {diff:.2e}")
  assert diff < TOL
  plain = ref.build(name).apply(ref.base_variables(name), ref.inputs(name))
  assert np.abs(np.asarray(plain) - recorded).max() > 1e-3  # it trained


@pytest.mark.parametrize("name", dref.MODELS)
def test_dora_export_then_import_is_exact_and_mixed_adapters_are_refused(name, tmp_path):
  peft.export_peft(lora.LoraModel(ref.build(name), ref.ALPHA), dora(name), tmp_path / "a")
  params, _ = peft_import.import_peft(ref.base_variables(name)["params"], tmp_path / "a",
                                      layout=LAYOUT[name])
  got = jtree.flatten(params)
  want = jtree.flatten(dora(name)["params"])
  if name == "vit":  # a projection without an adapter in a DoRA qkv gets one (B = 0
    # columns of the fused B) to hold its magnitude; compare the model instead
    np.testing.assert_allclose(_logits(name, params), _logits(name, dora(name)["params"]),
                               atol=1e-6)
    return
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  flat = dict(want)
  flat.pop("stem/conv/lora_magnitude")
  with pytest.raises(CheckpointError, match="use_dora covers every adapter"):
    peft.export_peft(lora.LoraModel(ref.build(name), ref.ALPHA),
                     {**dora(name), "params": jtree.unflatten(flat)}, tmp_path / "b")
