"""The README's Python examples run as written: Linen, NNX and a plain apply
function through the same calls."""

import re
from pathlib import Path

import numpy as np


def _blocks():
  text = (Path(__file__).parents[1] / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_api_example_runs(capsys):
  namespace = {}
  exec(compile(_blocks()[0], "README.md", "exec"), namespace)  # noqa: S102
  out = capsys.readouterr().out
  assert "trainable:" in out and "head" in out
  assert np.isfinite(float(namespace["metrics"]["loss"]))


def test_readme_nnx_and_apply_function_examples_run():
  nnx_block, fn_block = _blocks()[1:3]
  assert "nnx.Module" in nnx_block and "apply_fn" in fn_block
  namespace = {}
  exec(compile(nnx_block, "README.md", "exec"), namespace)  # noqa: S102
  model, state = namespace["model"], namespace["state"]
  np.testing.assert_array_equal(model.head.kernel.value, state.params["head"]["kernel"])
  np.testing.assert_array_equal(model.backbone.kernel.value,
                                state.params["backbone"]["kernel"])  # frozen, written back
  assert np.isfinite(float(namespace["metrics"]["loss"]))
  namespace = {}
  exec(compile(fn_block, "README.md", "exec"), namespace)  # noqa: S102
  trained = namespace["state"].params
  assert np.abs(trained["head"]["w"]).sum() > 0  # the head moved from zeros
  np.testing.assert_array_equal(trained["body"]["w"], np.float32(0.1))  # the frozen body did not
