"""The backbone chosen by measurement (`model="auto"` of the app).

`select_backbone` fits the cached linear probe on each candidate backbone
(one unaugmented feature pass over the training and validation images, then
the head alone on the cache: `strategies.features.feature_extractor` and
`head_trainer`, the machinery of the cached probe phase) and picks the one
whose probe scores best on the validation split. It returns the table of
candidates (validation accuracy, feature time, parameters, inference ms per
image) and the choice, with the chosen candidate's training features (only
the best so far is kept, so memory holds at most two candidates' features);
the run then trains the chosen backbone as if it had been named, and its
cached probe may take those features instead of a second backbone pass
(`features.cached_head_phase(train_features=...)`). A time budget skips the
candidates whose feature pass, estimated from one timed batch, would not fit
in what is left of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from jtl.recipes.strategies import features
from jtl.tree import PyTree

Batches = Callable[[], Iterable[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A backbone to try.

  Attributes:
    name: the model's name (what the run's `model` becomes if it wins).
    load: () -> (module, variables): the model with its pretrained weights and
      the run's head (a Dense named "head" over `module.features`).
    train_pass: () -> one unaugmented pass over the training split, in this
      model's preprocessing ({"inputs", "label", "mask"?} batches).
    val_pass: the same over the validation split.
    skip: why it is not tried (e.g. its weights are not installed); None: tried.
  """
  name: str
  load: Callable[[], tuple[Any, PyTree]]
  train_pass: Batches
  val_pass: Batches
  skip: str | None = None


@dataclasses.dataclass(frozen=True)
class Row:
  """One candidate's line of the table (None where it was not measured)."""
  name: str
  val_accuracy: float | None = None
  feature_seconds: float | None = None  # load, compile and both feature passes
  probe_seconds: float | None = None  # the head's steps on the cache
  params: int | None = None
  ms_per_image: float | None = None  # the backbone's forward pass, after compilation
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Selection:
  """The table (one row per candidate, in their order) and the chosen name.

  `train_features` are the chosen candidate's (features [N, D], labels [N])
  over its `train_pass`, as `features.extract_features` gives them (None
  when nothing was chosen); not part of the table (`to_dict`, `markdown`).
  """
  rows: tuple[Row, ...]
  choice: str | None
  train_features: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  def markdown(self) -> str:
    """The table as Markdown (the chosen row marked)."""
    lines = ["| candidate | val accuracy | feature s | probe s | params | ms/image | note |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in self.rows:
      note = "chosen" if r.name == self.choice else r.note
      lines.append(f"| {r.name} | {fmt(r.val_accuracy, '.4f')} | {fmt(r.feature_seconds, '.1f')}"
                   f" | {fmt(r.probe_seconds, '.1f')} | {fmt(r.params, ',')}"
                   f" | {fmt(r.ms_per_image, '.2f')} | {note} |")
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    return {"choice": self.choice, "candidates": [dataclasses.asdict(r) for r in self.rows]}


def select_backbone(candidates: Sequence[Candidate], *,
                    head_tx: Callable[[PyTree], optax.GradientTransformation],
                    head_steps: int, batch_size: int, num_images: int, seed: int = 0,
                    budget_seconds: float | None = None,
                    mesh: jax.sharding.Mesh | None = None,
                    clock: Callable[[], float] = time.perf_counter,
                    log: Callable[[str], None] | None = None) -> Selection:
  """Fits the cached probe on each candidate; the best on validation wins.

  Args:
    candidates: the backbones, in the order of the table (a tie goes to the
      earlier one, so list the cheaper first).
    head_tx: head labels ({"head": ...} -> "head") -> the probe's optimizer.
    head_steps, batch_size, seed: the probe's head steps on the cache
      (`features.head_trainer`), as the run's own cached probe takes them.
    num_images: training plus validation images (the feature pass's size, for
      the budget's estimate).
    budget_seconds: seconds for the whole selection (None: no limit). Before
      its feature pass, a candidate's time is estimated from one timed batch
      (ms per image x num_images); one that would end past the budget is
      skipped, and its row says so.
    clock: the timer (seconds).
    log: called with a line per candidate.

  Returns:
    The `Selection`; its choice is None when no candidate was measured, else
    its `train_features` are the choice's.
  """
  start, rows = clock(), []
  best, kept = None, None
  for candidate in candidates:
    feats = None
    if candidate.skip is not None:
      rows.append(Row(candidate.name, note=f"skipped: {candidate.skip}"))
    else:
      left = None if budget_seconds is None else budget_seconds - (clock() - start)
      row, feats = _measure(candidate, head_tx=head_tx, head_steps=head_steps,
                            batch_size=batch_size, num_images=num_images, seed=seed,
                            left=left, mesh=mesh, clock=clock)
      rows.append(row)
    # Strictly better only: a tie keeps the earlier (cheaper) candidate. Only the best
    # so far keeps its features, to bound memory.
    if rows[-1].val_accuracy is not None and (best is None
                                              or rows[-1].val_accuracy > best.val_accuracy):
      best, kept = rows[-1], feats
    if log is not None:
      log(_line(rows[-1]))
  return Selection(tuple(rows), None if best is None else best.name, kept)


def _line(row: Row) -> str:
  if row.val_accuracy is None:
    return f"{row.name}: {row.note}"
  return (f"{row.name}: validation accuracy {row.val_accuracy:.4f} (features "
          f"{row.feature_seconds:.1f}s, probe {row.probe_seconds:.1f}s, {row.params:,} params, "
          f"{row.ms_per_image:.2f} ms/image)")


def _measure(candidate: Candidate, *, head_tx: Callable[[PyTree], optax.GradientTransformation],
             head_steps: int, batch_size: int, num_images: int, seed: int,
             left: float | None, mesh: jax.sharding.Mesh | None,
             clock: Callable[[], float]
             ) -> tuple[Row, tuple[np.ndarray, np.ndarray] | None]:
  """(One candidate's row, its training features and labels or None): load,
  time one batch, then (within `left` seconds) both feature passes and the
  probe on the cache."""
  t0 = clock()
  module, variables = candidate.load()
  params = sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
  extract = features.feature_extractor(module, variables, mesh=mesh)
  batches = iter(candidate.train_pass())
  first = next(batches)
  extract([first])  # compiles
  t1 = clock()
  extract([first])
  per_image = (clock() - t1) / max(1, len(first["label"]))
  estimate = per_image * num_images
  if left is not None and (clock() - t0) + estimate > left:
    return Row(candidate.name, params=params, ms_per_image=1e3 * per_image,
               note=f"skipped: its feature pass (~{math.ceil(estimate)}s) does not fit the "
                    f"{max(0, math.floor(left - (clock() - t0)))}s left of the time budget"
               ), None
  train_x, train_y = extract(itertools.chain([first], batches))
  val_x, val_y = extract(candidate.val_pass())
  t2 = clock()
  head_vars = features.head_variables(variables)
  labels = jax.tree.map(lambda _: "head", head_vars["params"])
  head = features.head_trainer(variables, head_tx(labels))(
      train_x, train_y, num_steps=head_steps, batch_size=min(batch_size, len(train_y)),
      seed=seed)
  logits = features.Head(head.params["head"]["kernel"].shape[-1]).apply(
      {"params": head.params}, val_x)
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == val_y))
  return Row(candidate.name, val_accuracy=accuracy, feature_seconds=t2 - t0,
             probe_seconds=clock() - t2, params=params, ms_per_image=1e3 * per_image
             ), (train_x, train_y)
