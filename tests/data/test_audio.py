"""Audio data (jtl.data.audio): WAV reading and resampling, the FSDD layout
and its split, and batches through make_dataset, on files written here."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from jtl.data import audio, make_dataset, sources
from jtl.errors import DataError


def _write(path, x, rate=8000, channels=1, width=2):
  with wave.open(str(path), "wb") as f:
    f.setnchannels(channels)
    f.setsampwidth(width)
    f.setframerate(rate)
    f.writeframes(x.astype({1: np.uint8, 2: "<i2"}[width]).tobytes())


def _tone(digit, speaker, index, n=4000):
  t = np.arange(n) / 8000
  return (1000 * (1 + speaker) * np.sin(2 * np.pi * (200 + 50 * digit + index) * t))


@pytest.fixture
def fsdd_dir(tmp_path):
  rec = tmp_path / "fsdd" / "recordings"
  rec.mkdir(parents=True)
  for digit in range(3):
    for s, speaker in enumerate(["jackson", "theo"]):
      for index in range(8):  # 0-4: test, 5-7: train
        _write(rec / f"{digit}_{speaker}_{index}.wav", _tone(digit, s, index))
  (rec / "notes.txt").write_text("not a recording")
  return tmp_path / "fsdd"


def test_read_wav_resamples_and_mixes(tmp_path):
  t = np.arange(800) / 8000
  x = 1000 * np.sin(2 * np.pi * 440 * t)
  _write(tmp_path / "mono.wav", x)
  got = audio.read_wav(tmp_path / "mono.wav")
  want = 1000 * np.sin(2 * np.pi * 440 * np.arange(1600) / 16000)
  assert got.shape == (1600,) and got.dtype == np.float32
  # Band-limited interpolation of a periodic-looking tone: exact away from the ends.
  np.testing.assert_allclose(got[200:-200], want[200:-200], atol=15)
  stereo = np.stack([x, -x + 200], axis=1).ravel()
  _write(tmp_path / "stereo.wav", stereo, rate=16000, channels=2)
  np.testing.assert_allclose(audio.read_wav(tmp_path / "stereo.wav"), 100, atol=1)
  _write(tmp_path / "u8.wav", np.full(10, 192), rate=16000, width=1)
  np.testing.assert_array_equal(audio.read_wav(tmp_path / "u8.wav"), 64 * 256)
  (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVE")
  with pytest.raises(DataError, match="bad.wav"):
    audio.read_wav(tmp_path / "bad.wav")


def test_fsdd_split_and_order(fsdd_dir):
  clips, labels = audio.fsdd(fsdd_dir, length=12_000)
  assert clips["train"].shape == (18, 12_000) and clips["test"].shape == (30, 12_000)
  # Train is ordered by (index, speaker, digit): a slice of 6 is one of each.
  assert labels["train"][:6].tolist() == [0, 1, 2, 0, 1, 2]
  assert np.bincount(labels["test"]).tolist() == [10, 10, 10]
  # 4,000 samples at 8 kHz = 8,000 at 16 kHz, centred in 12,000.
  first = clips["train"][0]
  assert np.all(first[:2000] == 0) and np.all(first[-2000:] == 0) and np.abs(first).max() > 900
  with pytest.raises(DataError, match="FSDD"):
    audio.fsdd(fsdd_dir / "missing")


def test_fsdd_batches(fsdd_dir):
  info = sources.dataset_info(f"fsdd:{fsdd_dir}")
  assert info.num_classes == 10 and info.num_examples == {"train": 18, "test": 30}
  batch = next(iter(make_dataset(f"fsdd:{fsdd_dir}", split="train[:6]", batch_size=4,
                                 train=True)))
  assert batch["inputs"].shape == (4, audio.CLIP_SAMPLES) and batch["inputs"].dtype == np.float32
  evals = list(make_dataset(f"fsdd:{fsdd_dir}", split="test", batch_size=8, train=False))
  assert sum(int(b["mask"].sum()) for b in evals) == 30
  arrays = {"train": {"audio": np.ones((3, 100)), "label": np.array([0, 1, 0])}}
  batch = next(iter(make_dataset(arrays, split="train", batch_size=2, train=True)))
  assert batch["inputs"].shape == (2, 100)
  with pytest.raises(DataError, match="image augmentations"):
    make_dataset(arrays, split="train", batch_size=2, train=True, mixup_alpha=0.2)


def test_in_memory_audio_refuses_ragged_clips_and_warns_on_unit_floats(caplog):
  labels = np.array([0, 1])
  with pytest.raises(DataError, match=r"audio must be \[N, samples\].*clips of shapes "
                     r"\[\(100,\), \(120,\)\]; pad or crop"):
    sources.resolve_source({"train": {"audio": [np.zeros(100), np.zeros(120)], "label": labels}})
  with pytest.raises(DataError, match=r"got shape \(2, 100, 2\)"):
    sources.resolve_source({"train": {"audio": np.zeros((2, 100, 2)), "label": labels}})
  clips = np.full((2, 100), 0.5, np.float32)
  source = sources.resolve_source({"train": {"audio": clips, "label": labels}})
  assert "lies in [-1, 1]" in caplog.text and "multiply by 32768" in caplog.text
  assert source.inputs["train"].dtype == np.float32
