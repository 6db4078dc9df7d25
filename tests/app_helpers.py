"""What the app-level tests share: the repository root, a runner for
scripts/*.py in a fresh process, a small photo folder and the default config
with model options."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args, cwd=ROOT):
  """Runs scripts/<name> with `args` on the CPU; returns the CompletedProcess."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                        capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def photo_folder(root):
  """root/{train,test}/{cat,dog}/{0,1}.jpg: 40x40 random photos; returns root."""
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      (root / split / name).mkdir(parents=True)
      for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(
            root / split / name / f"{i}.jpg")
  return root


def config_with(**model_kwargs):
  """configs/default.py for a photo folder's train/test splits, with `model_kwargs`."""
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.num_classes = 10  # no dataset read
  c.train_split, c.eval_split = "train", "test"  # what the tests' photo folders hold
  c.model_kwargs = model_kwargs
  return c
