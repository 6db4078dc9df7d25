"""scripts/convert.py: the real EfficientNet-Lite0 .pth into npz and Orbax."""

import re

import numpy as np
from app_helpers import run_script

from jtl.weights import read

def test_convert_real_weights_to_orbax(tmp_path):
  # One subprocess (npz/safetensors/msgpack writing is covered by test_writers.py).
  for out, fmt in [(tmp_path / "lite0_orbax", ["--format=orbax"])]:
    result = run_script("convert.py", "--model=efficientnet_lite0",
                        "--source=efficientnet_lite0/imagenet", f"--out={out}", *fmt, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"loaded +247", result.stdout), result.stdout
    assert re.search(r"missing +0", result.stdout) and re.search(r"mismatched +0", result.stdout)
  orbax = read(tmp_path / "lite0_orbax")
  assert len(orbax) == 247 and orbax["params/head/kernel"].shape == (1280, 1000)
  # The converted stem kernel is the .pth's OIHW kernel in HWIO layout.
  pth = read(_pth())
  np.testing.assert_array_equal(orbax["params/stem/conv/kernel"],
                                pth["_conv_stem.weight"].transpose(2, 3, 1, 0))


def _pth():
  from jtl.weights import resolve
  return resolve("efficientnet_lite0/imagenet")
