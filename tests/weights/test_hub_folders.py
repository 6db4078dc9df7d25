"""Weights from a folder in the Hub layout (config.json + model.safetensors:
what `convert.py --format hf` writes, what `huggingface-cli download
--local-dir` leaves) load wherever `hf-hub:` does; a zoo name given a timm
file says to load it that way (never strict=False)."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save as st_save
from hub_helpers import _random, _timm_config, _timm_vit_reference, timm_vit_shapes

import jtl
from jtl import models
from jtl.export import hf_export
from jtl.errors import CheckpointError, LoadError


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
  """A tiny timm ViT (2 blocks, width 32, 32 px, 5 classes) as a Hub folder."""
  folder = tmp_path_factory.mktemp("hub") / "tiny-vit"
  folder.mkdir()
  sd = _random(timm_vit_shapes(32, 2, patch=8, image=32, num_classes=5))
  (folder / "config.json").write_bytes(_timm_config(
      "vit_tiny_patch16_224", size=32, mean=(.5,) * 3, std=(.5,) * 3, crop=0.9, num_classes=5,
      model_args={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8,
                  "img_size": 32}))
  (folder / "model.safetensors").write_bytes(st_save(sd))
  return folder, sd


X = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)


def logits(created):
  return np.asarray(jax.jit(created.module.apply)(created.variables, X))


def test_folder_loads_as_the_hub_repo_would(vit_folder):
  folder, sd = vit_folder
  want = _timm_vit_reference(sd, X.astype(np.float64), heads=2)
  for name in (str(folder), f"hf-hub:{folder}"):
    created = models.create(name)
    assert created.report.ok and len(created.report.loaded) == 40, name
    assert (created.spec.image_size, created.spec.default_num_classes) == (32, 5)
    assert created.spec.normalization.mean == (0.5, 0.5, 0.5)
    np.testing.assert_allclose(logits(created), want, atol=1e-5, err_msg=name)
  # pretrained=<folder> is its weights file (was read as an Orbax directory).
  again = models.create(f"hf-hub:{folder}", num_classes=3, pretrained=str(folder))
  assert [e.path for e in again.report.reinitialised] == ["params/head/bias",
                                                          "params/head/kernel"]
  assert sorted(jtl.weights.read(folder)) == sorted(sd)
  nnx_model = models.create(str(folder), api="nnx").module
  np.testing.assert_allclose(np.asarray(nnx_model(X)), want, atol=1e-5)


def test_an_hf_export_loads_back_from_its_folder(vit_folder, tmp_path):
  """convert.py --format hf's folder is itself a model source."""
  folder, _ = vit_folder
  created = models.create(str(folder), num_classes=3)
  created = created.__class__(created.module, jax.tree.map(lambda v: v + 0.01,
                                                           created.variables),
                              created.report, created.preprocess, created.spec)
  out = hf_export.export_hf(created.module, created.variables, tmp_path / "export")
  back = models.create(str(out))
  assert back.report.ok and back.spec.default_num_classes == 3
  np.testing.assert_allclose(logits(back), logits(created), atol=1e-5)


def test_zoo_model_with_a_timm_file_points_to_its_config_json(vit_folder):
  folder, _ = vit_folder
  with pytest.raises(LoadError) as e:
    models.create("vit_ti16", pretrained=str(folder / "model.safetensors"))
  message = str(e.value)
  assert f"models.create({str(folder)!r})" in message
  assert "strict=False is no fix: it would leave 198 of 'vit_ti16''s tensors" in message
  assert "strict=False to keep" not in message
  assert "Orbax" not in message


def test_folder_without_weights_or_shards_is_a_clear_error(vit_folder, tmp_path):
  folder, _ = vit_folder
  (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
  with pytest.raises(CheckpointError, match="has a config.json but none of the weight files"):
    models.create(str(tmp_path))
  (tmp_path / "model.safetensors.index.json").write_text(
      '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
  with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
    jtl.weights.read(tmp_path)
