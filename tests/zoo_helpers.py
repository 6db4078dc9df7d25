"""Shared by the zoo tests (ResNet, VGG, ViT): the published key layouts built
by fixtures/zoo_layouts.py, the PyTorch reference outputs, a zero-filled
variable tree of a model's shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"


def _load_layouts():
  spec = importlib.util.spec_from_file_location("zoo_layouts", FIXTURES / "zoo_layouts.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


layouts = _load_layouts()
REF = np.load(FIXTURES / "zoo_reference.npz")


def zeros_like_model(model, x, **kw):
  """Zeros in the shapes `model.init(x, **kw)` would give, without running it."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, **kw))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
