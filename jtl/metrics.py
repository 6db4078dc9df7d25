"""Where a run's numbers go: JSONL, TensorBoard event files and a PNG plot.

All three live in the workdir: `metrics.jsonl` (one JSON object per line,
{"step": ..., "split": "train"|"eval", ...}), `tensorboard/` and `curves.png`
(training loss, eval loss and eval accuracy against step, redrawn at each
evaluation). Only process 0 writes. A NaN or inf is written as null (strict
JSON). A resumed run first cuts the JSONL back to its resume step, so the
steps it repeats appear once, and drops a line left partial by a kill.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
from etils import epath

log = logging.getLogger(__name__)


def _read_rows(path: epath.Path) -> tuple[list[dict[str, Any]], list[int]]:
  """The rows of a metrics JSONL file and the numbers of the lines dropped.

  A run killed during a write (or a full disk) leaves a partial last line;
  the checkpoints are intact, so the run must resume: such a line, or any
  line that is not a metrics row, is dropped with a warning (the file is
  then rewritten without it, so the next row starts on a line of its own).
  """
  rows, dropped = [], []
  text = path.read_bytes().decode("utf-8", errors="replace")  # a cut can split a character
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if isinstance(row, dict) and {"step", "split"} <= row.keys():
      rows.append(row)
    else:
      dropped.append(number)
  if dropped:
    log.warning("%s: dropped %d unreadable line(s) (line %s; a write cut short by a kill "
                "or a full disk); the checkpoints are not affected.", path, len(dropped),
                ", ".join(map(str, dropped[:10])))
  return rows, dropped


class MetricWriter:
  """Appends metrics to JSONL and TensorBoard; draws the curves on demand."""

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               resume_step: int | None = None):
    self.workdir = epath.Path(workdir)
    self.active = jax.process_index() == 0
    self.history: list[dict[str, Any]] = []
    self._tb = None
    if not self.active:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl = self.workdir / "metrics.jsonl"
    if self.jsonl.exists():  # a resumed run keeps its earlier curve, up to where it resumes
      self.history, dropped = _read_rows(self.jsonl)
      kept = [r for r in self.history
              if resume_step is None or r.get("step", 0) <= resume_step]
      if dropped or len(kept) < len(self.history):
        self.history = kept
        tmp = self.workdir / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.jsonl)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    row = {"step": int(step), "split": split,
           **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    self.history.append(row)
    with open(self.jsonl, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
      self._tb.flush()

  def plot(self, filename: str = "curves.png") -> epath.Path | None:
    """Draws loss and accuracy curves of the history into workdir/filename."""
    if not self.active or not self.history:
      return None
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    def series(split, key):
      rows = [r for r in self.history if r["split"] == split and key in r]
      return [r["step"] for r in rows], [math.nan if r[key] is None else r[key] for r in rows]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
      xs, ys = series(split, "loss")
      if xs:
        ax_loss.plot(xs, ys, style, label=f"{split} loss")
      xs, ys = series(split, "accuracy")
      if xs:
        ax_acc.plot(xs, ys, style, label=f"{split} accuracy")
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("loss"), ax_loss.legend()
    ax_acc.set_xlabel("step"), ax_acc.set_ylabel("accuracy"), ax_acc.legend()
    ax_acc.set_ylim(0, 1)
    fig.tight_layout()
    path = self.workdir / filename
    tmp = self.workdir / (filename + ".tmp.png")
    fig.savefig(str(tmp), dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
