"""Bad input to the scripts: one clear message, exit status 2, before any
training step (issue 12, items 5-7). A small image folder stands in for the
user's data; no weights are loaded, so each run takes seconds."""

import pytest
from app_helpers import ROOT, photo_folder
from app_helpers import run_script as run


def finetune(tmp_path, *overrides):
  data = tmp_path / "photos"
  if not data.exists():
    photo_folder(data)
  return run("finetune.py", "--config", ROOT / "configs" / "default.py",
             "--workdir", tmp_path / "run", f"--config.dataset=folder:{data}",
             "--config.train_split=train", "--config.eval_split=test", *overrides)


def assert_clean_failure(result, *needles):
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  for needle in needles:
    assert needle in result.stderr, (needle, result.stderr[-3000:])


def test_every_config_problem_in_one_error_before_training(tmp_path):
  result = finetune(tmp_path, "--config.learning_rate=-1", "--config.image_size=0",
                    "--config.eval_split=tset", "--config.num_steps=0")
  assert_clean_failure(
      result, "ConfigError: Invalid config:", "learning_rate must be > 0, got -1",
      "image_size must be >= 32 for efficientnet_lite0", "num_steps must be >= 1",
      "eval_split='tset'", "Unknown split 'tset'")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_rule_that_labels_nothing_is_reported(tmp_path):
  result = finetune(tmp_path, "--config.strategy.rules=(('haed/.*', 'head'), ('.*', 'frozen'))")
  assert_clean_failure(result, "rule ('haed/.*', 'head') labels no parameter of "
                               "efficientnet_lite0")


def test_a_truncated_test_image_stops_the_run_before_step_1(tmp_path):
  data = photo_folder(tmp_path / "photos")
  image = data / "test" / "dog" / "1.jpg"
  image.write_bytes(image.read_bytes()[:-100])
  result = finetune(tmp_path)
  assert_clean_failure(result, "test/dog/1.jpg: a truncated or damaged JPEG")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_invalid_flag_values_are_one_message(tmp_path):
  result = finetune(tmp_path, "--config.batch_size=abc")
  assert_clean_failure(result, "ConfigError: invalid command line")
  result = run("evaluate.py", "--workdir", tmp_path / "none", "--step", "abc")
  assert_clean_failure(result, "ConfigError: --step must be 'latest', 'best' or a step number, "
                               "got 'abc'")
  result = run("evaluate.py", "--workdir", tmp_path / "none")
  assert_clean_failure(result, "CheckpointError:", "no checkpoints")


def test_one_class_is_refused_and_a_class_only_in_test_too(tmp_path):
  import pytest

  from configs import default
  from jtl.app import preflight, preflight_data
  from jtl.errors import ConfigError
  data = photo_folder(tmp_path / "photos")
  config = default.get_config()
  config.dataset, config.train_split, config.eval_split = f"folder:{data}", "train", "test"
  for image in (data / "train" / "dog").iterdir():  # dogs only in the test split
    image.unlink()
  (data / "train" / "dog").rmdir()
  problems, _ = preflight_data.data_problems(config)  # an output never trained, scored as errors
  assert len(problems) == 1 and "have no folder of the same name" in problems[0]
  assert "test/dog" in problems[0] and "Add training images" in problems[0]
  for image in (data / "test" / "dog").iterdir():  # now one class in all
    image.unlink()
  (data / "test" / "dog").rmdir()
  with pytest.raises(ConfigError, match="has 1 class\\(es\\); fine-tuning a classifier needs "
                                        "at least 2"):
    preflight.preflight(config)


def test_an_empty_workdir_flag_is_refused_by_every_script(tmp_path):
  """`--workdir=$UNSET` used to mean the current directory (finetune.py wrote
  its checkpoints there); every script refuses it and writes nothing."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  for script, args in (("finetune.py", ["--config", ROOT / "configs" / "default.py"]),
                       ("evaluate.py", []), ("convert.py", ["--format", "onnx"])):
    result = run(script, "--workdir=", *args, cwd=cwd)
    assert_clean_failure(result, "ConfigError: --workdir is empty (an unset shell variable?)")
  assert list(cwd.iterdir()) == []


def test_convert_names_its_format_flag_before_loading_any_weights(tmp_path):
  """An --out suffix that names no format, or another one than --format, is
  refused naming --format (not the library's format=), before the source is
  read (it does not exist here)."""
  source = tmp_path / "missing.npz"
  result = run("convert.py", "--model=small_cnn", f"--source={source}",
               f"--out={tmp_path / 'o.xyz'}")
  assert_clean_failure(result, "cannot tell the export format from the suffix '.xyz'",
                       "or pass --format=<format>, one of")
  assert "format= " not in result.stderr
  result = run("convert.py", "--model=small_cnn", f"--source={source}",
               f"--out={tmp_path / 'x.npz'}", "--format=safetensors")
  assert_clean_failure(result, "the suffix '.npz' is the npz format's, but --format=safetensors",
                       "Name the file x.safetensors, or pass --format=npz")
  assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow  # two convert.py processes; deploy.output_format is tested fast
def test_convert_checks_a_deployment_files_suffix_and_infers_its_format(tmp_path):
  """Audit: convert.py --workdir W --format onnx --out m.tflite wrote ONNX bytes
  as m.tflite, and without --format failed with "got None" although --format
  says "default: from --out's suffix". The suffix is checked before the
  workdir is read (it does not exist here), and names the format."""
  result = run("convert.py", f"--workdir={tmp_path / 'run'}", "--format=onnx",
               f"--out={tmp_path / 'm.tflite'}")
  assert_clean_failure(result, "the suffix '.tflite' is the tflite format's, but --format=onnx",
                       "Name the file m.onnx, or pass --format=tflite")
  result = run("convert.py", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'm.onnx'}")
  assert_clean_failure(result, "CheckpointError:", "no checkpoints")  # on to the workdir
  assert "got None" not in result.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == []
