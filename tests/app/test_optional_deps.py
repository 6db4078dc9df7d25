"""The core works without the extras: `import jtl` and a fine-tuning run with
checkpoints, in a process where TensorFlow, TFDS, the Hub client, tokenizers,
matplotlib, tensorboardX, ml-collections, pillow and the deploy runtimes
cannot be imported; features that need an extra name it.

A real venv with only the core would take minutes to install; hiding those
packages from every sys.meta_path finder (they are then not found, as if not
installed) is the same environment for jtl's imports. absl-py is not blocked: flax imports it and
orbax-checkpoint, a core dependency, requires it.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jtl import _optional
from jtl.errors import JtlError, MissingExtraError

_BLOCKED = ("tensorflow", "tensorflow_datasets", "huggingface_hub", "tokenizers", "matplotlib",
            "tensorboardX", "ml_collections", "PIL", "importlib_resources", "onnx", "onnx_ir",
            "onnxruntime", "ai_edge_litert", "jax2onnx")

_SCRIPT = r'''
import importlib.abc, json, sys
BLOCKED = set(sys.argv[2].split(","))

class Hidden(importlib.abc.MetaPathFinder):
  """Finds what `finder` finds, except the blocked packages: as if not installed."""
  def __init__(self, finder):
    self.finder = finder
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      return None
    return self.finder.find_spec(name, path, target)
  def __getattr__(self, attr):
    return getattr(self.finder, attr)

assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
import jtl

class Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Dense(2, name="head")(nn.relu(nn.Dense(32, name="backbone")(x)))

module = Net()
variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 16)))
labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "frozen")])
tx = jtl.make_optimizer(labels, learning_rate=0.05, optimizer="adam")
x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int32)
data = lambda start: ({"inputs": x[i % 4 * 16:(i % 4 + 1) * 16],
                       "label": y[i % 4 * 16:(i % 4 + 1) * 16]} for i in range(start, 40))
result = jtl.train.fit(module=module, variables=variables, labels=labels, tx=tx,
                       train_batches=data, num_steps=40, workdir=sys.argv[1],
                       checkpoint_every=20, log_every=5, async_checkpoints=False)
params = result.state.params
accuracy = lambda p: float((module.apply({"params": p}, x).argmax(-1) == y).mean())

errors = {}
for name, call in [("data", lambda: jtl.data.make_dataset),
                   ("hub", lambda: jtl.weights.read("hf://owner/repo/model.safetensors")),
                   ("app", lambda: __import__("jtl.app"))]:
  try:
    call()
    errors[name] = None
  except Exception as e:
    errors[name] = [type(e).__name__, isinstance(e, jtl.JtlError), str(e)]
print(json.dumps({
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    "backbone_kept": bool(np.array_equal(params["backbone"]["kernel"],
                                         variables["params"]["backbone"]["kernel"])),
    "accuracy": [accuracy(variables["params"]), accuracy(params)],
    "errors": errors}))
'''


def test_core_imports_and_fine_tunes_without_the_extras(tmp_path):
  out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path), ",".join(_BLOCKED)],
                       capture_output=True, text=True, timeout=300, check=False,
                       cwd=Path(__file__).parents[2])
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["imported"] == []
  assert got["backbone_kept"]
  before, after = got["accuracy"]
  assert after >= 0.8 and after > before + 0.2, got["accuracy"]
  # The run's files: metrics and checkpoints, no TensorBoard or plot (their packages are absent).
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [5, 10, 15, 20, 25, 30, 35, 40]
  assert (tmp_path / "checkpoints" / "40").is_dir()
  assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "curves.png").exists()
  # Each optional feature names its extra.
  for extra, package in [("data", "TensorFlow"), ("hub", "huggingface_hub"),
                         ("app", "ml-collections")]:
    kind, is_jtl_error, message = got["errors"][extra]
    assert kind == "MissingExtraError" and is_jtl_error, (extra, got["errors"][extra])
    assert f"pip install 'jtl[{extra}]'" in message and package in message, message


def test_require_names_the_extra_and_keeps_other_import_errors(tmp_path, monkeypatch):
  assert _optional.message("tensorflow_datasets", "TFDS datasets") == (
      "TFDS datasets: TensorFlow Datasets is not installed. "
      "Install it with `pip install 'jtl[data]'`.")
  # LiteRT export needs TensorFlow from the deploy extra.
  assert "pip install 'jtl[deploy]'" in _optional.message("tensorflow", "LiteRT export", "deploy")
  error = pytest.raises(MissingExtraError, _optional.require, "no_such_module_jtl", "X").value
  assert isinstance(error, JtlError) and isinstance(error, ImportError)
  assert str(error) == "X: no_such_module_jtl is not installed. Install it with " \
      "`pip install no_such_module_jtl`."
  # An installed package whose own import fails is not renamed into a missing extra.
  (tmp_path / "brokenpkg_jtl").mkdir()
  (tmp_path / "brokenpkg_jtl" / "__init__.py").write_text("import dependency_absent_jtl\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError) as info:
    _optional.require("brokenpkg_jtl", "X")
  assert not isinstance(info.value, MissingExtraError)
  assert info.value.name == "dependency_absent_jtl"
  assert _optional.available("json") and not _optional.available("no_such_module_jtl")


def _optional_imports(path: Path) -> list[str]:
  """'file:line module' for each import statement of an optional package
  (outside `if TYPE_CHECKING:`)."""
  tree = ast.parse(path.read_text())
  typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
  found = []
  for node in ast.walk(tree):
    if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
             else [node.module or ""] if node.level == 0 else [])
    found += [f"{path.name}:{node.lineno} {n}" for n in names
              if n.split(".")[0] in _optional.PACKAGES]
  return found


def test_core_and_recipes_import_optional_packages_only_through_require(tmp_path):
  """So that every missing extra is named: jtl.app checks its extra at import."""
  root = Path(__file__).parents[2] / "jtl"
  found = [f for path in sorted(root.rglob("*.py")) if "app" not in path.relative_to(root).parts
           for f in _optional_imports(path)]
  assert found == []
  sample = tmp_path / "sample.py"
  sample.write_text("import tensorflow as tf\nif TYPE_CHECKING:\n  import tokenizers\n"
                    "def f():\n  from PIL import Image\n  import json\n")
  assert _optional_imports(sample) == ["sample.py:1 tensorflow", "sample.py:5 PIL"]
