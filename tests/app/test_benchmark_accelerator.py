"""The accelerator benchmark stays runnable end to end on the CPU devices
(issues 18 and 28; the GPU numbers come from running the script on a GPU):
every mode's row, the guarded metrics (one this backend cannot give is
reported missing, the row kept), the profile's top-kernel table read from
the trace file, the second run from the compilation cache, the time budget,
and the mesh check (the step sharded over the 8 devices equals the
one-device step)."""

import json

import pytest
from app_helpers import ROOT, load_file

SCRIPT = ROOT / "scripts" / "benchmarks" / "benchmark_accelerator.py"


def load():
  return load_file(SCRIPT)


@pytest.fixture(autouse=True)
def own_compilation_cache():
  """The benchmark points jax at its own cache (--cache_dir) and counts its
  entries: the suite's cache (conftest.compile_cache) steps aside meanwhile."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  compilation_cache.reset_cache()
  yield
  compilation_cache.reset_cache()
  for k, v in before.items():
    jax.config.update(k, v)


@pytest.mark.slow  # end to end through subprocesses: make test-all
def test_smoke_run_measures_every_mode_profiles_and_runs_again_from_the_cache(tmp_path):
  bench = load()
  rows = bench.main(["--smoke", "--models", "small_cnn", "--image_size", "16",
                     "--batches", "8", "--profile", "small_cnn", "--ab", "{}",
                     "--no_torch", "--peak_tflops", "1.0", "--out", str(tmp_path)])
  assert [(r["model"], r["mode"], r["batch"]) for r in rows] == [
      ("small_cnn", "full", 8), ("small_cnn", "frozen", 8), ("small_cnn", "forward", 8),
      ("small_cnn", "partial", 8)]
  full, frozen, forward, partial = rows
  for r in rows:
    assert r["images_per_s"] > 0 and r["compile_s"] > 0 and r["program_gib"] > 0
    assert r["tflops_per_step"] > 0 and r["mfu"] > 0
    # The CPU has no memory_stats(): the metric is missing with its reason,
    # the row is kept.
    assert r["process_peak_gib"] is None and "memory_stats" in r["missing"]["process_peak_gib"]
  # Work as written: forward < frozen < partial < full.
  flops = [r["tflops_per_step"] for r in (forward, frozen, partial, full)]
  assert flops == sorted(flops) and len(set(flops)) == 4
  # The profile of the full step, from the trace file: XLA's ops by time.
  kernels = full["top_kernels"]
  assert 0 < len(kernels) <= 10 and all(k["ms"] > 0 and k["calls"] > 0 for k in kernels)
  assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
  assert 0 < sum(k["percent"] for k in kernels) <= 100.1
  result = json.loads((tmp_path / "results.json").read_text())
  assert result["cache_entries_at_start"] == 0
  assert result["not_measured"] == ["timm: skipped: --no_torch"]
  # A second process compiles the full programs again, from the cache.
  second = result["second_run"]
  assert [(r["mode"], r["batch"]) for r in second] == [("full", 8)]
  assert all(r["cached_compile_s"] > 0 and "error" not in r for r in second)
  text = (tmp_path / "results.md").read_text()
  assert "| small_cnn | frozen | 8 | - |" in text and "Top kernels, small_cnn full" in text


def test_budget_skips_rows_that_would_not_fit_and_says_so(tmp_path):
  rows = load().main(["--smoke", "--models", "small_cnn", "--image_size", "16", "--no_torch",
                      "--budget_s", "5", "--row_budget_s", "10", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "results.json").read_text())
  assert rows == [] and len(result["not_measured"]) == 1 + 4
  assert all(line.endswith("time budget") for line in result["not_measured"][1:])


def test_count_ops_lowers_without_running_and_counts_batchnorm_passes(tmp_path):
  """--count_ops (scripts/benchmarks/GPU_PLAN.md, Lite0 hypothesis 2): the full step lowered
  from shapes, float32 and bf16; SmallCNN's 3 BatchNorms take the closed form
  in both (4 reductions each; 4 more: the pool and the 3 conv biases'
  gradients), 5 converts each in bf16 (3 more: input, pool, its gradient)."""
  rows = load().main(["--count_ops", "cpu", "--models", "small_cnn", "--batches", "2",
                      "--image_size", "16", "--out", str(tmp_path)])
  assert [(r["compute"], r["reductions"], r["converts"]) for r in rows] == [
      ("float32", 4 * 3 + 4, 0), ("bfloat16", 4 * 3 + 4, 5 * 3 + 3)]
  assert json.loads((tmp_path / "op_counts.json").read_text()) == rows


def test_partial_rules_train_the_last_two_blocks_and_what_follows():
  from jtl.models import registry
  bench = load()
  assert [p for p, label in bench.rules(registry.get_spec("vit_b16"), "partial")
          if label != "frozen"] == [r"Transformer/encoderblock_10/.*",
                                    r"Transformer/encoderblock_11/.*",
                                    r"Transformer/encoder_norm/.*|pre_logits/.*", r"head/.*"]
  lite0 = [p for p, label in bench.rules(registry.get_spec("efficientnet_lite0"), "partial")
           if label != "frozen"]
  assert lite0[:2] == [r"blocks_14/.*", r"blocks_15/.*"] and len(lite0) == 4


def test_sharded_step_equals_one_device_step():
  assert load().check_mesh("small_cnn", size=28, batch=16) < 1e-5


def test_peak_table_matches_device_kinds():
  bench = load()
  assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
  assert bench.peak_tflops("TPU v5 lite", None) == 197.0
  assert bench.peak_tflops("cpu", None) is None and bench.peak_tflops("cpu", 2.0) == 2.0


def test_fused_row_counts_the_flops_of_the_model_as_written():
  """Lowered for the CPU, the fused program recomputes attention for its
  backward pass (the other platforms' branch): its MFU uses the Flax row's
  count."""
  flax_row = {"framework": "jtl", "model": "vit_b16", "mode": "full", "batch": 256, "build": {},
              "tflops_per_step": 27.0}
  fused = {**flax_row, "build": {"fused_attention": True}, "tflops_per_step": 28.1,
           "step_ms": 100.0}
  load()._flops_of_flax_row(fused, [flax_row], 989.0)
  assert fused["tflops_per_step"] == 27.0 and abs(fused["mfu"] - 270.0 / 989.0) < 1e-12
