"""The registry of zoo models: `ModelSpec`, `register`, `get_spec`, `list_models`.

Each model family registers a `ModelSpec`: how to build the Flax module, the
example input used to initialise it, its preprocessing, its named layer groups
(bottom to top) and, where weights exist, the pretrained source and the
converter from the published layout to the module's variables. A spec's
variables are initialised here (`init_variables`, `abstract_variables`,
`init_leaves`); `jtl.models.creation.create` builds a model from its spec.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jtl import tree as jtree
from jtl.errors import ConfigError, bullet_list
from jtl.models.preprocessing import Normalization, model_normalization
from jtl.weights import hub

Variables = dict[str, Any]


def image_input(batch_size: int, size: int = 224) -> np.ndarray:
  """Zeros [batch_size, size, size, 3]: the `example_input` of the image models."""
  return np.zeros((batch_size, size, size, 3), np.float32)


def image_inputs(normalization: Normalization) -> dict[str, Any]:
  """The `ModelSpec` fields an image model's `Normalization` decides: the
  normalization itself, `preprocess`, `example_input`, `image_size` and the
  Declare the normalisation once and pass these.

  >>> from jtl.models.preprocessing import model_normalization
  >>> fields = image_inputs(model_normalization("unit", image_size=28))
  >>> fields["image_size"], fields["normalization"].preset, fields["example_input"](2).shape
  (28, 'unit', (2, 28, 28, 3))
  """
  return {"normalization": normalization, "preprocess": normalization.preprocessor(),
          "example_input": functools.partial(image_input, size=normalization.image_size),
          "image_size": normalization.image_size}


# The top conv of `block_groups` learns at the head's rate under layer-wise
# decay (timm's EfficientNet/MobileNet group_matcher puts conv_head there).
BLOCK_HEAD_LEVEL = ("top",)


def block_groups(num_blocks: int) -> list[tuple[str, str]]:
  """Layer groups bottom to top: stem, blocks_0 .. blocks_{n-1}, top, head.

  >>> block_groups(2)[:2]
  [('stem', 'stem/.*'), ('blocks_0', 'blocks_0/.*')]
  """
  return ([("stem", r"stem/.*")]
          + [(f"blocks_{i}", rf"blocks_{i}/.*") for i in range(num_blocks)]
          + [("top", r"top/.*"), ("head", r"head/.*")])


def numbered(tree: Mapping[str, Any], prefix: str, *, start: int = 0) -> int:
  """How many of `prefix`<start>, `prefix`<start + 1>, ... are keys of `tree`
  (a built model's blocks, however many its constructor options gave it).

  >>> numbered({"block_0": {}, "block_1": {}, "head": {}}, "block_")
  2
  """
  count = 0
  while f"{prefix}{start + count}" in tree:
    count += 1
  return count


def layer_groups(spec: Any, params: Mapping[str, Any]) -> list[tuple[str, str]]:
  """The layer groups of a model as built (`spec.groups_of(params)`: a ViT
  built with depth=2 has 2 block groups, not its registered 12), else
  `spec.groups`."""
  groups_of = getattr(spec, "groups_of", None)
  return [tuple(g) for g in (groups_of(params) if groups_of else spec.groups)]


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
    groups_of: `groups_of(params) -> groups` of a model as built, for models
      whose constructor options (model_kwargs: depth, blocks) change their
      blocks; `layer_groups` calls it. None: `groups` holds for every build.
    pretrained: name of the default pretrained source (see
      `jtl.weights.resolve`), or None when no weights can be had.
    converter: maps a flat {name: array} state dict in the published layout to
      a flat {"params/...": array, "batch_stats/...": array} dict.
    head_level: groups that layer-wise learning-rate decay puts at the head's
      level, not one below it: the encoder's final norm of a ViT, the top
      conv of an EfficientNet, BERT's pooler (timm's, BEiT's and MAE's rule).
    head_pattern: regex of the classifier head's variable paths, re-initialised
      when its class count differs from the checkpoint's.
    input_kind, image_size: what the input pipeline must produce: "image"
      batches at this resolution (normalised as `normalization` says), or
      "text" (token ids). min_image_size: the smallest `image_size` a config
      may ask for.
    normalization: an image model's `Normalization` (mean, std, scale,
      channels, resolution, crop), from which `image_inputs` derives
      preprocess, example_input and image_size; None for text models.
    check_names: `check_names(tensor_names, where)`, called by `create` with
      the names in the pretrained checkpoint before anything is initialised;
      raises when they contradict the spec (a Hub config.json's layer count
      that the weights do not have). None: no check.
    tokenizer_file: a text model's `tokenizer_file() -> path` of its
      tokenizer.json (what its preprocessing tokenises with, and what an
      export copies beside the weights); None for image models.
  """
  name: str
  build: Callable[..., nn.Module]
  example_input: Callable[[int], Any]
  preprocess: Callable[..., Any] | None = None
  groups: Sequence[tuple[str, str]] = ()
  groups_of: Callable[[Mapping[str, Any]], Sequence[tuple[str, str]]] | None = None
  pretrained: str | None = None
  converter: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
  head_level: tuple[str, ...] = ()
  head_pattern: str = r"params/head/.*"
  default_num_classes: int = 1000
  # What the input pipeline must produce for this model.
  input_kind: str = "image"  # or "text"
  image_size: int = 224
  min_image_size: int = 32  # the smallest input the network's downsampling takes
  normalization: Normalization | None = None  # images: what the pipeline normalises with
  check_names: Callable[[Sequence[str], str], None] | None = None
  tokenizer_file: Callable[[], Any] | None = None


_REGISTRY: dict[str, ModelSpec] = {}
# Where each name outside jtl was registered: {"module": ..., "file": ...}.
_ORIGINS: dict[str, dict[str, str | None]] = {}


def register(spec: ModelSpec) -> ModelSpec:
  """Adds `spec` to the registry (the last registration of a name wins).

  A registration made outside jtl (a config file, the user's package)
  remembers where it was made (`origin`): a run's workdir records it, so
  `scripts/evaluate.py` and `convert.py` perform the same registration again.
  """
  _REGISTRY[spec.name] = spec
  caller = sys._getframe(1).f_globals  # pylint: disable=protected-access
  module = caller.get("__name__", "")
  if module == "jtl" or module.startswith("jtl."):
    _ORIGINS.pop(spec.name, None)
  else:
    file = caller.get("__file__")  # relative when a config file was given so
    _ORIGINS[spec.name] = {"module": module, "file": file and os.path.abspath(file)}
  return spec


def origin(name: str) -> dict[str, str | None] | None:
  """Where model `name` was registered outside jtl ({"module", "file"}), or
  None for jtl's own models, Hub repos and "package.module:attr" references
  (which say themselves where they live)."""
  return dict(_ORIGINS[name]) if name in _ORIGINS else None


def import_origin(where: Mapping[str, str | None]) -> None:
  """Performs a registration again from its `origin`: imports the module
  when it is importable from the same file, else runs the file (a config
  file: ml_collections loads those by path, not by module name).

  Raises:
    ConfigError: neither can be found.
  """
  module, file = where.get("module"), where.get("file")
  try:
    found = importlib.util.find_spec(module) if module and module != "__main__" else None
  except (ImportError, ValueError):
    found = None
  if found is not None and (file is None or os.path.abspath(found.origin or "") == file):
    importlib.import_module(module)
    return
  if not file or not os.path.exists(file):
    raise ConfigError(
        f"The model was registered by {module or 'code'} ({file or 'no file'}), which "
        "cannot be found now: restore the file, or register the model before this call "
        "(jtl.models.register).")
  loaded = importlib.util.spec_from_file_location(f"_jtl_origin_{abs(hash(file))}", file)
  code = importlib.util.module_from_spec(loaded)
  loaded.loader.exec_module(code)


def _hub_models() -> Any:
  """`jtl.models.hub_models`, imported on first use."""
  # In the function: hub_models imports this module (and every family) at its top.
  from jtl.models import hub_models  # pylint: disable=g-import-not-at-top
  return hub_models


def is_reference(name: str) -> bool:
  """Whether `name` is a "package.module:attribute" reference to user code.

  >>> is_reference("mypkg.models:MyNet"), is_reference("hf-hub:timm/x"), is_reference("resnet50")
  (True, False, False)
  """
  module, sep, attr = name.partition(":")
  return bool(sep) and attr.isidentifier() and all(p.isidentifier() for p in module.split("."))


def is_hub_model(name: str) -> bool:
  """Whether `name` is a Hub repo ("hf-hub:...") or a local folder in the Hub
  layout (config.json and weights), which `get_spec` reads the config.json of."""
  return name.startswith(hub.HUB_PREFIX) or (name not in _REGISTRY
                                              and hub.local_repo(name) is not None)


def get_spec(name: str) -> ModelSpec:
  """Returns the spec of `name`: a registered name, "hf-hub:<repo>" or a local
  Hub-layout folder (the spec its config.json describes; the folder's path
  or "hf-hub:<path>"), or "package.module:attribute" (user code: a
  `ModelSpec`, a Linen module class taking `num_classes`, see
  `spec_of_module`, or an NNX module class or factory taking `num_classes`
  and `rngs`, see `own_nnx.spec_of_nnx`); a ConfigError lists the
  registered names."""
  if is_hub_model(name):
    return _hub_models().spec_for(name)
  if name not in _REGISTRY and is_reference(name):
    return _referenced_spec(name)
  if name not in _REGISTRY and os.path.isdir(os.path.expanduser(name)):
    raise ConfigError(
        f"Model {name!r} is a folder but not one in the Hugging Face Hub layout: it needs a "
        "config.json (a timm or transformers model's) beside its weights (model.safetensors "
        "or pytorch_model.bin). Point to the folder that holds them, or name a zoo model.")
  if name not in _REGISTRY:
    raise ConfigError(
        f"Unknown model {name!r}. Registered models:\n"
        + bullet_list(sorted(_REGISTRY))
        + "\nYour own model: model='package.module:Name' (a ModelSpec, a Linen module "
        "class, or an NNX module class or factory), or jtl.models.register(ModelSpec(...)) "
        "in the config file.")
  return _REGISTRY[name]


def _referenced_spec(name: str) -> ModelSpec:
  """The spec of a "package.module:attribute" reference (see `get_spec`)."""
  module_name, _, attr = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(
        f"model {name!r}: cannot import {module_name!r} ({e}). Put the folder that holds "
        "the package on PYTHONPATH (the scripts also look in the current directory) or "
        "pip install it.") from e
  if not hasattr(module, attr):
    raise ConfigError(f"model {name!r}: module {module_name!r} ({module.__file__}) has no "
                      f"attribute {attr!r}.")
  target = getattr(module, attr)
  if isinstance(target, ModelSpec):
    return dataclasses.replace(target, name=name)
  if isinstance(target, type) and issubclass(target, nn.Module):
    return spec_of_module(target, name=name)
  # In the function: own_nnx imports this module at its top (an import cycle).
  from jtl.models import own_nnx  # pylint: disable=g-import-not-at-top
  if own_nnx.is_nnx_model(target):
    return own_nnx.spec_of_nnx(target, name=name)
  raise ConfigError(
      f"model {name!r} is a {type(target).__name__}; expected a jtl.models.ModelSpec, a "
      "Linen module class, or an NNX module class / factory function taking rngs.")


def _build_class(cls: type[nn.Module], num_classes: int, **kwargs: Any) -> nn.Module:
  return cls(num_classes=num_classes, **kwargs)


def spec_of_module(cls: type[nn.Module], *, name: str | None = None) -> ModelSpec:
  """The spec of a Linen image classifier class with a `num_classes` field.

  Its inputs: RGB pixels scaled to 0..1 at 224 px, the whole image (no
  crop), unless the class has a `normalization` class attribute (a
  `Normalization`). `head_pattern` "params/head/.*": name the classifier
  layer "head" so that strategies find it. No pretrained weights. For
  anything else (text, groups, weights), declare a `ModelSpec`.

  Raises:
    ConfigError: the class has no `num_classes` field.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  if "num_classes" not in fields:
    raise ConfigError(f"{cls.__module__}.{cls.__qualname__} has no `num_classes` field; a "
                      "model the scripts build takes num_classes (0: no head).")
  normalization = getattr(cls, "normalization", None)
  if not isinstance(normalization, Normalization):
    normalization = model_normalization("unit", crop_fraction=1.0)
  default = fields["num_classes"].default
  return ModelSpec(name=name or f"{cls.__module__}:{cls.__qualname__}",
                   build=functools.partial(_build_class, cls), **image_inputs(normalization),
                   default_num_classes=default if isinstance(default, int) else 1000,
                   min_image_size=1)


def list_models() -> list[str]:
  """Names of all registered models."""
  return sorted(_REGISTRY)


def _init_fn(module: nn.Module) -> Callable[[jax.Array, Any], Any]:
  return lambda r, x: module.init({"params": r, "dropout": r}, x, train=False)


def init_variables(spec: ModelSpec, module: nn.Module, *, seed: int = 0) -> Variables:
  """Initialises `module`'s variables from the spec's example input (on host)."""
  rng = jax.random.PRNGKey(seed)
  variables = jax.jit(_init_fn(module))(rng, spec.example_input(1))
  return jax.tree.map(np.asarray, dict(variables))


def abstract_variables(spec: ModelSpec, module: nn.Module, *, seed: int = 0) -> Variables:
  """The variables' tree as `jax.ShapeDtypeStruct`s (`jax.eval_shape`: no
  memory, no compute)."""
  return dict(jax.eval_shape(_init_fn(module), jax.random.PRNGKey(seed), spec.example_input(1)))


def init_leaves(spec: ModelSpec, module: nn.Module, paths: Sequence[str], *,
                seed: int = 0) -> dict[str, np.ndarray]:
  """{path: array} of only these leaves ("params/head/kernel", ...) of the init.

  The values are those of `init_variables(spec, module, seed=seed)` (same
  PRNG streams; Flax derives each layer's key from its path), but the
  compiled init returns only these leaves, so XLA drops every other
  initialiser and the forward pass they do not need: the memory is that of
  the leaves asked for.
  """
  paths = tuple(paths)
  if not paths:
    return {}

  def some(r, x):
    flat = jtree.flatten(dict(_init_fn(module)(r, x)))
    return {p: flat[p] for p in paths}

  out = jax.jit(some)(jax.random.PRNGKey(seed), spec.example_input(1))
  return {p: np.asarray(v) for p, v in out.items()}
