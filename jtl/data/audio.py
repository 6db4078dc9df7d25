"""Audio classification data: WAV files and the Free Spoken Digit Dataset.

`read_wav` reads PCM WAV files with the standard library (`wave`), mixes
them to mono and resamples them to 16 kHz (`resample`: exact band-limited
FFT resampling); `fit_length` centres each clip in a fixed number of
samples (zero padding, or the central part of a longer clip), so batches
have one shape. Values stay in 16-bit PCM units (-32768..32767), what
`jtl.models.speech` takes.

The Free Spoken Digit Dataset (FSDD; Jackson et al., CC BY-SA 4.0,
github.com/Jakobovski/free-spoken-digit-dataset) is 3,000 recordings of
the digits 0-9, 50 of each digit by each of 6 speakers, 8 kHz, in one
folder: `recordings/<digit>_<speaker>_<index>.wav`. `fsdd(path)` reads it
with the dataset's own split: recordings 0-4 of every speaker and digit
are "test" (300), 5-49 "train" (2,700). The train split is ordered by
(index, speaker, digit), so "train[:60]" holds one recording of each
speaker and digit, "train[:120]" two, and "train[-300:]" the last five.

>>> import numpy as np
>>> fit_length(np.arange(1, 4, dtype=np.float32), 7).tolist()
[0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
>>> resample(np.ones(8, np.float32), 8000, 16000).round(6).tolist() == [1.0] * 16
True
"""

from __future__ import annotations

import os
import re
import wave
from pathlib import Path

import numpy as np

from jtl.errors import DataError

FSDD = "fsdd"
FSDD_CLASSES = tuple(str(d) for d in range(10))
SAMPLE_RATE = 16_000
CLIP_SAMPLES = 16_000  # one second at 16 kHz: every FSDD clip but a few fits whole
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
_FSDD_TEST = 5  # recordings 0-4 of each speaker and digit: the dataset's test split


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
  """Band-limited resampling of a 1-D signal by zero-padding (or cutting)
  its spectrum; `rate` == `target` returns it unchanged."""
  if rate == target:
    return x.astype(np.float32)
  n = len(x)
  m = max(1, round(n * target / rate))
  spectrum = np.fft.rfft(x.astype(np.float64))
  out = np.fft.irfft(spectrum[:m // 2 + 1], m) if m < n else np.fft.irfft(spectrum, m)
  return (out * (m / n)).astype(np.float32)


def fit_length(x: np.ndarray, length: int) -> np.ndarray:
  """`x` centred in `length` samples: zero-padded, or its central part."""
  if len(x) >= length:
    start = (len(x) - length) // 2
    return x[start:start + length].astype(np.float32)
  before = (length - len(x)) // 2
  return np.pad(x, (before, length - len(x) - before)).astype(np.float32)


def read_wav(path: str | os.PathLike, *, rate: int = SAMPLE_RATE) -> np.ndarray:
  """A PCM WAV file as float32 mono at `rate` Hz, in 16-bit units."""
  try:
    with wave.open(os.fspath(path), "rb") as f:
      channels, width, file_rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
      frames = f.readframes(f.getnframes())
  except (wave.Error, EOFError, OSError) as e:
    raise DataError(f"{path}: not a readable PCM WAV file ({e}).") from None
  if width not in (1, 2, 4):
    raise DataError(f"{path}: {8 * width}-bit samples; expected 8, 16 or 32-bit PCM.")
  dtype = {1: np.uint8, 2: "<i2", 4: "<i4"}[width]
  x = np.frombuffer(frames[:len(frames) // (width * channels) * width * channels], dtype)
  x = x.astype(np.float64)
  if width == 1:
    x = (x - 128) * 256  # unsigned 8-bit -> 16-bit units
  elif width == 4:
    x = x / 65536
  x = x.reshape(-1, channels).mean(axis=1)
  if not len(x):
    raise DataError(f"{path}: the WAV file holds no samples.")
  return resample(x, file_rate, rate)


def _fsdd_files(path: Path) -> list[tuple[int, str, int, Path]]:
  folder = path / "recordings" if (path / "recordings").is_dir() else path
  if not folder.is_dir():
    raise DataError(f"FSDD folder {path} does not exist. Pass the dataset's folder "
                    "(github.com/Jakobovski/free-spoken-digit-dataset), which holds "
                    "recordings/<digit>_<speaker>_<index>.wav.")
  files = []
  for f in sorted(folder.iterdir()):
    m = _FSDD_NAME.match(f.name)
    if m:
      files.append((int(m.group(1)), m.group(2), int(m.group(3)), f))
  if not files:
    raise DataError(f"{folder}: no <digit>_<speaker>_<index>.wav files (the FSDD layout).")
  return files


def fsdd(path: str | os.PathLike, *, length: int = CLIP_SAMPLES
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """({split: float32 [N, length] 16 kHz clips}, {split: digit labels})."""
  files = _fsdd_files(Path(path).expanduser())
  order = sorted(files, key=lambda r: (r[2], r[1], r[0]))  # index, speaker, digit
  clips: dict[str, list[np.ndarray]] = {"train": [], "test": []}
  labels: dict[str, list[int]] = {"train": [], "test": []}
  for digit, _, index, f in order:
    split = "test" if index < _FSDD_TEST else "train"
    clips[split].append(fit_length(read_wav(f), length))
    labels[split].append(digit)
  return ({s: np.stack(c) if c else np.zeros((0, length), np.float32)
           for s, c in clips.items()},
          {s: np.array(y, np.int64) for s, y in labels.items()})
