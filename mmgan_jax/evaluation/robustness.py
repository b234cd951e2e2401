"""Robustness: the evaluation repeated on held-out inputs corrupted at increasing strength.

The paper's title claims robustness; this measures it. Each corruption is applied to the conditioning input
only (the reference images and captions stay clean), deterministically (a fixed seed per corruption, level and
chunk), so every model is scored on the same corrupted inputs:

  audio_snr_db   white Gaussian noise added to each clip at a signal-to-noise ratio in dB (its power relative
                 to the clip's own mean power); inf = clean.
  word_dropout   each word token of a caption dropped with probability p (BOS/EOS kept, the rest shifted left,
                 so the model sees a shorter caption, not a hole); 0 = clean.
  image_noise    additive Gaussian noise of standard deviation sigma on images in [-1, 1], clipped; 0 = clean.

What each corruption is scored on (CURVES): audio -> image semantic accuracy and audio -> text BLEU-4 under audio
noise; text -> image semantic accuracy under word dropout; image -> text BLEU-4 under image noise.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mmgan_jax.evaluation import evaluator as evaluator_lib

log = logging.getLogger(__name__)

Chunk = evaluator_lib.Chunk


@dataclasses.dataclass(frozen=True)
class Curve:
  """One corruption, its levels, and the (generate, caption) settings and metrics it is scored with."""
  name: str
  levels: tuple[float, ...]
  generate: tuple[str, ...]
  captions: tuple[str, ...]
  modality: str  # the input it corrupts


CURVES = {
    'audio_snr_db': Curve('audio_snr_db', (math.inf, 20.0, 10.0, 5.0, 0.0, -5.0, -10.0),
                          ('audio_to_image',), ('audio_to_text',), 'audio'),
    'word_dropout': Curve('word_dropout', (0.0, 0.2, 0.4, 0.6, 0.8), ('text_to_image',), (), 'text'),
    'image_noise': Curve('image_noise', (0.0, 0.1, 0.2, 0.4, 0.8), (), ('image_to_text',), 'image'),
}


def add_noise_at_snr(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
  """audio (B, N) plus white noise whose power is the clip's mean power / 10^(snr/10); inf: unchanged."""
  audio = np.asarray(audio, np.float32)
  if math.isinf(snr_db) and snr_db > 0:
    return audio
  power = np.mean(np.square(audio.astype(np.float64)), axis=1, keepdims=True)
  std = np.sqrt(np.maximum(power, 1e-12) / 10.0 ** (snr_db / 10.0))
  return (audio + std * rng.standard_normal(audio.shape)).astype(np.float32)


def drop_words(ids: np.ndarray, mask: np.ndarray, p: float, rng: np.random.Generator, *, bos_id: int,
               eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Drops each word token (not BOS/EOS/PAD) with probability p and re-packs the rows: BOS kept words EOS PAD."""
  ids, mask = np.asarray(ids), np.asarray(mask, bool)
  if p <= 0:
    return ids, mask
  out_ids = np.full_like(ids, pad_id)
  out_mask = np.zeros_like(mask)
  for r in range(ids.shape[0]):
    row = ids[r][mask[r]]
    words = [int(t) for t in row if t not in (bos_id, eos_id, pad_id)]
    kept = [t for t in words if rng.random() >= p]
    new = [bos_id] + kept + [eos_id]
    out_ids[r, :len(new)] = new
    out_mask[r, :len(new)] = True
  return out_ids, out_mask


def add_image_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if sigma <= 0:
    return images
  return np.clip(images + sigma * rng.standard_normal(images.shape), -1.0, 1.0).astype(np.float32)


def corrupt(batch: Mapping[str, np.ndarray], curve: str, level: float, rng: np.random.Generator, *, bos_id: int,
            eos_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """A copy of `batch` with its `curve` input corrupted at `level` (the other inputs untouched)."""
  out = dict(batch)
  if curve == 'audio_snr_db':
    out['audio'] = add_noise_at_snr(batch['audio'], level, rng)
  elif curve == 'word_dropout':
    out['text_ids'], out['text_mask'] = drop_words(batch['text_ids'], batch['text_mask'], level, rng,
                                                   bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
  elif curve == 'image_noise':
    out['image'] = add_image_noise(batch['image'], level, rng)
  else:
    raise ValueError(f'unknown corruption {curve!r}; choose from {sorted(CURVES)}.')
  return out


def corrupted_chunks(chunks: Iterable[Chunk], curve: str, level: float, seed: int, **ids) -> Iterator[Chunk]:
  for i, (batch, refs) in enumerate(chunks):
    key = 2 * int(round(1000 * min(abs(level), 1e6))) + int(level < 0)  # a non-negative id of the level
    rng = np.random.default_rng([seed, list(CURVES).index(curve), key, i])
    yield corrupt(batch, curve, level, rng, **ids), refs


def headline(curve: Curve, metrics: Mapping[str, float]) -> dict[str, float]:
  """The numbers a curve plots: refined semantic mean accuracy per generate setting, BLEU-4 per caption one."""
  out = {}
  for s in curve.generate:
    out[f'{s}/semantic'] = float(metrics[f'{s}/refined/mean'])
  for s in curve.captions:
    out[f'{s}/bleu4'] = float(metrics[f'{s}/BLEU-4'])
  return out


def evaluate_robustness(evaluator: evaluator_lib.Evaluator, state, chunks: Callable[[], Iterable[Chunk]], *,
                        curves: Sequence[str] = tuple(CURVES), seed: int = 0,
                        ids: Mapping[str, int]) -> dict[str, Any]:
  """{curve: {'levels': [...], metric: [value per level]}} for each corruption the model has the input for.

  `chunks()` gives a fresh pass over the held-out set; `evaluator` supplies the compiled sampling and
  captioning functions (its plug-ins are replaced by semantic + captions for the settings of each curve).
  """
  model = evaluator.model
  out: dict[str, Any] = {}
  for name in curves:
    curve = CURVES[name]
    if curve.modality not in model.modalities:
      log.warning('Robustness curve %s left out: the model has no %s input.', name, curve.modality)
      continue
    generate = tuple(s for s in curve.generate
                     if set(evaluator_lib.GENERATE_SETTINGS[s]) <= set(model.modalities))
    captions = tuple(s for s in curve.captions
                     if model.text_decoder is not None
                     and set(evaluator_lib.CAPTION_SETTINGS[s]) <= set(model.modalities))
    if not generate and not captions:
      continue
    ev = with_settings(evaluator, generate, captions)
    rows: dict[str, list[float]] = {}
    for level in curve.levels:
      metrics = ev.evaluate(state, corrupted_chunks(chunks(), name, level, seed, **ids))
      for k, v in headline(dataclasses.replace(curve, generate=generate, captions=captions), metrics).items():
        rows.setdefault(k, []).append(v)
      log.info('Robustness %s = %s: %s', name, level, {k: round(v[-1], 4) for k, v in rows.items()})
    out[name] = {'levels': [float(x) for x in curve.levels], **rows}
  return out


def with_settings(evaluator: evaluator_lib.Evaluator, generate: tuple[str, ...],
                  captions: tuple[str, ...]) -> evaluator_lib.Evaluator:
  """A shallow copy of `evaluator` (same compiled functions) scoring only semantic accuracy for `generate` and
  BLEU-4 for `captions`."""
  config = copy.deepcopy(evaluator.config)
  with config.unlocked():
    config.eval.evaluators = tuple(e for e, on in (('semantic', generate), ('captions', captions)) if on)
    config.eval.generate = generate
    config.eval.captions = captions
    config.eval.metrics = ('bleu',)
  ev = copy.copy(evaluator)
  ev.config = config
  ev.plugins = evaluator_lib.make_plugins(evaluator.model, config, num_examples=evaluator.num_examples)
  return ev
