"""Hostile or damaged weight files and downloads: each is refused with a
CheckpointError that names the problem, or read as what it really holds."""

from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pytest

from jtl.errors import CheckpointError
from jtl.weights import read, resolve


def _npz_bytes(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


class _Server:
  """A local HTTP server answering {path: (body, content_length)}."""

  def __init__(self, files: dict):
    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 - the http.server name
        if self.path not in files:
          self.send_error(404)
          return
        body, length = files[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

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
