"""scripts/benchmarks/benchmark_text.py's batching and draws, without a model:
length-bucketed batches cover every snippet once, in few shapes."""

import sys

import numpy as np
from app_helpers import ROOT, load_file

SCRIPTS = ROOT / "scripts" / "benchmarks"
sys.path.insert(0, str(SCRIPTS))
bench = load_file(SCRIPTS / "benchmark_text.py")


def token_data(lengths, width=128):
  mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = mask * (np.arange(len(lengths))[:, None] + 1000)  # row i holds token 1000+i
  inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
  return inputs, np.arange(len(lengths), dtype=np.int32) % 2


def test_eval_batches_cover_every_snippet_once_in_few_shapes():
  lengths = [5, 70, 12, 33, 17, 9, 50]
  inputs, labels = token_data(lengths)
  batches = list(bench.eval_batches(inputs, labels, 3, 16))
  seen = np.concatenate([b["inputs"]["input_ids"][b["mask"], 0] - 1000 for b in batches])
  assert sorted(seen.tolist()) == list(range(len(lengths)))
  widths = [b["inputs"]["input_ids"].shape[1] for b in batches]
  assert widths == [16, 64, 80]  # sorted by length: 5,9,12 | 17,33,50 | 70 (+ 2 masked)
  for b in batches:  # no real token is cut
    assert b["inputs"]["attention_mask"].sum() == sum(
        lengths[i] for i in b["inputs"]["input_ids"][:, 0] - 1000)
  assert batches[-1]["mask"].tolist() == [True, False, False]


def test_train_batches_are_full_shuffled_epochs():
  inputs, labels = token_data([3, 20, 40, 7, 9, 100, 64])
  it = bench.train_batches(inputs, labels, 3, seed=0, multiple=16)
  epoch = [next(it) for _ in range(2)]  # 7 // 3 full batches per epoch
  rows = np.concatenate([b["inputs"]["input_ids"][:, 0] - 1000 for b in epoch])
  assert len(set(rows.tolist())) == 6
  assert all(b["inputs"]["input_ids"].shape[1] % 16 == 0 for b in epoch)


def test_each_seed_draws_its_own_labelled_snippets():
  a, b = bench.draw_labelled(1000, 50, 0), bench.draw_labelled(1000, 50, 1)
  assert len(set(a.tolist())) == 50 and not np.array_equal(a, b)
  np.testing.assert_array_equal(a, bench.draw_labelled(1000, 50, 0))
