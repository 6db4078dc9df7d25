"""Fingerprints of a checkpoint's arrays: what was saved is what is restored.

Orbax and tensorstore keep no checksum of array data, so a bit flipped in a
stored chunk (a bad disk, a damaged copy between buckets) restored silently.
Each save records one 32-bit fingerprint per array in the step's meta
(computed on the devices, in one compiled pass over the state that also
finds any NaN or inf: `inspect`), and each
restore recomputes those of what it read: a difference names the arrays and
the step is treated as damaged (`restore_latest` and `restore_variables`
fall back to the previous good one).

A fingerprint is the sum, modulo 2**32, of each element's bits times an odd
weight that depends on its position: one flipped bit always changes it
(2**k times an odd number is never 0 modulo 2**32), and so do two elements
trading places. It is computed the same way on the devices (`fingerprints`)
and on the host (`host_fingerprint`), bit for bit.

>>> import numpy as np
>>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> y = x.copy(); y.view(np.uint32)[1, 2] ^= 1 << 7
>>> host_fingerprint(x) == host_fingerprint(y), host_fingerprint(x) == int(fingerprints({"x": x})["x"])
(False, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jtl import tree as jtree
from jtl.tree import PyTree

# Position i weighs i * _STRIDE + 1: odd (the stride is even), and spread out.
_STRIDE = (2 * 0x9E3779B1) % 2**32


def _bits(dtype: Any) -> int:
  """Bits per element of a numeric dtype (int4 and float4 included)."""
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.finfo(dtype).bits
  return 8 * np.dtype(dtype).itemsize


def _widened(x: Any, xp: Any) -> Any:
  """`x` with sub-byte elements (int4, float4) widened exactly to 8 or 32 bits."""
  if x.dtype == xp.bool_ or _bits(x.dtype) >= 8:
    return x
  if jnp.issubdtype(x.dtype, jnp.signedinteger):
    return x.astype(xp.int8)
  return x.astype(xp.uint8 if jnp.issubdtype(x.dtype, jnp.integer) else xp.float32)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32, one per element (8-byte elements as two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = _widened(x, jnp)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).ravel()
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _is_float(x: Any) -> bool:
  return not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) and jnp.issubdtype(
      x.dtype, jnp.inexact)


@jax.jit
def _sums_and_flags(leaves: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
  """Each leaf's fingerprint, and whether it holds a NaN or inf (floats only)."""
  sums, flags = [], []
  for x in leaves:
    words = _words(x)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(_STRIDE) + jnp.uint32(1)
    sums.append(jnp.sum(words * weights, dtype=jnp.uint32))
    flags.append(~jnp.all(jnp.isfinite(x)) if _is_float(x) else jnp.bool_(False))
  return sums, flags


def inspect(tree: PyTree) -> tuple[dict[str, int], list[str]]:
  """({"/"-joined path: fingerprint} of every array of `tree`, None skipped;
  the paths of float arrays holding a NaN or inf), in one pass: one compiled
  program over the arrays on an accelerator, numpy (no compile) over those
  already in host memory (the CPU backend)."""
  leaves = [(path, x) for path, x in jtree.leaves_with_paths(tree) if x is not None]
  on_host = [not _on_accelerator(x) for _, x in leaves]
  device = [jnp.asarray(x) for (_, x), host in zip(leaves, on_host) if not host]
  sums, flags = jax.device_get(_sums_and_flags(device)) if device else ([], [])
  sums, flags = iter(sums), iter(flags)
  prints, bad = {}, []
  for (path, x), host in zip(leaves, on_host):
    if host:
      value = _host_value(x)
      prints[path] = host_fingerprint(value)
      nonfinite = _is_float(value) and not np.isfinite(value).all()
    else:
      prints[path], nonfinite = int(next(sums)), bool(next(flags))
    if nonfinite:
      bad.append(path)
  return prints, bad


def fingerprints(tree: PyTree) -> dict[str, int]:
  """{"/"-joined path: fingerprint} of every array of `tree` (None skipped),
  as `inspect` computes them."""
  return inspect(tree)[0]


def _on_accelerator(x: Any) -> bool:
  """Whether `x` is computed on where it is: an accelerator's array, or one
  that spans other processes (their parts are not in this host's memory)."""
  return isinstance(x, jax.Array) and (not x.is_fully_addressable
                                       or any(d.platform != "cpu" for d in x.devices()))


def _host_value(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def host_fingerprint(x: Any) -> int:
  """`fingerprints`' number for one host array."""
  x = np.ascontiguousarray(_widened(np.asarray(x), np))
  if x.dtype == np.bool_:
    words = x.astype(np.uint32).ravel()
  else:
    words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize])
    words = words.astype(np.uint32).ravel()
  weights = np.arange(words.size, dtype=np.uint32) * np.uint32(_STRIDE) + np.uint32(1)
  return int(np.sum(words * weights, dtype=np.uint32))


def differing(saved: Mapping[str, int] | None, actual: Mapping[str, int]) -> list[str]:
  """The paths whose fingerprint differs from the one saved (none when the
  checkpoint recorded none: written before fingerprints were)."""
  if not saved:
    return []
  return sorted(p for p, value in actual.items() if p in saved and saved[p] != value)
