"""`import jtl` loads neither TensorFlow nor TFDS, nor the model zoo, prints nothing,
hides no devices.

Each check runs in a fresh interpreter: this test process has TensorFlow loaded
by other tests already. Timings are measured by scripts/benchmarks/benchmark_import.py.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import jtl

# The modules that import TensorFlow/TFDS when they are imported: the pipeline
# itself and what only it (or an explicit import) loads.
TF_MODULES = {"jtl.data.pipeline", "jtl.data.images", "jtl.data.augment", "jtl.data.builders"}
HEAVY = ("tensorflow", "tensorflow_datasets", "keras", "tf_keras")
# The packages `import jtl` leaves to first use (`jtl.create`, `jtl.load_pretrained`,
# `jtl.data`): the zoo's every family, the weight readers, the input pipelines.
LAZY_PACKAGES = ("jtl.models", "jtl.weights", "jtl.data")


def _modules_without_tf() -> list[str]:
  names = [m.name for m in pkgutil.walk_packages(jtl.__path__, "jtl.")]
  return sorted(n for n in names if not any(n == t or n.startswith(t + ".") for t in TF_MODULES))


def _run(code: str) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # let TensorFlow print if it is imported
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, timeout=300, check=False)


PROBE = """
import json, sys
heavy = {heavy!r}
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in heavy)
import jtl
after_jtl = loaded(), sorted(m for m in sys.modules if m.split(".")[0] == "orbax")
lazy = sorted(m for m in sys.modules if m.startswith({lazy!r}))
from jtl import create, load_pretrained, models
import jtl.models.efficientnet
same = [create is jtl.models.create, load_pretrained is jtl.weights.load_pretrained,
        models is jtl.models, jtl.models.efficientnet is sys.modules["jtl.models.efficientnet"]]
for name in {modules!r}:
  __import__(name)
with open({out!r}, "w") as f:
  json.dump({{"jtl": after_jtl[0], "orbax": after_jtl[1], "all": loaded(), "lazy": lazy,
             "same": same}}, f)
"""


def test_import_jtl_and_core_modules_load_no_tensorflow_and_print_nothing(tmp_path):
  modules = _modules_without_tf()
  assert {"jtl.models", "jtl.weights.readers", "jtl.partition", "jtl.train",
          "jtl.data.sources"} <= set(modules)
  out = tmp_path / "loaded.json"
  result = _run(PROBE.format(heavy=HEAVY, lazy=LAZY_PACKAGES, modules=modules, out=str(out)))
  assert result.returncode == 0, result.stderr
  assert (result.stdout, result.stderr) == ("", "")
  loaded = json.loads(out.read_text())
  assert loaded["jtl"] == [], "`import jtl` imported " + ", ".join(loaded["jtl"][:5])
  assert loaded["orbax"] == [], "`import jtl` imported orbax; load it on first use"
  assert loaded["lazy"] == [], "`import jtl` imported " + ", ".join(loaded["lazy"][:5])
  assert loaded["same"] == [True, True, True, True]
  assert loaded["all"] == [], ("importing jtl's modules (but the pipeline's) imported "
                               + ", ".join(loaded["all"][:5]))


BUILD = """
import json, sys
import numpy as np
import jtl
before = "tensorflow" in sys.modules
data = {"test": {"image": np.zeros((10, 4, 4, 3), np.uint8), "label": np.arange(10) % 3}}
batches = list(jtl.make_dataset(data, split="test", batch_size=4, train=False, image_size=2))
import tensorflow as tf
print(json.dumps({
    "tf_before": before, "tf_after": "tensorflow" in sys.modules,
    "masks": [int(b["mask"].sum()) for b in batches],
    "shape": list(batches[0]["inputs"].shape),
    "tf_gpus": len(tf.config.get_visible_devices("GPU")),
    "same": jtl.make_dataset is jtl.data.make_dataset,
    "missing": [n for n in jtl.__all__ + ["jtl.data." + n for n in jtl.data.__all__]
                if not hasattr(jtl.data if n.startswith("jtl.data.") else jtl,
                               n.removeprefix("jtl.data."))],
    "dir": sorted(set(jtl.__all__) - set(dir(jtl))) + sorted(
        set(jtl.data.__all__) - set(dir(jtl.data))),
    "extra": sorted(n for n in dir(jtl) if not n.startswith("_") and n not in jtl.__all__),
}))
"""


def test_make_dataset_imports_tensorflow_when_it_builds_a_pipeline():
  result = _run(BUILD)
  assert result.returncode == 0, result.stderr
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got == {"tf_before": False, "tf_after": True, "masks": [4, 4, 2],
                 "shape": [4, 2, 2, 3], "tf_gpus": 0, "same": True, "missing": [],
                 "dir": [], "extra": []}
