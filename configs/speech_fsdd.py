"""Speech: Google's speech_embedding keyword-spotting model (real weights,
the ONNX file inside the pip package openwakeword 0.4.0, read by jtl; no
torch, no onnxruntime) fine-tuned to recognise spoken digits, on the Free
Spoken Digit Dataset (3,000 real recordings: 6 speakers x 10 digits x 50).

FSDD is not shipped by a package: clone
github.com/Jakobovski/free-spoken-digit-dataset and pass its folder:

  python scripts/finetune.py --config configs/speech_fsdd.py \\
    --config.dataset=fsdd:/path/to/free-spoken-digit-dataset --workdir runs/speech

The dataset's own split: recordings 0-4 of each speaker and digit are the
test split, scored once after training; the best checkpoint is picked on a
validation split of 10% of the training recordings. The whole network trains
(the pretrained layers at a tenth of the head's rate); the front end
(16 kHz log-mel, openWakeWord's) has no weights. `--config.pretrained=False`
is the same run from random weights (BENCHMARKS.md compares the two).
"""

import ml_collections

from configs import default
from jtl.app import keys


def get_config(arg=None):
  c = default.get_config(arg)
  c.model = "speech_embedding"
  c.dataset = "fsdd:free-spoken-digit-dataset"
  c.train_split = "train[-val10%]"
  c.eval_split = "train[val10%]"
  c.test_split = "test"
  c.image_size = None
  c.batch_size = 32
  c.eval_batch_size = 100
  c.num_steps = 400
  c.eval_every = 100
  c.checkpoint_every = 100
  c.learning_rate = 3e-3
  c.warmup_steps = 20
  c.weight_decay = 1e-4
  c.clip_norm = 1.0
  c.strategy = keys.strategy_options("rules", rules=(
      (r"head/.*", "head"), (r".*", "backbone")))
  c.lr_multipliers = ml_collections.ConfigDict({"backbone": 0.1})
  # Image augmentations do not apply to audio; off.
  c.augment.crop = False
  c.augment.flip = False
  return c
