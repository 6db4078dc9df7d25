"""Where a run's numbers go: JSONL, TensorBoard event files and a PNG plot.

All three live in the workdir: `metrics.jsonl` (one JSON object per line,
{"step": ..., "split": "train"|"eval", ...}), `tensorboard/` and `curves.png`
(training loss, eval loss and eval accuracy against step, redrawn at each
evaluation). Only process 0 writes. A NaN or inf is written as null (strict
JSON). A resumed run first cuts the JSONL back to its resume step, so the
steps it repeats appear once, and drops a line left partial by a kill.
The workdir may be a bucket (`jtl.paths`): there the JSONL and the event file
are uploaded whole at each write (objects have no append), and the plot is
drawn in memory.
TensorBoard files need tensorboardX and the plot matplotlib (`jtl[app]`);
by default each is written when its package is installed.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from typing import Any

import jax
from etils import epath

from jtl import _optional, paths

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
    self.workdir = paths.path(workdir)
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
        paths.write_atomic(self.jsonl, self._jsonl_text().encode())
    if _wanted(tensorboard, "tensorboardX", "TensorBoard logs"):
      tbx = _optional.require("tensorboardX", "TensorBoard logs (MetricWriter)")
      if paths.is_remote(self.workdir):
        _register_tensorboard_backend(self.workdir)
      self._tb = tbx.SummaryWriter(os.fspath(self.workdir / "tensorboard"))

  def _jsonl_text(self) -> str:
    return "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.history)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    row = {"step": int(step), "split": split,
           **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    self.history.append(row)
    line = json.dumps(row, allow_nan=False) + "\n"
    paths.append_text(self.jsonl, line,
                      whole=self._jsonl_text() if paths.is_remote(self.jsonl) else line)
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
    try:
      return paths.save_figure(fig, self.workdir / filename)
    finally:
      plt.close(fig)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _EpathEventFile:
  """A TensorBoard event file in a bucket: tensorboardX's record writer
  appends to it; each flush uploads the whole file through epath."""

  def __init__(self, path: str):
    self.path = paths.path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer factory for a URL scheme (see `record_writer`)."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # buckets have no folders to create


def _register_tensorboard_backend(workdir: epath.Path) -> None:
  """Routes tensorboardX's event files under `workdir`'s scheme through epath
  (its own gs:// writer uses google-cloud-storage, another client)."""
  record_writer = _optional.require("tensorboardX.record_writer", "TensorBoard logs")
  record_writer.register_writer_factory(os.fspath(workdir).split(":")[0], _EpathEventFiles())
