"""Errors raised by jtl.

Every error jtl raises for bad user input is a `JtlError`. A message says what
was expected, what was found, where (path, file, config key) and what to do.
Problems are collected and reported together rather than one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable


class JtlError(Exception):
  """Base class of every error jtl raises for bad input."""


class PartitionError(JtlError):
  """Rules, labels or tree structures that do not fit a parameter tree."""


class OptimizerError(JtlError):
  """Labels or options that do not fit the optimizer being built."""


class StepError(JtlError):
  """A loss, model or batch that does not fit the train/eval step."""


class DeviceError(JtlError):
  """A batch, mesh or sharding that does not fit the devices."""


class CheckpointError(JtlError):
  """A checkpoint file or directory that cannot be read or written."""


class CheckpointMismatchError(CheckpointError):
  """An intact checkpoint saved from another state than the one it is restored
  into: another model, partition, optimizer or phase. Never taken for damage:
  a resume stops at it, with no older step tried and nothing renamed."""


class LoadError(JtlError):
  """Pretrained weights that do not fit the model they are loaded into.

  `report`: the `jtl.weights.LoadReport` of a strict load that failed, or None.
  """

  def __init__(self, message: str, report: object = None) -> None:
    super().__init__(message)
    self.report = report


class ConfigError(JtlError):
  """A config key or value that is missing, unknown or invalid."""


class DataError(JtlError):
  """A dataset, split, folder or example that cannot be used."""


class DivergenceError(StepError):
  """A training step whose loss or gradient norm is not finite (NaN or inf)."""


class MissingExtraError(JtlError, ImportError):
  """An optional package a feature needs is not installed (`jtl._optional`).

  Also an ImportError, so code that falls back when an import fails keeps working.
  """


class Preempted(JtlError):
  """A run stopped by SIGTERM or SIGINT after saving its progress.

  `step` is the checkpoint step saved (None when nothing could be: no
  workdir), `signal_name` the signal ("SIGTERM", "SIGINT"); running again
  with the same workdir resumes from `step`. Scripts exit with `exit_code`,
  128 + the signal's number, as a shell reports a process the signal ended.
  """

  def __init__(self, message: str, *, step: int | None, signal_name: str, exit_code: int):
    super().__init__(message)
    self.step = step
    self.signal_name = signal_name
    self.exit_code = exit_code


def bullet_list(items: Iterable[object], *, limit: int = 50) -> str:
  """Formats items as an indented bullet list, eliding after `limit`."""
  items = list(items)
  lines = [f"  - {item}" for item in items[:limit]]
  if len(items) > limit:
    lines.append(f"  ... and {len(items) - limit} more")
  return "\n".join(lines)
