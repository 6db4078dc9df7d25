"""Whether variables fit the model they are given with.

An NNX module holds its own variables, so a variables tree given with it is
compared with them by path and shape before it is used (`fit`,
`update_module`): a tree covering only part of the module would train the
rest from the module's own (random) weights, and another module's shapes
would fail inside the first trace. A Linen module holds none; flax finds a
mismatch when the module is first traced, and `linen_variable_errors` turns
flax's error into a StepError that keeps its facts and says what to do.

>>> import numpy as np
>>> module = {"params": {"head": {"kernel": np.zeros((4, 3))}}}
>>> check_variables({"params": {"head": {"kernel": np.zeros((4, 3))}}}, module,
...                 what="fit", advice="")
>>> check_variables({"params": {"head": {"kernel": np.zeros((8, 3))}}}, module,
...                 what="fit", advice="")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
jtl.errors.StepError: fit: the variables do not fit the module ...
  - params/head/kernel: (8, 3) in the variables, (4, 3) in the module
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import flax.errors
import numpy as np

from jtl import tree as jtree
from jtl.errors import StepError, bullet_list
from jtl.lora_layout import LORA_LEAF
from jtl.tree import PyTree

MERGE_LORA = ('fold them into the kernels first: variables["params"] = '
              'jtl.recipes.strategies.merge_lora(variables["params"], alpha), with the alpha '
              "they were trained with")


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _pure(variables: Mapping[str, Any]) -> dict[str, Any]:
  """`variables` with each `nnx.State` as its pure dict (the paths
  `update_module` and `variables_of` use, without the "/value" ending)."""
  nnx = sys.modules.get("flax.nnx")  # an nnx.State exists only once flax.nnx is imported
  state = nnx.State if nnx is not None else ()
  return {k: nnx.to_pure_dict(v) if isinstance(v, state) else v for k, v in variables.items()}


def check_variables(given: Any, expected: PyTree, *, what: str, advice: str,
                    allow_missing: bool = False, lora_advice: str = MERGE_LORA,
                    sown: Collection[str] = ()) -> None:
  """Raises one StepError listing the paths of `given` that the module's
  variables `expected` (arrays or abstract leaves) lack, those of another
  shape and, unless `allow_missing`, the module's paths that `given` lacks.
  `sown`: the paths of values an NNX module sowed, not among its variables.
  `what` (the call) starts the message and `advice` ends it. Shapes only:
  nothing is computed or compiled."""
  if not isinstance(given, Mapping):
    raise StepError(f"{what}: the variables must be a dict such as {{'params': ..., "
                    f"'state': ...}}, got {type(given).__name__}. {advice}")
  have, want = jtree.flatten(_pure(given)), jtree.flatten(expected)
  extra = [p for p in have if p not in want]
  missing = [] if allow_missing else [p for p in want if p not in have]
  reshaped = [p for p in have if p in want and _shape(have[p]) != _shape(want[p])]
  if not (extra or missing or reshaped):
    return
  parts = [f"{what}: the variables do not fit the module (compared by path and shape)."]
  if missing:
    parts.append(f"Missing from the variables ({len(missing)} of the module's {len(want)}):\n"
                 + bullet_list([f"{p} {_shape(want[p])}" for p in missing], limit=20))
  if extra:
    parts.append(f"Not in the module ({len(extra)}):\n"
                 + bullet_list([f"{p} {_shape(have[p])}" for p in extra], limit=20))
  if reshaped:
    parts.append(f"Of another shape ({len(reshaped)}):\n" + bullet_list(
        [f"{p}: {_shape(have[p])} in the variables, {_shape(want[p])} in the module"
         for p in reshaped], limit=20))
  if any(p.startswith("batch_stats/") for p in extra) and any(p.startswith("state/") for p in want):
    parts.append("An NNX module keeps its BatchNorm statistics under 'state': pass "
                 "{'params': variables['params'], 'state': variables['batch_stats']}.")
  lora = [p for p in extra if re.fullmatch(LORA_LEAF, p)]
  if lora:
    parts.append(f"{len(lora)} of the leaves not in the module are LoRA adapters "
                 f"({lora[0]}, ...), which the plain module has no place for: {lora_advice}.")
  outputs = [p for p in extra if p in sown]
  if outputs:
    parts.append(f"{len(outputs)} of them ({outputs[0]}, ...) are values the module sowed "
                 "(Module.sow, nnx.Intermediate): its outputs, not variables to train or "
                 "load; leave them out, as jtl.adapter.variables_of(module) does.")
  raise StepError("\n".join(parts + [advice]).rstrip())


_LINEN_ERRORS = (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError,
                 flax.errors.ScopeCollectionNotFound, flax.errors.ScopeVariableNotFoundError,
                 flax.errors.ApplyScopeInvalidVariablesStructureError)


def _linen_message(module: Any, error: Exception) -> str:
  """flax's facts (without its documentation link) and what to do."""
  fact = re.sub(r"\s*\(https?://[^)]*\)\s*$", "", str(error)).rstrip(".")
  name = type(module).__name__
  collection = re.search(r'collection "([^"]+)"', fact)
  if collection and collection.group(1) != "params":
    todo = (f"Pass the full variables dict ({{'params': ..., '{collection.group(1)}': ...}}, "
            "as module.init(...) or the pretrained load returns it), not only its 'params'.")
  elif isinstance(error, flax.errors.ScopeParamShapeError):
    todo = ("The variables must be this module's: from module.init(...) or the pretrained "
            "load of the same architecture and sizes (widths, num_classes), initialised on "
            "inputs shaped as the training inputs (a layer after a flatten depends on the "
            "image size).")
  else:
    todo = ("The variables must be this module's, every layer: from module.init(...) or the "
            "pretrained load (jtl.load_pretrained(source, like=module.init(...))) of the same "
            "architecture.")
  return f"{name}: the variables do not fit the module: {fact}. {todo}"


@contextlib.contextmanager
def linen_variable_errors(module: Any) -> Iterator[None]:
  """Within this context, flax's errors for variables that do not fit the
  Linen `module` (another module's shapes, a missing layer or collection)
  are StepErrors. flax raises them while the call is traced, so the traced
  program is the same."""
  try:
    yield
  except _LINEN_ERRORS as e:
    raise StepError(_linen_message(module, e)) from e
