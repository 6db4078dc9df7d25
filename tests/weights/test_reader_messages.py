"""What a researcher sees for weights that are there but not where or how the
loader looks: each message names the file and the fix, and the fix works."""

import io
import os
import re
import zipfile

import numpy as np
import pytest
from flax import serialization
from safetensors.numpy import save_file

from jtl import models, paths, weights
from jtl.errors import CheckpointError, LoadError
from jtl.export import hf_export

LIKE = {"params": {"body": {"kernel": np.zeros((4, 3), np.float32),
                            "bias": np.zeros(3, np.float32)}}}


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def test_atomic_writes_get_the_umask_permissions_not_mkstemps(tmp_path):
  dest = tmp_path / "w.bin"
  paths.write_atomic(dest, b"x")
  assert os.stat(dest).st_mode & 0o777 == 0o666 & ~_umask()


def test_a_missing_path_is_not_offered_every_registered_source(tmp_path):
  with pytest.raises(CheckpointError) as e:
    weights.read(str(tmp_path / "nope.npz"))
  assert str(e.value) == f"{tmp_path / 'nope.npz'}: no such file or directory."
  with pytest.raises(CheckpointError, match="Did you mean:\n  - efficientnet_lite0/imagenet"):
    weights.read("efficientnet_lite0/imagenett")


def test_a_truncated_safetensors_header_is_called_truncated(tmp_path):
  save_file({"w": np.ones((4, 4), np.float32)}, tmp_path / "full.safetensors")
  blob = (tmp_path / "full.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(blob[:20])
  for fmt in (None, "safetensors"):
    with pytest.raises(CheckpointError, match=r"cut.safetensors: a safetensors file cut short: "
                                              r"its header declares \d+ bytes"):
      weights.read(tmp_path / "cut.safetensors", format=fmt)
  (tmp_path / "tiny.safetensors").write_bytes(blob[:5])
  with pytest.raises(CheckpointError, match="cut short"):
    weights.read(tmp_path / "tiny.safetensors")


def test_a_folder_of_weight_files_names_them(tmp_path):
  save_file({"w": np.ones(2, np.float32)}, tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"holding weight files \['model.safetensors'\]: "
                                            "pass one of those files"):
    weights.read(tmp_path)


def test_a_saved_training_state_points_to_subtree_and_subtree_loads_it(tmp_path):
  state = {"state": {"params": LIKE["params"], "step": np.int32(3)}}
  (tmp_path / "run.msgpack").write_bytes(serialization.to_bytes(state))
  with pytest.raises(LoadError, match=r"under the prefix 'state' .*pass subtree='state'"):
    weights.load_pretrained(tmp_path / "run.msgpack", LIKE)
  variables, report = weights.load_pretrained(tmp_path / "run.msgpack", LIKE, subtree="state",
                                              skip=["step"])
  assert report.ok and len(report.loaded) == 2


def _suggested_converter(message: str):
  """The converter a LoadError's advice suggests, evaluated as written."""
  return eval(re.search(r"converter=(lambda flat: \{[^{}]*\})", message).group(1))  # noqa: S307


def test_dotted_names_point_to_a_converter_that_loads_as_written(tmp_path):
  save_file({"body.kernel": np.ones((4, 3), np.float32), "body.bias": np.ones(3, np.float32)},
            tmp_path / "dots.safetensors")
  with pytest.raises(LoadError, match=r"use '\.' where the model's use '/'") as e:
    weights.load_pretrained(tmp_path / "dots.safetensors", LIKE)
  # Its output gets "params/" before it, as the source's names without a converter.
  variables, report = weights.load_pretrained(tmp_path / "dots.safetensors", LIKE,
                                              converter=_suggested_converter(str(e.value)))
  assert report.ok and len(report.loaded) == 2
  np.testing.assert_array_equal(variables["params"]["body"]["kernel"], 1.0)


def test_another_collection_name_points_to_a_renaming_converter(tmp_path):
  # An NNX run's "state/" checkpoint for a Linen model's "batch_stats/": not
  # a prefix to strip with subtree=, a collection to rename.
  like = {**LIKE, "batch_stats": {"bn": {"mean": np.zeros(3, np.float32)}}}
  np.savez(tmp_path / "nnx.npz", **{"params/body/kernel": np.ones((4, 3), np.float32),
                                    "params/body/bias": np.ones(3, np.float32),
                                    "state/bn/mean": np.full(3, 2.0, np.float32)})
  with pytest.raises(LoadError, match=r"the model's 'batch_stats' leaves under 'state' "
                                      r"\(e\.g\. 'state/bn/mean' for 'batch_stats/bn/mean'\)"
                     ) as e:
    weights.load_pretrained(tmp_path / "nnx.npz", like)
  assert "subtree=" not in str(e.value)
  variables, report = weights.load_pretrained(tmp_path / "nnx.npz", like,
                                              converter=_suggested_converter(str(e.value)))
  assert report.ok and len(report.loaded) == 3
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], 2.0)


def test_zero_heavy_compressed_npz_loads_with_max_expansion(tmp_path):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
    for name, value in (("body/kernel", np.zeros((4, 3), np.float32)),
                        ("body/bias", np.zeros(3, np.float32)),
                        ("pruned", np.zeros(20_000_000, np.float32))):
      with zf.open(name + ".npy", "w") as f:
        np.lib.format.write_array(f, value)
  (tmp_path / "z.npz").write_bytes(buffer.getvalue())
  with pytest.raises(CheckpointError, match="max_expansion=.* jtl.load_pretrained"):
    weights.load_pretrained(tmp_path / "z.npz", LIKE, skip=["pruned"])
  _, report = weights.load_pretrained(tmp_path / "z.npz", LIKE, skip=["pruned"],
                                      max_expansion=None)
  assert len(report.loaded) == 2


def test_an_exported_text_model_folder_keeps_its_tokenizer(tmp_path):
  created = models.create("minilm_l6", pretrained=True)
  hf_export.export_hf(created.module, created.variables, tmp_path / "hf",
                      tokenizer=created.spec.tokenizer_file())
  again = models.create(str(tmp_path / "hf"))
  source = created.spec.tokenizer_file().parent
  for name in hf_export.TOKENIZER_FILES:  # what transformers' AutoTokenizer reads
    assert (tmp_path / "hf" / name).read_bytes() == (source / name).read_bytes()
  texts = ["A man is playing a guitar.", "Bread is baked in an oven."]
  want, got = created.preprocess(texts), again.preprocess(texts)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
