"""Sampling, captioning and evaluation with the EMA generator and refiner, through plug-in evaluators.

`Evaluator` makes one streaming pass over the held-out examples. For each chunk it computes only what the
configured plug-ins ask for (real images, samples per conditioning setting before/after diffusion
refinement, captions per setting, shared-space embeddings) and hands it to them; each plug-in keeps its own
running state and returns flat ``{name: float}`` metrics at the end. Memory is bounded by what the plug-ins
keep (Inception features for FID and precision/recall: 8 KiB per image and set), not by the images.

Plug-ins, named in ``config.eval.evaluators`` (see `EVALUATORS`):
  semantic   oracle attribute accuracy of text/audio->image samples (synthetic "shapes" set only);
  captions   BLEU-1..4 / METEOR / ROUGE-L / CIDEr(-D) of image(+audio)->text and audio->text captions under
             the COCO protocol (``config.eval.metrics``);
  retrieval  cross-modal retrieval R@k in the shared space (text<->image, audio<->image);
  fid        FID and improved precision/recall (k = ``config.eval.fid.k``) of samples against the held-out
             real images, with Inception features of the TF-2015 FID network; the real-set statistics are
             cached on disk per (dataset, split, N, weights).

Every chunk is padded to ``config.eval.batch_size`` so each jitted function compiles once; padded rows are
dropped before the plug-ins see them. With several processes every process runs the same pass on the same
held-out chunks (host numpy inputs, replicated; parameters stay sharded) and `fetch` gathers each output to
every host, so the plug-ins compute identical metrics everywhere; only process 0 writes files. Sampling noise
is ``fold_in(PRNGKey(seed + 1_000_003), chunk index)``: the same checkpoint, config and seed give the same
numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mmgan_jax.data import oracle, shapes
from mmgan_jax.evaluation import npz, semantic, text_metrics
from mmgan_jax.models import mmgan, text_decoder

log = logging.getLogger(__name__)

# Named conditioning settings evaluated for generation and captioning.
GENERATE_SETTINGS = {'text_to_image': ('text',), 'audio_to_image': ('audio',), 'text_audio_to_image': ('text', 'audio')}
CAPTION_SETTINGS = {'image_to_text': ('image',), 'image_audio_to_text': ('image', 'audio'),
                    'audio_to_text': ('audio',)}
STAGES = ('pre_refine', 'refined')

Chunk = tuple[Mapping[str, np.ndarray], Sequence[Sequence[str]]]


def fetch(tree: Any) -> Any:
  """Host numpy copies of the arrays in `tree`, also for global arrays spread over several processes.

  Arrays this process holds entirely (always the case with one process) are copied as `np.asarray` does;
  an array with shards on other processes is all-gathered first (a collective: every process must call it).
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def eval_params(state) -> dict[str, Any]:
  """Params with the EMA generator and refiner swapped in."""
  return dict(state.params, **state.ema)


class Plugin:
  """One evaluator: says what it needs, accumulates it chunk by chunk, and returns flat metrics.

  `skip_reason(ctx)` returns why the plug-in does not apply to this model (it is then left out with a
  warning, e.g. captions for a model without text); a plug-in that applies but is misconfigured raises.

  Attributes a subclass sets: `generated` ((setting, stage) pairs whose samples it needs), `caption_settings`,
  `needs_real` (real images), `needs_embeddings` (the shared-space vectors of every modality).
  """
  name = ''
  generated: tuple[tuple[str, str], ...] = ()
  caption_settings: tuple[str, ...] = ()
  needs_real = False
  needs_embeddings = False

  @staticmethod
  def skip_reason(ctx: 'Context') -> str | None:  # pylint: disable=unused-argument
    return None

  def start(self) -> None:
    """Clears the running state before a pass."""

  def real(self, images: np.ndarray, batch: Mapping[str, np.ndarray]) -> None:
    """Real held-out images, (B, H, W, 3) in [-1, 1]."""

  def samples(self, setting: str, stage: str, images: np.ndarray, batch: Mapping[str, np.ndarray]) -> None:
    """Generated images for `setting` at `stage`, aligned with `batch`."""

  def captions(self, setting: str, predictions: list[str], references: Sequence[Sequence[str]],
               batch: Mapping[str, np.ndarray]) -> None:
    """Decoded captions for `setting`, every example's reference captions, aligned with `batch`."""

  def embeddings(self, vectors: Mapping[str, np.ndarray]) -> None:
    """Shared-space vectors {modality: (B, D)}."""

  def result(self) -> dict[str, float]:
    raise NotImplementedError


def _settings(requested: Sequence[str], table: Mapping[str, tuple[str, ...]], modalities: Sequence[str],
              field: str) -> tuple[str, ...]:
  unknown = [s for s in requested if s not in table]
  if unknown:
    raise ValueError(f'{field}: unknown setting(s) {unknown}; known: {sorted(table)}.')
  return tuple(s for s in requested if set(table[s]) <= set(modalities))


class SemanticPlugin(Plugin):
  """Per-attribute accuracy (shape, colour, size, position, mean, all_correct): of generated images by the
  oracle, per setting and stage; and of decoded captions (the attributes they name), per captioning setting."""
  name = 'semantic'

  def __init__(self, ctx: 'Context'):
    if ctx.config.data.name != 'shapes':
      raise ValueError(f"evaluator 'semantic' scores samples with the oracle of the synthetic 'shapes' set; "
                       f"config.data.name={ctx.config.data.name!r} has no such labels. Drop it from "
                       'config.eval.evaluators (use fid/captions/retrieval).')
    self.generated = tuple((s, st) for s in ctx.generate_settings for st in STAGES)
    self.caption_settings = ctx.caption_settings if ctx.model.text_decoder is not None else ()

  def start(self):
    self._pred: dict[tuple[str, ...], list[np.ndarray]] = {}
    self._labels: dict[tuple[str, ...], list[np.ndarray]] = {}

  def captions(self, setting, predictions, references, batch):
    self._pred.setdefault((setting,), []).append(np.stack([shapes.parse_caption(c) for c in predictions]))
    self._labels.setdefault((setting,), []).append(np.asarray(batch['attributes'], np.int32))

  def samples(self, setting, stage, images, batch):
    self._pred.setdefault((setting, stage), []).append(oracle.predict_attributes(images))
    self._labels.setdefault((setting, stage), []).append(np.asarray(batch['attributes'], np.int32))

  def result(self):
    out = {}
    for key, pred in self._pred.items():
      acc = oracle.attribute_accuracy(np.concatenate(pred), np.concatenate(self._labels[key]))
      out.update({'/'.join(key + (k,)): float(v) for k, v in acc.items()})
    return out


class CaptionPlugin(Plugin):
  """COCO-protocol caption scores per captioning setting."""
  name = 'captions'

  @staticmethod
  def skip_reason(ctx: 'Context') -> str | None:
    if ctx.model.text_decoder is None:
      return 'the model has no text decoder (no text modality)'
    return None

  def __init__(self, ctx: 'Context'):
    self.metrics = tuple(ctx.config.eval.metrics)
    unknown = set(self.metrics) - set(text_metrics.ALL_METRICS)
    if unknown:
      raise ValueError(f'config.eval.metrics: unknown {sorted(unknown)}; known: {text_metrics.ALL_METRICS}.')
    if 'meteor' in self.metrics and not text_metrics.java_available():
      raise ValueError('config.eval.metrics has meteor, which needs Java 8+ on PATH (METEOR 1.5 is a jar); '
                       'install a JRE (e.g. apt-get install openjdk-17-jre-headless) or drop meteor.')
    self.caption_settings = ctx.caption_settings

  def start(self):
    self._pred: dict[str, list[str]] = {}
    self._refs: dict[str, list[Sequence[str]]] = {}

  def captions(self, setting, predictions, references, batch):
    del batch
    self._pred.setdefault(setting, []).extend(predictions)
    self._refs.setdefault(setting, []).extend(references)

  def result(self):
    out = {}
    for setting, preds in self._pred.items():
      scores = text_metrics.caption_scores(preds, self._refs[setting], metrics=self.metrics)
      out.update({f'{setting}/{k}': float(v) for k, v in scores.items() if isinstance(v, (int, float))})
    return out


class RetrievalPlugin(Plugin):
  """R@k and median rank for text<->image and audio<->image retrieval in the shared space."""
  name = 'retrieval'
  needs_embeddings = True

  def __init__(self, ctx: 'Context'):
    self.ks = tuple(int(k) for k in ctx.config.eval.retrieval_ks)
    self.modalities = tuple(m for m in ('text', 'audio') if m in ctx.model.modalities)
    if 'image' not in ctx.model.modalities or not self.modalities:
      raise ValueError("evaluator 'retrieval' needs the image modality and text or audio.")

  def start(self):
    self._emb: dict[str, list[np.ndarray]] = {}

  def embeddings(self, vectors):
    for m, v in vectors.items():
      self._emb.setdefault(m, []).append(np.asarray(v, np.float32))

  def result(self):
    emb = {m: np.concatenate(v) for m, v in self._emb.items()}
    out = {}
    for m in self.modalities:
      for q, k in ((m, 'image'), ('image', m)):
        r = semantic.retrieval_recall(emb[q], emb[k], ks=self.ks)
        out.update({f'retrieval/{q}_to_{k}/{name}': float(v) for name, v in r.items()})
    return out


class FIDPlugin(Plugin):
  """FID and improved precision/recall of samples vs the held-out real images (Inception pool3 features)."""
  name = 'fid'
  needs_real = True

  def __init__(self, ctx: 'Context'):
    from mmgan_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
    f = ctx.config.eval.fid
    weights = str(f.weights or os.environ.get('MMGAN_FID_WEIGHTS', ''))
    if not weights:
      raise ValueError("evaluator 'fid' needs the FID Inception weights: pass --config.eval.fid.weights=PATH "
                       '(an .npz in the layout of inception_2015_12_05_fid.npz; convert the official '
                       'pytorch-fid .pth with `python -m mmgan_jax.evaluation.convert_inception`) or set '
                       'MMGAN_FID_WEIGHTS. Nothing is downloaded.')
    self.extractor = inception.FeatureExtractor.from_npz(weights, batch_size=int(f.batch_size))
    stages = tuple(f.stages)
    if not set(stages) <= set(STAGES):
      raise ValueError(f'config.eval.fid.stages={stages}: allowed {STAGES}.')
    settings = _settings(tuple(f.settings), GENERATE_SETTINGS, ctx.model.modalities, 'config.eval.fid.settings')
    self.generated = tuple((s, st) for s in settings for st in stages)
    self.k = int(f.k)
    self.precision_recall = bool(f.precision_recall)
    self.cache_path = None
    if ctx.cache_dir:
      key = json.dumps({'data': ctx.config.data.to_dict(), 'n': ctx.num_examples, 'weights': _file_id(weights)},
                       sort_keys=True, default=str)
      name = f'real_{ctx.config.data.name}_{ctx.num_examples}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz'
      self.cache_path = os.path.join(ctx.cache_dir, name)
    self._real_cached = None
    self._real_stats = None
    if self.cache_path and os.path.exists(self.cache_path):
      try:  # derived data: a damaged cache file is recomputed (and rewritten), never fatal
        self._real_cached = np.asarray(npz.read_arrays(self.cache_path, 'cached real-set features')['features'])
        log.info('Real-set Inception features from the cache %s (N=%d).', self.cache_path,
                 len(self._real_cached))
      except (ValueError, KeyError) as e:
        log.warning('Ignoring the damaged feature cache %s (%s); recomputing it.', self.cache_path, e)
    self.needs_real = self._real_cached is None

  def start(self):
    self._real: list[np.ndarray] = []
    self._fake: dict[tuple[str, str], list[np.ndarray]] = {}

  def real(self, images, batch):
    self._real.append(self.extractor(images))

  def samples(self, setting, stage, images, batch):
    self._fake.setdefault((setting, stage), []).append(self.extractor(images))

  def result(self):
    from mmgan_jax.evaluation import fid, precision_recall  # pylint: disable=g-import-not-at-top
    real = self._real_cached if self._real_cached is not None else np.concatenate(self._real)
    if self._real_cached is None:  # first pass: keep the real features (in memory, and on disk if asked)
      if self.cache_path and jax.process_index() == 0:  # every process has them; one writes the file
        os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
        tmp = self.cache_path + '.tmp.npz'
        np.savez(tmp, features=real)
        os.replace(tmp, self.cache_path)
      self._real_cached = real
      self.needs_real = False
    if self._real_stats is None:  # the real set does not change between evaluations: one covariance per run
      self._real_stats = fid.FeatureStats()
      self._real_stats.update(real)
    real_stats = self._real_stats
    out = {}
    for (setting, stage), feats in self._fake.items():
      fake = np.concatenate(feats)
      stats = fid.FeatureStats()
      stats.update(fake)
      out[f'{setting}/{stage}/fid'] = fid.frechet_distance(real_stats.mean, real_stats.cov, stats.mean, stats.cov)
      if self.precision_recall:
        pr = precision_recall.precision_recall(real, fake, k=self.k)
        out[f'{setting}/{stage}/precision'] = float(pr['precision'])
        out[f'{setting}/{stage}/recall'] = float(pr['recall'])
    return out


def _file_id(path: str) -> str:
  """Content hash of a weights file (so a cache built with other weights is never reused)."""
  h = hashlib.sha1()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


EVALUATORS: dict[str, type[Plugin]] = {
    'semantic': SemanticPlugin, 'captions': CaptionPlugin, 'retrieval': RetrievalPlugin, 'fid': FIDPlugin}


class Context:
  """What a plug-in may look at when it is built."""

  def __init__(self, model, config, num_examples: int, cache_dir: str | None):
    self.model, self.config, self.num_examples, self.cache_dir = model, config, num_examples, cache_dir
    self.generate_settings = _settings(tuple(config.eval.generate), GENERATE_SETTINGS, model.modalities,
                                       'config.eval.generate')
    self.caption_settings = _settings(tuple(config.eval.captions), CAPTION_SETTINGS, model.modalities,
                                      'config.eval.captions')


def make_plugins(model, config, *, num_examples: int, cache_dir: str | None = None) -> list[Plugin]:
  """The plug-ins named in config.eval.evaluators, validated (clear errors before anything compiles)."""
  names = tuple(config.eval.evaluators)
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise ValueError(f'config.eval.evaluators: unknown {unknown}; known: {sorted(EVALUATORS)}.')
  if len(set(names)) != len(names):
    raise ValueError(f'config.eval.evaluators names an evaluator twice: {names}.')
  ctx = Context(model, config, num_examples, cache_dir)
  plugins = []
  for n in names:
    reason = EVALUATORS[n].skip_reason(ctx)
    if reason:
      log.warning("Evaluator '%s' left out: %s.", n, reason)
    else:
      plugins.append(EVALUATORS[n](ctx))
  return plugins


def _pad(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every array to `size` rows by repeating the last row (one compiled shape per function)."""
  n = len(batch['image'])
  if n > size:
    raise ValueError(f'chunk of {n} examples is larger than the eval batch size {size}.')
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) if n < size else np.asarray(v)
          for k, v in batch.items()}


class Evaluator:
  """Samples images and captions from a train state and scores held-out examples with the plug-ins."""

  def __init__(self, model: mmgan.Model, config, text_codec, *, seed: int = 0, cache_dir: str | None = None,
               num_examples: int | None = None):
    self.model = model
    self.config = config
    self.codec = text_codec
    self.key = jax.random.PRNGKey(seed + 1_000_003)
    self.batch_size = int(config.eval.batch_size)
    self.num_examples = int(config.eval.num_examples if num_examples is None else num_examples)
    if self.batch_size <= 0 or self.num_examples <= 0:
      raise ValueError(f'config.eval.batch_size={self.batch_size} and num_examples={self.num_examples} must be '
                       'positive.')
    self.plugins = make_plugins(model, config, num_examples=self.num_examples, cache_dir=cache_dir)
    r = config.refine
    steps = int(r.num_steps) if model.refiner is not None else 0
    prediction = config.model.refiner.prediction

    def sample(params, codec, adaptive, batch, present, key):
      k_z, k_ref, k_noise = jax.random.split(key, 3)
      cond = mmgan.encode(model, params, batch, present)['generate']
      b = batch['image'].shape[0]
      z = jax.random.normal(k_z, (b, model.generator.z_dim), jnp.float32)
      # The per-pixel noise G was trained with (StyleGAN2 samples it at generation too); without it the
      # feature statistics G learned shift.
      x = mmgan.generate(model, params['generator'], z, mmgan.gan_condition(model, adaptive, cond),
                         noise_key=k_noise)
      xr = mmgan.refine(model, params.get('refiner'), x, cond, k_ref, t_start=int(r.t_start), num_steps=steps,
                        prediction=prediction, guidance=float(r.guidance), num_draws=int(r.num_draws))
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

  @staticmethod
  def _inputs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k != 'attributes'}

  def samples(self, state, batch: Mapping[str, np.ndarray], sources: Sequence[str], key=None):
    """(pre-refinement, post-refinement) images in [-1, 1] for one batch conditioned on `sources`."""
    n = len(batch['image'])
    size = max(n, self.batch_size)
    present = mmgan.only_present(self.model, size, sources)
    pre, post = self._sample(eval_params(state), state.codec, state.adaptive, _pad(self._inputs(batch), size),
                             present, self.key if key is None else key)
    pre, post = fetch((pre, post))
    return pre[:n], post[:n]

  def captions(self, state, batch: Mapping[str, np.ndarray], sources: Sequence[str]) -> list[str]:
    if self._captions is None:
      raise ValueError('this model has no text decoder (config.model.text_decoder).')
    n = len(batch['image'])
    size = max(n, self.batch_size)
    present = mmgan.only_present(self.model, size, sources)
    ids = fetch(self._captions(eval_params(state), _pad(self._inputs(batch), size), present))
    return self.codec.decode_batch(ids[:n])

  def evaluate(self, state, chunks: Iterable[Chunk]) -> dict[str, float]:
    """Every configured metric over the held-out `chunks` ((batch, reference captions) pairs, in order).

    Exactly `num_examples` examples are scored: chunks beyond them are not read, and fewer is an error.
    """
    plugins = self.plugins
    for p in plugins:
      p.start()
    want_gen = {pair for p in plugins for pair in p.generated}
    want_settings = sorted({s for s, _ in want_gen}, key=list(GENERATE_SETTINGS).index)
    want_caps = [s for s in CAPTION_SETTINGS if any(s in p.caption_settings for p in plugins)]
    params = eval_params(state)
    seen = 0
    t0 = last_log = time.time()
    for i, (batch, refs) in enumerate(chunks):
      if seen >= self.num_examples:
        break
      n = min(len(batch['image']), self.num_examples - seen)
      batch = {k: np.asarray(v)[:n] for k, v in batch.items()}
      refs = list(refs)[:n]
      seen += n
      for p in plugins:
        if p.needs_real:
          p.real(batch['image'], batch)
      for setting in want_settings:
        pre, post = self.samples(state, batch, GENERATE_SETTINGS[setting], key=jax.random.fold_in(self.key, i))
        for stage, images in (('pre_refine', pre), ('refined', post)):
          for p in plugins:
            if (setting, stage) in p.generated:
              p.samples(setting, stage, images, batch)
      for setting in want_caps:
        preds = self.captions(state, batch, CAPTION_SETTINGS[setting])
        for p in plugins:
          if setting in p.caption_settings:
            p.captions(setting, preds, refs, batch)
      if any(p.needs_embeddings for p in plugins):
        vectors = self._embed(params, _pad(self._inputs(batch), max(n, self.batch_size)))
        vectors = {m: v[:n] for m, v in fetch(vectors).items()}
        for p in plugins:
          if p.needs_embeddings:
            p.embeddings(vectors)
      if time.time() - last_log > 60:
        last_log = time.time()
        log.info('Evaluated %d / %d held-out examples in %.0f s.', seen, self.num_examples, last_log - t0)
    if seen < self.num_examples:
      raise ValueError(f'the held-out set ended after {seen} examples; config.eval.num_examples='
                       f'{self.num_examples}.')
    out: dict[str, float] = {}
    for p in plugins:
      out.update(p.result())
    out['num_examples'] = float(seen)
    return out
