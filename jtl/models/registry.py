"""A registry of zoo models: `create(name, num_classes=..., pretrained=...)`.

Each model family registers a `ModelSpec`: how to build the Flax module, the
example input used to initialise it, its preprocessing, its named layer groups
(bottom to top) and, where weights exist, the pretrained source and the
converter from the published layout to the module's variables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jtl.errors import ConfigError, bullet_list

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build, initialise, feed and load one zoo model.

  Attributes:
    name: registry name, e.g. "efficientnet_lite0".
    build: `build(num_classes, **kwargs) -> nn.Module`; `num_classes=0`
      builds the model without a head (its output is the pooled features).
    example_input: `example_input(batch_size) -> inputs` used for `init`.
    preprocess: maps raw inputs (uint8 HWC images, or token dicts) to what the
      module expects, e.g. resize and normalisation constants.
    groups: ordered (name, regex) layer groups, bottom (stem) to top (head),
      over "/"-joined parameter paths without the "params/" prefix.
    pretrained: name of the default pretrained source (see
      `jtl.checkpoint.resolve`), or None when no weights can be had.
    converter: maps a flat {name: array} state dict in the published layout to
      a flat {"params/...": array, "batch_stats/...": array} dict.
    head_pattern: regex of the classifier head's variable paths, re-initialised
      when its class count differs from the checkpoint's.
    input_kind, image_size, normalize: what the input pipeline must produce:
      "image" batches at this resolution with this normalisation preset, or
      "text" (token ids).
  """
  name: str
  build: Callable[..., nn.Module]
  example_input: Callable[[int], Any]
  preprocess: Callable[..., Any] | None = None
  groups: Sequence[tuple[str, str]] = ()
  pretrained: str | None = None
  converter: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
  head_pattern: str = r"params/head/.*"
  default_num_classes: int = 1000
  # What the input pipeline must produce for this model.
  input_kind: str = "image"  # or "text"
  image_size: int = 224
  normalize: str | None = None  # a jtl.data.NORMALIZE_PRESETS name


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
  """Adds `spec` to the registry (the last registration of a name wins)."""
  _REGISTRY[spec.name] = spec
  return spec


def get_spec(name: str) -> ModelSpec:
  """Returns the registered spec for `name`, or a ConfigError listing names."""
  if name not in _REGISTRY:
    raise ConfigError(
        f"Unknown model {name!r}. Registered models:\n"
        + bullet_list(sorted(_REGISTRY)))
  return _REGISTRY[name]


def list_models() -> list[str]:
  """Names of all registered models."""
  return sorted(_REGISTRY)


def init_variables(spec: ModelSpec, module: nn.Module, *, seed: int = 0) -> Variables:
  """Initialises `module`'s variables from the spec's example input (on host)."""
  rng = jax.random.PRNGKey(seed)
  variables = jax.jit(lambda r, x: module.init({"params": r, "dropout": r}, x, train=False))(
      rng, spec.example_input(1))
  return jax.tree.map(np.asarray, dict(variables))
