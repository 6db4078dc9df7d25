"""Zoo models built and loaded: `create(name, num_classes=..., pretrained=...)`.

`create` takes the model's `ModelSpec` from `jtl.models.registry`, builds the
module with the options given (checked before any weights are read),
initialises only the variables the checkpoint lacks, merges the pretrained
weights and returns a `CreatedModel`; `to_nnx` gives the same model as an NNX
module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jtl import weights
from jtl.errors import ConfigError, LoadError
from jtl.models import hub_models, registry
from jtl.models.registry import ModelSpec, Variables
from jtl.weights import loading


@dataclasses.dataclass(frozen=True)
class CreatedModel:
  """What `create` returns: everything needed to run or fine-tune a zoo model.

  Attributes:
    module: the Flax module: Linen, or with api="nnx" an NNX module
      (`nnx.bridge.ToNNX` around the Linen model) holding the weights.
    variables: {"params": ..., "batch_stats": ...} as numpy arrays (the
      Linen layout; `jtl.adapter.variables_of(module)` gives the NNX module's).
    report: the `jtl.weights.LoadReport` of the pretrained load, or None.
    preprocess: the model's preprocessing of raw inputs (see `ModelSpec`).
    spec: the registered `ModelSpec`.
  """
  module: Any
  variables: Variables
  report: Any
  preprocess: Callable[..., Any] | None
  spec: ModelSpec


def create(name: str, *, num_classes: int | None = None,
           pretrained: bool | str = True, seed: int = 0, api: str = "linen",
           **kwargs: Any) -> CreatedModel:
  """Builds a zoo model, initialises it and merges pretrained weights.

  Args:
    name: a registered model name (see `list_models()`), or a Hub model repo
      "hf-hub:<owner>/<name>[@<revision>]" (timm or transformers), or a local
      folder in that layout (config.json and model.safetensors: its path, or
      "hf-hub:<path>"): its config.json picks the zoo architecture, size and
      preprocessing, and its weights are the default pretrained source (see
      `jtl.models.hub_models.SUPPORTED`); or "package.module:Name" (your own
      model, see `get_spec`).
    num_classes: classes of the new head; None keeps the checkpoint's
      (`spec.default_num_classes`), 0 builds the model without a head. A head
      whose class count differs from the checkpoint's keeps its fresh init and
      is listed as reinitialised in the report. A folder written by
      `export_hf` with a `head.safetensors` (a BERT's head on its mean-pooled
      features) loads that head when num_classes is its class count.
    pretrained: True loads `spec.pretrained`; a string is a source name, URL or
      path for `jtl.weights.resolve`; False keeps the random init.
    seed: PRNG seed of the init.
    api: "linen", or "nnx" for a Flax NNX module with the same weights, which
      `model(x)` runs (in eval mode: `model(x, train=False)` is the default)
      and every jtl call (`label_params`, `make_train_step`, `fit`) takes.
    **kwargs: passed to `spec.build` (e.g. `formulation="grouped"`).

  Raises:
    ConfigError: unknown name, or pretrained=True for a model without weights.
    CheckpointError: a Hub repo that cannot be downloaded.
  """
  if api not in ("linen", "nnx"):
    raise ConfigError(f"api={api!r}: expected 'linen' or 'nnx'.")
  from_hub = registry.is_hub_model(name)
  spec = registry.get_spec(name)
  n = spec.default_num_classes if num_classes is None else int(num_classes)
  if n < 0:
    raise ConfigError(f"num_classes={num_classes}: expected >= 0 (0: no head).")
  module, spec = _built(name, spec, n, kwargs, seed)  # options checked before any weights
  path = None if pretrained is False or pretrained is None else _weights(name, spec, pretrained)
  report = None
  if path is None:
    variables = registry.init_variables(spec, module, seed=seed)
  else:
    # Shapes only (no init of what the checkpoint replaces): the loaded leaves
    # are the checkpoint's arrays, and only the leaves it lacks (a new head,
    # skipped ones) are initialised, so the peak stays near the file's size.
    try:
      variables, report = weights.load_pretrained(
          _with_exported_head(path, n) if from_hub else path,
          like=registry.abstract_variables(spec, module, seed=seed),
          converter=spec.converter, reinit_head=spec.head_pattern,
          skip=hub_models.SKIP if from_hub else (),
          init=lambda paths: registry.init_leaves(spec, module, paths, seed=seed))
    except LoadError as e:
      if from_hub:
        raise
      raise LoadError(loading.strict_message(path, e.report, _hub_layout_hint(
          name, path, e.report)), e.report) from None
    if report.reinitialised:
      logging.info("%s: head re-initialised for %d classes (checkpoint has "
                   "%d): %s", name, n, spec.default_num_classes,
                   ", ".join(e.path for e in report.reinitialised))
  if spec.groups_of is not None:  # the groups of the blocks this build has
    spec = dataclasses.replace(spec, groups=registry.layer_groups(spec, variables["params"]))
  if api == "nnx":
    return CreatedModel(to_nnx(module, variables, seed=seed), variables, report,
                        spec.preprocess, spec)
  return CreatedModel(module, variables, report, spec.preprocess, spec)


def _with_exported_head(path: Any, num_classes: int) -> Any:
  """The weights of a Hub-layout folder with the `head.safetensors` that
  `export_hf` writes beside them (a BERT's head on its mean-pooled features)
  when a head is asked for; its class count is checked as the head's."""
  head = os.path.join(os.path.dirname(str(path)), "head.safetensors")
  if not num_classes or not os.path.isfile(head):
    return path
  return {**weights.read(path), **weights.read(head)}


def _built(name: str, spec: ModelSpec, num_classes: int, kwargs: dict[str, Any], seed: int
           ) -> tuple[nn.Module, ModelSpec]:
  """(module, spec) of `spec.build(num_classes, **kwargs)`: an option the model
  does not take, or values it cannot be built or initialised with, are a
  ConfigError naming them; an `image_size` option gives the spec that size
  (preprocessing and example input), as a patch model's position embedding
  is adapted to it."""
  try:
    module = spec.build(num_classes=num_classes, **kwargs)
  except TypeError as e:
    if "unexpected keyword" not in str(e):
      raise
    base = spec.build(num_classes=num_classes)
    taken = [f.name for f in dataclasses.fields(base) if f.name not in ("parent", "name")] \
        if dataclasses.is_dataclass(base) else []
    raise ConfigError(f"Model {name!r} takes no option {sorted(kwargs)} ({e}); its options: "
                      f"{taken}.") from None
  for key, value in kwargs.items():
    if _is_probability(key) and isinstance(value, (int, float)) and not 0 <= value < 1:
      raise ConfigError(f"Model {name!r}: {key}={value!r} is a drop probability; expected "
                        f"0 <= {key} < 1 (0.1 is usual for fine-tuning).")
  if kwargs:  # shapes only: a value the model cannot use fails here, not mid-load
    try:
      registry.abstract_variables(spec, module, seed=seed)
    except (AssertionError, ValueError, TypeError, ZeroDivisionError, IndexError) as e:
      raise ConfigError(f"Model {name!r} cannot be built with {kwargs}: "
                        f"{type(e).__name__}: {e}") from None
  size = kwargs.get("image_size")
  if size and spec.normalization is not None and size != spec.image_size:
    spec = dataclasses.replace(spec, **registry.image_inputs(
        dataclasses.replace(spec.normalization, image_size=int(size))))
  return module, spec


def _is_probability(option: str) -> bool:
  """Whether a model option is a drop probability (`drop_path_rate`,
  `dropout`, `attention_dropout`, `hidden_dropout_prob`, ...)."""
  return option.endswith(("_rate", "_prob")) or "dropout" in option


def _hub_layout_hint(name: str, path: Any, report: Any) -> str:
  """What to do when a zoo model's converter does not fit a file: for a timm /
  transformers file, load it through its config.json (the hf-hub: form)."""
  folder = path.parent if (path.parent / "config.json").is_file() else None
  left = len(report.missing) + len(report.mismatched) if report is not None else 0
  where = (f"the folder it is in, which has its config.json: models.create({str(folder)!r}) "
           f"(--config.model={folder})" if folder is not None else
           "its repo, models.create('hf-hub:<owner>/<repo>'), or a folder holding the file "
           "with its config.json: models.create('/path/to/folder')")
  return (f"If {path.name} is a timm / transformers checkpoint, zoo model {name!r} does not "
          f"read its layout; load it with the architecture and layout its config.json "
          f"describes, through {where}. Otherwise pass a checkpoint in {name!r}'s own "
          f"layout. strict=False is no fix: it would leave {left} of {name!r}'s tensors at "
          "their random init.")


def _weights(name: str, spec: ModelSpec, pretrained: bool | str) -> Any:
  """The local path of the pretrained weights, checked by `spec.check_names`
  (before anything is built: a config that contradicts them is refused)."""
  source = spec.pretrained if pretrained is True else pretrained
  if source is None:
    raise ConfigError(
        f"Model {name!r} has no default pretrained weights (spec.pretrained "
        "is None). Pass pretrained=False for a random init, or "
        "pretrained='<path or source name>'.")
  path = weights.resolve(source)
  if spec.check_names is not None:
    spec.check_names(weights.tensor_names(path), str(path))
  return path


def to_nnx(module: nn.Module, variables: Variables, *, seed: int = 0) -> Any:
  """An NNX module (`nnx.bridge.ToNNX`) running the Linen `module` with
  `variables` ({"params", "batch_stats"}); params keep their Linen paths.

  No init runs: `ToNNX` keeps the Linen variables as its attributes, which
  its `lazy_init` would fill from a full random init (a second one after
  `create`'s, as large as the model); here they are set from `variables`
  with the bridge's own Linen -> NNX conversion (`nnx.Param` for params,
  `nnx.BatchStat` for batch_stats), holding the given arrays. The rng
  streams (seed) are drawn from first at the first call, not at creation.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax.nnx.bridge import variables as bridge_variables  # pylint: disable=g-import-not-at-top
  extra = sorted(set(variables) - {"params", "batch_stats"})
  if extra:
    raise ConfigError(f"api='nnx' supports params and batch_stats; this model also has {extra}.")
  model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(seed))
  linen = {c: variables[c] for c in ("params", "batch_stats") if variables.get(c)}
  for name, value in bridge_variables.linen_vars_to_nnx_attrs(linen).items():
    setattr(model, name, nnx.data(value))  # as ToNNX.__call__ stores an init's variables
  return model
