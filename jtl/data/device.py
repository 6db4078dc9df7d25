"""`prefetch_to_device`: keep a few numpy batches already on the devices.

`jax.device_put` is asynchronous, so holding `size` transferred batches in a
queue overlaps the host-to-device copy of the next batches with the current
step. With several processes, each passes its local rows and gets the global
`jax.Array` (`jax.make_array_from_process_local_data`).

>>> import numpy as np, jax
>>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
>>> mesh = Mesh(np.array(jax.devices()), ("data",))
>>> n = jax.device_count()
>>> batches = ({"x": np.full((2 * n, 2), i, np.float32)} for i in range(3))
>>> out = list(prefetch_to_device(batches, 2, NamedSharding(mesh, P("data"))))
>>> [float(b["x"][0, 0]) for b in out], len(out[0]["x"].sharding.device_set) == n
([0.0, 1.0, 2.0], True)
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import jax

from jtl.errors import DeviceError


def _put(batch: Any, sharding: Any) -> Any:
  try:
    if jax.process_count() > 1 and sharding is not None:
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    return jax.device_put(batch, sharding)
  except ValueError as e:
    shapes = jax.tree.map(lambda x: getattr(x, "shape", None), batch)
    raise DeviceError(
        f"Cannot place a batch with shapes {shapes} onto sharding {sharding}: {e}\n"
        "The batch size must be divisible by the number of devices along the "
        "sharded axis; change batch_size or the mesh.") from None


def prefetch_to_device(iterator: Iterable[Any], size: int = 2,
                       sharding: Any = None) -> Iterator[Any]:
  """Yields the batches of `iterator` as device arrays, `size` ahead.

  Args:
    iterator: numpy batches (any pytree of arrays).
    size: batches to have in flight; 0 or less transfers without prefetching.
    sharding: a `jax.sharding.Sharding` for every leaf (e.g.
      `NamedSharding(mesh, P("data"))`), a pytree of them matching the batch,
      or None for the default device.
  """
  queue: collections.deque[Any] = collections.deque()
  it = iter(iterator)
  for batch in it:
    queue.append(_put(batch, sharding))
    if len(queue) > max(size, 0):
      yield queue.popleft()
  while queue:
    yield queue.popleft()
