"""Reads Orbax checkpoint directories into flat numpy dicts on the host.

Three layouts are understood: a PyTree checkpoint directory (written by
`PyTreeCheckpointer` or `StandardCheckpointer`, it holds `_METADATA`), a
`CheckpointManager` step directory whose sub-directories are items (names are
then prefixed by the item, e.g. "state/params/..."), and a manager's root
directory, of which the latest step is read. With a `subtree`, only that
branch is restored from disk (`partial_restore`). Before a restore the
directory passes `jtl.weights.orbax_verify` (its metadata checked against the
bytes on disk) and the arrays it declares must fit the memory available.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from jtl import paths
from jtl.errors import CheckpointError, bullet_list
from jtl.weights import orbax_verify
from jtl.weights.formats import to_flat_arrays
from jtl.weights.torch_pickle import Budget

# Single-file weight formats, named in the error for a folder of them.
_WEIGHT_SUFFIXES = (".safetensors", ".npz", ".msgpack", ".bin", ".pt", ".pth", ".ckpt", ".onnx")


def _is_pytree_dir(path: epath.Path) -> bool:
  return path.is_dir() and ((path / "_METADATA").exists() or
                            (path / "checkpoint").exists())


def _latest_step(path: epath.Path) -> epath.Path | None:
  steps = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
  return max(steps, key=lambda p: int(p.name)) if steps else None


class _NoMissingMetadataWarning(logging.Filter):
  """Drops Orbax's "Metadata file does not exist" warning: a CheckpointManager
  step keeps `_CHECKPOINT_METADATA` beside its items, not in the item folder
  read here, so the warning is about a file that was never meant to be there
  (and reads as corruption). Damage is checked by `verify_orbax`."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  logger = logging.getLogger("absl")  # Orbax logs through absl
  quiet = _NoMissingMetadataWarning()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def metadata_tree(path: epath.Path) -> Any:
  """The metadata tree of an Orbax PyTree item folder (without Orbax's
  warning about the manager's `_CHECKPOINT_METADATA`, see `_quiet_orbax`)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  with _quiet_orbax():
    md = ocp.PyTreeCheckpointer().metadata(path)
  md = getattr(md, "item_metadata", md)
  return getattr(md, "tree", md)


def _branch(tree: Any, keys: list[str], where: epath.Path, subtree: str) -> Any:
  """Returns the tree with only the branch at `keys` kept (same nesting)."""
  if not keys:
    return tree
  key, rest = keys[0], keys[1:]
  if isinstance(tree, dict) and key in tree:
    return {key: _branch(tree[key], rest, where, subtree)}
  if isinstance(tree, (list, tuple)) and key.isdigit() and int(key) < len(tree):
    raise CheckpointError(
        f"{where}: subtree {subtree!r} goes through a list; restore the "
        "enclosing dict instead.")
  found = sorted(map(str, tree)) if isinstance(tree, dict) else []
  raise CheckpointError(
      f"{where}: no {key!r} in the checkpoint on the way to subtree "
      f"{subtree!r}. Names at that level:\n" + bullet_list(found, limit=20))


def _available_memory() -> int | None:
  """The bytes this host can still allocate (MemAvailable; else its memory)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):
    return None


def _disk_bytes(path: epath.Path) -> int:
  """The bytes of every file under the folder `path`."""
  if not paths.is_remote(path):
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(os.fspath(path)) for f in files)
  return sum(p.stat().length for p in path.rglob("*") if p.is_file())


def _check_fits(path: epath.Path, keys: list[str], budget: Budget | None) -> None:
  """verify_orbax, then: the arrays to restore fit in `budget` (max_expansion x
  the folder's bytes on disk + the floor) and in this host's memory."""
  sizes = orbax_verify.inspect(path)
  prefix = ".".join(keys)
  total = sum(b for n, b in sizes.items()
              if not prefix or n == prefix or n.startswith(prefix + "."))
  if budget is not None:
    budget.charge(total, f"the arrays to restore ({total} bytes declared; chunks "
                  "equal to the fill value may be left out on disk)")
  memory = _available_memory()
  if memory and total > memory:
    raise CheckpointError(
        f"{path}: the arrays to restore declare {total} bytes, more than the {memory} bytes "
        "of memory this machine has available. Read a subtree= of it, or restore it sharded "
        "with the CheckpointManager.")


def _restore(path: epath.Path, keys: list[str], subtree: str,
             budget: Budget | None = None) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  _check_fits(path, keys, budget)
  tree = metadata_tree(path)
  item = _branch(tree, keys, path, subtree)
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                partial_restore=bool(keys))
  with _quiet_orbax():
    restored = ocp.PyTreeCheckpointer().restore(path, args=args)
  for key in keys:
    restored = restored[key]
  return restored


def _items(path: epath.Path) -> list[str]:
  return sorted(p.name for p in path.iterdir() if _is_pytree_dir(p))


def checkpoint_dir(path: epath.Path) -> epath.Path:
  """`path` if it holds a checkpoint (PyTree or items), else its latest step.

  Raises a CheckpointError when neither it nor its latest numbered step holds
  one (an empty or interrupted step folder must not read as "no arrays").
  """
  if _is_pytree_dir(path) or _items(path):
    return path
  step = _latest_step(path)
  if step is None:
    weights = sorted(p.name for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if weights and not path.name.isdigit():
      raise CheckpointError(
          f"{path}: a directory (read as an Orbax checkpoint) holding weight files "
          f"{weights[:5]}: pass one of those files, or, for a Hugging Face Hub layout, "
          "put its config.json beside them.")
    what = ("a numbered step folder without a checkpoint in it"
            if path.name.isdigit() else "a directory but not an Orbax checkpoint")
    raise CheckpointError(
        f"{path}: {what} (no _METADATA, no item sub-directories, no numbered "
        "step directories). The save may not have finished: read another "
        "step, or the run's checkpoint directory for the latest one.")
  if not (_is_pytree_dir(step) or _items(step)):
    raise CheckpointError(
        f"{step}: the latest step folder under {path} holds no checkpoint (no "
        "_METADATA, no item sub-directories); its save did not finish or it "
        f"was damaged. Read an earlier step ({path}/<step>) or remove {step}.")
  return step


def read_orbax(path: epath.Path, subtree: str | None, max_expansion: float | None = None,
               floor: int = 0) -> dict[str, np.ndarray]:
  """Restores the checkpoint (or its `subtree`) at `path` as numpy arrays.

  With `max_expansion`, the arrays may declare at most `max_expansion` x the
  checkpoint folder's bytes on disk + `floor` bytes (as the file readers).
  """
  # In the function: readers imports this module at its top (an import cycle).
  from jtl.weights.readers import select  # pylint: disable=g-import-not-at-top

  path = paths.path(path)
  if not paths.is_remote(path):
    path = epath.Path(os.path.abspath(os.fspath(path)))  # Orbax needs it
  keys = [k for k in (subtree or "").split("/") if k]
  path = checkpoint_dir(path)
  budget = None
  if max_expansion is not None:
    size = _disk_bytes(path)
    budget = Budget(str(path), int(max_expansion * size) + floor,
                    f"(max_expansion={max_expansion} x the checkpoint's {size} bytes "
                    f"on disk + {floor})")
  if _is_pytree_dir(path):
    return select(to_flat_arrays(_restore(path, keys, subtree or "", budget), path,
                                 prefix=subtree or ""), subtree, path)
  items = _items(path)
  if keys:
    if keys[0] not in items:
      raise CheckpointError(
          f"{path}: no item {keys[0]!r} for subtree {subtree!r}. Items:\n"
          + bullet_list(items))
    return select(to_flat_arrays(
        _restore(path / keys[0], keys[1:], subtree or "", budget), path / keys[0],
        prefix=subtree or ""), subtree, path)
  out: dict[str, np.ndarray] = {}
  for name in items:
    out.update(to_flat_arrays(_restore(path / name, [], "", budget), path / name,
                              prefix=name))
  return out
