"""What the app-level tests share: the repository root, configs and scripts
loaded by path, a runner for scripts/*.py in a fresh process, small photo
folders and the default config with model options."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_file(path, name=None):
  """Imports the .py file at `path` afresh (scripts, benchmarks and configs are
  no packages) under `name` (default: the file's stem); returns the module."""
  spec = importlib.util.spec_from_file_location(name or Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name, arg=None):
  """configs/<name>.py's get_config(arg) (get_config() without an arg)."""
  module = load_file(ROOT / "configs" / f"{name}.py")
  return module.get_config(arg) if arg is not None else module.get_config()


def run_script(name, *args, cwd=ROOT, env=None, timeout=300):
  """Runs scripts/<name> (a path under scripts/, e.g. "benchmarks/x.py") with
  `args` in a fresh process on the CPU, with `env` added to this process's
  environment; returns the CompletedProcess (stdout and stderr as text)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def colour_photos(root, classes, counts, size=(20, 24), name="{i}.png"):
  """root/<split>/<class>/<name>: counts[split] photos per class, each class
  its own colour (channel c of class c is bright), so a small CNN learns them
  in a few steps. `name` is formatted with the index i; returns root."""
  rng = np.random.default_rng(0)
  for split, n in counts.items():
    for c, label in enumerate(classes):
      (root / split / label).mkdir(parents=True)
      for i in range(n):
        x = rng.integers(0, 60, (*size, 3))
        x[..., c] += 180
        Image.fromarray(x.astype(np.uint8)).save(root / split / label / name.format(i=i))
  return root


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
