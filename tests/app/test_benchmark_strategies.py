"""scripts/benchmarks/benchmark_strategies.py's bookkeeping, without training:
resumable results (keyed by model), seeded labelled subsets, stratified
validation splits, the learning rate written into the optimizer state (one
compiled step serves every swept learning rate), and the digits folder of
make_small_folders.py read back by load_folder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from app_helpers import ROOT, load_file

bench = load_file(ROOT / "scripts" / "benchmarks" / "benchmark_strategies.py")


def test_results_are_resumable(tmp_path):
  path = tmp_path / "rows.jsonl"
  results = bench.Results(path)
  key = dict(kind="final", strategy="full", per_class=10, seed=1, lr=1e-3, steps=10,
             image_size=128)
  assert results.get(**key) is None
  results.add({**key, "acc": 0.5})
  again = bench.Results(path)  # a rerun reads the finished rows back
  assert again.get(**key)["acc"] == 0.5
  assert again.get(**{**key, "seed": 2}) is None


def test_labelled_subsets_and_holdout():
  y = np.repeat(np.arange(3), 50)
  a, b = bench.labelled_subset(y, 10, 0), bench.labelled_subset(y, 10, 1)
  assert np.bincount(y[a]).tolist() == [10, 10, 10] and not np.array_equal(a, b)
  fit, val = bench.stratified_holdout(y[a], 0.2)
  assert np.bincount(y[a][val]).tolist() == [2, 2, 2]
  assert not set(fit) & set(val) and len(fit) + len(val) == 30


def test_learning_rate_lives_in_the_optimizer_state():
  params = {"w": jnp.zeros(3)}
  tx = bench._INJECTED_ADAM(1e-3)
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  grads = {"w": jnp.ones(3)}
  for lr in (1e-3, 5e-2):
    updates, _ = step(grads, bench.set_learning_rate(state, lr))
    assert float(jnp.abs(updates["w"][0])) == pytest.approx(lr, rel=1e-3)
  assert step._cache_size() == 1  # one program for both learning rates


def test_rows_before_the_model_flag_are_lite0s(tmp_path):
  path = tmp_path / "rows.jsonl"
  old = dict(kind="final", strategy="lora", per_class=100, seed=0, lr=3e-3, steps=60,
             image_size=128)
  path.write_text(json.dumps({**old, "acc": 0.76}) + "\n")  # written without "model"
  results = bench.Results(path)
  assert results.get(**old, model="efficientnet_lite0")["acc"] == 0.76
  assert results.get(**old, model="efficientnet_lite1") is None


def test_the_rate_is_picked_by_its_mean_over_the_sweep_seeds(tmp_path):
  results = bench.Results(tmp_path / "rows.jsonl")
  common = dict(kind="sweep", strategy="lp_ft", per_class=100, steps=20, image_size=128,
                model="efficientnet_lite0")
  for seed, accs in {0: (0.90, 0.80), 1: (0.60, 0.78), 2: (0.62, 0.79)}.items():
    for lr, acc in zip((1e-4, 3e-5), accs):
      results.add({**common, "seed": seed, "lr": lr, "acc": acc})
  results.add({**common, "seed": 0, "lr": 1e-3, "acc": 0.99})  # not swept on seeds 1 and 2
  sweep = dict(per_class=100, steps=20, image_size=128)
  assert bench.best_lrs(results, ["lp_ft"], **sweep)["lp_ft"] == (1e-3, 0.99)  # seed 0 alone
  lr, mean = bench.best_lrs(results, ["lp_ft"], seeds=(0, 1, 2), **sweep)["lp_ft"]
  assert lr == 3e-5 and mean == pytest.approx(0.79)  # 1e-4 wins seed 0 but not the mean
  assert bench.sweep_means(results, "lp_ft", seeds=(0, 1), **sweep) == {
      1e-4: [0.90, 0.60], 3e-5: [0.80, 0.78]}


def test_labelled_subset_names_the_smallest_class():
  y = np.array([0] * 12 + [1] * 8)
  with pytest.raises(SystemExit, match="smallest training class has 8"):
    bench.labelled_subset(y, 10, 0)


folders = load_file(ROOT / "scripts" / "benchmarks" / "make_small_folders.py")


def test_small_folders_round_trip_through_load_folder(tmp_path):
  images, labels, names = folders.digits()
  assert images.shape == (1797, 8, 8) and images.max() == 255 and len(names) == 10
  parts = folders.split(labels, 50)
  assert np.bincount(labels[parts["test"]]).tolist() == [50] * 10
  assert not set(parts["test"]) & set(parts["train"]) and len(parts["train"]) == 1297
  assert np.array_equal(parts["test"], folders.split(labels, 50)["test"])  # fixed seed
  few = np.concatenate([np.flatnonzero(labels == c)[:3] for c in (0, 7)])
  counts = folders.write_folder(tmp_path, images[few], labels[few], names, 1)
  assert counts == {"train": 4, "test": 2}
  x, y = bench.load_folder(tmp_path, "train", None)
  assert x.shape == (4, 8, 8, 3) and y.tolist() == [0, 0, 1, 1]  # classes "0", "7" in order
  train_idx = few[folders.split(labels[few], 1)["train"]]
  assert np.array_equal(x[..., 0], images[train_idx])  # lossless PNG, grey -> RGB
  (tmp_path / "val").mkdir()
  with pytest.raises(SystemExit, match="no class folders"):
    bench.load_folder(tmp_path, "val", None)


def test_the_report_marks_which_test_rows_validation_picked(tmp_path, capsys):
  results = bench.Results(tmp_path / "rows.jsonl")
  same = dict(per_class=10, image_size=64, model="efficientnet_lite0", head_lr=1e-2,
              trainable=5, seconds=1.0)
  for lr, acc in ((1e-3, 0.7), (3e-3, 0.6)):
    results.add({"kind": "sweep", "strategy": "full", "seed": 0, "lr": lr, "steps": 20,
                 "acc": acc, **same})
  for lr, acc in ((1e-3, 0.5), (3e-3, 0.9)):  # the better test row was not picked
    results.add({"kind": "final", "strategy": "full", "seed": 0, "lr": lr, "steps": 40,
                 "acc": acc, **same})
  args = type("Args", (), dict(image_size=64, model="efficientnet_lite0", sweep_per_class=10,
                               val_fraction=0.2, sweep_steps=20, test_per_class=None,
                               cifar_dir="cifar", per_class="10", sweep_seeds="0"))
  bench.image_report(results, args, ["full"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| full")]
  picks = {row.split("|")[4].strip(): row.split("|")[-2].strip() for row in rows if "%" in row
           and row.count("|") > 8}
  assert picks == {"0.001": "yes", "0.003": "NO (not a result)"}
