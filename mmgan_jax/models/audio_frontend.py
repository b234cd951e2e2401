"""Log-mel spectrogram front end in jax.numpy (jit-able and differentiable).

Anchor: the standard speech/audio front end (25 ms periodic Hann window, 10 ms hop, mel filter bank,
log(mel + 1e-6)), as in EQUATIONS.md "Audio frontend". The reference it is tested against is
`transformers.audio_utils`: the mel matrix is built once with `mel_filter_bank` (a numpy constant), and
framing follows `spectrogram(..., center=True, pad_mode='reflect')`: the waveform is reflect-padded by
win_length // 2 on both sides, frames of win_length samples start every hop_length samples, each frame is
multiplied by the window and zero-padded at its end to n_fft before the real FFT.

Defaults: 16 kHz mono, win_length = n_fft = 400 (25 ms), hop 160 (10 ms), 64 mel bins, fmin 0, fmax 8000,
Slaney mel scale with Slaney area normalisation (librosa's default, also used by Whisper/CLAP). n_fft = 512
with win_length 400 also works (finer frequency grid, same frames).

Output shape: (B, 1 + N // hop_length, n_mels) for a waveform of N >= win_length // 2 + 1 samples.
The power spectrum is computed as re^2 + im^2 (no |.|), so gradients are finite even for silence.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from transformers.audio_utils import mel_filter_bank

LOG_OFFSET = 1e-6


@functools.lru_cache(maxsize=32)
def mel_filters(
    n_fft: int = 400,
    n_mels: int = 64,
    sample_rate: int = 16_000,
    fmin: float = 0.0,
    fmax: float = 8_000.0,
    mel_scale: str = 'slaney',
    norm: str | None = 'slaney',
) -> np.ndarray:
  """The (n_fft // 2 + 1, n_mels) float32 mel filter matrix (built once per setting, cached)."""
  fb = mel_filter_bank(
      num_frequency_bins=n_fft // 2 + 1,
      num_mel_filters=n_mels,
      min_frequency=fmin,
      max_frequency=fmax,
      sampling_rate=sample_rate,
      norm=norm,
      mel_scale=mel_scale,
  )
  fb = np.asarray(fb, np.float32)
  fb.setflags(write=False)
  return fb


@functools.lru_cache(maxsize=32)
def hann_window(win_length: int) -> np.ndarray:
  """Periodic Hann window of win_length samples (float32)."""
  n = np.arange(win_length, dtype=np.float64)
  w = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)).astype(np.float32)
  w.setflags(write=False)
  return w


def power_spectrogram(
    waveform: jnp.ndarray,
    *,
    n_fft: int = 400,
    hop_length: int = 160,
    win_length: int | None = None,
) -> jnp.ndarray:
  """Centred (reflect-padded) STFT power spectrum: (B, N) -> (B, frames, n_fft // 2 + 1), float32."""
  win_length = n_fft if win_length is None else win_length
  if win_length > n_fft:
    raise ValueError(f'win_length={win_length} must be <= n_fft={n_fft}.')
  x = jnp.asarray(waveform, jnp.float32)
  if x.ndim != 2:
    raise ValueError(f'waveform must be (B, N); got shape {x.shape}.')
  pad = win_length // 2
  if x.shape[1] <= pad:
    raise ValueError(f'waveform needs more than {pad} samples for reflect padding; got {x.shape[1]}.')
  x = jnp.pad(x, ((0, 0), (pad, pad)), mode='reflect')
  num_frames = 1 + (x.shape[1] - win_length) // hop_length
  idx = np.arange(num_frames)[:, None] * hop_length + np.arange(win_length)[None, :]
  frames = x[:, idx] * hann_window(win_length)  # (B, F, win_length)
  spec = jnp.fft.rfft(frames, n=n_fft, axis=-1)  # zero-pads each frame at its end to n_fft
  return jnp.square(spec.real) + jnp.square(spec.imag)


def log_mel_spectrogram(
    waveform: jnp.ndarray,
    *,
    sample_rate: int = 16_000,
    n_fft: int = 400,
    hop_length: int = 160,
    n_mels: int = 64,
    win_length: int | None = None,
    fmin: float = 0.0,
    fmax: float = 8_000.0,
) -> jnp.ndarray:
  """log(mel(power STFT) + 1e-6): (B, N) waveform -> (B, frames, n_mels) float32."""
  power = power_spectrogram(waveform, n_fft=n_fft, hop_length=hop_length, win_length=win_length)
  fb = mel_filters(n_fft, n_mels, sample_rate, float(fmin), float(min(fmax, sample_rate / 2)))
  mel = jnp.einsum('bfk,km->bfm', power, fb, precision='highest')
  return jnp.log(mel + LOG_OFFSET)
