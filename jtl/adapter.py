"""How jtl calls a model: one small adapter for every kind of model code.

Every step, loss and method in jtl calls a model through one pure function,

    model.apply(params, model_state, inputs, *, train, rng, frozen_paths)
        -> (outputs, new_model_state)

where `params` is a nested dict of arrays (labelled by "/"-joined paths),
`model_state` the model's other state (BatchNorm statistics) and
`frozen_paths` the module paths whose params are all frozen, whose BatchNorm
layers then run with their stored statistics. Three adapters give it:

- `LinenModel(module, ...)`: a Flax Linen module, with `train=`,
  `deterministic=` or no flag; outputs picked from a dict or tuple; inputs
  passed as keyword arguments (e.g. `input_ids=`, `attention_mask=`); or any
  call written as `call(module, inputs, **flag)`; the rng streams it draws
  from (`rng_streams`) and the collections it updates in evaluation
  (`eval_mutable`).
- `NnxModel(module, ...)`: a Flax NNX module. It is split once
  (`nnx.split`) into its graph definition and state; `params` are its
  `nnx.Param` leaves as a pure dict, `model_state` = {"state": its other
  variables (BatchStat, ...; not the values it sows)}. Inside the pure step it is merged again, put
  in train or eval mode, its frozen BatchNorm layers set to their stored
  statistics and its rng streams reseeded from the step's key; a mode flag
  its call takes (`train=`, `deterministic=`, ...) and an `rngs` argument
  are passed. `update_module(module, state)` writes a trained state back.
- `FunctionModel(apply_fn, ...)`: a plain `apply_fn(params, inputs, **kw)`,
  passed the mode flag and the `rng` key it takes.

`as_model(x)` picks the adapter; the steps call it, so users pass whichever
they have. An adapter is named once, e.g.
`jtl.LinenModel(bert, train_kwarg="deterministic", output="logits",
inputs_as_kwargs=True)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl import tree as jtree
from jtl.errors import StepError
from jtl.tree import PyTree
from jtl.variable_checks import check_variables, linen_variable_errors

Output = str | int | Callable[[Any], Any] | None


class Model(Protocol):
  """What the steps need of a model (see the module docstring)."""

  def apply(self, params: PyTree, model_state: dict[str, PyTree], inputs: Any, *, train: bool,
            rng: jax.Array | None, frozen_paths: frozenset[str] = frozenset()
            ) -> tuple[Any, dict[str, PyTree]]:
    ...


def select_output(out: Any, output: Output) -> Any:
  """`out[output]` for a key or index, `output(out)` for a function, else `out`.

  >>> select_output({"logits": 1, "hidden": 2}, "logits"), select_output((3, 4), 0)
  (1, 3)
  """
  if output is None:
    return out
  return output(out) if callable(output) else out[output]


def _flag(train_kwarg: str | None, train: bool) -> dict[str, bool]:
  if train_kwarg is None:
    return {}
  if train_kwarg == "deterministic":
    return {"deterministic": not train}
  if train_kwarg == "use_running_average":
    return {"use_running_average": not train}
  return {train_kwarg: train}


_FLAGS = ("train", "deterministic", "use_running_average", "training", "is_training")
_AUTO = "auto"  # NnxModel's and FunctionModel's default: the keyword read from the call


def call_kwargs(fn: Callable[..., Any], train: bool, key: jax.Array | None) -> dict[str, Any]:
  """What jtl passes an NNX module's call `fn` that no adapter names (an own
  NNX model run by a config, `jtl.models.own_nnx`): every mode flag it takes
  (train, deterministic, use_running_average, training, is_training, each
  with its own meaning), and `rngs` if it takes it (`nnx.Rngs(key)` in
  training, None in evaluation).

  >>> call_kwargs(lambda self, x, train=False, deterministic=None: x, True, None)
  {'train': True, 'deterministic': False}
  """
  params = _keywords(fn) or {}
  kwargs: dict[str, Any] = {}
  for name in (n for n in _FLAGS if n in params):
    kwargs.update(_flag(name, train))
  if "rngs" in params:
    kwargs["rngs"] = _nnx().Rngs(key) if train and key is not None else None
  return kwargs


def _keywords(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
  """The named parameters jtl may pass `fn` by keyword: all but the first two
  positional ones (self / module / params, and the inputs) and those a
  functools.partial binds (the user's choice); None when it has no signature."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return None
  positional = [n for n, p in params.items()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
  bound = fn.keywords if isinstance(fn, functools.partial) else {}
  return {n: p for n, p in params.items() if n not in positional and n not in bound
          and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _infer_kwarg(fn: Callable[..., Any], names: tuple[str, ...], *, wrapper: str,
                option: str) -> str | None:
  """The one of `names` that `fn` takes by keyword, or None. A StepError when
  it takes several (e.g. both `train` and `deterministic`): which one says
  training is the user's to name, `wrapper(..., option=...)`."""
  params = _keywords(fn)
  found = [n for n in names if n in (params or ())]
  if len(found) > 1:
    raise StepError(
        f"{function_name(fn)} takes several mode flags ({', '.join(found)}), and jtl sets "
        f"one of them to say training or evaluation. Name it once: {wrapper}, {option}="
        f"{found[0]!r}) (or {option}=None to pass none), and pass that wherever the model "
        "went (make_train_step, make_eval_step, fit).")
  return found[0] if found else None


def check_flag(module: Any, train_kwarg: str | None, method: Callable[..., Any] | None = None
               ) -> None:
  """Raises a StepError saying how to wrap `module` when its call takes no
  `train_kwarg` keyword (e.g. a module whose flag is `deterministic`)."""
  if train_kwarg is None or not isinstance(module, nn.Module):
    return
  fn = method if method is not None else type(module).__call__
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # no signature to read: let the call decide
    return
  if train_kwarg in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
    return
  flags = [f for f in _FLAGS if f in params]
  hint = (f"jtl.LinenModel(module, train_kwarg={flags[0]!r})" if flags else
          "jtl.LinenModel(module, train_kwarg=None) (no mode flag)")
  raise StepError(
      f"{type(module).__name__}.{getattr(fn, '__name__', '__call__')} takes no "
      f"{train_kwarg!r} argument (its arguments: {', '.join(list(params)[1:])}), and jtl "
      f"passes {train_kwarg}= to say training or evaluation. Wrap the module once: {hint}, "
      "and pass that wherever the module went (make_train_step, make_eval_step, fit).")


@contextlib.contextmanager
def frozen_batchnorm(frozen_module_paths: Iterable[str]):
  """Within this context, Linen BatchNorm layers at these module paths use
  their stored statistics (and do not update them), whatever `train` says.

  The flag is rewritten for the frozen layers wherever the model sets it: in
  the call (`nn.BatchNorm(...)(x, use_running_average=not train)`, the zoo's
  style) or in the constructor (`nn.BatchNorm(use_running_average=not
  train)(x)`, flax examples' style, where a call-time flag would clash).
  """
  paths = frozenset(frozen_module_paths)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.BatchNorm)
        or "/".join(module.scope.path) not in paths):
      return next_fun(*args, **kwargs)
    if len(args) > 1:  # bn(x, use_running_average)
      return next_fun(args[0], True, *args[2:], **kwargs)
    if module.use_running_average is None:
      return next_fun(*args, **{**kwargs, "use_running_average": True})
    flag = module.use_running_average
    object.__setattr__(module, "use_running_average", True)  # a frozen dataclass field
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "use_running_average", flag)

  if not paths:
    yield
    return
  token = _FROZEN_PATHS.set(paths)  # for NNX layers inside a Linen module (`own_nnx`)
  try:
    with nn.intercept_methods(interceptor):
      yield
  finally:
    _FROZEN_PATHS.reset(token)


_FROZEN_PATHS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "jtl_frozen_batchnorm_paths", default=frozenset())


def frozen_batchnorm_paths() -> frozenset[str]:
  """The module paths `frozen_batchnorm` freezes in this context (a wrapper
  of NNX layers, which Linen's interception does not reach, reads them)."""
  return _FROZEN_PATHS.get()


@dataclasses.dataclass(frozen=True)
class LinenModel:
  """A Flax Linen module and how to call it.

  Args:
    module: the Linen module.
    train_kwarg: the mode flag: "train" (`train=True` when training),
      "deterministic" (`deterministic=False` when training), or None (no flag).
    output: which output is the logits: a dict key, a tuple index, or a
      function of the output; None: the output itself.
    inputs_as_kwargs: call `module(**inputs)` with a dict of inputs (e.g.
      `input_ids`, `attention_mask`) instead of `module(inputs)`.
    call: `call(module, inputs, **flag)`, any other way of calling it (a
      method such as `MyModel.features`); replaces the three above's call.
    rng_streams: the rng streams the module draws from in training
      (`self.make_rng(name)`), each seeded from the step's key: "dropout"
      with the key itself, the i-th other one with `jax.random.fold_in(key, i)`.
      Evaluation passes none.
    eval_mutable: collections the module updates in evaluation too (a call
      counter, a cache): mutable there, their updates discarded, as the
      evaluation step returns only its sums. In training every collection
      of the variables besides "params" is mutable and kept.

  >>> import jax.numpy as jnp
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x, deterministic=True):
  ...     return {"logits": nn.Dense(2)(x)}
  >>> model = LinenModel(Net(), train_kwarg="deterministic", output="logits")
  >>> params = Net().init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
  >>> model.apply(params, {}, jnp.ones((4, 3)), train=True, rng=None)[0].shape
  (4, 2)
  """
  module: nn.Module
  train_kwarg: str | None = "train"
  output: Output = None
  inputs_as_kwargs: bool = False
  call: Callable[..., Any] | None = None
  rng_streams: tuple[str, ...] = ("dropout",)
  eval_mutable: tuple[str, ...] = ()
  jtl_adapter = True  # class attribute: `as_model` passes adapters through

  def __post_init__(self) -> None:
    for name in ("rng_streams", "eval_mutable"):  # a name or names, kept hashable
      value = getattr(self, name)
      object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

  def apply(self, params: PyTree, model_state: dict[str, PyTree], inputs: Any, *, train: bool,
            rng: jax.Array | None, frozen_paths: frozenset[str] = frozenset()
            ) -> tuple[Any, dict[str, PyTree]]:
    check_flag(self.module, self.train_kwarg, self.call)
    variables = {"params": params, **model_state}
    if train:
      mutable = list(model_state) if model_state else False
    else:  # evaluation's updates are dropped: the step is pure
      mutable = list(self.eval_mutable) or False
    rngs = {} if rng is None else {  # dropout's key as it always was: results stay the same
        s: rng if s == "dropout" else jax.random.fold_in(rng, i)
        for i, s in enumerate(self.rng_streams)}
    kwargs = dict(_flag(self.train_kwarg, train), rngs=rngs, mutable=mutable, method=self.call)
    with (frozen_batchnorm(frozen_paths if train else ()), linen_variable_errors(self.module),
          self._call_errors(train)):
      if self.inputs_as_kwargs:
        out = self.module.apply(variables, **inputs, **kwargs)
      else:
        out = self.module.apply(variables, inputs, **kwargs)
    out, new_state = out if mutable else (out, model_state)
    return select_output(out, self.output), dict(new_state if train else model_state)

  @contextlib.contextmanager
  def _call_errors(self, train: bool) -> Iterator[None]:
    """flax's errors for an rng stream jtl does not seed and for a collection
    updated while immutable, as StepErrors naming the option to set."""
    name = type(self.module).__name__
    wrap = lambda option: (  # noqa: E731
        f"wrap the module once, jtl.LinenModel(module, {option}), and pass that wherever the "
        "module went (make_train_step, make_eval_step, fit).")
    try:
      yield
    except flax.errors.InvalidRngError as e:
      found = re.search(r'needs PRNG for "([^"]+)"', str(e))
      if found is None:
        raise
      stream = found.group(1)
      if not train:
        raise StepError(
            f"{name} draws from the rng stream {stream!r} (self.make_rng({stream!r})) in "
            "evaluation, where jtl passes no random keys: evaluation is deterministic. Draw "
            "only when training (under the module's mode flag).") from e
      raise StepError(
          f"{name} draws from the rng stream {stream!r} (self.make_rng({stream!r})), which "
          "jtl does not seed: it seeds the streams LinenModel's rng_streams names "
          f"({', '.join(self.rng_streams) or 'none'}): "
          + wrap(f"rng_streams={(*self.rng_streams, stream)!r}")) from e
    except flax.errors.ModifyScopeVariableError as e:
      found = re.search(r'variable "([^"]*)" in "([^"]*)" because collection "([^"]+)"', str(e))
      if train or found is None:  # training: every collection given is mutable
        raise
      variable, path, collection = found.groups()
      where = "/".join(p for p in (collection, path.strip("/"), variable) if p)
      raise StepError(
          f"{name} updates {where!r} in evaluation, where jtl applies it with its "
          "collections immutable. If the updates may be dropped there (a call counter, a "
          "cache), " + wrap(f"eval_mutable={(*self.eval_mutable, collection)!r}")) from e


@dataclasses.dataclass(frozen=True)
class FunctionModel:
  """A plain `fn(params, inputs, **kwargs) -> outputs` (no Flax module).

  Args:
    fn: the apply function.
    train_kwarg: keyword of its mode flag ("train" or "deterministic"), or None
      (none passed); "auto" (the default): the one of train, deterministic,
      use_running_average, training, is_training that `fn` takes, if any (a
      functools.partial's bound keywords stay as bound).
    rng_kwarg: keyword for a dropout key (None in evaluation), or None;
      "auto" (the default): "rng" if `fn` takes it.
    output: which output is the logits (see `LinenModel`).

  >>> import jax.numpy as jnp
  >>> model = FunctionModel(lambda p, x: x @ p["w"])
  >>> model.apply({"w": jnp.ones((3, 2))}, {}, jnp.ones((4, 3)), train=True, rng=None)[0].shape
  (4, 2)
  >>> FunctionModel(lambda p, x, train=False, rng=None: x).train_kwarg
  'train'
  """
  fn: Callable[..., Any]
  train_kwarg: str | None = _AUTO
  rng_kwarg: str | None = _AUTO
  output: Output = None
  jtl_adapter = True

  def __post_init__(self) -> None:
    # A flag left out would train the function in its evaluation mode, silently.
    wrapper = f"jtl.FunctionModel({function_name(self.fn)}"
    if self.train_kwarg == _AUTO:
      object.__setattr__(self, "train_kwarg", _infer_kwarg(
          self.fn, _FLAGS, wrapper=wrapper, option="train_kwarg"))
    if self.rng_kwarg == _AUTO:
      object.__setattr__(self, "rng_kwarg", _infer_kwarg(
          self.fn, ("rng",), wrapper=wrapper, option="rng_kwarg"))

  def apply(self, params: PyTree, model_state: dict[str, PyTree], inputs: Any, *, train: bool,
            rng: jax.Array | None, frozen_paths: frozenset[str] = frozenset()
            ) -> tuple[Any, dict[str, PyTree]]:
    del frozen_paths
    kwargs = _flag(self.train_kwarg, train)
    if self.rng_kwarg:  # None in evaluation, which has no dropout key
      kwargs[self.rng_kwarg] = rng
    check_function_call(self, params, inputs, kwargs)
    return select_output(self.fn(params, inputs, **kwargs), self.output), model_state


def function_name(fn: Any) -> str:
  """`fn`'s name for a message (a functools.partial's: its function's)."""
  fn = getattr(fn, "func", fn)
  name = getattr(fn, "__name__", type(fn).__name__)
  return getattr(fn, "__qualname__", name) if name == "__call__" else name  # Net.__call__


def check_function_call(model: FunctionModel, params: PyTree, inputs: Any,
                        kwargs: dict[str, Any]) -> None:
  """Raises a StepError saying how to wrap `model.fn` when it cannot be called
  as `fn(params, inputs, **kwargs)` (a flag it requires that jtl does not pass,
  or a keyword jtl passes that it does not take), before its TypeError would."""
  try:
    signature = inspect.signature(model.fn)
  except (TypeError, ValueError):  # no signature to read: let the call decide
    return
  try:
    signature.bind(params, inputs, **kwargs)
    return
  except TypeError:
    pass
  name, args = function_name(model.fn), signature.parameters
  positional = [n for n, p in args.items() if p.kind in (p.POSITIONAL_ONLY,
                                                         p.POSITIONAL_OR_KEYWORD)][:2]
  missing = [n for n, p in args.items() if p.default is p.empty and n not in kwargs
             and n not in positional and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  unknown = [k for k in kwargs if k not in args]
  flags = [f for f in _FLAGS if f in args]
  if model.train_kwarg in unknown or (flags and flags[0] in missing):
    problem = (f"takes no {model.train_kwarg!r} argument" if model.train_kwarg in unknown
               else f"requires {flags[0]}=, which train_kwarg={model.train_kwarg!r} does not pass")
    hint = (f"jtl.FunctionModel({name}, train_kwarg={flags[0]!r})" if flags
            else f"jtl.FunctionModel({name}, train_kwarg=None) (no mode flag)")
  elif unknown:  # rng_kwarg
    problem = f"takes no {unknown[0]!r} argument"
    hint = (f"jtl.FunctionModel({name}, rng_kwarg=None) (no dropout key), or rng_kwarg= "
            "naming the keyword its key goes to")
  else:
    problem = (f"requires {', '.join(f'{n}=' for n in missing)}" if missing
               else "does not take these arguments")
    hint = (f"functools.partial({name}, ...) or defaults for what jtl does not pass, "
            "then jtl.FunctionModel(fn, train_kwarg=..., rng_kwarg=...) for a mode flag "
            "and a dropout key")
  passed = "".join(f", {k}=..." for k in kwargs)
  raise StepError(
      f"Apply function {name}{signature} {problem}: jtl calls it as "
      f"{name}(params, inputs{passed}) (train_kwarg={model.train_kwarg!r}, rng_kwarg="
      f"{model.rng_kwarg!r}). Wrap the function once: {hint}, and pass that wherever it "
      "went (make_train_step, make_eval_step, fit).")


def _nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx


def split_nnx(module: Any) -> tuple[Any, Any, Any, Any]:
  """(graphdef, params, rng state, the rest) of an NNX `module`, without its
  sown values (`Module.sow`, nnx.Intermediate): a call's outputs, not state
  to train or checkpoint, which the next call would add to. `module` keeps them."""
  nnx = _nnx()
  if nnx.state(module, nnx.Intermediate):  # a copy without them: the graphdef lacks them too
    module = nnx.clone(module)
    nnx.pop(module, nnx.Intermediate)
  return nnx.split(module, nnx.Param, nnx.RngState, ...)


def sown_paths(module: Any) -> set[str]:
  """The "state/..." paths of the values an NNX `module` holds sown, which
  its variables leave out (`split_nnx`)."""
  nnx = _nnx()
  return set(jtree.flatten({"state": nnx.to_pure_dict(nnx.state(module, nnx.Intermediate))}))


def is_nnx_module(x: Any) -> bool:
  """Whether `x` is a Flax NNX module (without importing NNX if nothing did)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Module)


class NnxModel:
  """A Flax NNX module, split once into a graph definition and its state.

  Args:
    module: the NNX module (its current weights are the initial variables).
    call: `call(module, inputs, **flag, **rngs)`, how to call it (default
      `module(inputs, **flag, **rngs)`).
    output: which output is the logits (see `LinenModel`).
    train_kwarg: a mode flag the call takes besides NNX's train/eval mode
      (which jtl always sets): "train" (`train=True` when training),
      "deterministic" (`deterministic=False` when training), ...; None: none
      passed; "auto" (the default): the one of train, deterministic,
      use_running_average, training, is_training the call takes, if any.
    rng_kwarg: a keyword the call takes random keys by (layers such as
      `nnx.Dropout(rate)` given theirs at call time, `self.drop(x,
      rngs=rngs)`): `nnx.Rngs(key)` in training, None in evaluation; None:
      none passed; "auto" (the default): "rngs" if the call takes it. Layers
      holding their own streams are reseeded from the step's key either way.

  `variables` is {"params": <nnx.Param leaves as a pure dict>, "state": <the
  other variables except rng state and sown values (`split_nnx`)>} (no
  "state" if there are none): what
  `label_params`, `create_train_state` and checkpoints take. A Linen module
  wrapped in `nnx.bridge.ToNNX` is called with its `train=` flag and mutable
  BatchNorm statistics.
  """
  jtl_adapter = True

  def __init__(self, module: Any, *, call: Callable[..., Any] | None = None,
               output: Output = None, train_kwarg: str | None = _AUTO,
               rng_kwarg: str | None = _AUTO):
    nnx = _nnx()
    if not isinstance(module, nnx.Module):
      raise StepError(f"NnxModel needs a flax.nnx.Module, got {type(module).__name__}.")
    self.graphdef, self._params, self._rngs, self._rest = split_nnx(module)
    self._streams = sorted({s.tag for _, s in nnx.iter_graph(module)
                            if isinstance(s, nnx.RngStream)})
    self.call, self.output = call, output
    self.bridged = isinstance(module, nnx.bridge.ToNNX)  # a Linen module inside
    self._name = type(module).__name__
    fn = call if call is not None else getattr(type(module), "__call__", None)

    def resolve(value: str | None, names: tuple[str, ...], option: str) -> str | None:
      # A flag left out would train the module in its evaluation mode, silently.
      if value != _AUTO:
        return value
      if self.bridged:  # the bridge's own call convention (`call_module`)
        return None
      return _infer_kwarg(fn, names, wrapper="jtl.NnxModel(module", option=option)

    self.train_kwarg = resolve(train_kwarg, _FLAGS, "train_kwarg")
    self.rng_kwarg = resolve(rng_kwarg, ("rngs",), "rng_kwarg")

  def call_module(self, module: Any, inputs: Any, *, train: bool = False,
                  frozen_paths: frozenset[str] = frozenset(), rng: jax.Array | None = None
                  ) -> Any:
    """The merged `module`'s output on `inputs` (in the mode it is set to);
    `rng`: the training key for `rng_kwarg`."""
    kwargs = _flag(self.train_kwarg, train)
    if self.rng_kwarg is not None:  # a key of its own, apart from the reseeded streams'
      kwargs[self.rng_kwarg] = (_nnx().Rngs(jax.random.fold_in(rng, len(self._streams)))
                                if train and rng is not None else None)
    if self.call is not None:
      return self.call(module, inputs, **kwargs)
    if not self.bridged:
      _check_nnx_call(module, self.train_kwarg, self.rng_kwarg)
      return module(inputs, **kwargs)
    # A Linen module inside `nnx.bridge.ToNNX` (e.g. from `jtl.models.create(...,
    # api="nnx")`): Linen's flag, mutable statistics and frozen BatchNorm.
    with frozen_batchnorm(frozen_paths if train else ()):
      return module(inputs, train=train, mutable=["batch_stats"] if train else False)

  @property
  def variables(self) -> dict[str, PyTree]:
    nnx = _nnx()
    rest = nnx.to_pure_dict(self._rest)
    return {"params": nnx.to_pure_dict(self._params), **({"state": rest} if rest else {})}

  def merge(self, params: PyTree, model_state: dict[str, PyTree]) -> Any:
    """A module with these params and state (in a trace or not)."""
    nnx = _nnx()
    copy = lambda state: jax.tree.map(lambda x: x, state)  # fresh Variables, here
    param_state, rest = copy(self._params), copy(self._rest)
    nnx.replace_by_pure_dict(param_state, params)
    if model_state.get("state"):
      nnx.replace_by_pure_dict(rest, model_state["state"])
    return nnx.merge(self.graphdef, param_state, copy(self._rngs), rest)

  def apply(self, params: PyTree, model_state: dict[str, PyTree], inputs: Any, *, train: bool,
            rng: jax.Array | None, frozen_paths: frozenset[str] = frozenset()
            ) -> tuple[Any, dict[str, PyTree]]:
    nnx = _nnx()
    module = self.merge(params, model_state)
    if rng is not None and self._streams:
      nnx.reseed(module, **{tag: jax.random.fold_in(rng, i) for i, tag in enumerate(self._streams)})
    module.set_attributes(deterministic=not train, use_running_average=not train,
                          raise_if_not_found=False)
    with frozen_nnx_batchnorm(module, frozen_paths if train else ()), self._call_errors():
      out = self.call_module(module, inputs, train=train, frozen_paths=frozen_paths, rng=rng)
    if not train or "state" not in model_state:
      return select_output(out, self.output), model_state
    rest = split_nnx(module)[3]
    return select_output(out, self.output), {"state": nnx.to_pure_dict(rest)}

  @contextlib.contextmanager
  def _call_errors(self) -> Iterator[None]:
    """NNX's error for a layer given no key at call time (`nnx.Dropout(rate)`
    called without `rngs=`), as a StepError naming `rng_kwarg`."""
    try:
      yield
    except ValueError as e:
      if not re.search(r"no `rngs` argument", str(e)):
        raise
      fact = str(e).splitlines()[0].rstrip(".")
      raise StepError(
          f"{self._name}: {fact} (a layer takes its random key at call time). jtl hands one "
          "over, nnx.Rngs(key) in training and None in evaluation, by the keyword "
          f"NnxModel's rng_kwarg names (now {self.rng_kwarg!r}; 'rngs' by default when the "
          "call takes it). Give __call__ an `rngs=None` argument it passes on to the layer "
          "(self.drop(x, rngs=rngs)); or wrap the module once, jtl.NnxModel(module, "
          "rng_kwarg=<its keyword>) (with call= for another method), and pass that wherever "
          "the module went (make_train_step, make_eval_step, fit); or build the layer with a "
          "stream of its own (nnx.Dropout(rate, rngs=rngs)), which jtl reseeds each step.") from e


@functools.cache
def _frozen_nnx_base() -> type:
  """nnx.BatchNorm normalising with its stored statistics (and leaving them
  as they are) whatever its call says, `use_running_average=not train` included."""
  nnx = _nnx()

  def call(self, x, use_running_average=None, **kwargs):
    del use_running_average
    return nnx.BatchNorm.__call__(self, x, True, **kwargs)

  return type("FrozenBatchNorm", (nnx.BatchNorm,), {"__call__": call})


@functools.cache
def _frozen_nnx_class(cls: type) -> type:
  """`cls` (nnx.BatchNorm or a user's subclass) frozen: the frozen call just
  above nnx.BatchNorm in its MRO, so a subclass's own `__call__` runs first."""
  base = _frozen_nnx_base()
  return base if cls is base.__mro__[1] else type(f"Frozen{cls.__name__}", (cls, base), {})


@contextlib.contextmanager
def frozen_nnx_batchnorm(module: Any, frozen_paths: Iterable[str]) -> Iterator[None]:
  """Within this context the nnx.BatchNorm layers of the merged `module` at
  these paths run on their stored statistics. NNX has no method interceptors
  (Linen's `frozen_batchnorm`), and a flag given at call time would override
  an attribute, so each such layer of this copy, made for the trace, is
  given a frozen subclass of its own class until the context ends."""
  nnx, paths = _nnx(), frozenset(frozen_paths)
  layers = [sub for path, sub in nnx.iter_modules(module) if paths
            and isinstance(sub, nnx.BatchNorm) and "/".join(map(str, path)) in paths]
  with classes_swapped(layers, _frozen_nnx_class):
    yield


@contextlib.contextmanager
def classes_swapped(layers: Iterable[Any], subclass: Callable[[type], type]) -> Iterator[None]:
  """Within this context each of `layers` is an instance of `subclass(its
  class)` (how jtl changes what an NNX layer's call does: NNX has no method
  interceptors); their own classes are back after it."""
  classes = [(layer, type(layer)) for layer in layers]
  try:
    for layer, cls in classes:
      object.__setattr__(layer, "__class__", subclass(cls))
    yield
  finally:
    for layer, cls in classes:
      object.__setattr__(layer, "__class__", cls)


def _check_nnx_call(module: Any, train_kwarg: str | None, rng_kwarg: str | None) -> None:
  """Raises a StepError saying how to wrap an NNX `module` whose `__call__`
  requires a mode flag that jtl would not pass, or lacks a keyword named."""
  try:
    params = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return
  for option, name in (("train_kwarg", train_kwarg), ("rng_kwarg", rng_kwarg)):
    if name is not None and name not in params and not any(
        p.kind is p.VAR_KEYWORD for p in params.values()):
      raise StepError(
          f"NnxModel({option}={name!r}): {type(module).__name__}.__call__ takes no "
          f"{name!r} argument (its arguments: {', '.join(list(params)[1:])}).")
  required = [n for n, p in params.items()
              if n in _FLAGS and n != train_kwarg and p.default is p.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  if required:
    raise StepError(
        f"{type(module).__name__}.__call__ requires {required[0]}=, which "
        f"NnxModel(train_kwarg={train_kwarg!r}) does not pass: wrap the module once, "
        f"jtl.NnxModel(module, train_kwarg={required[0]!r}), and pass that wherever the "
        "module went (make_train_step, make_eval_step, fit).")


def as_model(model: Any) -> Model:
  """The adapter for `model`: an adapter (an object with `jtl_adapter = True`
  and the `Model.apply` signature) as is; a Linen module (or an object
  with Linen's `apply(variables, x, ...)`, such as `jtl.recipes.strategies.LoraModel`)
  as `LinenModel(model)`; an NNX module as `NnxModel(model)`; any other
  callable as `FunctionModel(model)`."""
  if getattr(model, "jtl_adapter", False):  # LinenModel, NnxModel, FunctionModel, ...
    return model
  if isinstance(model, nn.Module) or (hasattr(model, "apply") and not callable(model)):
    return LinenModel(model)
  if is_nnx_module(model):
    return NnxModel(model)
  if callable(model):
    return FunctionModel(model)
  raise StepError(
      f"Cannot call a model of type {type(model).__name__}: expected a Flax Linen or NNX "
      "module, a function apply_fn(params, inputs), or a jtl.LinenModel / NnxModel / "
      "FunctionModel.")


def variables_of(model: Any) -> dict[str, PyTree]:
  """{"params": ..., ...} of an NNX module (or `NnxModel`): what
  `label_params`, `create_train_state` and `fit` take. Linen modules and
  apply functions keep their variables outside: pass those."""
  if is_nnx_module(model):  # its call is not read: only its variables are asked for
    model = NnxModel(model, train_kwarg=None, rng_kwarg=None)
  if isinstance(model, NnxModel):
    return model.variables
  raise StepError(
      f"A {type(model).__name__} keeps no variables of its own: pass its variables "
      "(e.g. module.init(...) for Linen, the params pytree for an apply function).")


def update_module(module: Any, state: Any) -> Any:
  """Writes a trained `TrainState` (or {"params": ..., "state": ...}
  variables) back into the NNX `module`, in place, and returns it, so that
  `module(x)` uses the fine-tuned weights.

  An update may be partial: the paths the variables lack keep the module's
  values (only "params": the BatchNorm statistics stay). A path the module
  lacks or holds in another shape is a StepError listing them all, raised
  before anything is written; LoRA adapter leaves must be folded into the
  kernels first (`jtl.recipes.strategies.merge_lora`).
  """
  nnx = _nnx()
  if not isinstance(module, nnx.Module):
    raise StepError(f"update_module needs a flax.nnx.Module, got {type(module).__name__}.")
  variables = state.variables if hasattr(state, "variables") else state
  _, params, _, other = split_nnx(module)
  check_variables(
      variables, {"params": nnx.to_pure_dict(params), "state": nnx.to_pure_dict(other)},
      what=f"update_module({type(module).__name__}, ...)", allow_missing=True,
      sown=sown_paths(module),
      advice="Pass variables of a module built as this one (its run's checkpoint, "
      "jtl.restore_variables; jtl.adapter.variables_of(module)); nothing was written.")
  # Fresh device arrays, never host numpy views: those are read-only, and a
  # train-mode call (BatchNorm writing its statistics) would fail on them.
  variables = jax.tree.map(jnp.asarray, jax.device_get(variables))
  updates = []
  for key, part in (("params", params), ("state", other)):
    if variables.get(key):
      nnx.replace_by_pure_dict(part, variables[key])
      updates.append(part)
  nnx.update(module, *updates)
  return module
