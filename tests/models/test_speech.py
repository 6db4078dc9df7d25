"""speech_embedding: the front end's constants are openWakeWord's, and the
imported network gives what onnxruntime gives on the published ONNX files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from jtl import models
from jtl.errors import DataError
from jtl.models import speech
from jtl.weights import read


def _openwakeword_models() -> Path:
  spec = importlib.util.find_spec("openwakeword")
  if spec is None:
    pytest.skip("openwakeword 0.4.0 not installed (make setup installs it)")
  return Path(list(spec.submodule_search_locations)[0]) / "resources" / "models"


def _clip(seconds: float = 1.0) -> np.ndarray:
  """A chirp with noise in 16-bit units, 16 kHz."""
  t = np.arange(int(16000 * seconds)) / 16000
  noise = np.random.default_rng(0).standard_normal(len(t))
  return (3000 * np.sin(2 * np.pi * 300 * t * (1 + 2 * t)) + 300 * noise).astype(np.float32)


def test_front_end_constants_are_openwakewords():
  flat = read(_openwakeword_models() / "melspectrogram.onnx")
  real, imag = speech.stft_basis()
  np.testing.assert_allclose(real.T, flat["0.stft.conv_real.weight"][:, 0], atol=1e-6)
  np.testing.assert_allclose(imag.T, flat["0.stft.conv_imag.weight"][:, 0], atol=1e-6)
  np.testing.assert_allclose(speech.mel_filters(), flat["1.melW"], atol=1e-7)


def test_matches_onnxruntime():
  ort = pytest.importorskip("onnxruntime")
  folder = _openwakeword_models()
  x = _clip()
  mel = ort.InferenceSession(str(folder / "melspectrogram.onnx"))
  ref_mel = np.squeeze(mel.run(None, {"input": x[None]})[0]) / 10 + 2
  np.testing.assert_allclose(np.asarray(speech.log_mel(x[None]))[0], ref_mel, atol=1e-4)
  windows = np.stack([ref_mel[i:i + speech.FRAMES]
                      for i in range(0, len(ref_mel) - speech.FRAMES + 1, 8)])
  embed = ort.InferenceSession(str(folder / "embedding_model.onnx"))
  ref = embed.run(None, {"input_1": windows[..., None].astype(np.float32)})[0]
  created = models.create("speech_embedding", num_classes=0,
                          pretrained="speech_embedding/openwakeword")
  assert not created.report.missing and not created.report.unexpected
  got = jax.jit(lambda v, x: created.module.apply(
      v, x, method=speech.SpeechEmbedding.embeddings))(created.variables, x[None])
  assert got.shape == (1, len(windows), 96)
  np.testing.assert_allclose(np.asarray(got)[0], ref.reshape(len(windows), 96),
                             atol=2e-3 * np.abs(ref).max())


def test_shapes_and_short_clips_are_refused():
  module = speech.SpeechEmbedding(num_classes=3)
  x = np.zeros((2, 16_000), np.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  assert jax.eval_shape(module.apply, variables, x).shape == (2, 3)
  assert variables["params"]["conv1"]["kernel"].shape == (1, 3, 24, 24)
  with pytest.raises(DataError, match=str(speech.MIN_SAMPLES)):
    jax.eval_shape(module.apply, variables, x[:, :speech.MIN_SAMPLES - 1])


def test_preprocess_refuses_stereo_and_short_clips_and_warns_on_unit_floats():
  clip = np.full(speech.MIN_SAMPLES, 1000, np.int16)
  assert speech.preprocess(clip).shape == (1, speech.MIN_SAMPLES)
  with pytest.raises(DataError, match=r"got shape \(12512, 2\); mix stereo"):
    speech.preprocess(np.stack([clip, clip], 1))
  with pytest.raises(DataError, match=r"got shape \(100,\).*pad short clips"):
    speech.preprocess(clip[:100])
  with pytest.warns(UserWarning, match=r"lies in \[-1, 1\].*multiply it by 32768"):
    speech.preprocess(clip / 32768.0)
