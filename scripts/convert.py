"""Converts a foreign checkpoint into jtl's layout for a zoo model, or exports
a model for deployment (ONNX, LiteRT float32, LiteRT full-integer int8).

  python scripts/convert.py --model resnet50 --source resnet50.pth --out resnet50.npz
  python scripts/convert.py --model efficientnet_lite0 --source efficientnet_lite0/imagenet \\
      --out /tmp/lite0_orbax --format orbax

Reads any format jtl.weights.read supports, maps it with the model's
converter, prints the load report, and writes npz, safetensors, msgpack or an
Orbax checkpoint directory.

Deployment (jtl.export.deploy): a fine-tuned workdir to onnx | tflite | tflite_int8;
int8 is calibrated on --calibration_images images of the training split and
checked against float32 on them (a warning past --max_int8_drop points):

  python scripts/convert.py --workdir runs/default --format tflite_int8 [--out m.tflite]

or a zoo model with pretrained weights, float formats (224 px unless --image_size):

  python scripts/convert.py --model efficientnet_lite0 --source efficientnet_lite0/imagenet \\
      --format onnx --out lite0.onnx

For PyTorch users (jtl.export.peft / hf_export): a LoRA run's adapters as
a PEFT folder (PeftModel.from_pretrained), or merged weights in the HF (BERT) /
timm (ViT, ResNet) layout (default out: <workdir>/export/<format>):

  python scripts/convert.py --workdir runs/default --format peft|hf [--out folder]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The repository root, for the config files' own imports (`from configs import default`),
# and the current directory, for the user's packages (model="mypkg.models:MyNet"), as
# `python -m` would; evaluate.py and convert.py rerun a config file that registered a model.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.getcwd())

from absl import app, flags, logging

from jtl import export, models, weights
from jtl.app import cli
from jtl.errors import ConfigError

_DEPLOY_FORMATS = ["onnx", "tflite", "tflite_int8"]
_HUB_FORMATS = ["peft", "hf"]  # jtl.export.peft / hf_export: folders PyTorch users load
_MODEL = flags.DEFINE_string("model", None, f"Zoo model name: {models.list_models()}")
_SOURCE = flags.DEFINE_string("source", None, "File, directory or registry name.")
_OUT = flags.DEFINE_string("out", None, "Output path (with --workdir: default "
                           "<workdir>/export/model.<format>).")
_FORMAT = flags.DEFINE_enum("format", None, ["npz", "safetensors", "msgpack", "orbax",
                                             *_DEPLOY_FORMATS, *_HUB_FORMATS],
                            "Output format (default: from --out's suffix: .npz, "
                            ".safetensors, .msgpack, .onnx, .tflite, .int8.tflite).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Classes of the head (default: the model's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Export this fine-tuned workdir (with a "
                               "deployment --format) instead of converting --source.")
_STEP = flags.DEFINE_string("step", "best", "With --workdir: 'latest', 'best' or a step.")
_CALIB = flags.DEFINE_integer("calibration_images", 300, "tflite_int8: training images that "
                              "calibrate the int8 ranges and check the accuracy.")
_MAX_DROP = flags.DEFINE_float("max_int8_drop", 1.0, "tflite_int8: warn when int8 loses more "
                               "accuracy points than this against float32 on the check.")
_PIXELS = flags.DEFINE_bool("input_pixels", False, "Fold the normalisation in: the exported "
                            "file takes RGB 0..255 (default: normalised inputs, as jtl's pipeline).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Zoo-model export: input size "
                                   "(default: the model's).")
_DATASET = flags.DEFINE_string("dataset", None, "With --workdir: where the run's data is now, "
                               "if it moved (e.g. folder:/mnt/photos): int8 calibration and "
                               "AdaBN (domain runs with batchnorm 'separate') read it.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "With --workdir: the TFDS data folder now, "
                                "if it moved.")


def _moved_data() -> dict[str, str]:
  """--dataset / --data_dir, as `workdirs.restore(data=...)` takes them."""
  return {k: v for k, v in (("dataset", _DATASET.value), ("data_dir", _DATA_DIR.value)) if v}


@cli.exit_on_jtl_error
def main(argv):
  del argv
  cli.refuse_empty_paths(workdir=_WORKDIR.value, out=_OUT.value)
  if _moved_data() and not _WORKDIR.value:
    raise ConfigError("--dataset / --data_dir say where a --workdir run's data is now; "
                      "pass --workdir too, or leave them out.")
  logging.set_verbosity(logging.WARNING)  # library INFO logs (Orbax, TFDS) drown the progress bar
  if _FORMAT.value in _HUB_FORMATS:
    _export_hub()
    return
  if _WORKDIR.value or _FORMAT.value in _DEPLOY_FORMATS or (
      _FORMAT.value is None and _names_a_deployment_file(_OUT.value)):
    _export()
    return
  missing = [f"--{f.name}" for f in (_MODEL, _SOURCE, _OUT) if not f.value]
  if missing:
    raise ConfigError(f"Converting a checkpoint needs {', '.join(missing)} (or --workdir "
                      f"with --format one of {_DEPLOY_FORMATS} to export for deployment).")
  # Before the weights load: a suffix that names no format, or another one.
  fmt = export.writers.output_format(_OUT.value, _FORMAT.value, option="--format=")
  created = models.create(_MODEL.value, num_classes=_NUM_CLASSES.value, pretrained=_SOURCE.value)
  print(created.report)
  print(f"Wrote {export.write(created.variables, _OUT.value, format=fmt)}")


def _names_a_deployment_file(path):
  """Whether `path` ends as an ONNX / LiteRT file does (.onnx, .tflite, .int8.tflite)."""
  return bool(path) and path.endswith(tuple(export.deploy.SUFFIX_FORMATS))


def _deployment_format():
  """--format, else the one --out's suffix names; checked against --out's
  suffix before any weights load (ONNX bytes are never written as m.tflite)."""
  from jtl.export import deploy  # only this path needs the converters
  fmt = _FORMAT.value
  if fmt is not None and fmt not in _DEPLOY_FORMATS:
    raise ConfigError(f"--workdir exports for deployment: --format must be one of "
                      f"{_DEPLOY_FORMATS}, got {fmt!r}.")
  if fmt is None and not _OUT.value:
    raise ConfigError(f"--workdir exports for deployment: pass --format, one of "
                      f"{_DEPLOY_FORMATS}, or an --out named .onnx, .tflite or .int8.tflite.")
  return deploy.output_format(_OUT.value, fmt, option="--format=") if _OUT.value else fmt


def _export_hub():
  """A workdir's LoRA adapters as a PEFT folder, or merged weights in the HF / timm layout."""
  from jtl.app import workdirs
  from jtl.export import hf_export
  if _WORKDIR.value:
    step = int(_STEP.value) if _STEP.value.isdigit() else _STEP.value
    path = workdirs.export_hub_format(_WORKDIR.value, _FORMAT.value, out=_OUT.value, step=step,
                                      data=_moved_data())
  elif _FORMAT.value == "hf" and _MODEL.value and _SOURCE.value and _OUT.value:
    created = models.create(_MODEL.value, num_classes=_NUM_CLASSES.value,
                            pretrained=_SOURCE.value)
    print(created.report)
    spec = created.spec  # a text model's tokenizer goes with the weights
    path = hf_export.export_hf(created.module, created.variables, _OUT.value,
                               tokenizer=spec.tokenizer_file and spec.tokenizer_file())
  else:
    raise ConfigError(f"--format {_FORMAT.value} exports a fine-tuned --workdir (or, for hf, "
                      "a zoo --model with --source and --out).")
  print(f"Wrote {path}: " + ", ".join(sorted(p.name for p in path.iterdir())))


def _export():
  """A workdir or a pretrained zoo model to ONNX / LiteRT (jtl.export.deploy)."""
  from jtl.app import deploy_runs  # only this path needs the converters
  from jtl.checkpoint import restore  # with Orbax, which only a --workdir needs
  from jtl.export import deploy  # only this path needs the converters
  fmt = _deployment_format()
  if _WORKDIR.value:
    step = int(_STEP.value) if _STEP.value.isdigit() else _STEP.value
    exported = deploy_runs.export_workdir(
        _WORKDIR.value, fmt, out=_OUT.value, step=step,
        num_calibration=_CALIB.value, input_pixels=_PIXELS.value, max_drop=_MAX_DROP.value,
        data=_moved_data())
  else:
    if not (_MODEL.value and _SOURCE.value and _OUT.value):
      raise ConfigError("Exporting a zoo model needs --model, --source and --out "
                        "(or pass --workdir).")
    if fmt == "tflite_int8":
      raise ConfigError("tflite_int8 needs calibration images from a training split: "
                        "export a fine-tuned --workdir.")
    created = models.create(_MODEL.value, num_classes=_NUM_CLASSES.value,
                            pretrained=_SOURCE.value)
    size = _IMAGE_SIZE.value or created.spec.image_size
    affine, norm = None, created.spec.normalization
    if _PIXELS.value:
      from jtl.app import methods
      affine = methods.pixel_affine(norm)
    exported = deploy.export(created.module, created.variables, _OUT.value,
                             format=fmt, input_shape=(size, size, 3),
                             pixel_affine=affine, meta={"model": _MODEL.value,
                                                        "normalize": norm and norm.describe()})
  print(f"Wrote {exported.path} ({exported.format}, {exported.bytes / 1e6:.2f} MB); "
        f"input: {exported.meta['input']} {exported.meta['input_shape']}")
  if "calibration_check" in exported.meta:
    print("int8 calibration check:", exported.meta["calibration_check"])
  note = restore.fallback_note(exported.meta)
  if note:  # last, where it is seen
    print(f"NOTE: {note} Its sidecar {exported.path}.json records it (\"step\", "
          "\"requested_step\", \"skipped_damaged\"); the warning above says what is damaged.")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_config_keys)
