"""A user's own Flax NNX classifier as a Linen module, so that a config's
`model="package.module:Name"` (an `nnx.Module` class, or a factory function
taking `rngs`) runs through the scripts as an own Linen model does: training,
evaluation, restore from a workdir and every export.

`NnxLinen` is flax's `nnx.bridge.ToLinen` with Linen's `train` flag: the NNX
module is built from its class and the Linen variables at each call (as
ToLinen does; under jit the unused init is dead code), put in train or eval
mode (`deterministic`, `use_running_average`), and called with the mode flags
its `__call__` takes and, if it takes `rngs`, a key drawn from Linen's
"dropout" stream in training (`jtl.adapter.call_kwargs`). Its variables are
the NNX state at the NNX attribute paths: "params" (`nnx.Param`, e.g.
"head/kernel") and "batch_stats" (`nnx.BatchStat`). BatchNorm layers whose
params a strategy freezes run on their stored statistics
(`jtl.adapter.frozen_batchnorm`), and precise BatchNorm recomputes their
statistics (`jtl.batchnorm.nnx_in_linen`), as for Linen's.

>>> from flax import nnx
>>> class Net(nnx.Module):
...   def __init__(self, num_classes=3, *, rngs):
...     self.head = nnx.Linear(4, num_classes, rngs=rngs)
...   def __call__(self, x):
...     return self.head(x.reshape(x.shape[0], -1)[:, :4])
>>> spec = spec_of_nnx(Net, name="my.models:Net")
>>> module = spec.build(num_classes=2)
>>> import jax
>>> variables = module.init(jax.random.PRNGKey(0), spec.example_input(1), train=False)
>>> jax.tree.map(lambda a: a.shape, variables["params"])
{'head': {'bias': (2,), 'kernel': (4, 2)}}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx
from flax.core import FrozenDict

from jtl import adapter, batchnorm
from jtl.errors import ConfigError
from jtl.models import registry
from jtl.models.preprocessing import Normalization, model_normalization


def is_nnx_model(target: Any) -> bool:
  """An `nnx.Module` class, or a function taking `rngs` (a factory of one)."""
  if isinstance(target, type):
    return issubclass(target, nnx.Module)
  if inspect.isfunction(target):
    return "rngs" in inspect.signature(target).parameters
  return False


class NnxLinen(nnx.bridge.ToLinen):
  """`nnx.bridge.ToLinen(nnx_class, kwargs=...)` called as `module(x, train=...)`."""

  @nn.compact
  def __call__(self, x: Any, *, train: bool = False) -> Any:
    frozen = adapter.frozen_batchnorm_paths()
    prefix = "/".join(self.scope.path)

    def run(module: nnx.Module, inputs: Any) -> Any:
      module.set_attributes(deterministic=not train, use_running_average=not train,
                            raise_if_not_found=False)
      # The mode flags the call takes are passed too (they would override the
      # attributes), and its call-time key: there is no NnxModel here to name them.
      takes_rngs = "rngs" in inspect.signature(type(module).__call__).parameters
      key = self.make_rng("dropout") if train and takes_rngs else None  # drawn only if taken
      kwargs = adapter.call_kwargs(type(module).__call__, train, key)
      names = {"/".join(map(str, p)) for p, _ in nnx.iter_modules(module)}
      frozen_here = [n for n in names if (f"{prefix}/{n}" if prefix else n) in frozen]
      with adapter.frozen_nnx_batchnorm(module, frozen_here if train else ()), \
          batchnorm.nnx_in_linen(module, prefix):  # precise BatchNorm's recording
        return module(inputs, **kwargs)

    return nnx.bridge.ToLinen.__call__(self, x, nnx_method=run)


def _options(target: Callable[..., Any]) -> tuple[list[inspect.Parameter], Any]:
  """The constructor's keyword parameters (rngs left out) and num_classes' default."""
  # A class's __init__ (NNX's metaclass hides the signature of the class itself).
  params = dict(inspect.signature(target.__init__ if isinstance(target, type)
                                  else target).parameters)
  params.pop("self", None)
  if "num_classes" not in params:
    raise ConfigError(f"{target.__module__}.{target.__qualname__} takes no `num_classes`; a "
                      "model the scripts build takes num_classes (0: no head) and rngs.")
  if "rngs" not in params:
    raise ConfigError(f"{target.__module__}.{target.__qualname__} takes no `rngs`; an NNX "
                      "model the scripts build takes rngs (nnx.Rngs) as NNX layers do.")
  kept = [p.replace(kind=p.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD else p
          for n, p in params.items() if n != "rngs" and p.kind is not p.VAR_POSITIONAL]
  default = params["num_classes"].default
  return kept, default if isinstance(default, int) else 1000


def spec_of_nnx(target: Callable[..., Any], *, name: str | None = None) -> registry.ModelSpec:
  """The spec of an NNX image classifier: an `nnx.Module` class or a factory
  function, called as `target(num_classes=..., **model_kwargs, rngs=...)`.

  As `registry.spec_of_module`: inputs are RGB pixels scaled to 0..1 at 224
  px unless `target` has a `normalization` attribute (a `Normalization`);
  name the classifier layer `head` so that strategies find it; no
  pretrained weights. The built module is an `NnxLinen`.
  """
  options, default_classes = _options(target)

  def build(num_classes: int = default_classes, **kwargs: Any) -> NnxLinen:
    return NnxLinen(target, kwargs=FrozenDict({"num_classes": num_classes, **kwargs}))

  # model_kwargs may set the constructor's own options (preflight.model_options).
  build.__signature__ = inspect.Signature(options)  # type: ignore[attr-defined]
  normalization = getattr(target, "normalization", None)
  if not isinstance(normalization, Normalization):
    normalization = model_normalization("unit", crop_fraction=1.0)
  return registry.ModelSpec(
      name=name or f"{target.__module__}:{target.__qualname__}", build=build,
      **registry.image_inputs(normalization), default_num_classes=default_classes,
      min_image_size=1)
