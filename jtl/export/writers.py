"""`write`: write params (or all variables) to npz, safetensors, msgpack or
an Orbax checkpoint directory: every format `read` takes, written in one place.

Names are the "/"-joined tree paths, so `read` gives back the same flat dict.
A file is written under a temporary name in the same directory and renamed
into place (Orbax does the same with its directory), so a crash never leaves
a half-written checkpoint at `path`.

>>> import numpy as np, os, tempfile
>>> from jtl.weights.readers import read
>>> path = os.path.join(tempfile.mkdtemp(), "params.safetensors")
>>> path = write({"head": {"kernel": np.ones((2, 3), np.float32)}}, path)
>>> read(path)["head/kernel"].shape
(2, 3)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from jtl import paths
from jtl import tree as tree_lib
from jtl.errors import CheckpointError

# A file name's ending -> the formats written under it (the first: the one it names).
_SUFFIXES = {".npz": ("npz",), ".safetensors": ("safetensors",), ".msgpack": ("msgpack",)}


def _to_bytes(flat: dict[str, np.ndarray], fmt: str) -> bytes:
  if fmt == "safetensors":
    import safetensors.numpy  # pylint: disable=g-import-not-at-top

    # safetensors needs C-contiguous buffers (np.ascontiguousarray would also
    # turn 0-d arrays into 1-d ones).
    return safetensors.numpy.save(
        {k: np.array(v, order="C") for k, v in flat.items()})
  if fmt == "msgpack":
    from flax import serialization  # pylint: disable=g-import-not-at-top

    return serialization.msgpack_serialize(tree_lib.unflatten(flat))
  import io  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  # .npy has no bfloat16; float32 holds every bfloat16 value exactly.
  np.savez(buf, **{k: v.astype(np.float32) if v.dtype.name == "bfloat16"
                   else v for k, v in flat.items()})
  return buf.getvalue()


FORMATS = ("npz", "safetensors", "msgpack", "orbax")


def output_format(path: Any, format: str | None = None, *,  # pylint: disable=redefined-builtin
                  option: str = "format=", suffixes: Mapping[str, tuple[str, ...]] | None = None,
                  formats: tuple[str, ...] = FORMATS) -> str:
  """The format `write` writes `path` in: `format`, else the one its suffix
  names. `option` is how the caller's users pass the format (a script's
  "--format="). `suffixes` maps a file name's ending to the formats written
  under it, the first the one it names (default: `write`'s; the deployment
  files' are `jtl.export.deploy.SUFFIX_FORMATS`), `formats` lists the
  formats there are.

  >>> output_format("m.npz"), output_format("m_orbax", "orbax")
  ('npz', 'orbax')

  Raises:
    CheckpointError: a suffix that names no format while `format` is not
      given, or one that names another format than `format` (a safetensors
      file named .npz, which np.load refuses; ONNX bytes named .tflite).
  """
  suffixes = _SUFFIXES if suffixes is None else suffixes
  name = paths.path(path).name
  # The longest ending first: "m.int8.tflite" is ".int8.tflite", not ".tflite".
  suffix = next((s for s in sorted(suffixes, key=len, reverse=True) if name.endswith(s)), None)
  named = suffixes[suffix] if suffix else ()
  if format is None and not named:
    raise CheckpointError(
        f"{path}: cannot tell the export format from the suffix "
        f"{paths.path(path).suffix!r}; use one of {sorted(suffixes)}, or pass "
        f"{option}<format>, one of {list(formats)}.")
  if format is not None and format not in formats:
    raise CheckpointError(f"{path}: unknown export format {format!r}; pass {option}<format>, "
                          f"one of {list(formats)}.")
  if format is not None and named and format not in named:
    right = next((s for s, fmts in suffixes.items() if fmts[0] == format), "")
    stem = name[:-len(suffix)]
    raise CheckpointError(
        f"{path}: the suffix {suffix!r} is the {named[0]} format's, but {option}{format} was "
        f"asked for; readers go by the suffix. Name the file "
        f"{stem + right if right else 'without it'}, or pass {option}{named[0]}.")
  return format or named[0]


def write(variables_or_params: Any, path: Any, *,
           format: str | None = None) -> epath.Path:  # pylint: disable=redefined-builtin
  """Writes every leaf of a params/variables tree to one file (or, for Orbax,
  one checkpoint directory) and returns its path.

  Args:
    variables_or_params: a (nested) dict of arrays, numpy or jax.
    path: destination; its suffix (.npz, .safetensors, .msgpack) picks the
      format unless `format` is given.
    format: one of `FORMATS`; "orbax" writes a directory that `read` (and
      `read(path, subtree="params")`) reads, and never overwrites one.

  Raises:
    CheckpointError: unknown format, a suffix of another format
      (`output_format`), non-array leaves, an existing Orbax directory, or a
      write failure.
  """
  path = paths.path(path)
  fmt = output_format(path, format)
  flat, bad = {}, []
  leaves = tree_lib.leaves_with_paths(variables_or_params)
  names = [name for name, _ in leaves]
  if len(set(names)) != len(names):  # {"a/b": x, "a": {"b": y}}: one would be lost
    twice = sorted({n for n in names if names.count(n) > 1})
    raise CheckpointError(f"{path}: leaves with the same '/'-joined name {twice[:5]} (a key "
                          "holding '/'); rename them so that every leaf keeps its own name.")
  for name, leaf in leaves:
    arr = np.asarray(leaf)
    if arr.dtype.kind not in "biufc" and arr.dtype.name != "bfloat16":
      bad.append(f"{name} ({type(leaf).__name__})")
    flat[name] = arr
  if bad or not flat:
    raise CheckpointError(
        f"{path}: can only export arrays; "
        + (f"these leaves are not: {bad}" if bad else "the tree has no leaves")
        + ".")
  if fmt == "orbax":
    empty = [name for name, arr in flat.items() if arr.size == 0]
    if empty:  # refused before Orbax starts a save it would leave unfinished
      raise CheckpointError(f"{path}: Orbax cannot save arrays with no elements: {empty[:5]}; "
                            "drop them, or write .npz / .safetensors / .msgpack.")
    return _write_orbax(tree_lib.unflatten(flat), path)
  write_atomic(path, _to_bytes(flat, fmt))
  return path


def _write_orbax(tree: dict[str, Any], path: epath.Path) -> epath.Path:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top - orbax only when asked

  path = paths.path(path if paths.is_remote(path) else os.path.abspath(path))
  if path.exists():
    raise CheckpointError(f"{path} exists; Orbax does not overwrite. Choose a new path.")
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
  except (ValueError, TypeError, OSError) as e:
    raise CheckpointError(f"{path}: Orbax could not save the tree: {e}") from e
  return path


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that a reader never sees a half-written file
  (`jtl.paths.write_atomic`: locally a temporary file in the same folder and a
  rename; in a bucket one upload). The folder is created if needed.

  Raises:
    CheckpointError: naming the path, when it cannot be written.
  """
  try:
    paths.write_atomic(path, data)
  except OSError as e:
    blocking = _file_in_the_way(path)
    if blocking is not None:
      raise CheckpointError(f"Cannot write {path}: {blocking} is a file, not a folder; pass "
                            "an output path inside a folder (or move that file away).") from e
    raise CheckpointError(f"Cannot write {path}: {e}. Check that its folder is writable.") from e


def _file_in_the_way(path: str | os.PathLike) -> str | None:
  """The nearest parent of a local `path` that is a file (None: none is)."""
  if paths.is_remote(path):
    return None  # a bucket has no folders to be in the way
  for parent in Path(os.path.abspath(os.fspath(path))).parents:
    if parent.exists():
      return os.fspath(parent) if not parent.is_dir() else None
  return None