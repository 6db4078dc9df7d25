"""Reads Orbax checkpoint directories into flat numpy dicts on the host.

Three layouts are understood: a PyTree checkpoint directory (written by
`PyTreeCheckpointer` or `StandardCheckpointer`, it holds `_METADATA`), a
`CheckpointManager` step directory whose sub-directories are items (names are
then prefixed by the item, e.g. "state/params/..."), and a manager's root
directory, of which the latest step is read. With a `subtree`, only that
branch is restored from disk (`partial_restore`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from etils import epath

from jtl.errors import CheckpointError, bullet_list


def _is_pytree_dir(path: epath.Path) -> bool:
  return path.is_dir() and ((path / "_METADATA").exists() or
                            (path / "checkpoint").exists())


def _latest_step(path: epath.Path) -> epath.Path | None:
  steps = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
  return max(steps, key=lambda p: int(p.name)) if steps else None


def _metadata_tree(path: epath.Path) -> Any:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

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


def _restore(path: epath.Path, keys: list[str], subtree: str) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  tree = _metadata_tree(path)
  item = _branch(tree, keys, path, subtree)
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                partial_restore=bool(keys))
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


def read_orbax(path: epath.Path, subtree: str | None) -> dict[str, np.ndarray]:
  """Restores the checkpoint (or its `subtree`) at `path` as numpy arrays."""
  from jtl.checkpoint.readers import select, to_flat_arrays  # pylint: disable=g-import-not-at-top

  if "://" not in os.fspath(path):
    path = epath.Path(os.path.abspath(os.fspath(path)))  # Orbax needs it
  keys = [k for k in (subtree or "").split("/") if k]
  path = checkpoint_dir(path)
  if _is_pytree_dir(path):
    return select(to_flat_arrays(_restore(path, keys, subtree or ""), path,
                                 prefix=subtree or ""), subtree, path)
  items = _items(path)
  if keys:
    if keys[0] not in items:
      raise CheckpointError(
          f"{path}: no item {keys[0]!r} for subtree {subtree!r}. Items:\n"
          + bullet_list(items))
    return select(to_flat_arrays(
        _restore(path / keys[0], keys[1:], subtree or ""), path / keys[0],
        prefix=subtree or ""), subtree, path)
  out: dict[str, np.ndarray] = {}
  for name in items:
    out.update(to_flat_arrays(_restore(path / name, [], ""), path / name,
                              prefix=name))
  return out
