"""DepthwiseConv: the shifted and grouped formulations agree (values, grads)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl.errors import ConfigError, DataError
from jtl.models import layers, preprocessing

CASES = [  # (H, W, kernel, stride, padding)
    (9, 9, 3, 1, "SAME"), (8, 8, 3, 2, "SAME"), (9, 7, 5, 2, "SAME"),
    (8, 8, 5, 1, "SAME"), (8, 8, 3, 2, 1), (7, 7, 3, 1, "VALID"),
    (10, 9, 3, 2, ((2, 0), (1, 1))), (6, 5, 3, 2, 3),
    (11, 11, 5, 2, ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("h,w,k,s,padding", CASES)
def test_formulations_agree_in_values_and_gradients(h, w, k, s, padding):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, h, w, 6)).astype(np.float32)
  kernel = rng.standard_normal((k, k, 1, 6)).astype(np.float32)

  def loss(formulation, x, kernel):
    y = layers.depthwise_conv(x, kernel, strides=s, padding=padding,
                              formulation=formulation)
    return jnp.sum(jnp.sin(y)), y

  results = {}
  for f in ("shifted", "grouped"):
    (_, y), grads = jax.jit(jax.value_and_grad(
        lambda x, kk, f=f: loss(f, x, kk), argnums=(0, 1), has_aux=True))(x, kernel)
    results[f] = (y, grads)
  ys, (gxs, gks) = results["shifted"]
  yg, (gxg, gkg) = results["grouped"]
  assert ys.shape == yg.shape
  np.testing.assert_allclose(ys, yg, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gxs, gxg, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gks, gkg, atol=1e-4, rtol=1e-5)


def test_shifted_backward_saves_only_the_input():
  # Autodiff of k*k slices keeps every tap for the kernel gradient (9x the
  # activation); the custom VJP keeps x and the kernel only.
  x = jnp.ones((2, 16, 16, 8))
  kernel = jnp.ones((3, 3, 1, 8))
  f = lambda x, k: layers.depthwise_conv(x, k, padding="SAME", formulation="shifted")
  residuals = jax.vjp(f, x, kernel)[1]
  saved = sum(leaf.size for leaf in jax.tree.leaves(residuals)
              if hasattr(leaf, "size"))
  assert saved <= x.size + kernel.size


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((0, 0), (0, 0))])
def test_pointwise_conv_is_a_matmul_with_the_same_values_and_gradients(padding):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
  kernel = rng.standard_normal((1, 1, 6, 7)).astype(np.float32)
  dims = ("NHWC", "HWIO", "NHWC")

  def loss(conv, x, kernel):
    return jnp.sum(jnp.sin(conv(x, kernel, (1, 1), padding, dimension_numbers=dims)))

  ours = jax.value_and_grad(lambda *a: loss(layers.conv_general_dilated, *a),
                            argnums=(0, 1))(x, kernel)
  ref = jax.value_and_grad(lambda *a: loss(jax.lax.conv_general_dilated, *a),
                           argnums=(0, 1))(x, kernel)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda x, k: layers.conv_general_dilated(
      x, k, (1, 1), padding, dimension_numbers=dims))(x, kernel))
  assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr


def test_other_convs_keep_lax_conv():
  x = np.ones((1, 6, 6, 40), np.float32)
  for kernel, strides in ((np.ones((3, 3, 40, 4), np.float32), (1, 1)),
                          (np.ones((1, 1, 40, 4), np.float32), (2, 2))):
    jaxpr = str(jax.make_jaxpr(lambda x, k: layers.conv_general_dilated(
        x, k, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, kernel))
    assert "conv_general_dilated" in jaxpr


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 9, 9, 3), (3, 3), (2, 2), "SAME"), ((2, 8, 7, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 10, 10, 1), (5, 5), (1, 1), "VALID"), ((2, 7, 7, 1), (3, 3), (2, 1), "SAME")])
def test_few_channel_convs_use_patches_on_cpu_with_equal_values_and_gradients(
    shape, kernel, strides, padding):
  rng = np.random.default_rng(6)
  x = rng.standard_normal(shape).astype(np.float32)
  w = rng.standard_normal((*kernel, shape[-1], 5)).astype(np.float32)
  dims = ("NHWC", "HWIO", "NHWC")

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=dims)))

  ours = jax.value_and_grad(lambda *a: loss(layers.conv_general_dilated, *a), (0, 1))(x, w)
  ref = jax.value_and_grad(lambda *a: loss(jax.lax.conv_general_dilated, *a), (0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=dims))(x, w))
  assert "conv_general_dilated" not in jaxpr  # the tests run on CPU


def test_matches_a_direct_loop_and_torch_padding():
  # Direct definition: y[n, o, p, c] = sum_ij xp[n, s*o + i, s*p + j, c] w[i, j, c].
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 6, 6, 2)).astype(np.float32)
  w = rng.standard_normal((3, 3, 1, 2)).astype(np.float32)
  y = np.asarray(layers.depthwise_conv(x, w, strides=2, padding=1, formulation="shifted"))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = np.zeros((1, 3, 3, 2), np.float32)
  for o in range(3):
    for p in range(3):
      ref[0, o, p] = np.einsum("ijc,ijc->c", xp[0, 2 * o:2 * o + 3, 2 * p:2 * p + 3],
                               w[:, :, 0])
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_module_parameter_layout_equals_flax_grouped_conv():
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 5)).astype(np.float32)
  ours = layers.DepthwiseConv(3, 2, "SAME", use_bias=True, formulation="shifted")
  flax_conv = nn.Conv(5, (3, 3), (2, 2), "SAME", feature_group_count=5)
  v = jax.jit(ours.init)(jax.random.PRNGKey(0), x)
  assert v["params"]["kernel"].shape == (3, 3, 1, 5)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(
      jnp.shape, flax_conv.init(jax.random.PRNGKey(0), x))
  np.testing.assert_allclose(jax.jit(ours.apply)(v, x), jax.jit(flax_conv.apply)(v, x),
                             atol=1e-5)


def test_auto_formulation_follows_backend():
  assert layers.default_formulation("cpu") == "shifted"
  assert layers.default_formulation("gpu") == "grouped"
  assert layers.default_formulation("tpu") == "grouped"
  assert layers.default_formulation() == "shifted"  # the tests run on CPU
  text = jax.jit(lambda x, w: layers.depthwise_conv(x, w)).lower(
      np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 1, 3), np.float32)).as_text()
  assert "feature_group_count" not in text and "convolution" not in text


def test_same_padding_is_tf_style():
  assert layers.same_padding(224, 3, 2) == (0, 1)
  assert layers.same_padding(112, 5, 2) == (1, 2)
  assert layers.same_padding(7, 5, 1) == (2, 2)
  assert layers.same_padding(7, 3, 2) == (1, 1)
  assert layers.same_padding(1, 1, 1) == (0, 0)


def test_bad_arguments_raise_config_errors():
  x = np.zeros((1, 4, 4, 3), np.float32)
  with pytest.raises(ConfigError, match="formulation='fast'"):
    layers.depthwise_conv(x, np.zeros((3, 3, 1, 3)), formulation="fast")
  with pytest.raises(ConfigError, match=r"kernel \(3, 3, 1, 4\)"):
    layers.depthwise_conv(x, np.zeros((3, 3, 1, 4)))
  with pytest.raises(ConfigError, match="padding='FULL'"):
    layers.depthwise_conv(x, np.zeros((3, 3, 1, 3)), padding="FULL")
  with pytest.raises(DataError, match=r"\(5, 5, 2\)"):  # grayscale and RGBA are taken
    preprocessing.center_crop_resize(np.zeros((5, 5, 2)))


def test_drop_path_drops_whole_examples_and_rescales():
  x = jnp.ones((64, 2, 2, 3))
  y = np.asarray(layers.drop_path(x, 0.5, deterministic=False, rng=jax.random.PRNGKey(0)))
  per_example = y.reshape(64, -1)
  assert set(np.unique(per_example)) <= {0.0, 2.0}
  assert np.all(per_example.min(1) == per_example.max(1))
  assert 10 < int((per_example[:, 0] == 0).sum()) < 54
  np.testing.assert_array_equal(layers.drop_path(x, 0.5, deterministic=True, rng=None), x)


@pytest.mark.parametrize("momentum,eps", [(0.9, 1e-5), (0.99, 1e-3)])
def test_batch_norm_equals_flax_in_values_gradients_and_statistics(momentum, eps):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((4, 5, 5, 6)) * 3 + 1, jnp.float32)
  ours = layers.BatchNorm(momentum=momentum, epsilon=eps)
  ref = nn.BatchNorm(momentum=momentum, epsilon=eps)
  v = ref.init(jax.random.PRNGKey(0), x, use_running_average=False)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(
      jnp.shape, ours.init(jax.random.PRNGKey(0), x, use_running_average=False))
  v = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape), a.dtype), v)

  def loss(module, params):
    y, upd = module.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                          use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(jnp.clip(y, 0, 6) * x), (y, upd["batch_stats"])

  (lo, (yo, so)), go = jax.value_and_grad(lambda p: loss(ours, p), has_aux=True)(v["params"])
  (lr, (yr, sr)), gr = jax.value_and_grad(lambda p: loss(ref, p), has_aux=True)(v["params"])
  for a, b in zip(jax.tree.leaves((lo, yo, so, go)), jax.tree.leaves((lr, yr, sr, gr))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  gx_ours = jax.grad(lambda x: jnp.sum(jnp.sin(ours.apply(
      v, x, use_running_average=False, mutable=["batch_stats"])[0])))(x)
  gx_ref = jax.grad(lambda x: jnp.sum(jnp.sin(ref.apply(
      v, x, use_running_average=False, mutable=["batch_stats"])[0])))(x)
  np.testing.assert_allclose(gx_ours, gx_ref, rtol=1e-4, atol=1e-5)
  # Eval mode is flax's own code path.
  np.testing.assert_allclose(ours.apply(v, x, use_running_average=True),
                             ref.apply(v, x, use_running_average=True), atol=1e-6)


def test_batch_norm_under_the_frozen_interceptor_uses_stored_statistics():
  from jtl.adapter import frozen_batchnorm
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 3, 3, 2)) + 2.0, jnp.float32)
  bn = layers.BatchNorm(momentum=0.9)
  v = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
  with frozen_batchnorm([""]):
    y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(y, bn.apply(v, x, use_running_average=True), atol=1e-6)
  for a, b in zip(jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(v["batch_stats"])):
    np.testing.assert_array_equal(a, b)
