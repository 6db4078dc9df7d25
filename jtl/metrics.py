"""Where a run's numbers go: JSONL, TensorBoard event files and a PNG plot.

All three live in the workdir: `metrics.jsonl` (one JSON object per line,
{"step": ..., "split": "train"|"eval", ...}), `tensorboard/` and `curves.png`
(training loss, eval loss and eval accuracy against step, redrawn at each
evaluation). Only process 0 writes. A NaN or inf is written as null (strict
JSON). A resumed run first cuts the JSONL back to its resume step, so the
steps it repeats appear once, and drops a line left partial by a kill.
TensorBoard files need tensorboardX and the plot matplotlib (`jtl[app]`);
by default each is written when its package is installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
from etils import epath

from jtl import _optional

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


def _wanted(option: bool | None, module: str, what: str) -> bool:
  """True/False as given; None: whether `module` is installed (logged once if not)."""
  if option is not None:
    return option
  if _optional.available(module):
    return True
  if module not in _NOT_INSTALLED_LOGGED:
    _NOT_INSTALLED_LOGGED.add(module)
    log.info("%s not written: %s is not installed (pip install 'jtl[app]').", what, module)
  return False


_NOT_INSTALLED_LOGGED: set[str] = set()


class MetricWriter:
  """Appends metrics to JSONL and TensorBoard; draws the curves on demand.

  `tensorboard` and `curves`: True writes them (MissingExtraError without
  tensorboardX / matplotlib), False does not, None when the package is installed.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool | None = None,
               curves: bool | None = None, resume_step: int | None = None):
    self.workdir = epath.Path(workdir)
    self.active = jax.process_index() == 0
    self.history: list[dict[str, Any]] = []
    self._tb = None
    self.curves = self.active and _wanted(curves, "matplotlib", "curves.png")
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
    if _wanted(tensorboard, "tensorboardX", "TensorBoard logs"):
      tbx = _optional.require("tensorboardX", "TensorBoard logs (MetricWriter)")
      self._tb = tbx.SummaryWriter(str(self.workdir / "tensorboard"))

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
    if not self.active or not self.history or not self.curves:
      return None
    _optional.require("matplotlib", "Plotting curves (MetricWriter)").use("Agg")
    plt = _optional.require("matplotlib.pyplot", "Plotting curves (MetricWriter)")

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
