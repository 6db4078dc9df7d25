"""jtl.models.wgrad: the same forward pass and input gradient as lax, weight
gradients as float32 results, and (bf16 compute, data parallel) float32 sums
of the zoo's weight gradients over devices."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jobs import TESTS

from jtl.models import wgrad

DOTS = [  # (lhs shape, rhs shape, dimension numbers): Dense, Dense on tokens, DenseGeneral
    ((8, 5), (5, 3), (((1,), (0,)), ((), ()))),
    ((2, 7, 6), (6, 4, 3), (((2,), (0,)), ((), ()))),
    ((2, 7, 4, 3), (4, 3, 5), (((2, 3), (0, 1)), ((), ()))),
    ((2, 7, 4, 3), (3, 5, 4), (((3, 2), (0, 2)), ((), ()))),
]
NHWC = ("NHWC", "HWIO", "NHWC")
CONVS = [  # (lhs shape, kernel shape, keyword arguments)
    ((2, 9, 10, 6), (3, 3, 6, 5), dict(window_strides=(1, 1), padding="SAME")),
    ((2, 9, 10, 6), (3, 3, 6, 5), dict(window_strides=(2, 2), padding="SAME")),
    ((2, 9, 10, 6), (1, 3, 6, 5), dict(window_strides=(2, 1), padding="VALID")),
    ((2, 9, 10, 6), (3, 3, 6, 5), dict(window_strides=(2, 2), padding=((1, 2), (0, 1)))),
    ((2, 9, 10, 6), (3, 3, 1, 6), dict(window_strides=(2, 2), padding="SAME",
                                       feature_group_count=6)),
    ((2, 9, 10, 6), (3, 3, 2, 6), dict(window_strides=(1, 1), padding="SAME",
                                       feature_group_count=3)),
    ((2, 9, 10, 6), (3, 3, 6, 4), dict(window_strides=(1, 1), padding="SAME",
                                       rhs_dilation=(2, 2))),
    ((2, 16, 16, 3), (4, 4, 3, 8), dict(window_strides=(4, 4), padding="VALID")),  # patches
]


def _bf16(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _check(ours, plain, lhs, rhs, raw_rhs_gradient):
  """ours and plain: f(lhs, rhs) -> bf16 output. Same output and input
  gradient; the weight gradient is the float32 autodiff of the upcast operands,
  rounded once to bf16."""
  rng = np.random.default_rng(1)
  out = plain(lhs, rhs)
  np.testing.assert_array_equal(ours(lhs, rhs), out)
  g = _bf16(rng, out.shape)
  _, vjp_ours = jax.vjp(ours, lhs, rhs)
  _, vjp_plain = jax.vjp(plain, lhs, rhs)
  (dl, dr), (dl_plain, _) = vjp_ours(g), vjp_plain(g)
  np.testing.assert_array_equal(dl, dl_plain)
  f32 = lambda a: a.astype(jnp.float32)
  exact = jax.vjp(lambda r: f32(plain(f32(lhs), r)), f32(rhs))[1](f32(g))[0]
  raw = raw_rhs_gradient(lhs, g)
  assert raw.dtype == jnp.float32 and dr.dtype == jnp.bfloat16
  np.testing.assert_allclose(raw, exact, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(dr, raw.astype(jnp.bfloat16))


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", DOTS)
def test_dot_general_keeps_outputs_and_computes_the_weight_gradient_in_float32(
    lhs_shape, rhs_shape, dims):
  rng = np.random.default_rng(0)
  lhs, rhs = _bf16(rng, lhs_shape), _bf16(rng, rhs_shape)
  _check(lambda a, b: wgrad.dot_general(a, b, dims), lambda a, b: lax.dot_general(a, b, dims),
         lhs, rhs, lambda a, g: wgrad._rhs_gradient(a, g, dims, rhs.ndim, None))


@pytest.mark.parametrize("lhs_shape,rhs_shape,kwargs", CONVS)
def test_conv_keeps_outputs_and_computes_the_kernel_gradient_in_float32(
    lhs_shape, rhs_shape, kwargs):
  rng = np.random.default_rng(0)
  lhs, rhs = _bf16(rng, lhs_shape), _bf16(rng, rhs_shape)
  kwargs = dict(kwargs, dimension_numbers=NHWC)
  ours = lambda a, b: wgrad.conv_general_dilated(a, b, **kwargs)
  plain = lambda a, b: lax.conv_general_dilated(a, b, **kwargs)
  pads = kwargs["padding"]
  if isinstance(pads, str):
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    window = wgrad._dilated([rhs.shape[d] for d in dims.rhs_spec[2:]],
                            kwargs.get("rhs_dilation", (1, 1)))
    pads = lax.padtype_to_pads(lhs.shape[1:3], window, kwargs["window_strides"], pads)
  config = (kwargs["window_strides"], tuple(map(tuple, pads)), (1, 1),
            kwargs.get("rhs_dilation", (1, 1)),
            lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC),
            kwargs.get("feature_group_count", 1), None)
  _check(ours, plain, lhs, rhs, lambda a, g: wgrad._kernel_gradient(a, g, rhs.shape, config))


def test_embedding_table_gradient_is_a_float32_sum_of_its_rows():
  rng = np.random.default_rng(0)
  table, g = _bf16(rng, (10, 4)), _bf16(rng, (2, 3, 4))
  ids = jnp.array([[1, 3, 1], [9, 0, 1]])
  np.testing.assert_array_equal(wgrad.take_rows(table, ids), jnp.take(table, ids, axis=0))
  grad = jax.vjp(lambda t: wgrad.take_rows(t, ids), table)[1](g)[0]
  exact = np.zeros((10, 4), np.float32)
  np.add.at(exact, np.asarray(ids), np.asarray(g, np.float32))
  assert grad.dtype == jnp.bfloat16  # one rounding of the float32 sum (order aside)
  np.testing.assert_allclose(np.asarray(grad, np.float32), exact, rtol=2**-8, atol=1e-6)


def test_float32_and_integer_operands_and_batched_dots_are_lax_itself():
  x = jnp.ones((4, 3))
  dims = (((1,), (0,)), ((), ()))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: wgrad.dot_general(x, w, dims).sum()))(
      jnp.ones((3, 2))))
  assert "custom_vjp" not in jaxpr
  batched = (((2,), (2,)), ((0,), (0,)))  # attention's q.k: no weight in it
  q = jnp.ones((2, 5, 4), jnp.bfloat16)
  assert "custom_vjp" not in str(jax.make_jaxpr(
      lambda q: wgrad.dot_general(q, q, batched))(q))
  ints = jnp.ones((2, 3), jnp.int8)  # int8 inference (jtl.export.quantize)
  np.testing.assert_array_equal(wgrad.dot_general(ints, ints.T, dims), np.full((2, 2), 3))
  assert "custom_vjp" in str(jax.make_jaxpr(
      lambda w: wgrad.dot_general(x.astype(jnp.bfloat16), w, dims))(jnp.ones((3, 2), jnp.bfloat16)))


def test_flax_nnx_layers_take_the_float32_weight_gradient_path():
  from flax import nnx
  x = jnp.ones((4, 6, 6, 3), jnp.bfloat16)
  layers = {"linear": nnx.Linear(3, 2, dtype=jnp.bfloat16, dot_general=wgrad.dot_general,
                                 rngs=nnx.Rngs(0)),
            "conv": nnx.Conv(3, 2, (3, 3), dtype=jnp.bfloat16,
                             conv_general_dilated=wgrad.conv_general_dilated, rngs=nnx.Rngs(0))}
  for name, layer in layers.items():
    assert "custom_vjp" in str(jax.make_jaxpr(lambda x, layer=layer: layer(x))(x)), name


@pytest.mark.slow  # 15 s: five models compiled for 8 devices in a process of its own
def test_data_parallel_bf16_steps_sum_the_zoo_weight_gradients_in_float32(tmp_path):
  """What XLA's partitioner all-reduces in an 8-device bf16 step (its
  dump, in a process of its own): the zoo's ViT, ResNet and BERT sum every
  kernel's and id-indexed embedding table's gradient in float32, and a LoRA
  ViT every adapter's (bf16 sums
  are left for biases and position embeddings: reductions over the batch); a
  model of plain Flax layers sums its kernels' gradients in bf16
  (jax#27496), which the zoo's layers avoid."""
  job = subprocess.run([sys.executable, str(TESTS / "reduced_dtypes_job.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
  assert job.returncode == 0, job.stderr[-3000:]
  reduced = json.loads(job.stdout.strip().splitlines()[-1])
  for zoo in ("vit", "resnet", "bert", "vit_lora"):
    r = reduced[zoo]
    assert r["f32"] >= r["weights"] > 300, reduced
    assert r.get("bf16", 0) <= r["others"], reduced
  plain = reduced["plain_flax"]
  assert plain.get("bf16", 0) >= plain["weights"] > 1000 and plain.get("f32", 0) == 0, reduced
