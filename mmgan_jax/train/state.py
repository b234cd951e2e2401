"""The one train-state pytree, its optimisers, and its sharded birth.

  TrainState
    step        int32 scalar: completed training iterations (one D step + one G step each)
    rng         uint32[2] key; every step folds in `step`, so a resumed run draws the same numbers
    params      {component: params} for every trainable component (see models/mmgan.py)
    ema         {'generator', 'refiner'}: exponential moving averages used for evaluation and sampling
    opt_g       optax state of the generator-side optimiser (G + encoders + fusion + decoder + refiner)
    opt_d       optax state of the discriminator's optimiser
    adaptive    float32 scalars: t_max (Diffusion-GAN), lambda_adv (VQGAN), r_d, images_seen, nonfinite; with
                model.whiten_condition also cond_mean (E,) and cond_cov (E, E), the condition's running statistics
    codec       {'params', 'scale'}: the frozen latent codec and its latent scale (LDM)

Optimisers (optax): G and D use Adam(beta1=0, beta2=0.99) as StyleGAN2; the representation side (encoders,
fusion, text decoder, refiner) uses AdamW with warm-up. Transfer learning goes through `optax.multi_transform`
labels derived from each parameter's path (models/pretrained.py, `train` of config.model.<m>_encoder):
  'frozen'        optax.set_to_zero(): components in `config.optim.frozen`, encoders with train.mode='frozen',
                  leaves matching an encoder's train.freeze patterns (partial fine-tuning), unused HF leaves
  'rep:<encoder>' the representation AdamW followed by a scale s(count) = lr_mul * [count >= unfreeze_after]:
                  a learning-rate multiplier (AdamW's update, weight decay included, is proportional to the
                  learning rate) and unfreezing after N optimiser steps; a pure function of the optimiser
                  step count, which is in the checkpointed state, so a resumed run continues exactly. Adam's
                  moments are estimated during the frozen steps, so the first unfrozen update is well scaled.
  'rep', 'gan'    everything else.
  '<label>|cond'  with config.optim.condition_frozen_after = N > 0: the same transform times [count < N] on the
                  condition path (CONDITION_PATH: text and audio encoders, fusion), so from iteration N on the
                  conditions G and D read stop moving (DF-GAN trains its GAN on a fixed text encoder); the image
                  encoder, captioner and refiner keep learning.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmgan_jax.models import mmgan
from mmgan_jax.models import pretrained as pretrained_lib
from mmgan_jax.train import sharding

Tree = Any

TRAINABLE = ('text_encoder', 'image_encoder', 'audio_encoder', 'fusion', 'generator', 'refiner',
             'discriminator', 'text_decoder')
EMA_COMPONENTS = ('generator', 'refiner')
CONDITION_PATH = ('text_encoder', 'audio_encoder', 'fusion')  # what makes the condition s from text and audio


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  rng: jax.Array
  params: dict[str, Tree]
  ema: dict[str, Tree]
  opt_g: Tree
  opt_d: Tree
  adaptive: dict[str, jax.Array]
  codec: dict[str, Tree]


def g_side(params: dict[str, Tree]) -> dict[str, Tree]:
  """The components the generator-side optimiser updates (everything but the discriminator)."""
  return {k: v for k, v in params.items() if k != 'discriminator'}


def _path(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def param_labels(params: dict[str, Tree], frozen=(), encoders: dict[str, pretrained_lib.TrainSpec] | None = None
                 ) -> dict[str, Tree]:
  """The optimiser label of every leaf of the G-side params (see the module docstring).

  Raises:
    ValueError: an encoder's train.freeze pattern that matches none of its parameters (a typo would otherwise
      freeze nothing, silently).
  """
  encoders = encoders or {}
  out = {}
  for name, tree in params.items():
    spec = encoders.get(name)
    if name in frozen or (spec is not None and spec.frozen):
      out[name] = jax.tree.map(lambda _: 'frozen', tree)
      continue
    if spec is None:
      out[name] = jax.tree.map(lambda _, n=name: 'gan' if n == 'generator' else 'rep', tree)
      continue
    base = 'rep' if spec.plain else f'rep:{name}'
    user = [re.compile(p) for p in spec.freeze]
    patterns = user + [re.compile(p) for p in spec.always_frozen]
    hits = [0] * len(user)

    def label(path, _, patterns=patterns, hits=hits, base=base, n_user=len(user)):
      p = _path(path)
      matched = [i for i, pat in enumerate(patterns) if pat.search(p)]
      for i in matched:
        if i < n_user:
          hits[i] += 1
      return 'frozen' if matched else base

    out[name] = jax.tree_util.tree_map_with_path(label, tree)
    unused = [spec.freeze[i] for i, h in enumerate(hits) if not h]
    if unused:
      some = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0][:6]]
      raise ValueError(f'config.model.{name}.train.freeze patterns {unused} match no parameter of {name} '
                       f'(regular expressions searched in paths such as {some}).')
  return out


def make_optimizers(cfg, total_steps: int, encoders: dict[str, pretrained_lib.TrainSpec] | None = None
                    ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(tx_g, tx_d) from `config.optim` and the encoders' TrainSpecs (`pretrained.train_specs(config.model)`)."""
  o = cfg
  encoders = dict(encoders or {})
  unknown = set(o.frozen) - set(TRAINABLE)
  if unknown:
    raise ValueError(f'config.optim.frozen has unknown components {sorted(unknown)}; choose from {TRAINABLE}.')
  if 'discriminator' in o.frozen or 'generator' in o.frozen:
    raise ValueError('config.optim.frozen cannot freeze the generator or the discriminator.')
  warmup = max(1, min(o.warmup_steps, total_steps))
  rep_lr = optax.warmup_cosine_decay_schedule(0.0, o.rep_lr, warmup, max(total_steps, warmup + 1),
                                              end_value=0.1 * o.rep_lr)
  clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  gan = optax.chain(*clip, optax.adam(o.g_lr, b1=o.gan_b1, b2=o.gan_b2, eps=1e-8))
  rep = optax.chain(*clip, optax.adamw(rep_lr, b1=o.rep_b1, b2=o.rep_b2, weight_decay=o.rep_weight_decay))
  frozen = tuple(o.frozen)
  transforms = {'gan': gan, 'rep': rep, 'frozen': optax.set_to_zero()}
  for name, spec in encoders.items():
    if not spec.plain and not spec.frozen:
      scale = lambda count, m=float(spec.lr_mul), n=int(spec.unfreeze_after): m * (count >= n).astype(jnp.float32)
      transforms[f'rep:{name}'] = optax.chain(rep, optax.scale_by_schedule(scale))
  labels = lambda params: param_labels(params, frozen, encoders)
  freeze_at = int(o.condition_frozen_after)
  if freeze_at > 0:
    stop = lambda count, n=freeze_at: (count < n).astype(jnp.float32)
    transforms.update({f'{k}|cond': optax.chain(t, optax.scale_by_schedule(stop))
                       for k, t in list(transforms.items()) if k != 'frozen'})
    plain_labels = labels

    def labels(params):
      out = plain_labels(params)
      for name in CONDITION_PATH:
        if name in out:
          out[name] = jax.tree.map(lambda l: l if l == 'frozen' else f'{l}|cond', out[name])
      return out

  tx_g = optax.multi_transform(transforms, labels)
  tx_d = optax.chain(*clip, optax.adam(o.d_lr, b1=o.gan_b1, b2=o.gan_b2, eps=1e-8))
  return tx_g, tx_d


def init_state(model: mmgan.Model, config, key: jax.Array, batch: dict[str, jax.Array],
               tx_g: optax.GradientTransformation, tx_d: optax.GradientTransformation,
               codec_params: Tree | None = None, latent_scale: float = 1.0,
               pretrained: dict[str, Tree] | None = None) -> TrainState:
  """A fresh TrainState with plain (unboxed) arrays. `state_shardings` gives where each leaf lives.

  `pretrained` ({component: {'hf': params}}, `pretrained.load_weights`) replaces the random initialisation of
  those sub-trees (every leaf shape-checked) before the optimiser state is built; pass it as an argument of the
  jitted init (not a closed-over constant) so it lands directly on its shards.
  """
  k_params, k_rng = jax.random.split(key)
  params = nn.unbox(mmgan.init_params(model, k_params, batch))
  if pretrained:
    params = pretrained_lib.place(params, pretrained)
  codec = params.pop('codec')
  if codec_params is not None:
    codec = codec_params
  ema = {k: params[k] for k in EMA_COMPONENTS if k in params}
  adaptive = dict(
      t_max=jnp.asarray(config.diffusion_gan.t_max_init, jnp.float32),
      lambda_adv=jnp.ones((), jnp.float32),
      r_d=jnp.zeros((), jnp.float32),
      images_seen=jnp.zeros((), jnp.float32),
      nonfinite=jnp.zeros((), jnp.float32),
  )
  if model.whiten_condition:  # the running statistics G and D whiten their condition with
    adaptive.update(mmgan.condition_stats_init(model.generator.cond_dim))
  return TrainState(
      step=jnp.zeros((), jnp.int32), rng=k_rng, params=params,
      ema=jax.tree.map(jnp.copy, ema),
      opt_g=tx_g.init(g_side(params)), opt_d=tx_d.init(params['discriminator']),
      adaptive=adaptive, codec={'params': codec, 'scale': jnp.asarray(latent_scale, jnp.float32)})


def state_shardings(model: mmgan.Model, abstract_state: TrainState, key: jax.Array, batch, mesh, rules
                    ) -> TrainState:
  """NamedShardings for every leaf of the state: params from logical rules, mirrors for EMA/optimiser."""
  boxed = jax.eval_shape(lambda k: mmgan.init_params(model, k, batch), key)
  boxed_codec = boxed.pop('codec')
  params_sh = sharding.param_shardings(boxed, mesh, rules)
  codec_sh = sharding.param_shardings(boxed_codec, mesh, rules)
  params_abs = abstract_state.params
  mirror = lambda tree, p, sh: sharding.mirror_shardings(tree, p, sh, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return TrainState(
      step=replicated, rng=replicated, params=params_sh,
      ema={k: params_sh[k] for k in abstract_state.ema},
      opt_g=mirror(abstract_state.opt_g, params_abs, params_sh),
      opt_d=mirror(abstract_state.opt_d, params_abs['discriminator'], params_sh['discriminator']),
      adaptive=jax.tree.map(lambda _: replicated, abstract_state.adaptive),
      codec={'params': codec_sh if jax.tree.leaves(abstract_state.codec['params']) else {},
             'scale': replicated})
