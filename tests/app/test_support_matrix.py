"""The support matrix (tests/support_matrix.py): the README's table is the
generated one, and a covering subset of the cells runs through the app path
(every family, strategy config, API, export and refusal reason at least
once); scripts/benchmarks/benchmark_support_matrix.py runs every cell."""

import re
from pathlib import Path

import pytest

import support_matrix as sm
from jtl import models
from jtl.app import preflight

README = Path(__file__).parents[2] / "README.md"

# (family, strategy config, api, exports): each cell also runs evaluate's path.
COVER = [  # the heavy exports (int8 calibration, LiteRT) on the smallest model
    ("small_cnn", "strategy.py:full", "nnx", ["orbax", "hf", "onnx", "tflite", "tflite_int8"]),
    ("small_cnn", "strategy.py:lora", "nnx", []),
    ("small_cnn", "strategy.py:lora", "linen", ["peft"]),  # no HF/timm layout: --format peft
    ("small_cnn", "strategy.py:scratch", "linen", []),
    ("small_cnn", "strategy.py:gradual", "linen", []),
    ("small_cnn", "strategy.py:partial", "linen", []),
    ("small_cnn", "full.py", "linen", []),
    ("small_cnn", "linear_probe.py", "linen", ["peft"]),
    ("small_cnn", "default.py", "linen", []),
    ("resnet", "partial.py", "linen", []),
    ("resnet", "strategy.py:lora", "linen", ["peft", "hf"]),
    ("resnet", "strategy.py:bitfit", "nnx", []),  # statistics kept: FrozenStatisticsModel
    ("vgg", "strategy.py:bitfit", "linen", ["tflite"]),  # a 1x1 map before the pool
    ("mobilenet_v2", "strategy.py:partial", "linen", []),
    ("efficientnet_lite", "strategy.py:linear_probe", "linen", []),
    ("vit", "strategy.py:lp_ft", "nnx", ["hf"]),
    ("dinov2", "strategy.py:linear_probe", "linen", ["hf"]),
    ("bert", "strategy.py:llrd", "linen", ["onnx", "hf"]),
]


def test_the_subset_covers_every_axis_and_refusal():
  assert {c[0] for c in COVER} == set(sm.FAMILIES)
  assert {c[1] for c in COVER} == set(sm.STRATEGIES)
  assert {c[2] for c in COVER} == set(sm.APIS)
  assert {e for c in COVER for e in c[3]} == set(sm.EXPORTS)
  reasons = {sm.expected(f, s, a, e) for f in sm.FAMILIES for s in sm.STRATEGIES
             for a in sm.APIS for e in (None, *sm.EXPORTS)} - {sm.WORKS}
  covered = {sm.expected(f, s, a, e) for f, s, a, exports in COVER for e in (None, *exports)}
  assert reasons and reasons <= covered, reasons - covered


def test_readme_table_is_the_generated_one():
  text = README.read_text()
  found = re.search(r"<!-- support-matrix -->\n(.*?)\n<!-- /support-matrix -->", text, re.S)
  assert found, "README.md has no <!-- support-matrix --> block"
  assert found.group(1) == sm.readme_table(), (
      "README.md's support matrix differs from tests/support_matrix.py: paste "
      "support_matrix.readme_table() between the markers")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  return sm.make_image_folder(tmp_path_factory.mktemp("matrix") / "images")


def _marked(cell: tuple) -> object:
  """The cells that train are `slow` (make test-all runs them): the default
  suite keeps every refusal (each is raised before training)."""
  family, strategy, api, _ = cell
  heavy = sm.expected(family, strategy, api, None) == sm.WORKS
  return pytest.param(*cell, marks=pytest.mark.slow) if heavy else cell


@pytest.mark.parametrize("family,strategy,api,exports", [_marked(c) for c in COVER],
                         ids=["-".join(c[:3]) for c in COVER])
def test_cell(family, strategy, api, exports, images, tmp_path):
  workdir = tmp_path / "run"
  error = None
  try:
    sm.run_training(family, strategy, api, workdir, images)
  except Exception as e:  # the expected outcome decides: a ConfigError may be the claim
    error = e
  observed, want = sm.outcome(error, workdir), sm.expected(family, strategy, api, None)
  assert sm.agrees(observed, want), f"{observed} (expected {want})"
  for export in exports if error is None else ():
    try:
      sm.run_export(export, workdir)
      seen = sm.WORKS
    except Exception as e:  # pylint: disable=broad-except
      seen = sm.outcome(e, workdir, training=False)
    want = sm.expected(family, strategy, api, export)
    assert sm.agrees(seen, want), f"{export}: {seen} (expected {want})"


def test_model_kwargs_set_the_sizes_model_options_lists():
  # model_options offered small_cnn's `width` and a ViT's `depth` etc., and
  # building with them raised "got multiple values for keyword argument".
  spec = models.get_spec("small_cnn")
  assert spec.build(num_classes=3, width=8).width == 8
  assert spec.build(num_classes=3).width == 32
  vit = models.get_spec("vit_ti16")
  assert {"depth", "width", "mlp_dim", "num_heads"} <= set(preflight.model_options(vit))
  small = vit.build(num_classes=3, depth=2, width=64, mlp_dim=128, num_heads=2)
  assert (small.depth, small.width, small.mlp_dim, small.num_heads) == (2, 64, 128, 2)
  assert vit.build(num_classes=3).depth == 12


def test_inference_fn_takes_a_text_models_token_dict():
  # evaluate.py on a BERT run raised "entry not a 2- or 3- tuple": the float32
  # predictor cast the dict of token ids to float.
  import jax
  import numpy as np
  from jtl.export import quantize
  from jtl.models import bert
  module = bert.Bert(num_classes=3, config=bert.BertConfig(
      vocab_size=128, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))
  batch = bert.example_input(2)
  variables = module.init(jax.random.PRNGKey(0), batch, train=False)
  want = np.asarray(module.apply(variables, batch, train=False))
  for precision in ("float32", "bfloat16"):
    got = quantize.make_inference_fn(module, variables, precision=precision)(batch)
    assert got.shape == (2, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.05 if precision == "bfloat16" else 1e-5)
