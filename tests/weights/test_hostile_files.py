"""Hostile or damaged weight files and downloads: each is refused with a
CheckpointError that names the problem, or read as what it really holds."""

from __future__ import annotations

import http.server
import io
import pickle
import struct
import threading
import zipfile

import msgpack
import numpy as np
import pytest
from flax import serialization

from jtl.errors import CheckpointError
from jtl.weights import formats, onnx_file, read, readers, resolve


def _npz_bytes(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


class _Server:
  """A local HTTP server answering {path: (body, content_length)}."""

  def __init__(self, files: dict):
    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 - the http.server name
        answer = files.get(self.path.split("?")[0], 404)
        if isinstance(answer, int):
          self.send_error(answer)
          return
        body, length = answer
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

      do_HEAD = do_GET  # noqa: N815

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_port}"
    threading.Thread(target=self.server.serve_forever, args=(0.02,),
                     daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def serve():
  servers = []

  def start(files):
    servers.append(_Server({k: (v, len(v)) if isinstance(v, bytes) else v
                            for k, v in files.items()}))
    return servers[-1].url

  yield start
  for s in servers:
    s.close()


def test_urls_with_the_same_file_name_get_their_own_cache_file(
    tmp_path, monkeypatch, serve):
  monkeypatch.setenv("JTL_CACHE_DIR", str(tmp_path / "cache"))
  url = serve({"/a/model.npz": _npz_bytes(w=np.zeros(2)),
               "/b/model.npz": _npz_bytes(w=np.ones(3))})
  np.testing.assert_array_equal(read(url + "/a/model.npz")["w"], np.zeros(2))
  np.testing.assert_array_equal(read(url + "/b/model.npz")["w"], np.ones(3))
  assert resolve(url + "/a/model.npz") != resolve(url + "/b/model.npz")


def test_a_download_cut_short_is_not_cached(tmp_path, monkeypatch, serve):
  monkeypatch.setenv("JTL_CACHE_DIR", str(tmp_path / "cache"))
  data = _npz_bytes(w=np.arange(1000.0))
  url = serve({"/m.npz": (data[:3000], len(data))})
  with pytest.raises(CheckpointError, match="cut short.*retry"):
    resolve(url + "/m.npz")
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_damaged_cached_download_says_to_delete_it(tmp_path, monkeypatch, serve):
  monkeypatch.setenv("JTL_CACHE_DIR", str(tmp_path / "cache"))
  url = serve({"/m.safetensors": b"\x10" + b"\x00" * 7 + b"{not json at all"})
  with pytest.raises(CheckpointError, match="cached by jtl: delete it"):
    read(url + "/m.safetensors")


# Pickle pieces for hand-built torch files (as a hostile writer would build them).
P = pickle


def _put(i: int) -> bytes:
  return P.LONG_BINPUT + struct.pack("<I", i)


def _get(i: int) -> bytes:
  return P.LONG_BINGET + struct.pack("<I", i)


def _ustr(text: str) -> bytes:
  raw = text.encode()
  return P.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _doublings(n: int, tuples: bool = False) -> bytes:
  """memo[n]: a list (tuple) of two memo[n-1]: 2**n leaves in O(n) bytes."""
  out = (P.EMPTY_TUPLE if tuples else P.EMPTY_LIST) + _put(0)
  for i in range(1, n + 1):
    pair = _get(i - 1) + _get(i - 1)
    out += (pair + P.TUPLE2 if tuples else P.MARK + pair + P.LIST) + _put(i)
  return out


def _torch_zip(path, pkl: bytes) -> None:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", P.PROTO + b"\x02" + pkl + P.STOP)


@pytest.mark.parametrize("use", ["encode", "key", "persistent_id"])
def test_pickle_memo_bombs_are_refused(tmp_path, use):
  n = 40  # 2**40 elements reached from a file of about 600 bytes
  if use == "encode":  # _codecs.encode(<shared list>, "latin1")
    value = (P.GLOBAL + b"_codecs\nencode\n" + _get(n) + _ustr("latin1")
             + P.TUPLE2 + P.REDUCE)
    pkl = _doublings(n) + P.EMPTY_DICT + _ustr("a") + value + P.SETITEM
  elif use == "key":  # a shared tuple as a dict key: hashing walks it all
    pkl = _doublings(n, tuples=True) + P.EMPTY_DICT + _get(n) + P.BININT1 + b"\x01"
    pkl += P.SETITEM
  else:  # an error message that would print the persistent id
    pkl = _doublings(n) + P.EMPTY_DICT + _ustr("a") + _get(n) + P.BINPERSID + P.SETITEM
  _torch_zip(tmp_path / "bomb.pt", pkl)
  with pytest.raises(CheckpointError, match="bomb.pt: more than 1000000 entries"):
    read(tmp_path / "bomb.pt")


@pytest.mark.parametrize("pkl, match", [
    (_doublings(3, tuples=True) + P.EMPTY_DICT + _get(3) + P.BININT1 + b"\x01"
     + P.SETITEM, "a dict key is a tuple"),
    (_doublings(3) + P.EMPTY_DICT + _ustr("a") + P.GLOBAL + b"_codecs\nencode\n"
     + _get(3) + _ustr("latin1") + P.TUPLE2 + P.REDUCE + P.SETITEM,
     "_codecs.encode of a list"),
    (P.EMPTY_DICT + _ustr("a") + P.EMPTY_LIST + P.DUP + P.APPEND + P.SETITEM,
     "DUP refused"),
    (P.EMPTY_LIST + _put(0) + _get(0) + P.APPEND, "changes a list after referring"),
])
def test_small_pickles_that_could_grow_are_refused(tmp_path, pkl, match):
  _torch_zip(tmp_path / "small.pt", pkl)
  with pytest.raises(CheckpointError, match=match):
    read(tmp_path / "small.pt")


def test_msgpack_containers_are_charged_to_the_budget(tmp_path, monkeypatch):
  monkeypatch.setattr(readers, "EXPANSION_FLOOR", 0)
  n = 100_000  # {"a": [{}] * n}: 100 KB that would become n Python dicts
  path = tmp_path / "flood.msgpack"
  path.write_bytes(b"\x81\xa1a\xdd" + n.to_bytes(4, "big") + b"\x80" * n)
  with pytest.raises(CheckpointError, match="flood.msgpack: a msgpack dict .* more than the limit"):
    read(path)
  monkeypatch.undo()
  ok = tmp_path / "ok.msgpack"
  ok.write_bytes(serialization.msgpack_serialize({"a": {"b": np.arange(3.0)}}))
  np.testing.assert_array_equal(read(ok)["a/b"], np.arange(3.0))


def _msgpack_array(name: str, value: np.ndarray) -> bytes:
  """{name: value} as flax's msgpack ext, the dtype spelled with its byte order."""
  raw = msgpack.packb((value.shape, value.dtype.str, value.tobytes()))
  return msgpack.packb({name: msgpack.ExtType(1, raw)})


@pytest.mark.parametrize("value", [
    np.array(["abc"]), np.array([1 + 2j]), np.zeros(2, "i4,f4"),
    np.array(["2024-01-01"], "datetime64[D]")], ids=["str", "complex", "struct", "datetime"])
@pytest.mark.parametrize("fmt", ["npz", "msgpack"])
def test_arrays_that_are_not_numbers_are_refused(tmp_path, fmt, value):
  path = tmp_path / f"w.{fmt}"
  if fmt == "npz":
    np.savez(path, x=value)
  else:
    path.write_bytes(_msgpack_array("x", value))
  with pytest.raises(CheckpointError, match=rf"w.{fmt}: .*'x'.* holds dtype .*bool, int"):
    read(path)


@pytest.mark.parametrize("fmt", ["npz", "msgpack"])
def test_big_endian_arrays_are_read_in_native_order(tmp_path, fmt):
  value = np.arange(4, dtype=">f4")
  path = tmp_path / f"w.{fmt}"
  if fmt == "npz":
    np.savez(path, x=value)
  else:
    path.write_bytes(_msgpack_array("x", value))
  got = read(path)["x"]
  assert got.dtype == np.dtype("=f4")
  np.testing.assert_array_equal(got, np.arange(4.0))


def _safetensors(path, header: bytes, data: bytes = b"", n: int | None = None) -> None:
  path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)


_W = b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


@pytest.mark.parametrize("header, match", [
    (b"{" + _W + b", " + _W + b"}", "names 'w' twice"),
    (b'{"__metadata__": [[], [], []], ' + _W + b"}", "__metadata__ is not an object of strings"),
    (b"{}", "without tensors"),
    (b'{"__metadata__": {"format": "pt"}}', "without tensors"),
], ids=["duplicate", "metadata_lists", "empty", "metadata_only"])
def test_safetensors_headers_that_are_refused(tmp_path, header, match):
  _safetensors(tmp_path / "w.safetensors", header, b"\0" * 4)
  with pytest.raises(CheckpointError, match=f"w.safetensors: .*{match}"):
    read(tmp_path / "w.safetensors")


def test_a_safetensors_header_above_the_bound_is_refused_before_parsing(
    tmp_path, monkeypatch):
  monkeypatch.setattr(formats, "_SAFETENSORS_HEADER_BYTES", 1024)
  meta = b'{"__metadata__": {"a": "' + b"x" * 2000 + b'"}, ' + _W + b"}"
  _safetensors(tmp_path / "w.safetensors", meta, b"\0" * 4)
  with pytest.raises(CheckpointError, match=r"declares 2\d+ bytes of JSON, more than the 1024"):
    read(tmp_path / "w.safetensors")
  small = b'{"__metadata__": {"a": "b"}, ' + _W + b"}"
  _safetensors(tmp_path / "ok.safetensors", small, b"\0\0\x80\x3f")
  assert read(tmp_path / "ok.safetensors")["w"].tolist() == [1.0]


def test_a_safetensors_header_longer_than_the_file_is_called_cut_short(tmp_path):
  _safetensors(tmp_path / "w.safetensors", b'{"w": {"dtype', n=10**15)
  with pytest.raises(CheckpointError, match="cut short"):
    read(tmp_path / "w.safetensors")


def _onnx(path, *tensors: bytes) -> None:
  graph = b"".join(onnx_file._field(5, t) for t in tensors)
  path.write_bytes(bytes([0x08, 7]) + onnx_file._field(7, graph))


def _onnx_tensor(name: str, dtype: int, fields: bytes) -> bytes:
  return fields + bytes([0x10, dtype]) + onnx_file._field(8, name.encode())


def test_onnx_packed_values_are_counted_and_charged_before_decoding(tmp_path, monkeypatch):
  monkeypatch.setattr(readers, "EXPANSION_FLOOR", 0)
  n = 100_000  # int32_data: n one-byte varints, which decode to n Python ints
  dims = bytes([0x08]) + onnx_file._varint_bytes(n)
  packed = onnx_file._field(5, b"\x01" * n)
  _onnx(tmp_path / "ints.onnx", _onnx_tensor("w", 6, dims + packed))
  with pytest.raises(CheckpointError, match="ints.onnx: decoding initializer 'w'"):
    read(tmp_path / "ints.onnx")
  assert read(tmp_path / "ints.onnx", max_expansion=None)["w"].sum() == n
  packed = onnx_file._field(7, b"\x01" * n)
  _onnx(tmp_path / "lie.onnx", _onnx_tensor("w", 7, bytes([0x08, 1]) + packed))
  monkeypatch.setattr(onnx_file, "_typed_values", None)  # never reached
  with pytest.raises(CheckpointError, match=rf"dims \[1\] \(1 values\) but holds {n}"):
    read(tmp_path / "lie.onnx")


def test_onnx_dims_and_names_are_checked(tmp_path):
  raw = onnx_file._field(9, b"\0" * 4)
  dims = onnx_file._field(1, b"\x01" * 1000)
  _onnx(tmp_path / "dims.onnx", _onnx_tensor("w", 1, dims + raw))
  with pytest.raises(CheckpointError, match="dims.onnx: .*more than 64 values"):
    read(tmp_path / "dims.onnx")
  one = _onnx_tensor("w", 1, bytes([0x08, 1]) + raw)
  _onnx(tmp_path / "twice.onnx", one, one)
  with pytest.raises(CheckpointError, match="twice.onnx: two initializers are named 'w'"):
    read(tmp_path / "twice.onnx")


def _orbax(path, tree, ocdbt: bool) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)).save(path, tree)


@pytest.mark.parametrize("ocdbt", [True, False], ids=["ocdbt", "files"])
def test_orbax_declared_sizes_must_fit_the_available_memory(tmp_path, monkeypatch, ocdbt):
  from jtl.weights import orbax_reader
  _orbax(tmp_path / "ck", {"z": np.zeros((64, 64), np.float32), "b": np.ones(3)}, ocdbt)
  monkeypatch.setattr(readers, "EXPANSION_FLOOR", 0)
  # Zero-heavy weights are tiny on disk (zstd): no bound on the disk's bytes refuses them.
  flat = read(tmp_path / "ck", max_expansion=0.5)
  assert flat["z"].shape == (64, 64) and not flat["z"].any() and flat["b"].tolist() == [1] * 3
  monkeypatch.setattr(orbax_reader, "_available_memory", lambda: 4096)
  with pytest.raises(CheckpointError, match=r"ck: the arrays to restore declare 16408 bytes, "
                                            r"more than the 4096 bytes of memory"):
    read(tmp_path / "ck")


def test_orbax_missing_chunk_is_named(tmp_path):
  _orbax(tmp_path / "ck", {"w": np.ones((4, 4), np.float32)}, ocdbt=False)
  (tmp_path / "ck" / "w" / "0.0").unlink()
  with pytest.raises(CheckpointError, match=r"ck: .*array 'w'.*chunk 0.0 is missing"):
    read(tmp_path / "ck")


def test_a_hub_server_error_is_reported_as_such(tmp_path, monkeypatch, serve):
  url = serve({"/org/repo/resolve/main/model.safetensors": 500})
  monkeypatch.setenv("HF_ENDPOINT", url)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
    monkeypatch.delenv(name, raising=False)
  hf_http = pytest.importorskip("huggingface_hub.utils._http")
  monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # no retry backoff
  with pytest.raises(CheckpointError, match="answered HTTP 500.*retry later") as e:
    read("hf://org/repo/model.safetensors")
  assert "cannot be reached" not in str(e.value)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_npz_with_two_members_of_one_name_is_refused(tmp_path):
  path = tmp_path / "twice.npz"
  with zipfile.ZipFile(path, "w") as zf:
    for value in (np.zeros(2), np.ones(2)):
      buf = io.BytesIO()
      np.save(buf, value)
      zf.writestr("w.npy", buf.getvalue())
  with pytest.raises(CheckpointError, match="twice.npz: the zip holds two members named 'w.npy'"):
    read(path)
