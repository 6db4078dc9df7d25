"""Google's speech_embedding model (keyword spotting), as openWakeWord ships it.

The pretrained weights are the initializers of `embedding_model.onnx` inside
the pip package openwakeword 0.4.0 (`resources/models/`), a conversion of
https://tfhub.dev/google/speech_embedding/1 (trained by Google on keyword
spotting); jtl reads them with its own ONNX reader (`jtl.weights.onnx_file`).

Input: 16 kHz mono waveforms [B, samples] in 16-bit PCM units (-32768..32767),
at least `MIN_SAMPLES` (0.78 s). The front end is openWakeWord's
`melspectrogram.onnx` written out in JAX with the same constants (checked
against the file in tests/models/test_speech.py): a 512-point STFT of a
400-sample Hann window every 160 samples, power, 32 Slaney mel bands over
60-3800 Hz, 10*log10, floored at the clip's maximum - 80 dB, then
`x / 10 + 2` (openWakeWord's transform towards Google's TF front end). The
trunk: a 3x3 conv, ReLU, BatchNorm, then 19 convs (1x3 "SAME" over
frequency, 3x1 "VALID" over time; BatchNorm folded into them), each followed
by LeakyReLU(0.2) and max(x, -0.4), with five max-pools; one 96-d embedding
per 76 frames (0.775 s), every 8 frames (80 ms). `features` averages the
embeddings over time; `head` is a Dense on that.

>>> import numpy as np
>>> m = SpeechEmbedding(num_classes=10)
>>> x = np.zeros((2, 16000), np.float32)
>>> v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)  # shapes only: no compile
>>> jax.eval_shape(m.apply, v, x).shape
(2, 10)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl.errors import CheckpointError, DataError
from jtl.models import registry, wgrad
from jtl.models.layers import BatchNorm

SAMPLE_RATE = 16_000
N_FFT, WINDOW, HOP, N_MELS = 512, 400, 160, 32
FRAMES = 76  # frames seen by one embedding
MIN_SAMPLES = N_FFT + (FRAMES - 1) * HOP
EMBED_DIM = 96
# (kernel over (time, frequency), max-pool after it or None), convs 1..18.
_CONVS = [((1, 3), None), ((3, 1), (2, 2)), ((1, 3), None), ((3, 1), None), ((1, 3), None),
          ((3, 1), (1, 2)), ((1, 3), None), ((3, 1), None), ((1, 3), None), ((3, 1), (2, 2)),
          ((1, 3), None), ((3, 1), None), ((1, 3), None), ((3, 1), (1, 2)), ((1, 3), None),
          ((3, 1), None), ((1, 3), None), ((3, 1), (2, 2))]
_WIDTHS = [24, 24, 48, 48, 48, 48, 72, 72, 72, 72, 96, 96, 96, 96, 96, 96, 96, 96]


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
  """Slaney's mel scale (librosa's default): linear below 1 kHz, log above."""
  f = np.asarray(f, np.float64)
  log_step = np.log(6.4) / 27.0
  return np.where(f >= 1000, 15.0 + np.log(np.maximum(f, 1e-9) / 1000) / log_step, f * 0.015)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  log_step = np.log(6.4) / 27.0
  return np.where(m >= 15.0, 1000 * np.exp(log_step * (m - 15.0)), m / 0.015)


def mel_filters(fmin: float = 60.0, fmax: float = 3800.0) -> np.ndarray:
  """[N_FFT // 2 + 1, N_MELS] Slaney-normalised triangular filters."""
  freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), N_MELS + 2))
  ramps = edges[:, None] - freqs[None]
  widths = np.diff(edges)
  lower = -ramps[:-2] / widths[:-1, None]
  upper = ramps[2:] / widths[1:, None]
  weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
  return weights.T.astype(np.float32)


def stft_basis() -> tuple[np.ndarray, np.ndarray]:
  """[N_FFT, N_FFT // 2 + 1] real and imaginary DFT rows times a 400-sample
  periodic Hann window centred in the 512-sample frame."""
  n = np.arange(N_FFT)
  window = np.zeros(N_FFT)
  start = (N_FFT - WINDOW) // 2
  window[start:start + WINDOW] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)
  angle = 2 * np.pi * np.outer(n, np.arange(N_FFT // 2 + 1)) / N_FFT
  return ((window[:, None] * np.cos(angle)).astype(np.float32),
          (-window[:, None] * np.sin(angle)).astype(np.float32))


_REAL, _IMAG = stft_basis()
_MEL = mel_filters()


def log_mel(waveform: jax.Array) -> jax.Array:
  """[B, samples] 16-bit-scale audio -> [B, frames, 32] transformed log-mel."""
  frames = (waveform.shape[1] - N_FFT) // HOP + 1
  idx = np.arange(frames)[:, None] * HOP + np.arange(N_FFT)[None]
  x = waveform[:, idx]  # [B, frames, N_FFT]
  power = jnp.dot(x, _REAL) ** 2 + jnp.dot(x, _IMAG) ** 2
  db = 10.0 * jnp.log10(jnp.maximum(jnp.dot(power, _MEL), 1e-10))
  db = jnp.maximum(db, jnp.max(db, axis=(1, 2), keepdims=True) - 80.0)
  return db / 10.0 + 2.0


def _act(x: jax.Array) -> jax.Array:
  return jnp.maximum(nn.leaky_relu(x, 0.2), -0.4)


class SpeechEmbedding(nn.Module):
  """Attributes: num_classes (0: the pooled 96-d embedding)."""
  num_classes: int = 0

  def setup(self) -> None:
    self.conv0 = wgrad.Conv(24, (3, 3), padding="VALID", use_bias=False)
    self.bn0 = BatchNorm(momentum=0.99, epsilon=1e-3)
    self.convs = [wgrad.Conv(w, k, padding=((0, 0), (1, 1)) if k == (1, 3) else "VALID",
                          name=f"conv{i}")
                  for i, ((k, _), w) in enumerate(zip(_CONVS, _WIDTHS), start=1)]
    self.conv19 = wgrad.Conv(EMBED_DIM, (3, 1), padding="VALID", use_bias=False)
    if self.num_classes:
      self.head = wgrad.Dense(self.num_classes)

  def embeddings(self, waveform: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, samples] -> [B, windows, 96]: one embedding per 76 frames, every 8."""
    if waveform.ndim != 2 or waveform.shape[-1] < MIN_SAMPLES:
      raise DataError(f"speech_embedding needs mono 16 kHz clips [batch, samples] of >= "
                      f"{MIN_SAMPLES} samples, got shape {tuple(waveform.shape)}; pad short "
                      "clips with zeros (jtl.data.audio.fit_length) and mix stereo to mono.")
    x = jax.lax.stop_gradient(log_mel(waveform.astype(jnp.float32)))[..., None]
    x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    x = _act(self.bn0(nn.relu(self.conv0(x)), use_running_average=not train))
    for conv, (_, pool) in zip(self.convs, _CONVS):
      x = _act(conv(x))
      if pool is not None:
        x = nn.max_pool(x, pool, strides=pool)
    return self.conv19(x)[:, :, 0, :]

  def features(self, waveform: jax.Array, *, train: bool = False) -> jax.Array:
    return jnp.mean(self.embeddings(waveform, train=train), axis=1)

  def __call__(self, waveform: jax.Array, *, train: bool = False) -> jax.Array:
    feats = self.features(waveform, train=train)
    return self.head(feats) if self.num_classes else feats


_BN = "model/batch_normalization/"
_NAMES = {
    "model/conv2d/StatefulPartitionedCall/StatefulPartitionedCall/Conv2D/ReadVariableOp:0":
        "params/conv0/kernel",
    _BN + "ReadVariableOp:0": "params/bn0/scale",
    _BN + "ReadVariableOp_1:0": "params/bn0/bias",
    _BN + "FusedBatchNormV3/ReadVariableOp:0": "batch_stats/bn0/mean",
    _BN + "FusedBatchNormV3/ReadVariableOp_1:0": "batch_stats/bn0/var",
    "model/conv2d_19/Conv2D/ReadVariableOp:0": "params/conv19/kernel",
}
_FUSED = re.compile(r"model/conv2d_(\d+)/Conv2D_(weights|bias)_fused_bn")


def convert_onnx(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """embedding_model.onnx's initializers -> jtl variables. ONNX convs are
  [out, in, time, freq]; Flax's [time, freq, in, out]. The graph's own
  constants (pad widths, reshape targets, the -0.4 floor) are structure,
  written in the module, and dropped here after checking the floor."""
  out = {}
  for name, value in flat.items():
    m = _FUSED.fullmatch(name)
    if name in _NAMES:
      target = _NAMES[name]
    elif m:
      target = f"params/conv{m.group(1)}/{'kernel' if m.group(2) == 'weights' else 'bias'}"
    elif name.startswith("const_fold_opt") and value.size == 1:
      if not np.isclose(float(value.ravel()[0]), -0.4):
        raise CheckpointError(f"speech_embedding: activation floor {name} is "
                              f"{float(value.ravel()[0])}, expected -0.4")
      continue
    elif name.startswith(("pad_const", "new_shape")):
      continue
    else:
      out[name] = value  # unknown: reported as unused by the loader
      continue
    out[target] = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
  return out


def example_input(batch_size: int) -> np.ndarray:
  return np.zeros((batch_size, MIN_SAMPLES), np.float32)


def preprocess(waveform: np.ndarray) -> np.ndarray:
  """16 kHz mono audio in 16-bit units, [samples] or [B, samples], as float32
  (a warning for floats in [-1, 1]; a DataError for other shapes or clips
  shorter than MIN_SAMPLES)."""
  x = np.asarray(waveform)
  if x.ndim not in (1, 2) or x.shape[-1] < MIN_SAMPLES:
    raise DataError(
        f"speech_embedding takes mono 16 kHz audio [samples] or [batch, samples] of >= "
        f"{MIN_SAMPLES} samples, got shape {x.shape}; mix stereo [samples, 2] to mono "
        "(x.mean(-1)) and pad short clips with zeros (jtl.data.audio.fit_length).")
  if np.issubdtype(x.dtype, np.floating) and x.size and 0 < np.abs(x).max() <= 1.0:
    warnings.warn("The float audio lies in [-1, 1], but speech_embedding takes 16-bit units "
                  "(-32768..32767): multiply it by 32768 first.", stacklevel=2)
  x = x.astype(np.float32)
  return x[None] if x.ndim == 1 else x


registry.register(registry.ModelSpec(
    name="speech_embedding",
    build=lambda num_classes=0, **kw: SpeechEmbedding(num_classes=num_classes, **kw),
    example_input=example_input,
    preprocess=preprocess,
    groups=[("stem", r"(conv0|bn0)/.*"), ("block1", r"conv[12]/.*"),
            ("block2", r"conv[3-6]/.*"), ("block3", r"(conv[7-9]|conv10)/.*"),
            ("block4", r"conv1[1-4]/.*"), ("block5", r"conv1[5-8]/.*"),
            ("embedding", r"conv19/.*"), ("head", r"head/.*")],
    pretrained="speech_embedding/openwakeword",
    converter=convert_onnx,
    default_num_classes=0,
    input_kind="audio",
))
