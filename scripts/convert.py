"""Converts a foreign checkpoint into jtl's layout for a zoo model.

  python scripts/convert.py --model resnet50 --source resnet50.pth --out resnet50.npz
  python scripts/convert.py --model efficientnet_lite0 --source efficientnet_lite0/imagenet \\
      --out /tmp/lite0_orbax --format orbax

Reads any format jtl.checkpoint.read supports, maps it with the model's
converter, prints the load report, and writes npz, safetensors, msgpack or an
Orbax checkpoint directory.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from jtl import checkpoint, cli, models  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, f"Zoo model name: {models.list_models()}")
_SOURCE = flags.DEFINE_string("source", None, "File, directory or registry name.")
_OUT = flags.DEFINE_string("out", None, "Output path.")
_FORMAT = flags.DEFINE_enum("format", None, ["npz", "safetensors", "msgpack", "orbax"],
                            "Output format (default: from --out's suffix).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Classes of the head (default: the model's).")
flags.mark_flags_as_required(["model", "source", "out"])


@cli.exit_on_jtl_error
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # library INFO logs (Orbax, TFDS) drown the progress bar
  created = models.create(_MODEL.value, num_classes=_NUM_CLASSES.value, pretrained=_SOURCE.value)
  print(created.report)
  if _FORMAT.value == "orbax":
    path = checkpoint.export_orbax(created.variables, _OUT.value)
  else:
    checkpoint.export(created.variables, _OUT.value, format=_FORMAT.value)
    path = _OUT.value
  print(f"Wrote {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_config_keys)
