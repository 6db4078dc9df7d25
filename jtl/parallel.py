"""Data parallelism on a device mesh (jit + NamedSharding), and pmap.

The recommended path: `mesh = make_mesh()`, `state = place_state(state, mesh)`,
`step = jit_train_step(train_step, mesh)`, then feed `shard_batch(batch, mesh)`.
Params are replicated; with `fsdp > 1`, leaves matched by `fsdp_rules` are
sharded along their largest divisible dimension over the "fsdp" mesh axis.

Multi-host (TPU VM pods): call `initialize_distributed()` first on every host;
each process loads its own slice of the global batch and `shard_batch` turns
the per-process arrays into global arrays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtl import tree as jtree
from jtl.errors import DeviceError
from jtl.tree import PyTree

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-host JAX (`jax.distributed.initialize`); on TPU VMs the
  arguments are discovered automatically. Call once, before anything else."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh(devices: Sequence[jax.Device] | None = None, *, fsdp: int = 1) -> Mesh:
  """A 2-D mesh ("data", "fsdp") over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise DeviceError(
        f"fsdp={fsdp} must be >= 1 and divide the number of devices ({len(devices)}).")
  grid = np.asarray(devices, dtype=object).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def check_mesh(mesh: Mesh) -> Mesh:
  """`mesh`, when its axes are jtl's ("data", "fsdp"); else a DeviceError.

  Not any mesh: jtl splits the batch over both axes and shards only over
  "fsdp"; another mesh's axes (a "model" axis, say) would be taken for data
  axes and its intent silently lost.
  """
  if set(mesh.axis_names) != {DATA_AXIS, FSDP_AXIS}:
    shape = dict(zip(mesh.axis_names, mesh.devices.shape))
    raise DeviceError(
        f"The mesh has axes {shape}; jtl expects the axes ({DATA_AXIS!r}, {FSDP_AXIS!r}) "
        f"(batch split over both, FSDP over {FSDP_AXIS!r}). Build it with "
        "jtl.make_mesh(devices) (data parallel over its devices) or "
        "jtl.make_mesh(devices, fsdp=k).")
  return mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(check_mesh(mesh), P((DATA_AXIS, FSDP_AXIS)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], size: int) -> P:
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % size == 0 and shape[d] >= size:
      spec = [None] * len(shape)
      spec[d] = FSDP_AXIS
      return P(*spec)
  return P()


def state_shardings(state: PyTree, mesh: Mesh, *, fsdp_rules: Sequence[str] = (),
                    min_size: int = 2**18) -> PyTree:
  """NamedShardings for every leaf: replicated, or FSDP-sharded when the mesh
  has an "fsdp" axis > 1 and the leaf's path matches one of `fsdp_rules`
  (regexes) and it has at least `min_size` elements."""
  size = check_mesh(mesh).shape[FSDP_AXIS]
  patterns = [re.compile(r) for r in fsdp_rules]

  def spec(path: str, leaf: Any) -> NamedSharding:
    shape = tuple(np.shape(leaf))
    if (size > 1 and int(np.prod(shape)) >= min_size
        and any(p.search(path) for p in patterns)):
      return NamedSharding(mesh, _fsdp_spec(shape, size))
    return NamedSharding(mesh, P())

  return jtree.map_with_path(spec, state)


def place_state(state: PyTree, mesh: Mesh, shardings: PyTree | None = None) -> PyTree:
  """Puts the state on the mesh (replicated unless `shardings` says otherwise).

  Always copies, so a train step that donates the state never deletes arrays
  the caller still holds (e.g. the pretrained variables).
  """
  shardings = state_shardings(state, mesh) if shardings is None else shardings
  # device_put may alias a buffer already on the right device, whatever
  # may_alias says; copy jax arrays first so donation cannot reach the caller's.
  state = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, state)
  return jax.device_put(state, shardings)


def _check_divisible(batch: PyTree, n: int, what: str) -> None:
  if all(np.ndim(x) and np.shape(x)[0] % n == 0 for x in jax.tree.leaves(batch)):
    return  # every step: the paths are only needed to name a problem
  for path, x in jtree.leaves_with_paths(batch):
    if np.ndim(x) == 0 or np.shape(x)[0] % n:
      raise DeviceError(
          f"Batch entry {path!r} has shape {np.shape(x)}: its leading (batch) "
          f"dimension must be divisible by {n} ({what}). Use a batch size that "
          f"is a multiple of {n}.")


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Per-process numpy batch -> global arrays split over the mesh's devices.

  In a multi-host run, each process passes its own part of the global batch.
  """
  sharding = batch_sharding(mesh)
  local = len(mesh.local_devices)
  _check_divisible(batch, local, f"the {local} local devices")
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def _check_axis_name(step: Callable, want: str | None, runner: str, kind: str) -> None:
  """Refuses a step whose recorded `axis_name` (`make_train_step` and
  `make_eval_step` set it; a step of one's own has none and passes) is not
  `want`: under pmap a step without it trains each replica on its own rows
  (the replicas diverge), on a mesh one with it has no axis to name."""
  if not hasattr(step, "axis_name") or step.axis_name == want:
    return
  if want is None:
    raise DeviceError(
        f"{runner} takes a step built without axis_name (the mesh combines its devices "
        f"itself); this one was built with axis_name={step.axis_name!r}, for jax.pmap. Build "
        f"it with make_{kind}(..., axis_name=None), or run it with jtl.parallel.pmap_{kind}.")
  raise DeviceError(
      f"{runner} needs a step built with axis_name={want!r} (jtl.parallel.PMAP_AXIS); this one "
      f"was built with axis_name={step.axis_name!r}, so its devices would not combine their "
      f"results (each replica would train or count its own rows alone). Build it with "
      f"make_{kind}(..., axis_name={want!r}), or use jtl.parallel.jit_{kind} on a mesh.")


def jit_train_step(train_step: Callable, mesh: Mesh, state_sharding: PyTree | None = None,
                   *, donate: bool = True) -> Callable:
  """jit-compiles `train_step(state, batch)` for the mesh.

  The state keeps `state_sharding` (default: whatever placement the state
  already has); the batch is split over devices; metrics are replicated.
  A step built with `axis_name` (for pmap) is refused with a DeviceError.
  """
  _check_axis_name(train_step, None, "jit_train_step", "train_step")
  kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if state_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding(mesh))
    kwargs["out_shardings"] = (state_sharding, replicated(mesh))
  return jax.jit(train_step, **kwargs)


def jit_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  """jit-compiles `eval_step(variables, batch)` for the mesh: the batch split
  over its devices, the sums replicated on all of them."""
  _check_axis_name(eval_step, None, "jit_eval_step", "eval_step")
  return jax.jit(eval_step, out_shardings=replicated(mesh))


# --- pmap ---------------------------------------------------------------------

PMAP_AXIS = "batch"


def pmap_train_step(train_step: Callable, *, donate: bool = True) -> Callable:
  """`jax.pmap` of a step built with `make_train_step(..., axis_name="batch")`
  (one built with another axis name, or none, is refused with a DeviceError)."""
  _check_axis_name(train_step, PMAP_AXIS, "pmap_train_step", "train_step")
  return jax.pmap(train_step, axis_name=PMAP_AXIS, donate_argnums=(0,) if donate else ())


def pmap_eval_step(eval_step: Callable) -> Callable:
  """`jax.pmap` of a step built with `make_eval_step(..., axis_name="batch")`:
  `eval_step(replicated variables, shard_for_pmap(batch))`, each device
  holding the whole batch's sums (another axis name, or none, is refused)."""
  _check_axis_name(eval_step, PMAP_AXIS, "pmap_eval_step", "eval_step")
  return jax.pmap(eval_step, axis_name=PMAP_AXIS)


def replicate(tree: PyTree, devices: Sequence[jax.Device] | None = None) -> PyTree:
  """Stacks one copy of `tree` per local device (pmap shards the leading axis);
  typed PRNG keys (`jax.random.key`) too."""
  n = len(jax.local_devices() if devices is None else devices)
  stack = lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x))  # noqa: E731

  def copies(x: Any) -> Any:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      # A key array has no numpy form: stack its raw data, then wrap it again.
      return jax.random.wrap_key_data(stack(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return stack(x)
  return jax.tree.map(copies, tree)


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of a pmap-replicated tree.

  Waits for the tree, then reads the first device's shard alone: indexing the
  whole array would run a computation across every device while the pmapped
  step may still be running, which has aborted XLA's CPU client (a rare crash
  of tests/core/test_model_kinds.py).
  """
  def first(x: Any) -> Any:
    if isinstance(x, jax.Array) and len(x.addressable_shards) > 1:
      return x.addressable_shards[0].data[0]
    return x[0]
  return jax.tree.map(first, jax.block_until_ready(tree))


def shard_for_pmap(batch: PyTree, num_devices: int | None = None) -> PyTree:
  """Reshapes [B, ...] to [devices, B / devices, ...]."""
  n = jax.local_device_count() if num_devices is None else num_devices
  _check_divisible(batch, n, f"the {n} local devices")
  return jax.tree.map(lambda x: np.reshape(x, (n, -1) + np.shape(x)[1:]), batch)
