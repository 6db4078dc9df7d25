"""LoRA: low-rank adapters on Dense, attention and convolution kernels.

Hu et al. (2021). A matched layer with kernel W (fan_in, out) computes
`x W + scale * (x A) B` with A (fan_in, r), B (r, out), scale = alpha / r;
B starts at zero, so the adapted model starts as the pretrained one. The zoo
modules are not changed: the adapters are two extra leaves, "lora_a" and
"lora_b", next to the layer's "kernel" in the params tree, and `LoraModel`
wraps a module so that its `apply` runs under a Flax method interceptor that
adds the low-rank path to every `nn.Dense` / `nn.Conv` holding adapters. For a
convolution, A is a convolution with the layer's kernel size, strides and
padding into r channels and B a 1x1 projection, so W + scale * A B is the
kernel the merged layer uses.

`merge_lora` folds the adapters into the kernels (a plain model for export and
inference; it lives with the leaf layout in the core, `jtl.lora_layout`,
which the exports use), `unmerge_lora` takes them out again, and `save_adapters` /
`load_adapters` write and read only the adapters (and the head).

DoRA (Liu et al. 2024, `add_lora(..., dora=True)`, the strategy's `dora`
option): each adapted layer also trains a magnitude vector "lora_magnitude"
[out], initialised to the column norms of W, and computes with
m * (W + scale A B) / ||W + scale A B||_c (`jtl.lora_layout.dora_kernel`),
so with B = 0 it is the pretrained layer. As in PEFT, the norm is
part of the forward (no separate frozen copy); the merge folds m in.

Flax NNX models: `adaptable_layers` / `add_lora` find `nnx.Linear`,
`nnx.LinearGeneral` and ungrouped `nnx.Conv` layers and add the same two
leaves to the module's params (`jtl.adapter.variables_of(module)`); `LoraWeights`
wraps the model so that each step uses W + scale * A B as the layer's kernel
(any model kind: it folds the adapters in before calling it). A model that
already holds `nnx.LoRA` / `nnx.LoRALinear` layers needs none of this: its
`nnx.LoRAParam` leaves ("lora_a", "lora_b") are params that rules select,
e.g. `[(".*/lora_[ab]", "lora"), (".*", "frozen")]`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl import tree as jtree
from jtl import lora_layout
from jtl.adapter import FunctionModel, as_model, function_name, is_nnx_module, variables_of
from jtl.errors import CheckpointError, ConfigError, bullet_list
from jtl.export import write
from jtl.models import wgrad
from jtl.tree import PyTree
from jtl.weights import read

# The leaf layout and the merge live in the core (exports use them too).
LORA_A, LORA_B, LORA_LEAF = lora_layout.LORA_A, lora_layout.LORA_B, lora_layout.LORA_LEAF
LORA_M = lora_layout.LORA_M
merge_lora, adapter_params = lora_layout.merge_lora, lora_layout.adapter_params
_delta, _adapted_modules = lora_layout.delta, lora_layout.adapted_modules
_ALPHA_KEY = "__lora_alpha__"


def _eligible(module: nn.Module) -> bool:
  return (isinstance(module, nn.Dense)
          or (isinstance(module, nn.DenseGeneral) and not module.batch_dims)
          or (isinstance(module, nn.Conv) and module.feature_group_count == 1))


def _input_axes(module: nn.Module) -> int:
  """How many leading kernel axes are input axes: a DenseGeneral's `axis`
  count (attention's query [width, heads, head_dim]: 1; its output
  [heads, head_dim, width]: 2); every axis but the last for Dense and Conv."""
  if isinstance(module, nn.DenseGeneral):
    return len(module.axis) if isinstance(module.axis, Sequence) else 1
  return -1


def _module_path(module: nn.Module) -> str:
  return "/".join(module.scope.path)


def _nnx_layers(module: Any) -> list[str]:
  """Paths of the NNX Linear / LinearGeneral / ungrouped Conv layers with a kernel."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  kinds = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)
  return ["/".join(map(str, path)) for path, sub in nnx.iter_modules(module)
          if isinstance(sub, kinds) and getattr(sub, "feature_group_count", 1) == 1
          and isinstance(getattr(sub, "kernel", None), nnx.Param)]


def adaptable_layers(module: Any, variables: PyTree = None, inputs: Any = None,
                     **call_kwargs: Any) -> list[str]:
  """Paths of the `nn.Dense` / `nn.DenseGeneral` (attention's query, key,
  value and output) / ungrouped `nn.Conv` layers a forward pass calls (Linen;
  traced abstractly with `jax.eval_shape`, so it costs no compute), or of an
  NNX module's Linear / LinearGeneral / ungrouped Conv layers.

  A Linen module is called as the train step calls it in evaluation mode:
  `module(inputs, train=False)`, or as a `jtl.LinenModel` says (its flag,
  `inputs_as_kwargs`, `call`); `call_kwargs`, when given, are the call's
  keywords instead (e.g. `deterministic=True`). A plain apply function has no
  layers to find ([]): give `add_lora` its `layers=` (the paths holding a kernel)."""
  if is_nnx_module(module):
    return _nnx_layers(module)
  return list(_linen_layers(module, variables, inputs, **call_kwargs))


def _linen_layers(module: Any, variables: PyTree, inputs: Any, **call_kwargs: Any
                  ) -> dict[str, int]:
  """{path: `_input_axes`} of the adaptable Linen layers, in call order."""
  found: dict[str, int] = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and _eligible(context.module):
      path = _module_path(context.module)
      if path not in found and context.module.has_variable("params", "kernel"):
        found[path] = _input_axes(context.module)
    return next_fun(*args, **kwargs)

  if call_kwargs:  # the caller says how to call it
    forward = lambda v, x: module.apply(v, x, **call_kwargs)  # noqa: E731
  else:  # as the steps call it: a LinenModel's flag, inputs and method; else train=False
    model = as_model(module)
    forward = lambda v, x: model.apply(  # noqa: E731
        v["params"], {k: c for k, c in v.items() if k != "params"}, x, train=False, rng=None)
  with nn.intercept_methods(record):
    jax.eval_shape(forward, variables, inputs)
  return found


def default_targets(layers: Sequence[str], head_pattern: str | None = r"head/.*") -> list[str]:
  """LoRA's default targets: the attention projections (query, key, value and
  the attention's output: the layers next to a query) when the model has
  them, as PEFT adapts transformers; otherwise every layer but the head."""
  attention = {p.rpartition("/")[0] for p in layers
               if p.rpartition("/")[2] in ("query", "key", "value")}
  chosen = [p for p in layers if p.rpartition("/")[0] in attention and p.count("/")]
  if not chosen:
    chosen = [p for p in layers
              if not (head_pattern and re.fullmatch(head_pattern, p + "/kernel"))]
  return [re.escape(p) for p in chosen]


def select_targets(layers: Sequence[str], targets: Sequence[str] | str) -> list[str]:
  """The layer paths that fully match one of the `targets` regexes.

  Raises ConfigError naming each regex that matches no layer.
  """
  targets = [targets] if isinstance(targets, str) else list(targets)
  compiled = jtree.compile_rules([(t, None) for t in targets])
  chosen = [p for p in layers if any(c.fullmatch(p) for c, _ in compiled)]
  unused = [t for (c, _), t in zip(compiled, targets) if not any(c.fullmatch(p) for p in layers)]
  if unused or not targets:
    raise ConfigError(
        f"LoRA targets {unused or targets} match no Dense/Conv layer (regexes must fully "
        "match a layer path). The adaptable layers are:\n"
        + (bullet_list(layers, limit=40) if layers else "  (none)"))
  return chosen


def add_lora(module: Any, variables: PyTree = None, inputs: Any = None, *,
             targets: Sequence[str] | str, rank: int, seed: int = 0,
             layers: Sequence[str] | None = None, dora: bool = False) -> dict[str, Any]:
  """Returns `variables` with adapters on the layers matched by `targets`.

  Args:
    module, variables: the model and its (pretrained) variables; for an NNX
      module, None takes its own (`jtl.adapter.variables_of(module)`).
    inputs: an example input batch (only its shapes are used; not needed
      for NNX modules).
    targets: regexes over layer paths, e.g. r".*/attention/(query|value)".
    rank: adapter rank r.
    seed: initialisation of A (uniform, +-1/sqrt(fan_in), as PEFT); B is 0.
    layers: the layer paths to choose from (each holds a "kernel"; default
      `adaptable_layers(module, variables, inputs)`); needed for an apply function.
    dora: also add DoRA's magnitude "lora_magnitude" = ||kernel||_c per output.
  """
  if not (isinstance(rank, int) and rank >= 1):
    raise ConfigError(f"LoRA rank={rank!r}: expected an int >= 1.")
  if not isinstance(dora, bool):
    raise ConfigError(f"LoRA dora={dora!r}: expected true or false.")
  if variables is None:
    variables = variables_of(module)
  flat = jtree.flatten(variables["params"])
  if layers is None and _is_function(module):
    raise ConfigError(_function_layers_message(module, flat))
  n_in = {} if is_nnx_module(module) else _linen_layers(module, variables, inputs)
  if layers is None:
    layers = adaptable_layers(module, variables, inputs)
  chosen = select_targets(layers, targets)
  _check_kernels(chosen, flat)
  key = jax.random.PRNGKey(seed)
  for i, path in enumerate(chosen):
    kernel = flat[f"{path}/kernel"]
    split = n_in.get(path, -1) % kernel.ndim  # after the input axes
    fan_in, out = int(np.prod(kernel.shape[:split])), int(np.prod(kernel.shape[split:]))
    bound = 1.0 / np.sqrt(fan_in)
    flat[f"{path}/{LORA_A}"] = np.asarray(jax.random.uniform(
        jax.random.fold_in(key, i), (fan_in, rank), jnp.float32, -bound, bound))
    flat[f"{path}/{LORA_B}"] = np.zeros((rank, out), np.float32)
    if dora:  # the same jnp reduction as the forward's, so B = 0 is the base model
      flat[f"{path}/{LORA_M}"] = np.asarray(
          lora_layout.column_norms(jnp.asarray(kernel, jnp.float32), fan_in))
  return {**variables, "params": jtree.unflatten(flat)}


def _is_function(module: Any) -> bool:
  """Whether `module` is a plain apply function (no Linen / NNX layers to find)."""
  return not is_nnx_module(module) and isinstance(as_model(module), FunctionModel)


def _kernel_layers(flat: Mapping[str, Any]) -> list[str]:
  """Paths of the params holding a "kernel" of 2 or more axes."""
  return [p[: -len("/kernel")] for p, v in flat.items()
          if p.endswith("/kernel") and np.ndim(v) >= 2]


def _function_layers_message(module: Any, flat: Mapping[str, Any]) -> str:
  """Why add_lora needs `layers=` for an apply function, with its kernels' paths."""
  name = function_name(getattr(module, "fn", module))  # a FunctionModel's function
  kernels = _kernel_layers(flat)
  example = f"layers={kernels[:4]!r}" if kernels else 'layers=["body/dense", ...]'
  return (f"add_lora: the layers of an apply function ({name}) cannot be discovered: it has "
          "no Linen or NNX modules to inspect. Pass layers=[...], the params paths holding "
          f"the kernels to adapt (without \"/kernel\"), e.g. {example}; targets then "
          "select among them. Its params with a kernel:\n"
          + (bullet_list(kernels, limit=40) if kernels else "  (none)"))


def _check_kernels(chosen: Sequence[str], flat: Mapping[str, Any]) -> None:
  """Raises a ConfigError naming the chosen layers whose params hold no kernel."""
  missing = [p for p in chosen if f"{p}/kernel" not in flat]
  if missing:
    raise ConfigError(
        f"LoRA layers {missing} hold no \"kernel\" in the params (a layer is the path above "
        "its kernel, e.g. \"body\" for body/kernel). The params with a kernel:\n"
        + bullet_list(_kernel_layers(flat), limit=40))


def _matmul(x: Any, w: Any) -> Any:
  """x @ w, with w's gradient summed over devices in float32 under bf16
  compute (`jtl.models.wgrad`): the adapters are all a LoRA step trains."""
  return wgrad.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def lora_interceptor(alpha: float):
  """A Flax method interceptor adding `alpha/r * (x A) B` to adapted layers."""

  def intercept(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or not mod.has_variable("params", LORA_A):
      return next_fun(*args, **kwargs)
    if not _eligible(mod):  # e.g. adapters imported from PEFT onto a DenseGeneral
      raise ConfigError(
          f"LoRA adapters at {_module_path(mod)} ({type(mod).__name__}): LoraModel adds "
          "the low-rank path to nn.Dense, nn.DenseGeneral (no batch_dims) and ungrouped "
          "nn.Conv layers only. Use "
          "jtl.recipes.strategies.LoraWeights (folds any adapter into its kernel) or merge_lora.")
    out = next_fun(*args, **kwargs)
    a = mod.get_variable("params", LORA_A).astype(out.dtype)
    b = mod.get_variable("params", LORA_B).astype(out.dtype)
    x = jnp.asarray(args[0]).astype(out.dtype)
    scale = alpha / a.shape[-1]
    if isinstance(mod, nn.DenseGeneral):
      update = _dense_general_update(mod, x, a, b, alpha).reshape(out.shape).astype(out.dtype)
    else:
      if isinstance(mod, nn.Dense):
        low = _matmul(x, a)
      else:
        kernel_shape = mod.get_variable("params", "kernel").shape
        conv = mod.clone(parent=None, name=None, features=a.shape[-1], use_bias=False)
        low = conv.apply({"params": {"kernel": a.reshape(kernel_shape[:-1] + (a.shape[-1],))}},
                         x)
      update = (_matmul(low, b) * scale).astype(out.dtype)
    if not mod.has_variable("params", LORA_M):
      return out + update
    return _dora_output(mod, out, update, alpha)

  return intercept


def _dense_general_update(mod: nn.Module, x: Any, a: Any, b: Any, alpha: float) -> Any:
  """alpha / r * (x A) B of a DenseGeneral: x's `axis` axes contract with A
  (split after the kernel's input axes: the low-rank path) or, for adapters
  split after another axis (e.g. imported), with their kernel update."""
  axes = tuple(ax % x.ndim for ax in (mod.axis if isinstance(mod.axis, Sequence)
                                      else (mod.axis,)))
  in_dims = tuple(x.shape[ax] for ax in axes)
  contract = (axes, tuple(range(len(axes))))
  if a.shape[0] == int(np.prod(in_dims)):
    low = wgrad.dot_general(x, a.reshape(in_dims + (a.shape[-1],)), (contract, ((), ())))
    return _matmul(low, b) * (alpha / a.shape[-1])
  kernel_shape = mod.get_variable("params", "kernel").shape
  return wgrad.dot_general(x, _delta(a, b, kernel_shape, alpha).astype(x.dtype),
                           (contract, ((), ())))


def _dora_output(mod: nn.Module, out: Any, update: Any, alpha: float) -> Any:
  """DoRA in activation space (PEFT's form): m / ||W + s A B||_c rescales the
  layer's output without its bias, x W + s x A B; the bias is added after."""
  kernel = mod.get_variable("params", "kernel")
  a, b = mod.get_variable("params", LORA_A), mod.get_variable("params", LORA_B)
  magnitude = mod.get_variable("params", LORA_M)
  norms = lora_layout.column_norms(
      kernel.astype(jnp.float32) + lora_layout.delta(a, b, kernel.shape, alpha), a.shape[0])
  k = 1  # the output's feature axes (a DenseGeneral's can be several)
  while int(np.prod(out.shape[-k:])) != magnitude.size and k < out.ndim:
    k += 1
  shape = (1,) * (out.ndim - k) + out.shape[-k:]  # broadcast over the feature axes
  scale = (magnitude / norms).reshape(shape).astype(out.dtype)
  if not mod.has_variable("params", "bias"):
    return (out + update) * scale
  bias = mod.get_variable("params", "bias").reshape(shape).astype(out.dtype)
  return (out - bias + update) * scale + bias


class LoraModel:
  """Wraps a Flax module so `apply` adds the LoRA path of adapted layers.

  It stands in for the module wherever jtl calls `module.apply(...)` (train
  and eval steps, `fit`); other attributes (`features`, ...) pass through.
  """

  def __init__(self, base: nn.Module, alpha: float):
    if not (isinstance(alpha, (int, float)) and alpha > 0):
      raise ConfigError(f"LoRA alpha={alpha!r}: expected a positive number.")
    self.base = base
    self.alpha = float(alpha)

  def apply(self, variables: PyTree, *args: Any, **kwargs: Any) -> Any:
    with nn.intercept_methods(lora_interceptor(self.alpha)):
      return self.base.apply(variables, *args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.base, name)

  def __repr__(self) -> str:
    return f"LoraModel(alpha={self.alpha}, base={type(self.base).__name__})"


class LoraWeights:
  """A model adapter for params holding LoRA leaves: each call folds them into
  the kernels (W + alpha/r * A B, `merge_lora`) and runs the model with those.

  Works for any model `jtl.as_model` takes; this is how NNX models train
  adapters (`add_lora(nnx_module, ...)`). The frozen kernels get no gradient;
  A and B get theirs through the product.

  Example:
    variables = add_lora(model, targets=r".*(query|value)", rank=8)
    labels = jtl.label_params(variables["params"], lora_rules())
    step = jtl.make_train_step(LoraWeights(model, alpha=16), tx, labels=labels)
  """
  jtl_adapter = True

  def __init__(self, model: Any, alpha: float):
    if not (isinstance(alpha, (int, float)) and alpha > 0):
      raise ConfigError(f"LoRA alpha={alpha!r}: expected a positive number.")
    self.model = as_model(model)
    self.alpha = float(alpha)

  def apply(self, params: PyTree, model_state: dict[str, PyTree], inputs: Any, *, train: bool,
            rng: jax.Array | None, frozen_paths: frozenset[str] = frozenset()
            ) -> tuple[Any, dict[str, PyTree]]:
    return self.model.apply(merge_lora(params, self.alpha), model_state, inputs, train=train,
                            rng=rng, frozen_paths=frozen_paths)


def lora_rules(head_pattern: str | None = r"head/.*") -> list[tuple[str, str | None]]:
  """Adapters ("lora") and the head ("head") train; everything else is frozen."""
  rules: list[tuple[str, str | None]] = [(LORA_LEAF, "lora")]
  if head_pattern:
    rules.append((head_pattern, "head"))
  return rules + [(".*", None)]


def unmerge_lora(merged: PyTree, adapters: Mapping[str, Any], alpha: float) -> dict[str, Any]:
  """Inverse of `merge_lora`: subtracts the adapters' update, puts them back.

  DoRA adapters cannot be taken out of a merged kernel (it keeps only the
  direction and m, not ||W + s A B||_c): a CheckpointError.
  """
  flat = dict(jtree.flatten(merged))
  adapters = {p: v for p, v in adapters.items() if re.fullmatch(LORA_LEAF, p)}
  if dora := sorted(p for p in adapters if p.endswith("/" + LORA_M)):
    raise CheckpointError(
        f"unmerge_lora: {dora[0]} is a DoRA magnitude; a merged DoRA kernel does not hold "
        "the norm needed to take the adapter out. Keep the unmerged params (or the "
        "adapters and the base model) and merge_lora them instead.")
  _check_slots(flat, adapters, "unmerge_lora")
  for m in _adapted_modules(adapters):
    a, b = adapters[f"{m}/{LORA_A}"], adapters[f"{m}/{LORA_B}"]
    kernel = flat[f"{m}/kernel"]
    flat[f"{m}/kernel"] = (kernel - _delta(a, b, kernel.shape, alpha)).astype(kernel.dtype)
    flat[f"{m}/{LORA_A}"], flat[f"{m}/{LORA_B}"] = a, b
  return jtree.unflatten(flat)


def _check_slots(flat: Mapping[str, Any], adapters: Mapping[str, Any], where: str) -> None:
  problems = []
  for p, v in adapters.items():
    module, leaf = p.rsplit("/", 1)
    kernel = flat.get(f"{module}/kernel")
    if kernel is None:
      problems.append(f"{p}: the params have no kernel at {module}/kernel")
      continue
    # a [prod(leading axes), r], b [r, prod(the other axes)], split anywhere
    sizes = [(int(np.prod(kernel.shape[:k])), int(np.prod(kernel.shape[k:])))
             for k in range(1, kernel.ndim)]
    if leaf == LORA_M:
      b = adapters.get(f"{module}/{LORA_B}")
      width = np.shape(b)[-1] if b is not None else sizes[-1][1]
      if np.shape(v) != (width,):
        problems.append(f"{p}: shape {np.shape(v)}, expected ({width},) (one magnitude per "
                        f"output column of {LORA_B})")
      continue
    ok = np.ndim(v) == 2 and any((v.shape[0] == i) if leaf == LORA_A else (v.shape[1] == o)
                                 for i, o in sizes)
    if not ok:
      fan_in, out = sizes[-1]
      problems.append(f"{p}: shape {np.shape(v)} does not fit kernel {tuple(kernel.shape)} "
                      f"(expected {LORA_A} (fan_in={fan_in}, r), {LORA_B} (r, {out}), or the "
                      "kernel split after another leading axis)")
  for m in _adapted_modules(adapters):
    if f"{m}/{LORA_B}" not in adapters:
      problems.append(f"{m}: has {LORA_A} but no {LORA_B}")
  if problems:
    raise CheckpointError(f"{where}: adapters do not fit the params:\n" + bullet_list(problems))


def save_adapters(params: PyTree, path: Any, *, alpha: float | None = None,
                  include: str | None = r"head/.*") -> None:
  """Writes only the adapters (and leaves matching `include`, the head) to
  npz/safetensors/msgpack by suffix; `alpha` is stored with them if given."""
  flat = {p: np.asarray(v) for p, v in adapter_params(params, include=include).items()}
  if not any(re.fullmatch(LORA_LEAF, p) for p in flat):
    raise CheckpointError(f"{path}: the params hold no LoRA adapters to save; "
                          "add them with add_lora first.")
  if alpha is not None:
    flat[_ALPHA_KEY] = np.asarray(alpha, np.float32)
  write(jtree.unflatten(flat), path)


def load_adapters(params: PyTree, path: Any) -> tuple[dict[str, Any], float | None]:
  """Puts the adapters (and head) saved at `path` into `params`.

  Leaves already present must keep their shape; missing adapter slots are
  created next to their kernels. Returns (params, alpha or None).
  """
  saved = dict(read(path))
  alpha = saved.pop(_ALPHA_KEY, None)
  flat = dict(jtree.flatten(params))
  problems = []
  for p, v in saved.items():
    if p in flat and np.shape(flat[p]) != np.shape(v):
      problems.append(f"{p}: file has shape {np.shape(v)}, params {np.shape(flat[p])}")
    elif p not in flat and not re.fullmatch(LORA_LEAF, p):
      problems.append(f"{p}: not in the params and not an adapter")
  if problems:
    raise CheckpointError(f"{path}: saved adapters do not fit these params:\n"
                          + bullet_list(problems) + "\nLoad them into the model they were "
                          "trained with (same architecture, same LoRA targets and rank).")
  _check_slots(flat, {p: v for p, v in saved.items() if re.fullmatch(LORA_LEAF, p)}, str(path))
  for p, v in saved.items():
    flat[p] = jnp.asarray(v, flat[p].dtype) if p in flat else jnp.asarray(v)
  return jtree.unflatten(flat), None if alpha is None else float(alpha)
