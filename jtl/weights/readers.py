"""`read`: one function for every pretrained-checkpoint format.

The format is detected from the content (an Orbax directory, a zip of `.npy`
members, a torch zip archive, a pickle stream, a safetensors header, a msgpack
map; an ONNX model by its `.onnx` name: its initializers) and can be forced
with `format=`. The result is always a flat dict of
host numpy arrays: nested trees (Orbax, msgpack, npz) are keyed by "/"-joined
paths, PyTorch and safetensors state dicts keep their own keys. Each file
format's reader is in `jtl.weights.formats`; this module detects the format,
sets the memory budget and selects a `subtree`.

Damaged or hostile files cost bounded memory: every byte a reader inflates or
copies is charged, before it is allocated, to a budget of `max_expansion` x
the file's size + `EXPANSION_FLOOR` (zip bombs, stride-0 torch tensors over a
one-element storage); members are stream-read with their size as a hard cap
and copied once; Orbax directories pass `verify_orbax` first and their
declared arrays must fit the available memory.

>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
>>> np.savez(path, **{"params/head/kernel": np.ones((2, 3))})
>>> {k: v.shape for k, v in read(path).items()}
{'params/head/kernel': (2, 3)}
>>> list(read(path, subtree="params/head"))
['kernel']
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath

from jtl.weights import formats, hub
from jtl.weights.orbax_reader import read_orbax
from jtl.weights.sources import cached_download_hint, resolve
from jtl.weights.torch_pickle import Budget
from jtl.errors import CheckpointError, JtlError, bullet_list

FORMATS = ("orbax", "msgpack", "npz", "safetensors", "torch", "onnx")
MAX_EXPANSION = 4.0
EXPANSION_FLOOR = 64 << 20


@contextlib.contextmanager
def guard(path: Any, what: str) -> Iterator[None]:
  """Turns any failure of a third-party parser into a CheckpointError."""
  try:
    yield
  except JtlError:
    raise
  except BaseException as e:  # parsers of damaged files throw anything
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
      raise
    try:
      reason = f"{type(e).__name__}: {e}"[:400]
    except Exception:  # noqa: BLE001 - e.g. an int too long to print
      reason = type(e).__name__
    raise CheckpointError(
        f"{path}: cannot read it as {what} ({reason}). The file may be "
        "truncated or damaged, or in another format: check it, or pass "
        f"format= one of {FORMATS}.") from e


def _zip_kind(path: epath.Path, data: Any) -> str:
  with zipfile.ZipFile(data) as zf:
    names = zf.namelist()
  if any(n.endswith(".npy") for n in names):
    return "npz"
  if any(n.endswith("/data.pkl") for n in names):
    return "torch"
  raise CheckpointError(
      f"{path}: a zip file with neither .npy members (npz) nor a "
      f"'<name>/data.pkl' member (torch.save); members: {names[:8]}. "
      "Pass format= if you know what it is.")


def detect_format(path: epath.Path) -> str:
  """Returns the format of the file or directory at `path` from its content."""
  if path.is_dir():
    return "orbax"
  head = formats.file_head(path)
  size = path.stat().length
  if not head:
    raise CheckpointError(f"{path}: the file is empty (0 bytes).")
  if path.name.endswith(".onnx"):  # a protobuf has no magic bytes: the name says it
    return "onnx"
  if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
    with guard(path, "a zip file"):
      return _zip_kind(path, formats.local_or_bytes(path))
  # safetensors first: its 8-byte header length can start with 80 02.
  if len(head) >= 9:
    n = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and (n + 8 <= size or n <= formats.MAX_SAFETENSORS_HEADER):
      return "safetensors"  # a header longer than the file: truncated, said when read
    if head[8:9] == b"{" and head[9:10] in (b'"', b"}", b" ", b"\n"):
      raise CheckpointError(
          f"{path}: a safetensors file cut short or damaged: its header declares {n} bytes "
          f"of JSON, but the file has only {size} bytes in all. Download or copy it again.")
  elif path.name.endswith(".safetensors"):
    raise CheckpointError(
        f"{path}: a safetensors file cut short: {size} bytes, less than its 8-byte header "
        "length and the header. Download or copy it again.")
  if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
    return "torch"
  if 0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):
    return "msgpack"
  raise CheckpointError(
      f"{path}: unknown checkpoint format (first bytes {head[:8].hex()}). "
      f"Expected one of {FORMATS}; pass format= to force one.")


def budget_for(path: epath.Path, max_expansion: float | None) -> Budget:
  """The bytes a reader may materialise from the file at `path`."""
  if max_expansion is None:
    return Budget(str(path), None)
  size = path.stat().length
  limit = int(max_expansion * size) + EXPANSION_FLOOR
  return Budget(str(path), limit, f"(max_expansion={max_expansion} x the "
                f"file's {size} bytes + {EXPANSION_FLOOR})")


def select(flat: Mapping[str, np.ndarray], subtree: str | None,
           where: Any) -> dict[str, np.ndarray]:
  """Keeps the entries under `subtree/` and strips that prefix."""
  if not subtree:
    return dict(flat)
  prefix = subtree.strip("/") + "/"
  out = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  if "" in out or prefix[:-1] in flat:
    raise CheckpointError(
        f"{where}: subtree {subtree!r} is a single array, not a branch; read "
        f"the parent and take the key, e.g. read(...)[{prefix[:-1]!r}].")
  if not out:
    tops = sorted({k.split("/")[0] for k in flat})
    raise CheckpointError(
        f"{where}: nothing under subtree {subtree!r}. Top-level names are:\n"
        + bullet_list(tops, limit=20))
  return out


def read(source: Any, *, format: str | None = None,  # pylint: disable=redefined-builtin
         subtree: str | None = None,
         max_expansion: float | None = MAX_EXPANSION) -> dict[str, np.ndarray]:
  """Reads a checkpoint into a flat {name: numpy array} dict.

  Args:
    source: a local path, an `etils.epath` path (gs://...), a registered
      source name such as "efficientnet_lite0/imagenet", or a Hub source
      "hf://<owner>/<name>[@rev]/<file>" / "hf-hub:<owner>/<name>[@rev]" (see
      `resolve`). A sharded checkpoint's `*.index.json` reads all its shards.
    format: one of "orbax", "msgpack", "npz", "safetensors", "torch", "onnx" (the initializers of an ONNX model) to skip
      detection from the content.
    subtree: keep only names under this "/"-joined prefix and strip it, e.g.
      "params/img". Orbax restores only that sub-tree from disk.
    max_expansion: a file may yield at most `max_expansion` x its size +
      `EXPANSION_FLOOR` (64 MiB) bytes of arrays; a file that asks for more
      (a zip bomb, stride-0 tensors over a tiny storage) is refused before
      anything is allocated. Tied weights (plain views of one torch storage)
      count once. None lifts the limit. An Orbax directory passes
      `verify_orbax` first, then the arrays it declares (sizes stated up
      front, not a stream to inflate) must fit this host's available memory.

  Returns:
    {name: np.ndarray} on the host.

  Raises:
    CheckpointError: the source is missing, damaged, unsafe or unknown.
  """
  if format is not None and format not in FORMATS:
    raise CheckpointError(
        f"Unknown format={format!r} for {source}; expected one of {FORMATS}.")
  path = resolve(source)
  try:
    return _read_path(path, format, subtree, max_expansion)
  except CheckpointError as e:
    hint = cached_download_hint(path)
    if not hint or hint in str(e):
      raise
    raise CheckpointError(str(e) + hint) from e


def _read_path(path: epath.Path, format: str | None,  # pylint: disable=redefined-builtin
               subtree: str | None, max_expansion: float | None) -> dict[str, np.ndarray]:
  """`read` of a resolved path."""
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory.")
  if path.name.endswith(".index.json") and not path.is_dir():  # sharded (Hub)
    return select(hub.read_sharded(path, read, format=format,
                                   max_expansion=max_expansion), subtree, path)
  fmt = format or detect_format(path)
  if fmt == "orbax":
    with guard(path, "an Orbax checkpoint"):
      # Its arrays' sizes are declared, not a stream to expand: checked against
      # this host's available memory (zstd keeps zero-heavy weights tiny on
      # disk, so a bound on the disk's bytes refused real checkpoints).
      return read_orbax(path, subtree)
  if path.is_dir():
    raise CheckpointError(
        f"{path}: a directory, but format={fmt!r} needs a file.")
  if path.stat().length == 0:
    raise CheckpointError(f"{path}: the file is empty (0 bytes).")
  with guard(path, f"a {fmt} file"):
    flat = formats.READERS[fmt](path, budget_for(path, max_expansion))
  return select(flat, subtree, path)


def tensor_names(source: Any) -> list[str]:
  """The sorted tensor names of a checkpoint, from its header where the format
  has one (a safetensors file, a sharded `*.index.json`: no tensor is read),
  else by reading it.

  Raises:
    CheckpointError: as `read`.
  """
  path = resolve(source)
  if path.name.endswith(".index.json") and path.is_file():
    return sorted(hub.weight_map(path))
  if path.is_file() and detect_format(path) == "safetensors":
    with path.open("rb") as f:
      header, _ = formats.safetensors_header(path, f)
    return sorted(header)
  return sorted(read(path))
