"""Restores a checkpoint from a workdir and evaluates it.

  python scripts/evaluate.py --workdir runs/default [--split test] [--step best]

Writes eval_<split>.json (accuracy, top-5, loss, per-class accuracy, confusion
matrix) and confusion_<split>.png into the workdir (or --out_dir).

Data moved since the run: --dataset folder:/where/it/is/now. Its classes (the
folder names) must be the run's, in its order, or nothing is scored; the files
are then eval_<split>_on_<folder name>.json / .png, so an evaluation on other
data never overwrites the run's own eval_<split>.json.

Post-training options:
  --precision int8 [--save_quantized model_int8.safetensors]   quantized eval
  --adabn                         AdaBN on the evaluated dataset's train split
                                  (always for a DANN/CORAL run with
                                  method.batchnorm='separate'); on a run's own
                                  data, the statistics a short run that
                                  re-estimated them (scratch,
                                  freeze_batchnorm=False) had no time to reach
  --attack pgd --eps 0.1          also accuracy under attack (pixel units)
  --exported runs/default/export/model.int8.tflite
                                  evaluate an exported ONNX / LiteRT file in its
                                  runtime instead (eval_<split>_step<N>_<format>.json,
                                  N: the step it was exported from)

WiSE-FT after an LP-FT run (strategy.name='lp_ft', its probe on cached features):
  --wise [--wise_alphas 0,0.25,0.5,0.75,1] [--split test]
                                  (1 - a) * probe + a * fine-tuned for each a,
                                  a chosen on the validation split (eval_split),
                                  that model written to export/wise.safetensors,
                                  scored once on --split; wise.json

For PyTorch users, the checkpoint at --step instead of an evaluation (the same
library call as scripts/convert.py --workdir --format peft|hf):
  --format peft [--export_dir DIR]  a LoRA run's adapters as a PEFT folder
  --format hf [--export_dir DIR]    merged weights in the HF (BERT) / timm layout
                                    (default DIR: <workdir>/export/<format>)
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The repository root, for the config files' own imports (`from configs import default`),
# and the current directory, for the user's packages (model="mypkg.models:MyNet"), as
# `python -m` would; evaluate.py and convert.py rerun a config file that registered a model.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.getcwd())

from absl import app, flags

from jtl.app import cli, evaluation
from jtl.checkpoint import restore
from jtl.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir written by scripts/finetune.py.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval_split).")
_STEP = flags.DEFINE_string("step", "", "'latest', 'best' or a step number (default: the run's "
                            "result: 'best' when it picked one by best_metric, else 'latest').")
_OUT = flags.DEFINE_string("out_dir", None, "Where to write results (default: the workdir).")
_PRECISION = flags.DEFINE_enum("precision", "float32",
                               ["float32", "bfloat16", "int8", "int8_bfloat16"],
                               "Inference precision (int8: per-channel weight quantization).")
_SAVE_Q = flags.DEFINE_string("save_quantized", None,
                              "Also save the variables at --precision to this .safetensors file.")
_ADABN = flags.DEFINE_bool("adabn", False, "Re-estimate BatchNorm statistics on the evaluated "
                           "dataset's (unlabelled) train split first (always done for "
                           "a DANN/CORAL run with method.batchnorm='separate').")
_ATTACK = flags.DEFINE_enum("attack", None, ["pgd", "fgsm"], "Also evaluate under this attack.")
_EPS = flags.DEFINE_float("eps", 0.1, "Attack radius in pixel units (0..1).")
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 20, "PGD steps.")
_EXPORTED = flags.DEFINE_string("exported", None, "Evaluate this exported .onnx / .tflite file "
                                "(scripts/convert.py --format ...) in its runtime.")
_THREADS = flags.DEFINE_integer("threads", None, "--exported: runtime threads (default: all).")
_FORMAT = flags.DEFINE_enum("format", None, ["peft", "hf"], "Instead of evaluating, write the "
                            "checkpoint at --step as a PEFT adapter folder (peft) or merged "
                            "HF / timm weights (hf), as scripts/convert.py --workdir does.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--format: output folder (default "
                                  "<workdir>/export/<format>).")
_WISE = flags.DEFINE_bool("wise", False, "WiSE-FT: interpolate an LP-FT run's probe and "
                          "fine-tuned weights, alpha chosen on the validation split.")
_WISE_ALPHAS = flags.DEFINE_list("wise_alphas", ["0", "0.25", "0.5", "0.75", "1"],
                                 "--wise: the alphas to evaluate (0: probe, 1: fine-tuned).")
_DATASET = flags.DEFINE_string("dataset", None, "Where the run's data is now, if it moved since "
                               "(e.g. folder:/mnt/photos; default: where the run last found it); "
                               "its classes must be the run's. Results: "
                               "eval_<split>_on_<folder name>.json.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "The TFDS data folder now, if it moved.")
flags.mark_flag_as_required("workdir")


@cli.exit_on_jtl_error
def main(argv):
  del argv
  cli.refuse_empty_paths(workdir=_WORKDIR.value, out_dir=_OUT.value,
                         export_dir=_EXPORT_DIR.value, save_quantized=_SAVE_Q.value)
  cli.prepare_process()
  step = (int(_STEP.value) if _STEP.value.isdigit() else _STEP.value
          or evaluation.workdir_result_step(_WORKDIR.value))
  if step not in ("latest", "best") and not isinstance(step, int):
    raise ConfigError(f"--step must be 'latest', 'best' or a step number, got {_STEP.value!r}.")
  # Where the run's data is now, if it moved: every path below reads it from there.
  data = {k: v for k, v in (("dataset", _DATASET.value), ("data_dir", _DATA_DIR.value)) if v}
  if _FORMAT.value:
    from jtl.app import workdirs
    path = workdirs.export_hub_format(_WORKDIR.value, _FORMAT.value, out=_EXPORT_DIR.value,
                                      step=step, data=data)
    print(f"Wrote {path}: " + ", ".join(sorted(p.name for p in path.iterdir())))
    return
  if _EXPORTED.value:
    from jtl.app import deploy_runs  # only this path needs the runtimes
    result = deploy_runs.evaluate_exported(_WORKDIR.value, _EXPORTED.value, split=_SPLIT.value,
                                      out_dir=_OUT.value, step=step, num_threads=_THREADS.value,
                                      data=data)
    shown = {k: v for k, v in result.items() if k not in ("confusion_matrix", "per_class_accuracy")}
    print(json.dumps(shown, indent=2))
    _print_fallback(result)
    return
  if _WISE.value:
    try:
      alphas = [float(a) for a in _WISE_ALPHAS.value]
    except ValueError as e:
      raise ConfigError(f"--wise_alphas: numbers in [0, 1], got {_WISE_ALPHAS.value}.") from e
    result = evaluation.wise_workdir(_WORKDIR.value, alphas=alphas, step=step,
                                     test_split=_SPLIT.value, data=data)
    print(json.dumps(result, indent=2))
    _print_fallback(result)
    return
  result = evaluation.evaluate_workdir(
      _WORKDIR.value, split=_SPLIT.value, step=step, out_dir=_OUT.value,
      precision=_PRECISION.value, save_quantized=_SAVE_Q.value, adabn=_ADABN.value,
      attack=_ATTACK.value, eps=_EPS.value, attack_steps=_ATTACK_STEPS.value, data=data)
  shown = {k: v for k, v in result.items() if k not in ("confusion_matrix", "per_class_accuracy")}
  print(json.dumps(shown, indent=2))
  print("per-class accuracy:", [round(a, 3) for a in result["per_class_accuracy"]])
  print(f"Written: {result['results_file']} (and its confusion_*.png)")
  _print_fallback(result)


def _print_fallback(result):
  """Last, where it is seen: a damaged step asked for and the one read instead."""
  note = restore.fallback_note(result)
  if note:
    print(f"NOTE: {note} The result file records it (\"step\", \"requested_step\", "
          "\"skipped_damaged\"); the warning above says what is damaged.")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_config_keys)
