"""The README's first Python example runs as written."""

import re
from pathlib import Path

import numpy as np


def test_readme_python_api_example_runs(capsys):
  text = (Path(__file__).parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  out = capsys.readouterr().out
  assert "trainable:" in out and "head" in out
  assert np.isfinite(float(namespace["metrics"]["loss"]))
