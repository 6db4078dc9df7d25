"""scripts/convert.py: the real EfficientNet-Lite0 .pth into npz and Orbax."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from jtl.checkpoint import read

SCRIPT = Path(__file__).parents[1] / "scripts" / "convert.py"


def test_convert_real_weights_to_npz_and_orbax(tmp_path):
  for out, fmt in [(tmp_path / "lite0.npz", []), (tmp_path / "lite0_orbax", ["--format=orbax"])]:
    result = subprocess.run([sys.executable, str(SCRIPT), "--model=efficientnet_lite0",
                             "--source=efficientnet_lite0/imagenet", f"--out={out}", *fmt],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"loaded +247", result.stdout), result.stdout
    assert re.search(r"missing +0", result.stdout) and re.search(r"mismatched +0", result.stdout)
  npz, orbax = read(tmp_path / "lite0.npz"), read(tmp_path / "lite0_orbax")
  assert sorted(npz) == sorted(orbax) and len(npz) == 247
  np.testing.assert_array_equal(npz["params/head/kernel"], orbax["params/head/kernel"])
  assert npz["params/head/kernel"].shape == (1280, 1000)
