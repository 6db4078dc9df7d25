"""float32 ONNX through jax2onnx (with jtl's max-pool lowering)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jtl import _optional
from jtl.errors import MissingExtraError, bullet_list
from jtl.export.deploy.tracing import TOKEN_INPUTS, ExportError, _examples, find_ops
from jtl.export.writers import write_atomic


@contextlib.contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR):
  logger = logging.getLogger(name)
  old = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(old)


def _jax2onnx() -> tuple[Callable[..., Any], Any]:
  """jax2onnx's `to_onnx` and its plugin system (the registry of lowerings)."""
  try:
    with _quiet_logger("jax2onnx"):  # it tries to import optional plugins (equinox, dm_pix)
      to_onnx = _optional.require("jax2onnx", "ONNX export").to_onnx
      plugin_system = _optional.require("jax2onnx.plugins.plugin_system", "ONNX export")
      plugin_system.import_all_plugins()
  except MissingExtraError:
    raise
  except ImportError as e:  # jax2onnx is there but onnx or onnx-ir, its own imports, is not
    missing = (e.name or "onnx").split(".")[0]
    raise MissingExtraError(_optional.message(missing, "ONNX export")) from e
  return to_onnx, plugin_system


# jax2onnx (0.17) replaces `flax.linen.max_pool` / `flax.linen.pool` while it
# traces, with versions that take `window_shape` only as a keyword and
# `padding` only as "SAME"/"VALID" (jtl's ResNet: `nn.max_pool(x, (3, 3),
# strides=(2, 2), padding=[(1, 1), (1, 1)])` fails). jtl turns those patches
# off during its export, so flax's max pool traces as `lax.reduce_window_max`,
# and lowers that primitive itself (`_max_pool_lowering`).
_UNPATCHED_ONNX_PLUGINS = ("linen.max_pool", "linen.pool")


def _max_pool_lowering(plugin_system: Any) -> Any:
  """A jax2onnx lowering of `reduce_window_max` as an ONNX MaxPool on NC...

  jax2onnx's own lowering adds two unit axes in front and pools over every
  axis of the operand: an NHWC max pool becomes a 4-D MaxPool (kernel
  [1, 3, 3, 1]) that ONNX Runtime has no kernel for. Here the pooled axes
  (window, stride, padding or dilation other than the identity) go last and
  the two others (batch, channels) first: Transpose NHWC -> NCHW, a 2-D
  MaxPool with the explicit pads (MaxPool pads with -inf, as the reduce
  window's init), Transpose back. Other shapes keep jax2onnx's lowering.
  """
  _ir_shapes = _optional.require("jax2onnx.plugins._ir_shapes", "ONNX export")
  reduce_window_max = _optional.require("jax2onnx.plugins.jax.lax.reduce_window_max",
                                        "ONNX export")

  base = reduce_window_max.ReduceWindowMaxPrimitivePlugin

  class JtlReduceWindowMax(base):  # pylint: disable=missing-class-docstring
    def lower(self, ctx: Any, eqn: Any) -> None:
      p = eqn.params
      window = tuple(int(v) for v in p["window_dimensions"])
      rank = len(window)
      strides = tuple(int(v) for v in p.get("window_strides") or (1,) * rank)
      pads = tuple(tuple(int(v) for v in pair) for pair in p.get("padding") or ((0, 0),) * rank)
      base_dil = tuple(int(v) for v in p.get("base_dilation") or (1,) * rank)
      dil = tuple(int(v) for v in p.get("window_dilation") or (1,) * rank)
      pooled = [a for a in range(rank) if (window[a], strides[a], pads[a], dil[a]) !=
                (1, 1, (0, 0), 1)]
      kept = [a for a in range(rank) if a not in pooled]
      x_var, (y_var,) = eqn.invars[0], eqn.outvars
      dtype = np.dtype(x_var.aval.dtype)
      if (len(kept) != 2 or not 1 <= len(pooled) <= 3 or any(d != 1 for d in base_dil)
          or any(v < 0 for pair in pads for v in pair) or dtype not in self._MAXPOOL_DTYPES):
        return super().lower(ctx, eqn)
      perm = kept + pooled
      inverse = [perm.index(a) for a in range(rank)]
      x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("jtl_maxpool_in"))
      y_spec = ctx.get_value_for_var(y_var, name_hint=ctx.fresh_name("jtl_maxpool_out"))
      label = _ir_shapes._dim_label_from_value_or_aval  # pylint: disable=protected-access
      x_dims = [label(x, x_var.aval.shape, a) for a in range(rank)]
      y_dims = [x_dims[a] if a in kept else int(y_var.aval.shape[a]) for a in range(rank)]

      def stamp(value: Any, dims: Sequence[Any]) -> Any:
        value.type = x.type
        _ir_shapes._stamp_type_and_shape(value, dims)  # pylint: disable=protected-access
        _ir_shapes._ensure_value_metadata(ctx, value)  # pylint: disable=protected-access
        return value

      b = ctx.builder
      nc = stamp(b.Transpose(x, _outputs=[ctx.fresh_name("jtl_maxpool_nchw")], perm=perm),
                 [x_dims[a] for a in perm])
      kwargs: dict[str, Any] = {"kernel_shape": [window[a] for a in pooled],
                                "strides": [strides[a] for a in pooled]}
      if any(pads[a] != (0, 0) for a in pooled):
        kwargs["pads"] = [pads[a][0] for a in pooled] + [pads[a][1] for a in pooled]
      if any(dil[a] != 1 for a in pooled):
        kwargs["dilations"] = [dil[a] for a in pooled]
      pooled_value = stamp(b.MaxPool(nc, _outputs=[ctx.fresh_name("jtl_maxpool")], **kwargs),
                           [y_dims[a] for a in perm])
      out = stamp(b.Transpose(pooled_value, _outputs=[getattr(y_spec, "name", None)
                                                      or ctx.fresh_name("jtl_maxpool_out")],
                              perm=inverse), y_dims)
      ctx.bind_value_for_var(y_var, out)

  old = plugin_system.PLUGIN_REGISTRY[reduce_window_max.jax.lax.reduce_window_max_p.name]
  plugin = JtlReduceWindowMax()
  plugin.primitive, plugin.metadata = old.primitive, old.metadata
  return plugin


@contextlib.contextmanager
def _jtl_onnx_plugins(plugin_system: Any):
  """jax2onnx's plugin registry with jtl's pooling fixes, restored on exit."""
  registry = plugin_system.PLUGIN_REGISTRY
  name = lax.reduce_window_max_p.name
  saved = {k: registry[k] for k in (*_UNPATCHED_ONNX_PLUGINS, name) if k in registry}
  try:
    if name in registry:
      registry[name] = _max_pool_lowering(plugin_system)
    for k in _UNPATCHED_ONNX_PLUGINS:
      registry.pop(k, None)
    yield registry
  finally:
    for k in _UNPATCHED_ONNX_PLUGINS:
      registry.pop(k, None)
    registry.update(saved)


def export_onnx(fn: Callable[..., jax.Array], path: str | os.PathLike, *,
                input_shape: Sequence[int], name: str = "jtl_model",
                token_inputs: bool = False) -> list[str]:
  """Writes `fn` as a float32 ONNX model with a dynamic batch dimension and
  returns the graph's input names ("x", or TOKEN_INPUTS).

  With `token_inputs`, the inputs are int32 "input_ids" and "attention_mask"
  [B, L], `input_shape` = (L,): the batch is dynamic, the length fixed (pad
  to it; jax2onnx 0.17 cannot trace BERT's position embeddings over a symbolic
  length).

  Raises:
    ExportError: `fn` uses an op jax2onnx has no lowering for (named with its
      layer), or the conversion fails.
  """
  to_onnx, plugin_system = _jax2onnx()
  missing = [u for u in find_ops(fn, *_examples(input_shape, token_inputs))
             if u.op not in plugin_system.PLUGIN_REGISTRY]
  if missing:
    raise ExportError(
        f"Cannot export to ONNX: jax2onnx has no lowering for these ops of the model:\n"
        f"{bullet_list(missing)}\nReplace the op in that layer, or export to another format.")
  try:
    # jax2onnx's flax plugins broadcast biases by rank promotion.
    with (_quiet_logger("jax2onnx"), _quiet_logger("onnx_ir"),
          jax.numpy_rank_promotion("allow"), _jtl_onnx_plugins(plugin_system)):
      if token_inputs:
        (b,) = jax.export.symbolic_shape("B")
        specs = [jax.ShapeDtypeStruct((b, *input_shape), jnp.int32) for _ in TOKEN_INPUTS]
        proto = to_onnx(fn, specs, return_mode="proto", model_name=name,
                        input_names=list(TOKEN_INPUTS))
      else:
        proto = to_onnx(fn, [("B", *input_shape)], return_mode="proto", model_name=name,
                        input_names=["x"])
  except Exception as e:  # any converter failure, reported with its cause
    raise ExportError(f"jax2onnx failed to convert the model: {type(e).__name__}: "
                      f"{str(e)[:2000]}") from e
  # jax2onnx leaves stale NHWC shape annotations on tensors it moved to NCHW;
  # onnxruntime infers them again without the mismatch warnings.
  del proto.graph.value_info[:]
  write_atomic(path, proto.SerializeToString())
  return [i.name for i in proto.graph.input]
