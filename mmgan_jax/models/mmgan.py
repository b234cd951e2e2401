"""The whole multi-modal GAN as a bundle of stateless Linen modules plus the pure functions that compose them.

Every module here is built from plain config values (`build_model(config.model, ...)`); parameters live in one
dict with a sub-tree per component:

  text_encoder, image_encoder, audio_encoder   modality encoders (DESIGN.md "one training step"): ours
                                               (encoders.py) or transformers' Flax models (pretrained.py)
  fusion                                       projection, self-attention, cross-attention fusion, logit scale
  generator                                    StyleGAN2-like G(z, cond, T)
  refiner                                      conditional denoiser R for SDEdit refinement in latent space
  discriminator                                noise-aware projection D(y, t, cond)
  text_decoder                                 captioning decoder cross-attending to fused tokens
and, frozen and outside the optimisers, the latent codec's params (`codec`).

The functions below are what the train steps and the evaluators call; none of them holds state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmgan_jax.models import codec as codec_lib
from mmgan_jax.models import diffusion, encoders, fusion, layers, pretrained, text_decoder
from mmgan_jax.models.discriminator import Discriminator
from mmgan_jax.models.generator import Generator

Array = Any
Params = Any

# Which modalities condition each task. Missing or switched-off modalities are simply absent.
GENERATE_SOURCES = ('text', 'audio')
CAPTION_SOURCES = ('image', 'audio')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# config.model.remat: what the backward pass keeps of each component's forward (see `checkpointed`).
REMAT = ('none', 'blocks', 'full')


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """The component modules and the static facts the steps need (compared by identity)."""

  modalities: tuple[str, ...]
  encoders: Mapping[str, nn.Module]
  fusion: fusion.ModalityFusion
  generator: Generator
  refiner: diffusion.Denoiser | None
  discriminator: Discriminator
  text_decoder: text_decoder.TextDecoder | None
  codec: nn.Module
  image_shape: tuple[int, int, int]
  latent_shape: tuple[int, int, int]
  alpha_bar_refiner: np.ndarray  # (T_r + 1,) cosine schedule of the refiner
  alpha_bar_disc: np.ndarray  # (T_d + 1,) schedule of the discriminator's instance noise
  max_text_len: int
  vocab_size: int
  pad_id: int  # the text codec's padding id (masked out of the captioning loss)
  frozen_encoders: tuple[str, ...] = ()  # encoders with train.mode='frozen': no gradient is even computed
  remat: str = 'none'  # one of REMAT
  whiten_condition: bool = False  # G and D read the condition vector ZCA-whitened (see `gan_condition`)
  whiten_eps: float = 1e-3  # the whitening's eigenvalue floor, relative to the largest eigenvalue

  @property
  def generate_sources(self) -> tuple[str, ...]:
    return tuple(m for m in GENERATE_SOURCES if m in self.modalities)

  @property
  def caption_sources(self) -> tuple[str, ...]:
    return tuple(m for m in CAPTION_SOURCES if m in self.modalities)

  @property
  def tasks(self) -> dict[str, tuple[str, ...]]:
    tasks = {'generate': self.generate_sources}
    if self.text_decoder is not None:
      tasks['caption'] = self.caption_sources
    return tasks


def _check_modalities(modalities) -> tuple[str, ...]:
  modalities = tuple(modalities)
  unknown = set(modalities) - set(fusion.MODALITIES)
  if unknown:
    raise ValueError(f'config.model.modalities has unknown entries {sorted(unknown)}; '
                     f'choose from {fusion.MODALITIES}.')
  if 'image' not in modalities:
    raise ValueError("config.model.modalities must include 'image': images are what the GAN generates and "
                     'what captions are written for.')
  if not set(GENERATE_SOURCES) & set(modalities):
    raise ValueError("config.model.modalities needs 'text' or 'audio' to condition the generator.")
  return modalities


def build_model(cfg, *, image_size: int, vocab_size: int, max_text_len: int, sample_rate: int,
                pad_id: int = 0) -> Model:
  """Builds every module from `config.model` (an ml_collections.ConfigDict or anything with attributes)."""
  modalities = _check_modalities(cfg.modalities)
  dtype = DTYPES[cfg.dtype]
  kw = dict(dtype=dtype)
  enc = {}
  for m in ('text', 'image', 'audio'):
    if m in modalities and pretrained.encoder_type(getattr(cfg, f'{m}_encoder')) != 'own':
      enc[m] = pretrained.build_encoder(m, getattr(cfg, f'{m}_encoder'), name=f'{m}_encoder', dtype=dtype,
                                        vocab_size=vocab_size, max_text_len=max_text_len, sample_rate=sample_rate)
  if 'text' in modalities and 'text' not in enc:
    t = cfg.text_encoder
    enc['text'] = encoders.TextEncoder(vocab_size=vocab_size, width=t.width, depth=t.depth,
                                       num_heads=t.num_heads, max_len=max_text_len, name='text_encoder', **kw)
  if 'image' not in enc:
    i = cfg.image_encoder
    enc['image'] = encoders.ImageEncoder(patch_size=i.patch_size, width=i.width, depth=i.depth,
                                         num_heads=i.num_heads, posemb='sincos2d', stem=i.stem,
                                         name='image_encoder', **kw)
  if 'audio' in modalities and 'audio' not in enc:
    a = cfg.audio_encoder
    enc['audio'] = encoders.AudioEncoder(width=a.width, depth=a.depth, num_heads=a.num_heads, n_mels=a.n_mels,
                                         sample_rate=sample_rate, downsample=a.downsample,
                                         name='audio_encoder', **kw)
  enc = {m: enc[m] for m in ('text', 'image', 'audio') if m in enc}
  frozen = tuple(enc[m].name for m in enc if pretrained.train_spec(getattr(cfg, f'{m}_encoder')).frozen)
  f = cfg.fusion
  fuse = fusion.ModalityFusion(modalities=modalities, width=cfg.width, embed_dim=cfg.embed_dim,
                               self_depth=f.self_depth, cross_depth=f.cross_depth, num_heads=f.num_heads,
                               cross_attention=f.cross_attention, name='fusion', **kw)

  c = cfg.codec
  if c.type == 'identity':
    codec = codec_lib.IdentityCodec(image_channels=3)
  elif c.type == 'kl':
    codec = codec_lib.KLAutoencoder(channels=tuple(c.channels), latent_channels=c.latent_channels,
                                    num_res_blocks=c.num_res_blocks, num_groups=c.num_groups)
  else:
    raise ValueError(f"config.model.codec.type must be 'identity' or 'kl', got {c.type!r}.")
  image_shape = (image_size, image_size, 3)
  latent = codec_lib.latent_shape(codec, image_shape)

  g = cfg.generator
  gen = Generator(out_channels=latent[-1], resolution=latent[0], cond_dim=cfg.embed_dim,
                  channels=tuple(g.channels), z_dim=g.z_dim, w_dim=g.w_dim, mapping_layers=g.mapping_layers,
                  mapping_lr_mul=g.mapping_lr_mul, cross_attention_max_res=g.cross_attention_max_res,
                  num_heads=g.num_heads, architecture=g.architecture, noise_injection=g.noise_injection,
                  name='generator', **kw)
  r = cfg.refiner
  refiner = None
  if r.enabled:
    refiner = diffusion.Denoiser(cond_dim=cfg.embed_dim, channels=tuple(r.channels),
                                 num_res_blocks=r.num_res_blocks, attention=r.attention, num_heads=r.num_heads,
                                 num_groups=r.num_groups, patch_size=r.patch_size, name='refiner', **kw)
  d = cfg.discriminator
  disc = Discriminator(resolution=latent[0], channels=tuple(d.channels), cond_dim=cfg.embed_dim,
                       noise_aware=d.noise_aware, projection=d.projection, mbstd_group_size=d.mbstd_group_size,
                       downsample=d.downsample, cond_head=bool(getattr(d, 'cond_head', False)),
                       head_dim=vocab_size if getattr(d, 'cond_head_target', 'condition') == 'words' else 0,
                       name='discriminator', **kw)
  dec = None
  if 'text' in modalities:
    t = cfg.text_decoder
    dec = text_decoder.TextDecoder(vocab_size=vocab_size, width=t.width, depth=t.depth, num_heads=t.num_heads,
                                   max_len=max_text_len, name='text_decoder', **kw)
  return Model(
      modalities=modalities, encoders=enc, fusion=fuse, generator=gen, refiner=refiner, discriminator=disc,
      text_decoder=dec, codec=codec, image_shape=image_shape, latent_shape=tuple(latent),
      alpha_bar_refiner=diffusion.cosine_alpha_bar(r.num_timesteps),
      alpha_bar_disc=diffusion.cosine_alpha_bar(d.num_timesteps),
      max_text_len=max_text_len, vocab_size=vocab_size, pad_id=pad_id, frozen_encoders=frozen,
      remat=_check_remat(getattr(cfg, 'remat', 'none')),
      whiten_condition=bool(getattr(cfg, 'whiten_condition', False)),
      whiten_eps=float(getattr(cfg, 'whiten_eps', WHITEN_EPS)))


def _check_remat(remat: str) -> str:
  if remat not in REMAT:
    raise ValueError(f'config.model.remat must be one of {REMAT}, got {remat!r}.')
  return remat


def checkpointed(model: Model, fn):
  """`fn` (a component's forward) under the model's rematerialisation policy (config.model.remat).

  'none': the backward pass keeps every intermediate. 'blocks': it keeps only the residual blocks' outputs
  (`layers.block_output`) and recomputes each block's inside (about one extra forward of the component, the
  activation memory of one block at a time plus the block boundaries). 'full': it keeps only the component's
  inputs and recomputes its whole forward. The values and gradients are the same in every mode.
  """
  if model.remat == 'none':
    return fn
  policy = None if model.remat == 'full' else jax.checkpoint_policies.save_only_these_names(layers.BLOCK_OUTPUT)
  return jax.checkpoint(fn, policy=policy)


# ------------------------------------------------------------------------------------------------------------
# Initialisation.


def dummy_batch(model: Model, batch_size: int, audio_samples: int) -> dict[str, Array]:
  h, w, c = model.image_shape
  batch = dict(image=jnp.zeros((batch_size, h, w, c), jnp.float32),
               text_ids=jnp.zeros((batch_size, model.max_text_len), jnp.int32),
               text_mask=jnp.ones((batch_size, model.max_text_len), bool))
  if 'audio' in model.modalities:  # a dataset without audio (COCO) has no such key
    batch['audio'] = jnp.zeros((batch_size, audio_samples), jnp.float32)
  return batch


def all_present(model: Model, batch_size: int) -> dict[str, dict[str, Array]]:
  """Every source of every task present (evaluation with all modalities; initialisation)."""
  return {task: {m: jnp.ones((batch_size,), bool) for m in srcs} for task, srcs in model.tasks.items()}


def only_present(model: Model, batch_size: int, sources) -> dict[str, dict[str, Array]]:
  """Each task sees only `sources` (e.g. ('audio',) for audio->image), others marked missing."""
  out = {}
  for task, srcs in model.tasks.items():
    out[task] = {m: jnp.full((batch_size,), m in sources) for m in srcs}
  return out


def init_params(model: Model, key: Array, batch: Mapping[str, Array]) -> dict[str, Params]:
  """Initialises every trainable component (boxed with logical partitioning metadata) plus the codec."""
  keys = dict(zip(('text', 'image', 'audio', 'fusion', 'gen', 'ref', 'disc', 'dec', 'codec'),
                  jax.random.split(key, 9)))
  b = batch['image'].shape[0]
  params: dict[str, Params] = {}
  feats = {}
  for m, module in model.encoders.items():
    params[module.name] = module.init(keys[m], *_encoder_inputs(m, batch))['params']
    if pretrained.is_pretrained_module(module):  # transformers' params carry no logical axis names
      params[module.name] = pretrained.with_logical_axes(params[module.name])
    feats[m] = module.apply({'params': params[module.name]}, *_encoder_inputs(m, batch))
  present = all_present(model, b)
  params['fusion'] = model.fusion.init(keys['fusion'], feats, present, model.tasks)['params']
  fused = model.fusion.apply({'params': params['fusion']}, feats, present, model.tasks)
  gen = fused['generate']
  z = jnp.zeros((b, model.generator.z_dim), jnp.float32)
  params['generator'] = model.generator.init({'params': keys['gen'], 'noise': keys['gen']}, z, gen['cond'],
                                             gen['tokens'], gen['mask'])['params']
  x = jnp.zeros((b,) + model.latent_shape, jnp.float32)
  t = jnp.zeros((b,), jnp.int32)
  if model.refiner is not None:
    params['refiner'] = model.refiner.init(keys['ref'], x, t, gen['cond'], None, gen['tokens'],
                                           gen['mask'])['params']
  params['discriminator'] = model.discriminator.init(keys['disc'], x, t, gen['cond'])['params']
  if model.text_decoder is not None:
    cap = fused['caption']
    params['text_decoder'] = model.text_decoder.init(keys['dec'], batch['text_ids'][:, :-1], cap['tokens'],
                                                     cap['mask'])['params']
  params['codec'] = model.codec.init({'params': keys['codec'], 'noise': keys['codec']},
                                     batch['image'])['params'] if _has_params(model.codec) else {}
  return params


def _has_params(module: nn.Module) -> bool:
  return not isinstance(module, codec_lib.IdentityCodec)


def _encoder_inputs(modality: str, batch: Mapping[str, Array]) -> tuple[Array, ...]:
  if modality == 'text':
    return batch['text_ids'], batch['text_mask']
  return (batch[modality],)


# ------------------------------------------------------------------------------------------------------------
# Forward functions used by the steps and evaluators.


def encode(model: Model, params: Mapping[str, Params], batch: Mapping[str, Array],
           present: Mapping[str, Mapping[str, Array]], *, deterministic: bool = True,
           rngs: Mapping[str, Array] | None = None,
           tasks: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
  """Encoders + shared-latent stage for every enabled modality; see `ModalityFusion.__call__` for the output.

  `tasks` (default `model.tasks`) may add fusions of the same encoder outputs, e.g. {'image_caption': ('image',)}
  for captioning from the image alone; `present` then has an entry per task.
  """
  rngs = dict(rngs or {})
  tasks = model.tasks if tasks is None else tasks
  feats = {}
  for m, module in model.encoders.items():
    p = params[module.name]
    if module.name in model.frozen_encoders:  # zero gradient anyway (optax set_to_zero); skip its backward pass
      p = jax.lax.stop_gradient(p)
    apply = lambda p, inputs, r, module=module: module.apply({'params': p}, *inputs, deterministic=deterministic,
                                                              rngs=r)
    feats[m] = checkpointed(model, apply)(p, _encoder_inputs(m, batch), rngs)
  fuse = lambda p, f, pr, r: model.fusion.apply({'params': p}, f, pr, tasks, deterministic=deterministic,
                                                rngs=r)
  return checkpointed(model, fuse)(params['fusion'], feats, present, rngs)


def image_embedding(model: Model, params: Mapping[str, Params], images: Array) -> Array:
  """Shared-latent vector s_image (B, E) of pixel images in [-1, 1] (used for G's semantic-consistency loss)."""
  return image_semantics(model, params, images, caption=False)[0]


def image_semantics(model: Model, params: Mapping[str, Params], images: Array, *, caption: bool
                    ) -> tuple[Array, dict[str, Array] | None]:
  """What the representation side reads from pixel images in [-1, 1], the image encoder run once.

  Returns s_image (B, E) and, when `caption`, the captioning task's conditioning from the image alone
  ({'tokens', 'mask', ...}, as `encode(...)['caption']` with only the image present), else None.
  """
  module = model.encoders['image']
  tokens, mask = checkpointed(model, lambda p, x: module.apply({'params': p}, x))(params[module.name], images)
  if not caption:
    embed = lambda p, tok, msk: model.fusion.apply({'params': p}, 'image', tok, msk,
                                                   method=fusion.ModalityFusion.embed)[1]
    return checkpointed(model, embed)(params['fusion'], tokens, mask), None
  present = {'caption': {'image': jnp.ones((images.shape[0],), bool)}}
  fuse = lambda p, tok, msk: model.fusion.apply({'params': p}, {'image': (tok, msk)}, present,
                                                {'caption': ('image',)})
  out = checkpointed(model, fuse)(params['fusion'], tokens, mask)
  return out['embed']['image'], out['caption']


# ------------------------------------------------------------------------------------------------------------
# The condition G and D read: ZCA-whitened by running statistics (config.model.whiten_condition).
#
# The learned condition s is unit-norm with a spectrum spanning ~0.24 to ~1e-7 per direction; the rarer attributes
# live in its weak directions (shape explains 13 % of its variance in the demo against 26-33 % for colour and
# position), and a linear first layer trained with Adam learns weak input directions slowly. Fed to the GAN core
# whitened, the same conditions taught shape ~2x faster, about as fast as one-hot labels (docs/training.md,
# "Whitening the condition"). The statistics are exponential moving averages over the D steps' conditions, kept
# in TrainState.adaptive (checkpointed), so evaluation and sampling whiten exactly as training last did.

WHITEN_DECAY = 0.99  # per D step: a half-life of ~70 iterations
WHITEN_EPS = 1e-3  # eigenvalue floor, relative to the largest eigenvalue (config.model.whiten_eps)


def condition_stats_init(embed_dim: int) -> dict[str, Array]:
  """The running mean and covariance before any data: those of a uniform unit vector (0, I / E)."""
  return {'cond_mean': jnp.zeros((embed_dim,), jnp.float32),
          'cond_cov': jnp.eye(embed_dim, dtype=jnp.float32) / embed_dim}


def update_condition_stats(stats: Mapping[str, Array], s: Array, decay: float = WHITEN_DECAY
                           ) -> dict[str, Array]:
  """One EMA step of the mean and covariance with a batch of condition vectors s (B, E) (no gradient)."""
  s = jax.lax.stop_gradient(s.astype(jnp.float32))
  mean = decay * stats['cond_mean'] + (1 - decay) * jnp.mean(s, axis=0)
  centred = s - mean
  cov = decay * stats['cond_cov'] + (1 - decay) * (centred.T @ centred) / s.shape[0]
  return {'cond_mean': mean, 'cond_cov': cov}


def whiten(s: Array, mean: Array, cov: Array, eps: float = WHITEN_EPS) -> Array:
  """ZCA: (s - mean) U diag((lambda + eps max lambda)^-1/2) U^T, with cov = U diag(lambda) U^T."""
  lam, u = jnp.linalg.eigh(cov.astype(jnp.float32))
  lam = jnp.maximum(lam, 0.0)
  w = (u * jax.lax.rsqrt(lam + eps * jnp.max(lam) + 1e-12)) @ u.T
  return (s.astype(jnp.float32) - mean) @ w


def gan_condition(model: Model, adaptive: Mapping[str, Array], cond: Mapping[str, Array]) -> dict[str, Array]:
  """The conditioning G and D read: `cond` with its vector whitened when model.whiten_condition (the refiner,
  the semantic loss and the captioner keep the unit-norm s)."""
  if not model.whiten_condition:
    return dict(cond)
  return dict(cond, cond=whiten(cond['cond'], adaptive['cond_mean'], adaptive['cond_cov'], eps=model.whiten_eps))


def to_latent(model: Model, codec_params: Params, latent_scale: Array, images: Array) -> Array:
  """Real images -> codec latents scaled to unit variance (the mean of the posterior; the codec is frozen)."""
  mean, _ = model.codec.apply({'params': codec_params}, images, method='encode')
  return mean * latent_scale


def to_image(model: Model, codec_params: Params, latent_scale: Array, latents: Array) -> Array:
  """Latents -> images (differentiable; used to feed generated latents to the image encoder and to summaries)."""
  decode = lambda p, z: model.codec.apply({'params': p}, z, method='decode')
  return checkpointed(model, decode)(codec_params, latents / latent_scale)


def generate(model: Model, gen_params: Params, z: Array, cond: Mapping[str, Array], *, noise_key: Array | None,
             truncation_psi: float = 1.0, w_avg: Array | None = None) -> Array:
  """G(z, cond, T) -> latents (B, h, w, c). `noise_key` None switches the per-pixel noise off."""
  rngs = {'noise': noise_key} if noise_key is not None else {}

  def apply(p, z, c, w_avg, rngs):
    return model.generator.apply({'params': p}, z, c['cond'], c['tokens'], c['mask'], noise=noise_key is not None,
                                 truncation_psi=truncation_psi, w_avg=w_avg, rngs=rngs)[0]

  return checkpointed(model, apply)(gen_params, z, cond, w_avg, rngs).astype(jnp.float32)


def refiner_fn(model: Model, ref_params: Params, cond: Mapping[str, Array], *, guidance: float = 1.0):
  """Closure eps_theta(x_t, t) conditioned on `cond`, optionally with classifier-free guidance."""

  apply = checkpointed(model, lambda p, x_t, t, c, keep: model.refiner.apply(
      {'params': p}, x_t, t, c['cond'], keep, c['tokens'], c['mask']))

  def fn(x_t, t):
    out = apply(ref_params, x_t, t, cond, None)
    if guidance != 1.0:
      out_u = apply(ref_params, x_t, t, cond, jnp.zeros(x_t.shape[:1], bool))
      out = diffusion.classifier_free_guidance(out, out_u, guidance)
    return out

  return fn


def refine(model: Model, ref_params: Params | None, x: Array, cond: Mapping[str, Array], key: Array, *,
           t_start: int, num_steps: int, prediction: str = 'eps', guidance: float = 1.0,
           num_draws: int = 1) -> Array:
  """SDEdit refinement of generated latents x: noise to t_start, then `num_steps` DDIM steps (the mean of
  `num_draws` such refinements, in antithetic noise pairs). Identity if off."""
  if model.refiner is None or ref_params is None or num_steps == 0 or t_start == 0:
    return x
  fn = refiner_fn(model, ref_params, cond, guidance=guidance)
  return diffusion.refine(fn, x, key, jnp.asarray(model.alpha_bar_refiner), t_start=t_start,
                          num_steps=num_steps, prediction=prediction, num_draws=num_draws)


def discriminate(model: Model, disc_params: Params, y: Array, t: Array, cond: Array) -> Array:
  apply = lambda p, y, t, c: model.discriminator.apply({'params': p}, y, t, c)[0]
  return checkpointed(model, apply)(disc_params, y, t, cond).astype(jnp.float32)


def discriminate_with_condition(model: Model, disc_params: Params, y: Array, t: Array, cond: Array
                                ) -> tuple[Array, Array]:
  """(logits (B,), D's prediction of the condition (B, E)) from one forward pass; needs cond_head=True."""
  def apply(p, y, t, c):
    logits, aux = model.discriminator.apply({'params': p}, y, t, c)
    return logits.astype(jnp.float32), aux['cond_pred']
  return checkpointed(model, apply)(disc_params, y, t, cond)


def caption_logits(model: Model, dec_params: Params, ids: Array, cond: Mapping[str, Array], *,
                   deterministic: bool = True, rngs=None) -> Array:
  apply = lambda p, ids, tok, msk, r: model.text_decoder.apply({'params': p}, ids, tok, msk,
                                                               deterministic=deterministic, rngs=r)
  return checkpointed(model, apply)(dec_params, ids, cond['tokens'], cond['mask'], rngs or {})


def decode_fn(model: Model, dec_params: Params):
  """The (ids, memory, memory_mask) -> logits function that greedy/beam search expect."""
  return lambda ids, memory, memory_mask: model.text_decoder.apply({'params': dec_params}, ids, memory,
                                                                     memory_mask)
