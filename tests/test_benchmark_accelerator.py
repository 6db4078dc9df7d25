"""The accelerator benchmark stays runnable: a tiny ViT and ResNet at 32 px for
one step on the CPU devices, and its mesh check (the step sharded over the 8
devices equals the one-device step) holds (issue 18; the GPU numbers come from
running the script on a GPU)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "benchmarks" / "benchmark_accelerator.py"


def load():
  spec = importlib.util.spec_from_file_location("benchmark_accelerator", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tiny_run_writes_the_table(tmp_path):
  bench = load()
  common = ["--tiny", "--steps", "1", "--batches", "8", "--no_torch", "--peak_tflops", "1.0"]
  rows = bench.main(common + ["--models", "vit_ti16", "--out", str(tmp_path / "vit")])
  rows += bench.main(common + ["--models", "resnet18", "--modes", "frozen",
                               "--out", str(tmp_path / "resnet")])
  assert [(r["model"], r["mode"]) for r in rows] == [
      ("vit_ti16", "full"), ("vit_ti16", "frozen"), ("resnet18", "frozen")]
  for r in rows:
    assert r["images_per_s"] > 0 and r["tflops_per_step"] > 0 and 0 < r["mfu"]
    assert r["program_gib"] > 0
  # The forward pass is timed where its ratio is the goal: the frozen backbone.
  assert rows[0]["step_over_forward"] is None and rows[1]["step_over_forward"] > 0
  # The frozen step does far less work than full fine-tuning (compiled FLOPs).
  assert rows[1]["tflops_per_step"] < 0.6 * rows[0]["tflops_per_step"]
  result = json.loads((tmp_path / "vit" / "results.json").read_text())
  assert result["devices"] == 8 and len(result["rows"]) == 2
  assert "| vit_ti16 | full | 8 |" in (tmp_path / "vit" / "results.md").read_text()


def test_sharded_step_equals_one_device_step():
  assert load().check_mesh("small_cnn", size=28, batch=16) < 1e-5


def test_peak_table_matches_device_kinds():
  bench = load()
  assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
  assert bench.peak_tflops("TPU v5 lite", None) == 197.0
  assert bench.peak_tflops("cpu", None) is None and bench.peak_tflops("cpu", 2.0) == 2.0
