"""jtl.export.deploy on the zoo models the first deployment round could not export:
ResNet / VGG max pools to ONNX, ViT's per-platform attention to ONNX, ResNet
and DINOv2 (exact GELU) to int8 LiteRT, MiniLM (token inputs) to ONNX and
LiteRT; and the int8 range guard.

Small variants keep it fast: resnet18 at 64 px, a 1-layer DINOv2 at 28 px
(the same layers as the zoo's, fewer of them), MiniLM with its real weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl import models
from jtl.errors import ConfigError
from jtl.export import deploy

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")


def _noise(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def resnet18():
  created = models.create("resnet18", pretrained=False, num_classes=10, seed=0)
  x = _noise((3, 64, 64, 3))
  ref = np.asarray(jax.jit(deploy.inference_fn(created.module, created.variables))(x))
  return created.module, created.variables, x, ref


def test_resnet18_exports_to_onnx_with_its_max_pool(resnet18, tmp_path):
  import flax.linen.pooling  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top
  from jax2onnx.plugins import plugin_system  # pylint: disable=g-import-not-at-top
  module, variables, x, ref = resnet18
  deploy.onnx_export._jax2onnx()  # pylint: disable=protected-access  (imports every plugin)
  registry_before = dict(plugin_system.PLUGIN_REGISTRY)
  exported = deploy.export(module, variables, tmp_path / "r18.onnx", format="onnx",
                           input_shape=(64, 64, 3))
  runtime = deploy.load(exported.path, num_threads=2)
  np.testing.assert_allclose(runtime(x), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
  np.testing.assert_allclose(runtime(x[:1]), ref[:1], atol=1e-4 * np.abs(ref).max(), rtol=0)
  graph = onnx.load(exported.path, load_external_data=False).graph
  assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
  pools = [n for n in graph.node if n.op_type == "MaxPool"]
  assert len(pools) == 1
  attrs = {a.name: list(a.ints) for a in pools[0].attribute}
  assert attrs["kernel_shape"] == [3, 3] and attrs["pads"] == [1, 1, 1, 1], attrs
  # jax2onnx's plugins and flax's functions are as they were.
  assert plugin_system.PLUGIN_REGISTRY == registry_before
  assert nn.max_pool is flax.linen.pooling.max_pool


@pytest.mark.parametrize("fused", [False, True])
def test_vit_exports_to_onnx_with_its_attention_in_plain_form(tmp_path, fused):
  """ViT's attention picks its kernel per platform (`lax.platform_dependent`:
  tokens padded to 8 for cuBLAS, cuDNN's fused kernel): the exported graph
  has Flax's attention, the same numbers (17 tokens: the padded branch exists)."""
  module = models.vit.vit("ti", 5, image_size=32, patch_size=8, depth=1, fused_attention=fused)
  x = _noise((2, 32, 32, 3))
  variables = module.init(jax.random.PRNGKey(0), x)
  ref = np.asarray(jax.jit(deploy.inference_fn(module, variables))(x))
  exported = deploy.export(module, variables, tmp_path / "vit.onnx", format="onnx",
                           input_shape=(32, 32, 3))
  runtime = deploy.load(exported.path, num_threads=2)
  np.testing.assert_allclose(runtime(x), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


class _Pools(nn.Module):
  """The max pools of the zoo (ResNet's padded 3x3/2, VGG's 2x2/2) and others."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    a = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
    b = nn.max_pool(x, (2, 2), strides=(2, 2))
    c = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    d = nn.max_pool(x, (2, 3), strides=(1, 2), padding=[(0, 1), (2, 1)])
    return jnp.concatenate([p.mean((1, 2)) for p in (a, b, c)] + [d.max((1, 2))], -1)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_max_pool_paddings_export(tmp_path, fmt):
  module = _Pools()
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 10, 10, 3), np.float32))
  x = _noise((2, 10, 10, 3))
  exported = deploy.export(module, variables, tmp_path / f"p{deploy.SUFFIX[fmt]}", format=fmt,
                           input_shape=(10, 10, 3))
  np.testing.assert_allclose(deploy.load(exported.path)(x), module.apply(variables, x),
                             atol=1e-5)


def test_edge_padded_max_pool_equals_the_padded_one():
  x = jnp.asarray(_noise((2, 9, 8, 3)))
  def fn(v):
    return nn.max_pool(v, (3, 2), strides=(2, 1), padding=[(2, 1), (1, 0)])
  record = []
  got = jax.jit(deploy.int8_form(fn, record))(x)
  np.testing.assert_array_equal(got, fn(x))
  assert record == ["max_pool"]


@pytest.mark.slow  # 9 s: calibrates and converts resnet18 (the small CNN's int8 is fast)
def test_resnet18_int8_litert_runs_in_xnnpack(resnet18, tmp_path):
  module, variables, x, ref = resnet18
  calibration = [_noise((1, 64, 64, 3), seed=s) for s in range(8)]
  exported = deploy.export(module, variables, tmp_path / "r18.int8.tflite",
                           format="tflite_int8", input_shape=(64, 64, 3),
                           representative=calibration)
  assert exported.meta["int8_form"]["max_pools_padded_from_the_edge"] == 1
  assert deploy.unresolvable_int8_tensors(exported.path) == []
  types = deploy.tflite_tensor_types(exported.path)
  assert "MAX_POOL_2D" in types and "PADV2" not in types, types
  got = deploy.load(exported.path, num_threads=2)(x)  # XNNPACK, the default delegate
  assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.95


_DINO_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    from jtl.export import deploy
    from jtl.models import dinov2
    module = dinov2.Dinov2(num_classes=5, width=32, depth=1, num_heads=2, image_size=56)
    x = np.random.default_rng(0).standard_normal((3, 28, 28, 3)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(0), x[:1])
    variables = jax.tree.map(lambda v: v + 0.02 * np.random.default_rng(1).standard_normal(
        v.shape).astype(v.dtype), variables)  # the zero-initialised head gets values
    ref = np.asarray(jax.jit(deploy.inference_fn(module, variables))(x))
    cal = [np.random.default_rng(s).standard_normal((1, 28, 28, 3)).astype(np.float32)
           for s in range(16)]
    e = deploy.export(module, variables, sys.argv[1], format="tflite_int8",
                      input_shape=(28, 28, 3), representative=cal)
    print("GELUS", e.meta["int8_form"]["exact_gelus_as_tanh_gelu"], flush=True)
    print("TYPES", deploy.tflite_tensor_types(sys.argv[1]).get("GELU"), flush=True)
    got = deploy.load(sys.argv[1])(x)
    print("CORR", np.corrcoef(got.ravel(), ref.ravel())[0, 1], flush=True)
""")


@pytest.mark.slow  # a ViT int8 LiteRT conversion: make test-all
def test_dinov2_int8_litert_runs(tmp_path):
  """Exact GELU used to calibrate to infinite ranges and abort LiteRT (in its
  own process here, so a regression fails the test instead of pytest)."""
  run = subprocess.run([sys.executable, "-c", _DINO_SCRIPT, str(tmp_path / "d.int8.tflite")],
                       check=False, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})
  out = {l.split()[0]: l.split(None, 1)[1] for l in run.stdout.splitlines()
         if l.split() and l.split()[0] in ("GELUS", "TYPES", "CORR")}
  assert run.returncode == 0 and "CORR" in out, run.stdout + run.stderr[-3000:]
  assert out["GELUS"] == "1" and out["TYPES"] == "['int8']", out
  assert float(out["CORR"]) > 0.9, out


class _Huge(nn.Module):
  """Pads with -1e30 (a hand-written -inf padding): a range int8 cannot hold."""
  @nn.compact
  def __call__(self, x):
    return jnp.pad(x, ((0, 0), (1, 1)), constant_values=-1e30).max(-1, keepdims=True) + x


class _HugeNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4, name="body")(x)
    x = _Huge(name="strange_layer")(x)
    return nn.Dense(3, name="head")(x)


def test_int8_tensor_int8_cannot_hold_is_refused_naming_it(tmp_path):
  module = _HugeNet()
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.float32))
  with pytest.raises(deploy.ExportError, match="cannot hold") as info:
    deploy.export(module, variables, tmp_path / "h.int8.tflite", format="tflite_int8",
                  input_shape=(8,), representative=[_noise((1, 8), s) for s in range(4)])
  message = str(info.value)
  assert "strange_layer/pad" in message and "op PADV2" in message, message
  assert not (tmp_path / "h.int8.tflite").exists()


# --------------------------------------------------------------------------
# MiniLM (BERT) with its real weights: int32 token ids and attention mask.


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
  from jtl import weights  # pylint: disable=g-import-not-at-top
  from jtl.models import bert, text  # pylint: disable=g-import-not-at-top
  model = bert.Bert()
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), bert.example_input(1)))
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  variables, report = weights.load_pretrained(weights.resolve("minilm_l6/sentence"),
                                                 like, converter=bert.convert_torch)
  assert report.ok
  sentences = ["A man is eating food.", "A man is eating a piece of bread.",
               "The new movie is awesome", "A cheetah chases prey across a field."]
  batch = text.tokenize(text.load_tokenizer(text.minilm_dir(), max_length=24), sentences)
  ref = np.asarray(jax.jit(deploy.inference_fn(model, variables, token_inputs=True))(
      batch["input_ids"], batch["attention_mask"]))
  out = tmp_path_factory.mktemp("minilm")
  files = {fmt: deploy.export(model, variables, out / f"minilm{deploy.SUFFIX[fmt]}",
                              format=fmt, input_shape=(24,), token_inputs=True)
           for fmt in ("onnx", "tflite")}
  return batch, ref, files


@pytest.mark.slow  # text model conversions: make test-all
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_minilm_exports_with_token_inputs(minilm, fmt):
  batch, ref, files = minilm
  runtime = deploy.load(files[fmt].path, num_threads=2)
  assert runtime.input_names == ["input_ids", "attention_mask"]
  got = runtime(batch)  # the tokenizer's dict, token_type_ids (zeros) included
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  one = runtime({k: v[2:3] for k, v in batch.items()})  # another batch size
  np.testing.assert_allclose(one, ref[2:3], atol=1e-4, rtol=0)
  meta = deploy.read_meta(files[fmt].path)
  assert meta["inputs"] == ["input_ids", "attention_mask"] and meta["input_shape"] == [None, 24]
  with pytest.raises(ConfigError, match="token_type_ids"):
    runtime({**batch, "token_type_ids": np.ones_like(batch["input_ids"])})
  with pytest.raises(ConfigError, match="dict"):
    runtime(batch["input_ids"])
