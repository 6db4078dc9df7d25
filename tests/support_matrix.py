"""The support matrix: every zoo family x strategy config x API x export, defined once.

The lists and `expected(family, strategy, api, export)` are the single
source of what jtl claims; `run_training` / `run_export` run one cell
through the app path of the scripts (`jtl.app.experiment.finetune` with a
config file's config, `jtl.app.evaluation.evaluate_workdir`, then the
exports of `scripts/convert.py`: `jtl.export.write` for orbax,
`jtl.app.workdirs.export_hub_format` for peft / hf,
`jtl.app.deploy_runs.export_workdir` for onnx / tflite / tflite_int8). Tiny
sizes, random weights, 2 steps. `readme_table()` renders the README's table
from the same lists (tests/app/test_support_matrix.py checks it is the README's);
`scripts/benchmarks/benchmark_support_matrix.py` runs every cell, the test suite a
covering subset.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Family:
  """A zoo family at a tiny size: its model name, constructor options, input size."""
  model: str
  model_kwargs: tuple[tuple[str, Any], ...] = ()
  image_size: int | None = 32  # None: a text model
  hub_layout: bool = False  # hf (timm / transformers) and peft layouts exist


FAMILIES = {
    "small_cnn": Family("small_cnn", (("width", 8),), 28),
    "resnet": Family("resnet18", (), 32, hub_layout=True),
    "vgg": Family("vgg16", (("blocks", ((1, 8), (1, 16), (1, 16), (1, 32), (1, 32))),), 32),
    "mobilenet_v2": Family("mobilenet_v2", (("width", 0.35),), 32),
    "efficientnet_lite": Family("efficientnet_lite0", (), 32),
    # The registered depth: a spec's layer groups (partial, gradual, llrd) are its own.
    "vit": Family("vit_ti16", (("image_size", 32),), 32, hub_layout=True),
    "dinov2": Family("dinov2_s14", (("image_size", 28),), 28, hub_layout=True),
    "bert": Family("minilm_l6", (), None, hub_layout=True),
}
# Config files as scripts/finetune.py --config takes them.
STRATEGIES = [f"strategy.py:{n}" for n in ("full", "scratch", "linear_probe", "partial", "bitfit",
                                            "lora", "lp_ft", "gradual", "llrd")]
STRATEGIES += ["full.py", "partial.py", "linear_probe.py", "default.py"]
APIS = ["linen", "nnx"]
EXPORTS = ["orbax", "peft", "hf", "onnx", "tflite", "tflite_int8"]

WORKS = "works"


def expected(family: str, strategy: str, api: str, export: str | None) -> str:
  """"works" or "refused: <why>" for one cell (`export` None: training and
  evaluation alone)."""
  f = FAMILIES[family]
  refused = _training_refusal(family, strategy, api)
  if refused or export is None or export == "orbax":
    return refused or WORKS
  if export == "peft" and strategy != "strategy.py:lora":
    return "refused: peft exports LoRA adapters [strategy]"
  if export in ("peft", "hf") and not f.hub_layout:
    return f"refused: no HF/timm layout for this family [{export}]"
  if export in ("onnx", "tflite", "tflite_int8") and f.image_size is None:
    return "refused: deployment export takes image models [model]"
  return WORKS


def _training_refusal(family: str, strategy: str, api: str) -> str:
  """Why the config is refused before training ("" when it trains)."""
  if api == "nnx" and strategy == "strategy.py:lora":
    return "refused: LoRA's model wrapper is Linen only [api]"
  if family == "small_cnn" and strategy == "strategy.py:gradual":
    return "refused: the small CNN has 3 blocks, gradual's max_blocks is 4 [max_blocks]"
  if family == "small_cnn" and strategy == "strategy.py:partial":
    return "refused: the small CNN has 3 blocks, partial's num_blocks is 4 [num_blocks]"
  # MobileNetV2's blocks_0..16 include every name these rules give (Lite0's
  # blocks_12..15 and top): they train those, and its last block 16 stays
  # frozen (the full run found it; configs/partial.py says so).
  if strategy in ("partial.py", "default.py") and family not in ("efficientnet_lite",
                                                                "mobilenet_v2"):
    return "refused: the rules name EfficientNet-Lite0 blocks [rules]"
  return ""


# --- Running a cell ---------------------------------------------------------

def make_image_folder(root: Path, classes: int = 3, train: int = 8, test: int = 4) -> Path:
  """train/ and test/ folders of class folders of 32 px PNGs, one colour per class."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, count in (("train", train), ("test", test)):
    for c in range(classes):
      folder = root / split / f"class_{c}"
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        pixels = rng.integers(0, 60, (32, 32, 3)) + np.eye(3, dtype=int)[c] * 180
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
  return root


def config_for(family: str, strategy: str, api: str, data: Path) -> Any:
  """The config file's config, shrunk to a 2-step run of the tiny family."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  file, _, arg = strategy.partition(":")
  spec = importlib.util.spec_from_file_location(f"configs.{file[:-3]}", ROOT / "configs" / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg or None)
  f = FAMILIES[family]
  c.model = f.model
  c.model_kwargs = ml_collections.ConfigDict(dict(f.model_kwargs))
  c.pretrained = False
  c.api = api
  if f.image_size is None:
    c.dataset, c.max_length, c.train_split, c.eval_split = (
        "rotten_tomatoes", 16, "train[:24]", "test[:12]")
  else:
    c.dataset, c.image_size = f"folder:{data}", f.image_size
    c.train_split, c.eval_split = "train", "test"
  c.test_split = None  # evaluate.py's path is run on the eval split below
  c.update(batch_size=8, eval_batch_size=8,  # 8: the test suite's 8 CPU devices
           num_steps=2, eval_every=2, checkpoint_every=2,
           log_every=1, warmup_steps=0)
  # A config declares every strategy's options: shrink the named strategy's own.
  if c.strategy.name == "lp_ft":
    c.strategy.probe_steps = 2
  if c.strategy.name == "gradual":
    c.strategy.steps_per_stage = 1
  return c


def run_training(family: str, strategy: str, api: str, workdir: Path, data: Path) -> dict:
  """Fine-tunes and evaluates one cell as scripts/finetune.py and evaluate.py
  do; returns the evaluation (a ConfigError propagates)."""
  from jtl.app import evaluation, experiment  # pylint: disable=g-import-not-at-top
  config = config_for(family, strategy, api, data)
  experiment.finetune(config, workdir, progress=False)
  result = evaluation.evaluate_workdir(workdir, step="best")
  if not np.isfinite(result["loss"]) or result["count"] <= 0:
    raise AssertionError(f"evaluation: {result}")
  return result


def run_export(export: str, workdir: Path) -> Path:
  """Exports a trained cell's workdir as scripts/convert.py --workdir does and
  reads the export back (a ConfigError propagates)."""
  out = workdir / "export" / export
  if out.exists():
    shutil.rmtree(out) if out.is_dir() else out.unlink()
  if export == "orbax":
    from jtl import export as export_lib, weights  # pylint: disable=g-import-not-at-top
    from jtl.app import workdirs  # pylint: disable=g-import-not-at-top
    run = workdirs.restore(workdir)
    variables = run.merged_variables()
    path = export_lib.write(variables, out, format="orbax")
    back = weights.read(path)
    _same_leaves(variables, back)
    return path
  if export in ("peft", "hf"):
    from jtl.app import workdirs  # pylint: disable=g-import-not-at-top
    path = workdirs.export_hub_format(workdir, export, out=out)
    if not (path / ("adapter_model.safetensors" if export == "peft"
                    else "model.safetensors")).exists():
      raise AssertionError(f"{export}: {sorted(p.name for p in path.iterdir())}")
    return path
  from jtl.app import deploy_runs  # pylint: disable=g-import-not-at-top
  exported = deploy_runs.export_workdir(workdir, export, out=out, num_calibration=8)
  result = deploy_runs.evaluate_exported(workdir, exported.path, out_dir=workdir / "export")
  if result["count"] <= 0 or not np.isfinite(result["loss"]):
    raise AssertionError(f"{export} evaluation: {result}")
  return exported.path


def _same_leaves(a: Any, b: Any) -> None:
  from jtl import tree  # pylint: disable=g-import-not-at-top
  fa, fb = tree.flatten(a), tree.flatten(b)
  if set(fa) != set(fb):
    raise AssertionError(f"orbax round trip: {sorted(set(fa) ^ set(fb))[:5]}")
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def outcome(error: BaseException | None, workdir: Path | None = None, *,
            training: bool = True) -> str:
  """A cell's observed outcome: "works", "refused: <ConfigError>" or "failed: ...",
  the workdir's path written <workdir> (its name must not pass for a key); a
  training cell's ConfigError after a checkpoint was written is a failure
  (refusals come before training)."""
  from jtl.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if error is None:
    return WORKS
  message = str(error).replace(str(workdir), "<workdir>") if workdir else str(error)
  trained = training and workdir is not None and any((workdir / "checkpoints").glob("[0-9]*"))
  if isinstance(error, ConfigError) and not trained:
    return f"refused: {message}"
  return f"failed: {type(error).__name__}{' after training' if trained else ''}: {message}"


def agrees(observed: str, want: str) -> bool:
  """Works where expected, or refused with a ConfigError where expected whose
  message names the user-facing key in the expected reason's brackets."""
  if observed == WORKS or want == WORKS:
    return observed == want
  key = want.rsplit("[", 1)[1].rstrip("]") if want.endswith("]") else ""
  return observed.startswith("refused:") and key in observed


# --- The README's table -----------------------------------------------------

def readme_table() -> str:
  """Markdown: per family, one row per group of strategy configs with the same
  outcomes (Linen), one column per export after training + evaluation ("no:
  <why> [the key the ConfigError names]"); then where NNX (`api="nnx"`) differs."""
  head = "| family | strategy configs | train + eval | " + " | ".join(EXPORTS) + " |"
  rows = [head, "|" + "---|" * (3 + len(EXPORTS))]
  for family in FAMILIES:
    groups: dict[tuple[str, ...], list[str]] = {}
    for strategy in STRATEGIES:
      cells = tuple(_short(expected(family, strategy, "linen", e)) for e in (None, *EXPORTS))
      if cells[0] != WORKS:  # refused before training: no export to speak of
        cells = (cells[0],) + ("-",) * len(EXPORTS)
      groups.setdefault(cells, []).append(strategy)
    for cells, strategies in groups.items():
      rows.append(f"| {family} | {', '.join(strategies)} | " + " | ".join(cells) + " |")
  differs: dict[tuple[str, str], list[str]] = {}
  for s in STRATEGIES:
    for f in FAMILIES:
      if expected(f, s, "nnx", None) != expected(f, s, "linen", None):
        differs.setdefault((s, _short(expected(f, s, "nnx", None))), []).append(f)
  nnx = [f"{s} on {'every family' if len(fs) == len(FAMILIES) else ', '.join(fs)}: {why}"
         for (s, why), fs in sorted(differs.items())]
  rows.append("")
  rows.append("With `api=\"nnx\"` every cell is the same, except " + "; ".join(nnx) + ".")
  return "\n".join(rows)


def _short(cell: str) -> str:
  return "works" if cell == WORKS else "no: " + cell.split(": ", 1)[1]
