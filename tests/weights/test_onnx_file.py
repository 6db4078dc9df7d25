"""jtl's own ONNX initializer reader (jtl.weights.onnx_file): the arrays the
`onnx` package wrote, in every storage it uses, and bad files refused."""

from __future__ import annotations

import numpy as np
import pytest

from jtl.errors import CheckpointError
from jtl.weights import onnx_file, read

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402


def _model(tensors):
  x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
  graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
                            initializer=tensors)
  return helper.make_model(graph)


def test_reads_what_onnx_wrote(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"conv/w": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
            "half": rng.standard_normal(5).astype(np.float16),
            "f64": rng.standard_normal((2, 2)),
            "scalar": np.array(-0.4, np.float32)}
  tensors = [numpy_helper.from_array(a, n) for n, a in arrays.items()]  # raw_data
  # Typed repeated fields instead of raw_data (what some exporters write).
  tensors.append(helper.make_tensor("shape", onnx.TensorProto.INT64, [3], [-1, 1, 76]))
  tensors.append(helper.make_tensor("floats", onnx.TensorProto.FLOAT, [2, 2], [1.5, 2, 3, 4]))
  path = tmp_path / "m.onnx"
  onnx.save(_model(tensors), path)
  got = read(path)
  arrays.update(shape=np.array([-1, 1, 76]), floats=np.array([[1.5, 2], [3, 4]], np.float32))
  assert sorted(got) == sorted(arrays)
  for name, want in arrays.items():
    assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
    np.testing.assert_array_equal(got[name], want)


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def test_bad_files_are_refused(tmp_path):
  path = tmp_path / "m.onnx"
  onnx.save(_model([numpy_helper.from_array(np.ones(1000, np.float32), "w")]), path)
  blob = path.read_bytes()
  (tmp_path / "cut.onnx").write_bytes(blob[:len(blob) // 2])
  with pytest.raises(CheckpointError, match="cut.onnx"):
    read(tmp_path / "cut.onnx")
  # Dims asking for 2**40 floats over 4 bytes of data: refused before allocating.
  dims = bytes([0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20])  # dims: [2**40] as a varint
  tensor = dims + bytes([0x10, 1]) + onnx_file._field(8, b"w") + onnx_file._field(9, b"\0" * 4)
  huge = onnx_file._field(7, onnx_file._field(5, tensor))
  (tmp_path / "huge.onnx").write_bytes(huge)
  with pytest.raises(CheckpointError, match="limit"):
    read(tmp_path / "huge.onnx")
  # Dims whose product wraps around in int64 ([2**62 + 1, 4] -> 4 elements).
  wrap = b"".join(bytes([0x08]) + _varint(d) for d in (2**62 + 1, 4))
  tensor = wrap + bytes([0x10, 1]) + onnx_file._field(8, b"w") + onnx_file._field(9, b"\0" * 16)
  (tmp_path / "wrap.onnx").write_bytes(onnx_file._field(7, onnx_file._field(5, tensor)))
  with pytest.raises(CheckpointError, match="limit"):
    read(tmp_path / "wrap.onnx")
  external = helper.make_tensor("e", onnx.TensorProto.FLOAT, [1], [0.0])
  external.data_location = onnx.TensorProto.EXTERNAL
  onnx.save(_model([external]), tmp_path / "ext.onnx")
  with pytest.raises(CheckpointError, match="external"):
    read(tmp_path / "ext.onnx")
  (tmp_path / "empty.onnx").write_bytes(bytes([0x08, 7]))
  with pytest.raises(CheckpointError, match="no ONNX graph"):
    read(tmp_path / "empty.onnx")
