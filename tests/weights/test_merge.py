"""Tests for load_pretrained / LoadReport and the adaptations in jtl.checkpoint."""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jtl.weights import LoadReport, adapt_input_conv, load_pretrained, read, resize_pos_embed
from jtl.errors import LoadError

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"


class TinyNet(nn.Module):
  """Flax twin of the torch net in tests/fixtures/make_torch_fixtures.py."""
  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), padding="VALID", use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, epsilon=1e-5, name="bn")(x)
    x = x.reshape(x.shape[0], -1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, name="head")(x)
    return x


def torch_converter(sd):
  """torch Sequential(conv, bn, flatten, linear) -> TinyNet variables."""
  out = {"params/conv/kernel": np.transpose(sd["0.weight"], (2, 3, 1, 0)),
         "params/bn/scale": sd["1.weight"], "params/bn/bias": sd["1.bias"],
         "batch_stats/bn/mean": sd["1.running_mean"],
         "batch_stats/bn/var": sd["1.running_var"]}
  if "3.weight" in sd:
    out["params/head/kernel"] = sd["3.weight"].T
    out["params/head/bias"] = sd["3.bias"]
  return out


def _init(num_classes=5, in_ch=3):
  v = TinyNet(num_classes).init(jax.random.PRNGKey(1), jnp.zeros((1, 3, 3, in_ch)))
  return jax.tree.map(np.asarray, dict(v))


@pytest.mark.parametrize("name", ["torch_zip.pt", "torch_legacy.pt"])
def test_loaded_net_matches_torch_forward(name):
  ref = np.load(FIXTURES / "torch_forward.npz")
  sd = {k: v for k, v in read(FIXTURES / name).items() if k[:2] in ("0.", "1.", "3.")}
  variables, report = load_pretrained(sd, _init(), converter=torch_converter)
  assert report.ok and len(report.loaded) == 7
  assert report.skipped == report.missing == report.unexpected == ()
  y = TinyNet().apply(variables, np.transpose(ref["x"], (0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(y), ref["y"], rtol=1e-5, atol=1e-5)


def test_unused_state_dict_entries_are_unexpected_in_strict_mode():
  sd = read(FIXTURES / "torch_zip.pt")  # also holds "extra.*", "view.*" ...

  def keep_all(s):
    out = torch_converter(s)
    out.update({f"params/{k}": v for k, v in s.items() if k.startswith("extra.")})
    return out

  with pytest.raises(LoadError) as e:
    load_pretrained(sd, _init(), converter=keep_all)
  msg = str(e.value)
  assert "8 unexpected" in msg and "params/extra.bf16 (4,)" in msg
  assert "strict=False" in msg and "skip=" in msg
  _, report = load_pretrained(sd, _init(), converter=keep_all, strict=False)
  assert len(report.unexpected) == 8 and len(report.loaded) == 7


def _like():
  return {"params": {"stem": {"kernel": np.zeros((3, 3, 3, 4), np.float32)},
                     "block": {"w": np.zeros((4, 4), np.float32),
                               "b": np.zeros(4, np.float32)},
                     "head": {"kernel": np.full((4, 10), 7.0, np.float32),
                              "bias": np.full(10, 7.0, np.float32)}},
          "batch_stats": {"bn": {"mean": np.zeros(4, np.float32)}}}


def _src(classes=10):
  rng = np.random.default_rng(0)
  return {"params/stem/kernel": rng.normal(size=(3, 3, 3, 4)),
          "params/block/w": rng.normal(size=(4, 4)).astype(np.float32),
          "params/block/b": np.arange(4, dtype=np.float32),
          "params/head/kernel": np.ones((4, classes), np.float32),
          "params/head/bias": np.ones(classes, np.float32),
          "batch_stats/bn/mean": np.full(4, 3.0, np.float32)}


def test_exact_load_and_cast_report():
  src = _src()
  variables, report = load_pretrained(src, _like())
  assert report.ok and len(report.loaded) == 6
  stem = variables["params"]["stem"]["kernel"]
  assert stem.dtype == np.float32  # float64 in the source, like says float32
  np.testing.assert_array_equal(stem, src["params/stem/kernel"].astype(np.float32))
  assert [e.path for e in report.cast] == ["params/stem/kernel"]
  assert report.cast[0].note == "float64 -> float32"
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], 3.0)


def test_strict_lists_everything_at_once():
  src = _src()
  del src["params/block/b"]
  src["params/block/w"] = np.zeros((4, 5), np.float32)
  src["params/extra"] = np.zeros(2, np.float32)
  with pytest.raises(LoadError) as e:
    load_pretrained(src, _like())
  msg = str(e.value)
  assert "1 missing" in msg and "params/block/b (4,)" in msg
  assert "1 unexpected" in msg and "params/extra (2,)" in msg
  assert "1 mismatched" in msg and "params/block/w (4, 5) -> (4, 4)" in msg


def test_non_strict_keeps_init_and_reports():
  src = _src()
  del src["params/block/b"]
  src["params/block/w"] = np.ones((4, 5), np.float32)
  variables, report = load_pretrained(src, _like(), strict=False)
  assert not report.ok
  assert [e.path for e in report.missing] == ["params/block/b"]
  assert report.mismatched[0][1:3] == ((4, 5), (4, 4))
  np.testing.assert_array_equal(variables["params"]["block"]["w"], 0.0)
  np.testing.assert_array_equal(variables["params"]["block"]["b"], 0.0)
  table = str(report)
  assert "missing" in table and "params/block/b" in table
  assert table.splitlines()[0].startswith("category")


def test_skip_patterns_keep_init():
  variables, report = load_pretrained(_src(), _like(), skip=[r"head/.*"])
  assert sorted(e.path for e in report.skipped) == ["params/head/bias",
                                                    "params/head/kernel"]
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], 7.0)
  np.testing.assert_array_equal(variables["params"]["block"]["b"], np.arange(4))


def test_head_with_other_class_count_is_reinitialised():
  variables, report = load_pretrained(_src(classes=1000), _like())
  assert report.ok
  assert [e.note for e in report.reinitialised] == [
      "checkpoint has 1000 classes, model 10: re-initialised"] * 2
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], 7.0)
  assert re.search(r"^reinitialised +2  params/head", str(report), re.M)
  # reinit_head=None: the class-count difference is an ordinary mismatch.
  with pytest.raises(LoadError, match="2 mismatched"):
    load_pretrained(_src(classes=1000), _like(), reinit_head=None)


def test_head_of_a_bare_params_tree_is_reinitialised():
  # An apply function's params, no "params/" collection: the default head
  # pattern matches "head/w" as it matches "params/head/kernel".
  params = {"body": {"w": np.zeros((2, 3), np.float32)},
            "head": {"w": np.full((3, 4), 7.0, np.float32)}}
  src = {"body/w": np.ones((2, 3), np.float32), "head/w": np.ones((3, 10), np.float32)}
  variables, report = load_pretrained(src, params)
  assert report.ok and [e.path for e in report.loaded] == ["body/w"]
  assert [e.note for e in report.reinitialised] == [
      "checkpoint has 10 classes, model 4: re-initialised"]
  np.testing.assert_array_equal(variables["head"]["w"], 7.0)
  np.testing.assert_array_equal(variables["body"]["w"], 1.0)
  # A module named head deeper in a bare tree is not the classifier: a mismatch.
  nested = {"encoder": {"head": {"w": np.zeros((3, 4), np.float32)}}}
  _, report = load_pretrained({"encoder/head/w": np.ones((3, 10), np.float32)}, nested,
                              strict=False)
  assert [e.path for e in report.mismatched] == ["encoder/head/w"] and not report.reinitialised


def test_head_mismatch_outside_class_dim_is_an_error():
  src = _src()
  src["params/head/kernel"] = np.ones((8, 10), np.float32)
  with pytest.raises(LoadError, match=r"params/head/kernel \(8, 10\) -> \(4, 10\)"):
    load_pretrained(src, _like())


def test_model_without_head_drops_checkpoint_head_with_note():
  like = _like()
  del like["params"]["head"]
  _, report = load_pretrained(_src(), like)
  assert report.ok
  assert {e.note for e in report.skipped} == {"model has no head"}


def test_no_collection_prefix_and_jax_leaves():
  like = jax.tree.map(jnp.asarray, {"params": {"a": {"kernel": np.zeros((2, 2), np.float32)}}})
  variables, report = load_pretrained({"a": {"kernel": np.eye(2)}}, like)
  assert report.ok
  np.testing.assert_array_equal(variables["params"]["a"]["kernel"], np.eye(2))


def test_dtype_request_casts_floats_only():
  like = {"params": {"w": np.zeros(3, np.float32), "i": np.zeros(2, np.int32)}}
  src = {"w": np.array([1.0, 2.5, -3.0]), "i": np.array([4, 5], np.int64)}
  variables, report = load_pretrained(src, like, dtype=jnp.bfloat16)
  assert variables["params"]["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(variables["params"]["w"].astype(np.float32),
                                [1.0, 2.5, -3.0])
  assert variables["params"]["i"].dtype == np.int32
  assert len(report.cast) == 2


def test_converter_failure_names_the_converter():
  def my_converter(sd):
    return {"params/x": sd["missing.key"]}
  with pytest.raises(LoadError, match="my_converter failed.*KeyError"):
    load_pretrained({"a": np.zeros(1)}, _like(), converter=my_converter)


def test_load_from_file_path(tmp_path):
  np.savez(tmp_path / "w.npz", **_src())
  variables, report = load_pretrained(tmp_path / "w.npz", _like())
  assert report.ok
  np.testing.assert_array_equal(variables["params"]["block"]["b"], np.arange(4))


def test_adapters_in_load_pretrained():
  like = {"params": {"posembed_input": {"pos_embedding": np.zeros((1, 10, 8), np.float32)},
                     "embedding": {"kernel": np.zeros((3, 3, 1, 8), np.float32)}}}
  rng = np.random.default_rng(0)
  src = {"params/posembed_input/pos_embedding": rng.normal(size=(1, 5, 8)).astype(np.float32),
         "params/embedding/kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32)}
  variables, report = load_pretrained(src, like)
  assert sorted(e.path for e in report.adapted) == [
      "params/embedding/kernel", "params/posembed_input/pos_embedding"]
  pe = variables["params"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(pe[0, 0], src["params/posembed_input/pos_embedding"][0, 0])
  np.testing.assert_allclose(variables["params"]["embedding"]["kernel"][:, :, 0],
                             src["params/embedding/kernel"].sum(axis=2), rtol=1e-6)
  with pytest.raises(LoadError, match="2 mismatched"):
    load_pretrained(src, like, adapt=False)
  assert isinstance(report, LoadReport)


@pytest.mark.parametrize("old,new", [(4, 6), (6, 4), (3, 7), (5, 5)])
def test_resize_pos_embed_matches_jax_bilinear(old, new):
  rng = np.random.default_rng(old * 10 + new)
  posemb = rng.normal(size=(1, 1 + old * old, 5)).astype(np.float32)
  out = resize_pos_embed(posemb, new)
  assert out.shape == (1, 1 + new * new, 5)
  np.testing.assert_array_equal(out[0, 0], posemb[0, 0])  # class token kept
  ref = jax.image.resize(posemb[0, 1:].reshape(old, old, 5), (new, new, 5),
                         method="bilinear", antialias=False)
  np.testing.assert_allclose(out[0, 1:].reshape(new, new, 5), ref, atol=1e-5)


def test_resize_pos_embed_rectangular_and_errors():
  grid = np.arange(2 * 3, dtype=np.float32).reshape(6, 1)
  out = resize_pos_embed(grid, (4, 6), num_prefix_tokens=0, old_grid=(2, 3))
  assert out.shape == (24, 1)
  # A linear ramp stays linear inside the grid (bilinear is exact there).
  rows = out.reshape(4, 6)
  np.testing.assert_allclose(np.diff(rows[1, 1:-1]), 0.5, atol=1e-6)
  with pytest.raises(LoadError, match="not a square grid"):
    resize_pos_embed(np.zeros((1, 7, 2)), 3)


def test_adapt_input_conv_like_timm():
  rng = np.random.default_rng(0)
  k = rng.normal(size=(3, 3, 3, 8)).astype(np.float32)
  one = adapt_input_conv(k, 1)
  assert one.shape == (3, 3, 1, 8)
  np.testing.assert_allclose(one[:, :, 0], k.sum(axis=2), rtol=1e-6)
  six = adapt_input_conv(k, 6)
  np.testing.assert_allclose(six, np.concatenate([k, k], axis=2) * 0.5, rtol=1e-6)
  # Same response to a constant image: sum over input channels is unchanged.
  np.testing.assert_allclose(six.sum(axis=2), k.sum(axis=2), rtol=1e-5)
  four = adapt_input_conv(k, 4)
  np.testing.assert_allclose(four[:, :, 3], k[:, :, 0] * 0.75, rtol=1e-6)
  s2d = rng.normal(size=(2, 2, 12, 4)).astype(np.float32)
  np.testing.assert_allclose(adapt_input_conv(s2d, 1),
                             s2d.reshape(2, 2, 4, 3, 4).sum(axis=3), rtol=1e-6)
  with pytest.raises(LoadError, match="only RGB"):
    adapt_input_conv(np.zeros((3, 3, 2, 4)), 5)


def test_head_absent_from_a_headless_checkpoint_is_reinitialised_not_missing():
  import numpy as np

  from jtl.weights import load_pretrained
  like = {"params": {"body": {"kernel": np.zeros((3, 4), np.float32)},
                     "head": {"kernel": np.full((4, 2), 7.0, np.float32)}}}
  source = {"params/body/kernel": np.ones((3, 4), np.float32)}
  variables, report = load_pretrained(source, like=like)
  assert [e.path for e in report.reinitialised] == ["params/head/kernel"]
  assert not report.missing and report.ok
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], 7.0)


class _NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.Linear(2, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.body(x))


def test_an_nnx_module_is_loaded_in_place_from_a_linen_checkpoint():
  net = _NnxNet(nnx.Rngs(0))
  linen = {"params/body/kernel": np.ones((2, 3), np.float32),
           "params/body/bias": np.full(3, 2.0, np.float32),
           "params/bn/scale": np.full(3, 3.0, np.float32),
           "params/bn/bias": np.full(3, 4.0, np.float32),
           "batch_stats/bn/mean": np.full(3, 5.0, np.float32),
           "batch_stats/bn/var": np.full(3, 6.0, np.float32)}
  out, report = load_pretrained(linen, net)
  assert out is net and report.ok and len(report.loaded) == 6
  # The Linen checkpoint's "batch_stats/" is the NNX model's "state/", reported.
  assert [(e.path, e.note) for e in report.renamed] == [
      ("state/bn/mean", "the checkpoint's batch_stats/bn/mean"),
      ("state/bn/var", "the checkpoint's batch_stats/bn/var")]
  assert re.search(r"^renamed +2  state/bn/mean", str(report), re.M)
  np.testing.assert_array_equal(net.body.kernel[...], 1.0)
  np.testing.assert_array_equal(net.bn.var[...], 6.0)
  # A failed load names the variables' paths and writes nothing.
  with pytest.raises(LoadError, match=r"1 missing:\n  - params/body/bias \(3,\)"):
    load_pretrained({k: v * 0 for k, v in linen.items() if k != "params/body/bias"}, net)
  np.testing.assert_array_equal(net.body.kernel[...], 1.0)


def test_a_model_without_its_variables_is_refused():
  with pytest.raises(LoadError, match=r"like=<TinyNet>.*pass module.init\(rng, x\)"):
    load_pretrained(_src(), TinyNet())
