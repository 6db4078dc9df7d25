"""Inference export: jit predict, jax.export round trip in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jtl.errors import CheckpointError
from jtl.models import efficientnet
from jtl.export import serving

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _small_model():
  model = efficientnet.EfficientNetLite(
      num_classes=5, stages=((1, 3, 1, 1, 16), (1, 5, 2, 6, 24)), top_channels=32)
  x = np.zeros((1, 32, 32, 3), np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  # Non-trivial statistics, so a wrong BN mode would show in the logits.
  variables = jax.tree.map(lambda a: a + 0.1, variables)
  return model, variables


def test_export_reloads_in_a_fresh_process(tmp_path):
  model, variables = _small_model()
  x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  expected = np.asarray(serving.make_predict_fn(model, variables)(x))
  np.testing.assert_allclose(expected, jax.jit(model.apply)(variables, x), atol=1e-6)
  path = tmp_path / "model.jax"
  serving.export_predict(model, variables, path, input_shape=(32, 32, 3))
  np.save(tmp_path / "x.npy", x)
  script = (
      "import sys, numpy as np\n"
      "from jtl.export.serving import load_exported\n"
      "p = load_exported(sys.argv[1])\n"
      "x = np.load(sys.argv[2])\n"
      "np.save(sys.argv[3], np.asarray(p(x)))\n"
      "np.save(sys.argv[4], np.asarray(p(x[:1])))\n")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"),
                  str(tmp_path / "y.npy"), str(tmp_path / "y1.npy")],
                 check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / "y1.npy"), expected[:1], atol=1e-5)


def test_fixed_batch_export_and_errors(tmp_path):
  model, variables = _small_model()
  path = tmp_path / "sub" / "fixed.jax"
  serving.export_predict(model, variables, path, batch_size=2, input_shape=(32, 32, 3))
  predict = serving.load_exported(path)
  x = np.ones((2, 32, 32, 3), np.float32)
  np.testing.assert_allclose(predict(x), jax.jit(model.apply)(variables, x), atol=1e-5)
  with pytest.raises(Exception):
    predict(np.ones((3, 32, 32, 3), np.float32))
  assert not [p for p in os.listdir(path.parent) if p.startswith(".tmp")]
  (tmp_path / "junk.jax").write_bytes(b"not an export")
  with pytest.raises(CheckpointError, match="junk.jax"):
    serving.load_exported(tmp_path / "junk.jax")
  with pytest.raises(CheckpointError, match="missing.jax"):
    serving.load_exported(tmp_path / "missing.jax")
