"""scripts/benchmarks/benchmark_distill.py's data handling, without the
dataset: the stratified validation split and the on-device augmentation that
teacher and student share (same seed -> same batches, for both students)."""

import jax.numpy as jnp
import numpy as np
from app_helpers import ROOT, load_file

bench = load_file(ROOT / "scripts" / "benchmarks" / "benchmark_distill.py")


def test_validation_split_holds_out_a_tenth_of_every_class():
  y = np.repeat(np.arange(4), [50, 30, 20, 10])
  train, val = bench.split_validation(y, 0.1, seed=0)
  assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == len(y)
  np.testing.assert_array_equal(np.bincount(y[val]), [5, 3, 2, 1])
  np.testing.assert_array_equal(val, bench.split_validation(y, 0.1, seed=0)[1])


def test_batches_are_a_function_of_the_seed_and_stay_images():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
  labels = jnp.asarray(np.arange(40) % 10, jnp.int32)
  first, second = (bench.batches(images, labels, batch_size=16, seed=3) for _ in range(2))
  a = [next(first) for _ in range(3)]
  b = [next(second) for _ in range(3)]
  c = next(bench.batches(images, labels, batch_size=16, seed=4))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["inputs"], c["inputs"])
  x = np.asarray(a[0]["inputs"])
  assert x.shape == (16, 8, 8, 3) and 0.0 <= x.min() and x.max() <= 1.0
