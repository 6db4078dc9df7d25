"""Inference: a jit-compiled predict function and a serialized `jax.export` artifact.

The artifact holds the computation and the weights (as constants), so a fresh
process needs only jax and the file:

>>> import tempfile, os, numpy as np, flax.linen as nn, jax
>>> model = nn.Dense(3)
>>> variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.float32))
>>> path = os.path.join(tempfile.mkdtemp(), "dense.jax")
>>> export_predict(model, variables, path, input_shape=(4,))
>>> predict = load_exported(path)
>>> bool(np.allclose(predict(np.ones((2, 4), np.float32)),
...                  model.apply(variables, np.ones((2, 4), np.float32))))
True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import export as jax_export

from jtl import paths
from jtl.errors import CheckpointError
from jtl.export.writers import write_atomic


def make_predict_fn(module: nn.Module, variables: Any, *,
                    method: Callable[..., Any] | str | None = None
                    ) -> Callable[[jax.Array], jax.Array]:
  """Returns jitted `predict(images) -> logits` in inference mode (train=False).

  The variables are an argument of the compiled function (not constants), so
  compiling is fast and the weights are not copied into the executable.
  """
  kwargs = {} if method is None else {"method": method}
  apply = jax.jit(lambda v, x: module.apply(v, x, **kwargs))

  def predict(images: jax.Array) -> jax.Array:
    return apply(variables, images)

  return predict


def export_predict(module: nn.Module, variables: Any, path: str | os.PathLike, *,
                   batch_size: int | None = None,
                   input_shape: Sequence[int] = (224, 224, 3),
                   dtype: Any = jnp.float32,
                   platforms: Sequence[str] | None = None) -> None:
  """Serializes `module.apply(variables, images)` with jax.export to `path`.

  Args:
    module, variables: the model in inference mode; the variables become
      constants of the artifact.
    path: file to write (atomically: a temporary file, then a rename).
    batch_size: a fixed batch size, or None for any batch size.
    input_shape: the per-example shape, e.g. (224, 224, 3).
    dtype: the input dtype.
    platforms: e.g. ("cpu", "cuda"); by default the current backend.

  Raises:
    CheckpointError: the file cannot be written.
  """
  batch = jax_export.symbolic_shape("b")[0] if batch_size is None else int(batch_size)
  spec = jax.ShapeDtypeStruct((batch, *input_shape), dtype)
  fn = jax.jit(lambda x: module.apply(variables, x))
  exported = jax_export.export(fn, platforms=platforms)(spec)
  write_atomic(path, exported.serialize())


def load_exported(path: str | os.PathLike) -> Callable[..., jax.Array]:
  """Loads a file from `export_predict`; returns `predict(images) -> logits`.

  Raises:
    CheckpointError: the file is missing or is not a serialized jax.export.
  """
  try:
    data = paths.path(path).read_bytes()  # a local file or a bucket URL
  except OSError as e:
    raise CheckpointError(f"Cannot read exported model {path}: {e}.") from e
  try:
    exported = jax_export.deserialize(bytearray(data))
  except Exception as e:  # any parse failure means a bad file
    raise CheckpointError(
        f"{path} is not a serialized jax.export artifact ({type(e).__name__}: "
        f"{e}). Write it with jtl.export.serving.export_predict.") from e
  return jax.jit(exported.call)
