"""Fine-tunes a pretrained model from a config.

  python scripts/finetune.py --config configs/default.py --workdir runs/default
  python scripts/finetune.py --config configs/default.py --config.num_steps=50 ...
  python scripts/finetune.py --keys      # every config key, its default and meaning

Running it again with the same --workdir resumes from the last checkpoint.
Outputs in the workdir: checkpoints/, metrics.jsonl, tensorboard/, curves.png,
final_report.json.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The repository root, for the config files' own imports (`from configs import default`),
# and the current directory, for the user's packages (model="mypkg.models:MyNet"), as
# `python -m` would; evaluate.py and convert.py rerun a config file that registered a model.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.getcwd())

from absl import app, flags
from ml_collections import config_flags

from jtl.app import cli, evaluation, experiment
from jtl.app.cli import parse_flags_with_config_keys

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_bool("keys", False, "Print every config key with its default and meaning "
                  "(jtl/app/keys.py), and exit.")
flags.mark_flags_as_required(["config", "workdir"])


@cli.exit_on_jtl_error
def main(argv):
  del argv
  cli.refuse_empty_paths(workdir=_WORKDIR.value)
  cli.prepare_process()
  result = experiment.finetune(_CONFIG.value, _WORKDIR.value)
  test = evaluation.evaluate_test_split(_CONFIG.value, _WORKDIR.value)  # with test_split set
  if test is not None:
    by_class = test["per_class_accuracy_by_name"]
    # Hundreds of classes (a recommendation run's users) would bury the summary.
    per_class = by_class if len(by_class) <= 20 else test["results_file"]
    print(f"\nBest checkpoint (step {test['step']}) on {test['split']}: accuracy "
          f"{test['accuracy']:.4f}; per class: {per_class}")
  print(f"\nDone. Final eval: {result.eval_metrics}\n"
        f"Outputs in {_WORKDIR.value}: checkpoints/, metrics.jsonl, tensorboard/, curves.png, "
        "final_report.json")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_with_config_keys)
