"""Tests for jtl.export.writers (`jtl.export`): round trips through `read`, atomic writes."""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jtl.export import write
from jtl.weights import load_pretrained, read
from jtl.errors import CheckpointError


def _variables():
  rng = np.random.default_rng(0)
  return {"params": {
      "stem": {"conv": {"kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32)}},
      "blocks": {"0": {"w": rng.normal(size=(8, 8)).astype(np.float16)},
                 "1": {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}},
      "head": {"kernel": rng.normal(size=(8, 10)).astype(ml_dtypes.bfloat16),
               # a transposed view: not contiguous in memory
               "bias": rng.normal(size=(10, 4)).astype(np.float32).T[0]}},
      "batch_stats": {"bn": {"mean": np.arange(8, dtype=np.float32),
                             "count": np.array(3, np.int64)}}}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".msgpack"])
def test_round_trip(tmp_path, suffix):
  variables = _variables()
  path = tmp_path / "sub" / f"model{suffix}"
  write(variables, path)
  flat = read(path)
  expected = {
      "params/stem/conv/kernel", "params/blocks/0/w", "params/blocks/1/w",
      "params/head/kernel", "params/head/bias", "batch_stats/bn/mean",
      "batch_stats/bn/count"}
  assert set(flat) == expected
  from jtl.tree import flatten
  for name, leaf in flatten(variables).items():
    leaf = np.asarray(leaf)
    got = flat[name]
    assert got.shape == leaf.shape, name
    if leaf.dtype == ml_dtypes.bfloat16 and suffix == ".npz":
      assert got.dtype == np.float32  # .npy has no bfloat16; exact widening
    else:
      assert got.dtype == leaf.dtype, name
    np.testing.assert_array_equal(got.astype(np.float64), leaf.astype(np.float64))
  assert os.listdir(path.parent) == [path.name]  # no temporary files left
  # The exported file loads back into the same structure, strictly.
  like = {"params": variables["params"]}
  loaded, report = load_pretrained(path, like, skip=[r"batch_stats/.*"])
  assert report.ok and len(report.loaded) == 5


def test_export_params_only_and_format_override(tmp_path):
  params = {"a": {"kernel": np.ones((2, 2), np.float32)}}
  write(params, tmp_path / "weights.bin", format="safetensors")
  assert list(read(tmp_path / "weights.bin")) == ["a/kernel"]


def test_export_errors_leave_existing_file_intact(tmp_path):
  path = tmp_path / "model.npz"
  write({"w": np.ones(3)}, path)
  before = path.read_bytes()
  with pytest.raises(CheckpointError, match="not: \\['w/name"):
    write({"w": {"name": np.array(["a"])}}, path)
  with pytest.raises(CheckpointError, match="suffix '.pkl'"):
    write({"w": np.ones(3)}, tmp_path / "model.pkl")
  with pytest.raises(CheckpointError, match="no leaves"):
    write({}, path)
  with pytest.raises(CheckpointError, match=r"same '/'-joined name \['a/b'\]"):
    write({"a/b": np.ones(1), "a": {"b": np.zeros(1)}}, path)  # one of them would be lost
  with pytest.raises(CheckpointError, match=r"no elements: \['e'\]"):
    write({"e": np.zeros(0), "w": np.ones(2)}, tmp_path / "ckpt", format="orbax")
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["model.npz"]  # no unfinished Orbax folder either


def test_a_suffix_of_another_format_and_a_file_in_the_way_are_refused(tmp_path):
  from jtl.export import writers
  # A safetensors file named .npz: np.load refused it; nothing is written.
  with pytest.raises(CheckpointError, match=r"model.npz: the suffix '.npz' is the npz format's, "
                                            r"but format=safetensors was asked for(.|\n)*Name "
                                            r"the file model.safetensors, or pass format=npz"):
    write({"w": np.ones(3)}, tmp_path / "model.npz", format="safetensors")
  with pytest.raises(CheckpointError, match="is the msgpack format's, but format=orbax"):
    write({"w": np.ones(3)}, tmp_path / "ckpt.msgpack", format="orbax")
  assert os.listdir(tmp_path) == []
  # scripts/convert.py names its flag.
  with pytest.raises(CheckpointError, match=r"suffix '.xyz'; .* or pass --format=<format>"):
    writers.output_format(tmp_path / "o.xyz", option="--format=")
  with pytest.raises(CheckpointError, match="but --format=npz was asked for"):
    writers.output_format(tmp_path / "o.safetensors", "npz", option="--format=")
  assert writers.output_format(tmp_path / "o.bin", "npz") == "npz"
  (tmp_path / "afile").write_text("x")
  for out in ("afile/m.npz", "afile/sub/m.npz"):
    with pytest.raises(CheckpointError, match=r"afile is a file, not a folder; pass an output "
                                              r"path inside a folder"):
      write({"w": np.ones(3)}, tmp_path / out)
  assert (tmp_path / "afile").read_text() == "x"


def test_orbax_directory_round_trip_and_never_overwrites(tmp_path):
  """Orbax is one more format of `export` (no second writer in the manager)."""
  variables = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
               "batch_stats": {"bn": {"mean": np.ones(3, np.float32)}}}
  path = write(variables, tmp_path / "ckpt", format="orbax")
  assert path == tmp_path / "ckpt" and path.is_dir()
  flat = read(path)
  np.testing.assert_array_equal(flat["params/w"], variables["params"]["w"])
  np.testing.assert_array_equal(read(path, subtree="params")["w"], variables["params"]["w"])
  with pytest.raises(CheckpointError, match="exists; Orbax does not overwrite"):
    write(variables, path, format="orbax")
