"""A finished `scripts/finetune.py` run as a model: restore it, export it.

App layer: a workdir's checkpoints carry the run's config, so the model, its
variables (method wrappers removed) and its LoRA adapters (with their alpha)
can be rebuilt from the workdir alone. `restore` does that once for
`scripts/convert.py`, `scripts/evaluate.py` and `jtl.app.experiment`;
`load` gives a run to the user's code as one ready model (Linen, NNX or an
apply function) and the preprocessing the run used; `export_hub_format`
writes a run as a PEFT adapter folder or as merged weights in the HF / timm
layout (`jtl.export.peft`, `hf_export`). Every one of them, and evaluate.py,
takes the model from `Restored.deployable_variables` (AdaBN applied where
the run's method needs it), so what is shipped is what was scored.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import logging
from etils import epath

from jtl import export, models, paths
from jtl import tree as jtree
from jtl.app import keys, methods
from jtl.batchnorm import recompute_batchnorm
from jtl.checkpoint import layout
from jtl.checkpoint.restore import restore_variables
from jtl.errors import CheckpointError, ConfigError, JtlError
from jtl.export import hf_export, hf_layout, peft
from jtl.models import preprocessing
from jtl.recipes.strategies import lora
from jtl.recipes.strategies.builder import resolve_options
from jtl.tree import PyTree
from jtl.weights import read


def writable_problem(path: Any, what: str = "workdir") -> str | None:
  """Why the run cannot write into the folder `path` (None when it can): an
  empty path (an unset shell variable), a file in the way, a read-only or
  full disk. Writes and removes one small probe file in `path` or, while it
  does not exist, in its nearest existing parent: nothing is left behind."""
  if path is None or not str(os.fspath(path)).strip():
    return (f"{what} is empty (an unset shell variable?): pass the run's folder, e.g. "
            f"--{what} runs/default; jtl does not write into the current directory unasked")
  folder = existing = paths.path(path)
  try:
    paths.check_reachable(folder)  # a bucket out of reach: not a full disk
  except CheckpointError as e:
    return f"{what}: {e}"
  try:
    # In a bucket objects need no folders: the probe goes into the workdir itself.
    while not paths.is_remote(existing) and not existing.exists() \
        and existing.parent != existing:
      existing = existing.parent
    if existing.is_file() if paths.is_remote(existing) else not existing.is_dir():
      return f"{what} {os.fspath(path)} is not a folder: {existing} is a file"
    probe = existing / f".jtl-write-check-{os.getpid()}"
    probe.write_bytes(b"jtl write check\n")
    probe.unlink()
  except OSError as e:
    where = "" if existing == folder else f" (its parent {existing})"
    return (f"{what} {os.fspath(path)}{where} is not writable ({type(e).__name__}: "
            f"{e.strerror or e}): pass a folder on a disk with free space that you can "
            "write to")
  return None


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's `model_kwargs`: options for the model's constructor
  (`spec.build`, e.g. {"drop_path_rate": 0.1}); {} when unset."""
  kwargs = config.model_kwargs or {}
  return kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)


def model_spec(model: str, meta: Mapping[str, Any]) -> models.ModelSpec:
  """The spec of a run's `model` (its config's `model` key), registering it
  again from the origin the checkpoint's `meta` records when the name is not
  registered in this process (a model registered by the run's config file or
  the user's package: see `models.registry.origin`)."""
  try:
    return models.get_spec(model)
  except ConfigError:
    where = meta.get("model_origin")
    if not where:
      raise
  models.registry.import_origin(where)
  return models.get_spec(model)


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore` rebuilds from a workdir.

  Attributes:
    module: the zoo model (plain, without method wrappers).
    variables: its variables as saved (LoRA adapters still separate).
    config: the run's config.
    spec: the model's `ModelSpec`.
    num_classes: classes of its head.
    alpha: the LoRA alpha of a LoRA run, else None.
    meta: the checkpoint's meta (step, metrics, ...).
    data_changed: those of `DATA_KEYS` that `restore(data=...)` changed from
      where the run last found its data (its data elsewhere, or other data).
  """
  module: Any
  variables: PyTree
  config: ml_collections.ConfigDict
  spec: models.ModelSpec
  num_classes: int
  alpha: float | None
  meta: dict[str, Any]
  data_changed: tuple[str, ...] = ()
  # deployable_variables' results by `adabn`: one AdaBN pass however often asked.
  # Not an init field: `dataclasses.replace(run, variables=...)` starts a fresh one.
  _deployable: dict[bool, Any] = dataclasses.field(default_factory=dict, init=False,
                                                   repr=False, compare=False)

  def merged_variables(self) -> PyTree:
    """The variables with LoRA adapters folded into the kernels (a plain model)."""
    if self.alpha is None:
      return self.variables
    return {**self.variables, "params": lora.merge_lora(self.variables["params"], self.alpha)}

  def deployable_variables(self, *, adabn: bool = False
                           ) -> tuple[PyTree, dict[str, Any] | None]:
    """The variables of the model the run's evaluation scores, and what AdaBN did.

    `merged_variables`, with the BatchNorm statistics re-estimated on the
    unlabelled train split of the evaluated data (AdaBN: one unaugmented
    pass) when `adabn` asks for it or the run's method needs it
    (`methods.needs_adabn`: a DANN / CORAL run with batchnorm "separate"
    keeps the source's running statistics). The record names that data and
    why (None: no AdaBN). evaluate.py, the exports and `load` all take the
    model from here, so a shipped model is the one that was scored.
    """
    if adabn not in self._deployable:
      self._deployable[adabn] = self._with_adabn(adabn)
    return self._deployable[adabn]

  def _with_adabn(self, adabn: bool) -> tuple[PyTree, dict[str, Any] | None]:
    variables = self.merged_variables()
    config = self.config
    if not (adabn or methods.needs_adabn(config)):
      return variables, None
    why = "asked" if adabn else "method.batchnorm='separate'"
    record = {"dataset": config.eval_dataset or config.dataset, "split": config.train_split,
              "why": why}
    # experiment (the input pipelines) imports workdirs: imported when AdaBN runs.
    from jtl.app import experiment  # pylint: disable=g-import-not-at-top
    target = experiment.eval_batches(config, self.spec, config.train_split)
    try:
      return recompute_batchnorm(self.module, variables, target()), record
    except JtlError as e:
      raise type(e)(
          f"{e}\nThe model of this run re-estimates its BatchNorm statistics ({why}: AdaBN) "
          f"on {record['dataset']!r} split {record['split']!r} before it is evaluated or "
          "exported, so that data must be readable there. If it has moved, say where it is "
          "now: --dataset=folder:/new/path (or --data_dir) for evaluate.py and convert.py, "
          "data={'dataset': 'folder:/new/path'} for workdirs.load / restore.") from e

  @property
  def preprocess(self) -> Callable[..., Any]:
    """The run's preprocessing of raw inputs (`run_preprocessing`)."""
    return run_preprocessing(self.config, self.spec)

  def model(self, api: str = "linen") -> Any:
    """The model with its weights (LoRA folded in, AdaBN applied where the
    method needs it: `deployable_variables`), ready to call in eval mode.

    Args:
      api: "linen" (the module bound to its variables: `model(x)`, and its
        other methods such as `model.features(x)`), "nnx" (an NNX module,
        `models.creation.to_nnx`) or "apply" (a jitted `apply(x)` function).
    """
    if api not in ("linen", "nnx", "apply"):  # before an AdaBN pass
      raise ConfigError(f"api={api!r}: expected 'linen', 'nnx' or 'apply'.")
    variables, _ = self.deployable_variables()
    if api == "linen":
      return self.module.bind(variables)
    if api == "nnx":
      return models.creation.to_nnx(self.module, variables)
    return jax.jit(functools.partial(self.module.apply, variables))


def run_preprocessing(config: ml_collections.ConfigDict, spec: models.ModelSpec
                      ) -> Callable[..., Any]:
  """What the run's evaluation pipeline did to raw inputs, as a function.

  Images (RGB, 0..255, [H, W, 3] or [B, H, W, 3], any size) are resized
  whole to the run's `image_size` (the config's, else the model's native
  one: jtl's pipeline crops nothing) and normalised as the model's
  `Normalization` says; texts are tokenised with the run's `max_length`.
  The zoo's `spec.preprocess` is the published default instead (224 px and
  its crop for most image models), which a run at another size did not see.
  """
  inputs = run_inputs(config, spec)
  if inputs is None:
    max_length = config.max_length
    if spec.preprocess is not None and max_length:
      return functools.partial(spec.preprocess, max_length=max_length)
    return spec.preprocess
  return inputs.preprocessor()


def run_inputs(config: ml_collections.ConfigDict, spec: models.ModelSpec
               ) -> preprocessing.Normalization | None:
  """The images of the run's evaluation pipeline, for an image model (else
  None): the model's `Normalization` at the side the whole image was resized
  to (the config's `image_size`, else the model's native one; no crop:
  crop_fraction None) and with the pipeline's resize, bilinear whatever the
  weights' published one."""
  if spec.input_kind != "image" or spec.normalization is None:
    return None
  size = int(config.image_size or spec.image_size)
  return dataclasses.replace(spec.normalization, resize="bilinear", image_size=size,
                             crop_fraction=None)


class Ready(NamedTuple):
  """What `load` returns: `model(preprocess(raw_inputs))` gives the logits."""
  model: Any
  preprocess: Callable[..., Any]


def load(workdir: str | os.PathLike, *, step: int | str = "best", api: str = "linen",
         data: dict[str, Any] | None = None) -> Ready:
  """A finetune.py run's model, ready to call, and the preprocessing it used.

  >>> model, preprocess = load("runs/default", api="nnx")  # doctest: +SKIP
  >>> logits = model(preprocess(images))  # uint8 RGB images, any size  # doctest: +SKIP

  Args:
    workdir: the run's folder.
    step: "best", "latest" or a step number.
    api: "linen", "nnx" or "apply" (see `Restored.model`).
    data: where the run's data is now, if it moved (`restore`); read only by
      a run whose model re-estimates its BatchNorm statistics (AdaBN).
  """
  run = restore(workdir, step=step, data=data)
  return Ready(run.model(api), run.preprocess)


# Where the data is: a resumed run may have found it elsewhere (a VM that came
# back with the bucket or disk mounted at another path).
DATA_KEYS = ("dataset", "data_dir", "eval_dataset")


def restore(workdir: str | os.PathLike, *, step: int | str = "best",
            data: Mapping[str, Any] | None = None) -> Restored:
  """Rebuilds a finetune.py run's model and variables (params and statistics
  only, host arrays, any device count) from its checkpoint at `step` ("best":
  by the metric the run chose it by, accuracy for runs that recorded none).

  The data keys (`DATA_KEYS`) are the newest checkpoint's: where the run last
  found its data, also for an older best step; `data` ({"dataset": ...})
  overrides them, for data that has moved since."""
  metric = None
  if step == "best" and layout.recorded_metric(layout.checkpoint_dir(workdir))[0] is None:
    metric = "accuracy"
  # `Restored` keeps the adapters apart and merges them with the run's alpha.
  variables, meta = restore_variables(workdir, step=step, metric=metric, warn_lora=False)
  if "config" not in meta:
    raise ConfigError(f"{workdir}: the checkpoint has no saved config; was it written by "
                      "scripts/finetune.py?")
  newest = (layout.latest_meta(workdir) or {}).get("config") or {}
  unknown = sorted(set(data or {}) - set(DATA_KEYS))
  if unknown:
    raise ConfigError(f"restore(data=...): {unknown} are not data keys; expected {DATA_KEYS}.")
  recorded = {**meta["config"], **{k: newest[k] for k in DATA_KEYS if k in newest}}
  changed = tuple(k for k in DATA_KEYS
                  if k in (data or {}) and not same_data(k, data[k], recorded.get(k)))
  meta = {**meta, "config": {**recorded, **dict(data or {})}}
  config = keys.complete(ml_collections.ConfigDict(meta["config"]))  # older runs: fewer keys
  spec = model_spec(config.model, meta)
  module = spec.build(num_classes=meta["num_classes"], **model_kwargs(config))
  strategy = config.strategy or {}
  alpha = None
  if strategy.get("name") == "lora":
    alpha = resolve_options(strategy)["alpha"]
  if "state" in variables and "batch_stats" not in variables:  # trained with api="nnx"
    variables = {**{k: v for k, v in variables.items() if k != "state"},
                 "batch_stats": variables["state"]}
  return Restored(module, methods.plain_variables(config, variables), config, spec,
                  int(meta["num_classes"]), alpha, meta, changed)


def same_data(key: str, given: Any, recorded: Any) -> bool:
  """Whether a data key (`DATA_KEYS`) names the same data as the run's record:
  folders (a "folder:" dataset, a data_dir) are compared as the real paths
  they are (os.path.realpath: a trailing slash, a symlink, the absolute form
  of a relative path, which is resolved against the current directory).

  >>> same_data("dataset", "folder:/data/photos/", "folder:/data/photos")
  True
  """
  if given == recorded:
    return True
  if not (isinstance(given, str) and isinstance(recorded, str)):
    return False
  prefix = "folder:" if key in ("dataset", "eval_dataset") else ""
  if not (given.startswith(prefix) and recorded.startswith(prefix)):
    return False
  return _real_folder(given[len(prefix):]) == _real_folder(recorded[len(prefix):])


def _real_folder(folder: str) -> str:
  """A local folder's real path; a bucket's URL without its trailing slash."""
  if paths.is_remote(folder):
    return folder.rstrip("/")
  return os.path.realpath(os.path.expanduser(folder))


def export_hub_format(workdir: str | os.PathLike, format: str, *,  # pylint: disable=redefined-builtin
                      out: str | os.PathLike | None = None, step: int | str = "best",
                      data: dict[str, Any] | None = None) -> epath.Path:
  """Exports a run as a PEFT adapter folder or as merged HF / timm weights.

  Args:
    workdir: the run's folder (its checkpoints hold the config).
    format: "peft" (a LoRA run's adapters and head, `jtl.export.peft`) or
      "hf" (merged weights in the HF / timm layout, `hf_export.export_hf`).
    out: destination folder (default <workdir>/export/<format>).
    step: "best", "latest" or a step number.
    data: where the run's data is now, if it moved (`restore`; AdaBN reads it).

  Raises:
    ConfigError: "peft" for a run that did not train LoRA adapters, or a
      model without an HF/timm layout.
  """
  if format not in ("peft", "hf"):
    raise ConfigError(f"export_hub_format: format {format!r}; expected 'peft' or 'hf'.")
  run = restore(workdir, step=step, data=data)
  out = paths.path(out or paths.path(workdir) / "export" / format)
  if format == "peft" and run.alpha is None:
    strategy = (run.config.strategy or {}).get("name") or "full fine-tuning"
    raise ConfigError(f"{workdir}: --format peft exports LoRA adapters, but this run's "
                      f"strategy is {strategy!r}; use --format hf for merged weights.")
  try:  # a family without an HF / timm layout: say which option and model
    hf_layout.layout_of(run.module)
  except ConfigError as e:
    raise ConfigError(f"{workdir}: --format {format} for model {run.config.model!r}: "
                      f"{e}") from None
  if format == "peft" and methods.needs_adabn(run.config):
    raise ConfigError(
        f"{workdir}: --format peft writes the LoRA adapters for the base model's own "
        "BatchNorm statistics, but this run's model (method.batchnorm='separate') is "
        "evaluated with statistics re-estimated on its target data (AdaBN), which an adapter "
        "folder cannot carry. Use --format hf: merged weights with those statistics.")
  if format == "hf":
    spec = run.spec  # a text model's tokenizer goes with the weights
    variables, adabn = run.deployable_variables()  # LoRA merged, AdaBN applied
    return hf_export.export_hf(run.module, variables, out,
                               tokenizer=spec.tokenizer_file and spec.tokenizer_file(),
                               max_length=run.config.max_length,
                               inputs=run_inputs(run.config, spec),  # the run's, not published
                               record={"adabn": adabn} if adabn else None)
  return peft.export_peft(run.module, run.variables, out, alpha=run.alpha,
                          base_model_name_or_path=base_model_name(run))


def base_model_name(run: Restored) -> str | None:
  """The base model a run's LoRA adapters were trained on, for a PEFT
  folder's base_model_name_or_path: the run's `pretrained` source (the
  model's published one for True); None, with a warning, for a run from a
  random initialisation (pretrained=False), which no published model is."""
  pretrained = run.config.pretrained
  if pretrained is None or pretrained is False:
    logging.warning(
        "%s was trained from a random initialisation (pretrained=False): its adapters fit "
        "that base alone, which is not saved with them; base_model_name_or_path is null. "
        "Export the merged model with --format hf instead.", run.config.model)
    return None
  source = pretrained if isinstance(pretrained, str) else run.spec.pretrained
  source = source if isinstance(source, str) else None
  if source and source.startswith("hf-hub:"):
    source = source[len("hf-hub:"):]
  return source or run.config.model


# LP-FT's probe (pretrained backbone, probed head, before fine-tuning): the
# other end of WiSE-FT's line (`evaluation.wise_workdir`).
PROBE_VARIABLES = "probe/variables.safetensors"


def save_probe(workdir: str | os.PathLike, variables: PyTree) -> None:
  """Writes the probed variables of an LP-FT run into its workdir (process 0)."""
  if jax.process_index() == 0:
    target = paths.path(workdir) / PROBE_VARIABLES
    target.parent.mkdir(parents=True, exist_ok=True)
    export.write(jax.device_get(variables), target)


def load_probe(workdir: str | os.PathLike) -> PyTree:
  """The variables `save_probe` wrote, as a nested dict of numpy arrays."""
  source = paths.path(workdir) / PROBE_VARIABLES
  if not source.exists():
    raise ConfigError(f"{source} does not exist: WiSE-FT interpolates an LP-FT run's probe "
                      "and fine-tuned weights, and only a run with strategy.name='lp_ft' and "
                      "its probe phase on cached features saves the probe there.")
  return jtree.unflatten(read(source))
