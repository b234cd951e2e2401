"""Sampling, captioning and the end-of-run evaluation, with the EMA generator and refiner.

`Evaluator` compiles three functions once (per batch shape) and scores a held-out set:
  text->image and audio->image (and text+audio->image): oracle semantic accuracy of the samples before and
      after diffusion refinement (synthetic set; real datasets get FID/precision/recall in a later issue);
  image->text (and image+audio->text): BLEU-1..4 (and METEOR/ROUGE-L/CIDEr if asked) against every reference;
  retrieval R@1 in the shared space (text<->image, audio<->image).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmgan_jax.evaluation import semantic, text_metrics
from mmgan_jax.models import mmgan, text_decoder

# Named conditioning settings evaluated for generation and captioning.
GENERATE_SETTINGS = {'text_to_image': ('text',), 'audio_to_image': ('audio',), 'text_audio_to_image': ('text', 'audio')}
CAPTION_SETTINGS = {'image_to_text': ('image',), 'image_audio_to_text': ('image', 'audio'),
                    'audio_to_text': ('audio',)}


def eval_params(state) -> dict[str, Any]:
  """Params with the EMA generator and refiner swapped in."""
  return dict(state.params, **state.ema)


class Evaluator:
  """Samples images and captions from a train state and scores them on a fixed held-out batch."""

  def __init__(self, model: mmgan.Model, config, text_codec, *, seed: int = 0):
    self.model = model
    self.config = config
    self.codec = text_codec
    self.key = jax.random.PRNGKey(seed + 1_000_003)
    r = config.refine
    steps = int(r.num_steps) if model.refiner is not None else 0
    prediction = config.model.refiner.prediction

    def sample(params, codec, batch, present, key):
      k_z, k_ref = jax.random.split(key)
      cond = mmgan.encode(model, params, batch, present)['generate']
      b = batch['image'].shape[0]
      z = jax.random.normal(k_z, (b, model.generator.z_dim), jnp.float32)
      x = mmgan.generate(model, params['generator'], z, cond, noise_key=None)
      xr = mmgan.refine(model, params.get('refiner'), x, cond, k_ref, t_start=int(r.t_start), num_steps=steps,
                        prediction=prediction, guidance=float(r.guidance))
      to_img = lambda v: jnp.clip(mmgan.to_image(model, codec['params'], codec['scale'], v), -1.0, 1.0)
      return to_img(x), to_img(xr)

    def embed(params, batch):
      present = mmgan.all_present(model, batch['image'].shape[0])
      return mmgan.encode(model, params, batch, present)['embed']

    self._sample = jax.jit(sample)
    self._embed = jax.jit(embed)
    self._captions = None
    if model.text_decoder is not None:
      beam = int(config.eval.beam_size)

      def captions(params, batch, present):
        cond = mmgan.encode(model, params, batch, present)['caption']
        fn = mmgan.decode_fn(model, params['text_decoder'])
        kw = dict(max_len=model.max_text_len, bos_id=text_codec.bos_id, eos_id=text_codec.eos_id,
                  pad_id=text_codec.pad_id)
        if beam > 1:
          return text_decoder.beam_search(fn, cond['tokens'], cond['mask'], beam_size=beam, **kw)
        return text_decoder.greedy_decode(fn, cond['tokens'], cond['mask'], **kw)

      self._captions = jax.jit(captions)

  def _batches(self, batch: Mapping[str, np.ndarray], size: int):
    n = len(batch['image'])
    for i in range(0, n - size + 1, size):
      yield {k: v[i:i + size] for k, v in batch.items() if k != 'attributes'}, batch['attributes'][i:i + size]

  def samples(self, state, batch: Mapping[str, np.ndarray], sources: Sequence[str], key=None):
    """(pre-refinement, post-refinement) images in [-1, 1] for one batch conditioned on `sources`."""
    b = len(batch['image'])
    present = mmgan.only_present(self.model, b, sources)
    inputs = {k: v for k, v in batch.items() if k != 'attributes'}
    pre, post = self._sample(eval_params(state), state.codec, inputs, present,
                             self.key if key is None else key)
    return np.asarray(pre), np.asarray(post)

  def captions(self, state, batch: Mapping[str, np.ndarray], sources: Sequence[str]) -> list[str]:
    b = len(batch['image'])
    present = mmgan.only_present(self.model, b, sources)
    inputs = {k: v for k, v in batch.items() if k != 'attributes'}
    ids = np.asarray(self._captions(eval_params(state), inputs, present))
    return self.codec.decode_batch(ids)

  def evaluate(self, state, batch: Mapping[str, np.ndarray], references: Sequence[Sequence[str]]
               ) -> dict[str, float]:
    """Every metric on the held-out `batch` (trimmed to a multiple of config.eval.batch_size)."""
    size = min(int(self.config.eval.batch_size), len(batch['image']))
    out: dict[str, float] = {}
    for name, sources in GENERATE_SETTINGS.items():
      if not set(sources) <= set(self.model.modalities):
        continue
      pre, post, attrs = [], [], []
      for i, (inputs, a) in enumerate(self._batches(batch, size)):
        p, q = self.samples(state, inputs, sources, key=jax.random.fold_in(self.key, i))
        pre.append(p)
        post.append(q)
        attrs.append(a)
      attrs = np.concatenate(attrs)
      for stage, images in (('pre_refine', pre), ('refined', post)):
        acc = semantic.semantic_accuracy(np.concatenate(images), attrs)
        for k, v in acc.items():
          out[f'{name}/{stage}/{k}'] = float(v)
    if self._captions is not None:
      for name, sources in CAPTION_SETTINGS.items():
        if not set(sources) <= set(self.model.modalities):
          continue
        preds = []
        for inputs, _ in self._batches(batch, size):
          preds.extend(self.captions(state, inputs, sources))
        refs = list(references)[:len(preds)]
        scores = text_metrics.caption_scores(preds, refs, metrics=tuple(self.config.eval.metrics))
        for k, v in scores.items():
          if isinstance(v, (int, float)):
            out[f'{name}/{k}'] = float(v)
    emb = {}
    for inputs, _ in self._batches(batch, size):
      for m, s in self._embed(eval_params(state), inputs).items():
        emb.setdefault(m, []).append(np.asarray(s))
    emb = {m: np.concatenate(v) for m, v in emb.items()}
    for m in ('text', 'audio'):
      if m in emb:
        r = semantic.retrieval_recall(emb[m], emb['image'], ks=(1,))
        for k, v in r.items():
          out[f'retrieval/{m}_to_image/{k}'] = float(v)
    return out
