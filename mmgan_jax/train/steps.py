"""The training steps: pure functions of (state, batch) -> (state, metrics), jitted by the trainer.

One training iteration is `d_step` (or `d_step_r1` every `r1_interval` iterations: the same step plus the lazy
R1 penalty) followed by `g_step`. The host chooses which compiled function to call; nothing inside branches on
the step number. Both draw their randomness from `fold_in(state.rng, state.step)`.

D step (Diffusion-GAN + projection D + matching-aware pairs, StyleGAN2 losses):
  conditions from the encoders (no gradient), fakes x~ = R(G(z, c)) (no gradient),
  y = diffuse(x, t), t ~ priority(T_max) for reals and fakes,
  L_D = softplus(-D(y_real, c)) + softplus(D(y_fake, c)) + w_mm softplus(D(y_real, c_shuffled)) [+ R1],
  then T_max moves toward r_d = E[sign D(y_real)] = target.

G step, two gradient paths:
  representation: L_rep = w_align InfoNCE(s_a, s_b) over modality pairs + w_cap CE(captions)
                          + w_den |eps - eps_theta(x_t, t, c)|^2 on real latents (condition dropout for CFG)
                          [+ w_cons source_gap(s_text, s_audio) + w_cc CE(captions | s alone)];
                  updates encoders, fusion, text decoder, refiner.
  generator:      x = G(z, c, T) for two z per condition (B/2 conditions); x~ = R(x) (K differentiable DDIM steps, R frozen here),
                  L_adv = softplus(-D(diffuse(x~, t), c)),
                  L_sem = InfoNCE(image-encoder(x~), c)   (XMC-GAN; encoder frozen here)
                          [+ w_semcap CE(captioner(image-encoder(x~)), caption of c)   (MirrorGAN's STREAM)],
                  L_div = MSGAN 1 / (|x_1 - x_2| / |z_1 - z_2|),
                  grad = lambda * w_adv grad L_adv + grad(w_sem L_sem + w_div L_div),
                  lambda = |grad_last(semantic)| / |grad_last(adv)|  (VQGAN adaptive weight, last G layer).
  Both cotangents are pulled back through R and G with one vjp each, so the split costs no extra forward pass.
  With refine.in_training=False, K = 0: G trains on x itself and only sampling and evaluation refine.
  `gan_step` is the generator path alone (conditions without gradient, no representation losses or backward):
  the iterations that config.rep_every leaves to the GAN; `gan_step_lazy` also leaves out the semantic terms and
  keeps the last adaptive weight (the iterations between two of every config.loss.sem_every, whose semantic
  gradient is weighted sem_every).
  EMA of G and R is updated in the step.

Non-finite losses or gradients: the update is skipped (the state is kept), `adaptive['nonfinite']` counts
consecutive bad iterations (one whose D or G step was skipped, counted once) and the metrics report it; the
trainer stops with an error after `max_nonfinite_steps` of them.

Gradient accumulation (`config.optim.grad_accum` = A > 1): each step splits its batch into A interleaved
micro-batches (rows i, i + A, ...: on a batch-sharded mesh every device keeps its own rows, no communication),
computes the gradients and loss terms of each in a `lax.scan` with its own random stream, and applies their
mean once. Activation memory is that of one micro-batch. Losses that couple examples (InfoNCE negatives, the
mismatched pairs, minibatch-stddev groups, the mode-seeking pairs) see B / A examples at a time, so A > 1 is
the B / A training problem with B / A-times less noisy updates, not bit-for-bit the large batch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmgan_jax.models import diffusion, mmgan, partitioning, text_decoder
from mmgan_jax.models.generator import last_layer_params, with_last_layer
from mmgan_jax.train import losses
from mmgan_jax.train.state import TrainState, g_side

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# Stream ids folded into the step key, so the D and G steps and every use inside them draw independent numbers.
_D_STREAM, _G_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Steps:
  d_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  d_step_r1: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  g_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  # The representation update alone (encoders, fusion, captioner, refiner; G and D unchanged): the iterations
  # before `config.gan_start`, so the GAN starts on conditions that already tell the attributes apart.
  rep_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  # G's update alone on conditions computed without gradient (the representation side, its optimiser state
  # included, unchanged): the iterations that `config.rep_every` leaves to the GAN.
  gan_step: Callable[..., tuple[TrainState, Metrics]]
  # gan_step without the semantic terms (the image encoder's forward and backward on G's samples), keeping the
  # last adaptive weight: the G-only iterations between two of every `config.loss.sem_every`, whose semantic
  # gradient carries sem_every times the weight (StyleGAN2's lazy regularisation, as for R1).
  gan_step_lazy: Callable[..., tuple[TrainState, Metrics]]
  # D's features and condition head on clean real images alone (config.d_head_warmup, before gan_start).
  d_head_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  # The raw gradients (for tests and debugging): D's with R1, and every G-side component's; (state, batch) or
  # (state, micro_batch, micro_index) for one micro-batch of gradient accumulation.
  d_grads: Callable[..., Any]
  g_grads: Callable[..., Any]


def sample_presence(model: mmgan.Model, key: jax.Array, batch_size: int, p_drop: float
                    ) -> dict[str, dict[str, jax.Array]]:
  """Per task and example, which sources are kept: with probability p_drop one of two sources is dropped."""
  out = {}
  for i, (task, srcs) in enumerate(model.tasks.items()):
    keep = {m: jnp.ones((batch_size,), bool) for m in srcs}
    if len(srcs) == 2 and p_drop > 0:
      k1, k2 = jax.random.split(jax.random.fold_in(key, i))
      drop = jax.random.bernoulli(k1, p_drop, (batch_size,))
      which = jax.random.bernoulli(k2, 0.5, (batch_size,))
      keep[srcs[0]] = ~(drop & which)
      keep[srcs[1]] = ~(drop & ~which)
    out[task] = keep
  return out


def _select(ok: jax.Array, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _guard(ok: jax.Array, new: TrainState, old: TrainState, iteration_ok: jax.Array | None = None) -> TrainState:
  """Keeps the old state unless every loss and gradient was finite. With `iteration_ok` (the G step: D's and G's
  verdicts of this iteration together) it also counts the iteration in the streak of bad iterations."""
  kept = _select(ok, new, old)
  if iteration_ok is None:  # the D step: the streak is the G step's to update, once per iteration
    return kept.replace(step=new.step)
  nonfinite = jnp.where(iteration_ok, 0.0, old.adaptive['nonfinite'] + 1.0)
  return kept.replace(step=new.step, adaptive={**kept.adaptive, 'nonfinite': nonfinite})


def _tile2(tree):
  return jax.tree.map(lambda x: jnp.concatenate([x, x], axis=0), tree)


def make_steps(model: mmgan.Model, config, tx_g: optax.GradientTransformation,
               tx_d: optax.GradientTransformation) -> Steps:
  """Builds the step functions for a model and config (static; closed over, not traced)."""
  lc = config.loss
  dg = config.diffusion_gan
  noise_aware = bool(config.model.discriminator.noise_aware)
  ab_disc = jnp.asarray(model.alpha_bar_disc)
  ab_ref = jnp.asarray(model.alpha_bar_refiner)
  num_ref_t = len(model.alpha_bar_refiner) - 1
  refiner_on = model.refiner is not None
  prediction = config.model.refiner.prediction
  t_start = int(config.refine.t_start)
  ref_fraction = float(config.refine.train_fraction)
  # Refiner steps on G's samples in training (D and the semantic loss see refined samples); none with
  # refine.in_training=False, where only sampling and evaluation refine.
  num_ref_steps = int(config.refine.num_steps) if refiner_on and config.refine.in_training else 0
  num_draws = int(config.refine.num_draws)
  z_dim = model.generator.z_dim
  captions_on = model.text_decoder is not None and lc.caption > 0
  sem_caption_on = model.text_decoder is not None and lc.sem_caption > 0
  cond_caption_on = model.text_decoder is not None and lc.cond_caption > 0
  semantic_on = lc.sem > 0 or lc.div > 0 or sem_caption_on
  adaptive_on = bool(lc.adaptive) and semantic_on and lc.adv > 0
  cond_reg_on = model.discriminator.cond_head and lc.cond_reg > 0
  words_on = cond_reg_on and model.discriminator.head_dim > 0  # the head names the caption's words

  def head_loss(pred, cond, ids, mask):
    """D's condition head against its target: the caption's words (a multi-label classifier, AC-GAN with the
    caption's words as the labels) or the condition vector (InfoGAN's Q)."""
    if words_on:
      return losses.word_presence_loss(pred, text_decoder.words_present(ids, mask, model.vocab_size))
    return losses.condition_regression(pred, cond)
  pairs = list(itertools.combinations(model.modalities, 2))
  gen_sources = [m for m in model.generate_sources if m in model.encoders]
  consistency_on = lc.source_consistency > 0 and len(gen_sources) >= 2
  pad_id = model.pad_id
  accum = int(getattr(config.optim, 'grad_accum', 1))
  sem_every = int(lc.sem_every)

  def keys(state: TrainState, stream: int, n: int, micro=None):
    k = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), stream)
    if micro is not None:  # gradient accumulation: an independent stream per micro-batch
      k = jax.random.fold_in(k, micro)
    return jax.random.split(k, n)

  def accumulate(compute, state: TrainState, batch: Batch):
    """compute(state, batch, micro) -> pytree of floats; its mean over the `accum` micro-batches."""
    if accum == 1:
      return compute(state, batch, None)
    split = jax.tree.map(lambda x: jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0),
                         batch)
    first = jax.tree.map(lambda x: x[0], split)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(compute, state, first, 0))

    def body(total, xs):
      i, micro = xs
      return jax.tree.map(jnp.add, total, compute(state, micro, i)), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), split))
    return jax.tree.map(lambda x: x / accum, total)

  def sample_t(key, b, t_max):
    if not noise_aware:
      return jnp.zeros((b,), jnp.int32)
    return losses.sample_priority_t(key, (b,), jnp.round(t_max).astype(jnp.int32))

  def diffuse(key, x, t):
    if not noise_aware:
      return x
    return losses.diffuse(x, t, ab_disc, key, sigma=dg.sigma)

  def conditions(state, batch, present):
    enc = mmgan.encode(model, state.params, batch, present)
    return jax.lax.stop_gradient(enc['generate'])

  def fakes(state, cond, gan_cond, k_z, k_noise, k_ref):
    b = cond['cond'].shape[0]
    z = jax.random.normal(k_z, (b, z_dim), jnp.float32)
    x = mmgan.generate(model, state.params['generator'], z, gan_cond, noise_key=k_noise)
    return mmgan.refine(model, state.params.get('refiner'), x, cond, k_ref, t_start=t_start,
                        num_steps=num_ref_steps, prediction=prediction, num_draws=num_draws)

  # --------------------------------------------------------------------------------------------------------
  # Discriminator.

  def d_compute(state: TrainState, batch: Batch, with_r1: bool, micro=None):
    """D loss gradients (w.r.t. the discriminator params) and the loss terms."""
    ks = keys(state, _D_STREAM, 8, micro)
    b = batch['image'].shape[0]
    present = sample_presence(model, ks[0], b, config.modality_dropout)
    cond = conditions(state, batch, present)
    stats = {}
    if model.whiten_condition:  # this step's conditions join the running statistics before they are used
      stats = mmgan.update_condition_stats(state.adaptive, cond['cond'])
    gan_cond = mmgan.gan_condition(model, {**state.adaptive, **stats}, cond)
    x_real = mmgan.to_latent(model, state.codec['params'], state.codec['scale'], batch['image'])
    x_fake = jax.lax.stop_gradient(fakes(state, cond, gan_cond, ks[1], ks[2], ks[3]))
    t_max = state.adaptive['t_max']
    t_real, t_fake = sample_t(ks[4], b, t_max), sample_t(ks[5], b, t_max)
    y_real, y_fake = diffuse(ks[6], x_real, t_real), diffuse(ks[7], x_fake, t_fake)
    c = gan_cond['cond']
    c_mismatch = jnp.roll(c, 1, axis=0)

    def loss_fn(dp):
      d = lambda y, t, s: mmgan.discriminate(model, dp, y, t, s)
      if cond_reg_on:
        real, real_pred = mmgan.discriminate_with_condition(model, dp, y_real, t_real, c)
      else:
        real = d(y_real, t_real, c)
      fake = d(y_fake, t_fake, c)
      mismatch = d(y_real, t_real, c_mismatch) if lc.mismatch > 0 else None
      loss, aux = losses.d_logistic_loss(real, fake, mismatch, mismatch_weight=lc.mismatch)
      if cond_reg_on:  # D learns to read the condition (or the caption's words) off real images
        aux['cond_reg'] = head_loss(real_pred, c, batch['text_ids'], batch['text_mask'])
        loss = loss + lc.cond_reg * aux['cond_reg']
      if with_r1:
        penalty, _ = losses.r1_penalty(lambda y: d(y, t_real, c), y_real)
        loss = loss + 0.5 * lc.r1_gamma * lc.r1_interval * penalty
        aux['r1'] = penalty
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params['discriminator'])
    return grads, loss, (aux, stats)

  def d_step_impl(state: TrainState, batch: Batch, with_r1: bool):
    grads, loss, (aux, stats) = accumulate(lambda s, b, i: d_compute(s, b, with_r1, i), state, batch)
    t_max = state.adaptive['t_max']
    updates, opt_d = tx_d.update(grads, state.opt_d, state.params['discriminator'])
    params = dict(state.params, discriminator=optax.apply_updates(state.params['discriminator'], updates))
    r_d = aux['r_sign']
    t_new = t_max
    if noise_aware and dg.adaptive:
      t_new = losses.update_t_max(t_max, r_d, target=dg.target, step=dg.step_size, t_lo=dg.t_lo, t_hi=dg.t_hi)
    new = state.replace(params=params, opt_d=opt_d,
                        adaptive={**state.adaptive, **stats, 't_max': t_new, 'r_d': r_d})
    grad_norm = optax.global_norm(grads)
    ok = losses.all_finite((loss, grad_norm))
    new = _guard(ok, new, state)
    metrics = {f'd/{k}': v for k, v in aux.items()}
    metrics.update({'d/loss': loss, 'd/grad_norm': grad_norm, 'diffusion_gan/t_max': new.adaptive['t_max'],
                    'guard/d_finite': ok.astype(jnp.float32)})
    return new, metrics

  def d_head_step_impl(state: TrainState, batch: Batch):
    """D's features and condition head alone, on clean real images (the head's loss, no adversarial term): the
    iterations before `gan_start` with `config.d_head_warmup`, so that D can already name what it sees when G
    starts (AC-GAN's classifier, pretrained; in the core, pretraining took a head-less D's shape from 54 to 68 % at
    3000 iterations, docs/training.md part 14). G, the representation side and the step count are untouched."""
    b = batch['image'].shape[0]
    x_real = mmgan.to_latent(model, state.codec['params'], state.codec['scale'], batch['image'])
    t0 = jnp.zeros((b,), jnp.int32)
    if words_on:  # the head reads the image alone; the projection's input does not matter here
      c = jnp.zeros((b, model.discriminator.cond_dim), jnp.float32)
    else:
      present = sample_presence(model, keys(state, _D_STREAM, 1)[0], b, config.modality_dropout)
      c = mmgan.gan_condition(model, state.adaptive, conditions(state, batch, present))['cond']

    def loss_fn(dp):
      _, pred = mmgan.discriminate_with_condition(model, dp, x_real, t0, c)
      return lc.cond_reg * head_loss(pred, c, batch['text_ids'], batch['text_mask'])

    loss, grads = jax.value_and_grad(loss_fn)(state.params['discriminator'])
    updates, opt_d = tx_d.update(grads, state.opt_d, state.params['discriminator'])
    params = dict(state.params, discriminator=optax.apply_updates(state.params['discriminator'], updates))
    ok = losses.all_finite((loss, optax.global_norm(grads)))
    new = _guard(ok, state.replace(params=params, opt_d=opt_d), state)
    return new, {'d/head_warmup': loss, 'guard/d_finite': ok.astype(jnp.float32)}

  # --------------------------------------------------------------------------------------------------------
  # Generator side.

  def rep_loss_fn(rep_params, state, batch, present, ks):
    tasks = model.tasks
    if sem_caption_on:
      # G's caption-consistency term asks the captioner to read a sample ALONE: train it on real images alone
      # too (the caption task mostly also hears the audio, which names every attribute). Same encoder outputs.
      tasks = dict(tasks, image_caption=('image',))
      present = dict(present, image_caption={'image': jnp.ones((batch['image'].shape[0],), bool)})
    enc = mmgan.encode(model, rep_params, batch, present, tasks=tasks)
    scale = enc['logit_scale']
    terms = {}
    total = 0.0
    if lc.align > 0 and pairs:
      vals = []
      for a, bm in pairs:
        l, aux = losses.info_nce(enc['embed'][a], enc['embed'][bm], scale)
        terms[f'align/{a}_{bm}_acc'] = aux['accuracy']
        vals.append(l)
      terms['align/loss'] = sum(vals) / len(vals)
      total = total + lc.align * terms['align/loss']
    if consistency_on:
      # One example's text and audio should give one condition (docs/training.md, part 6).
      # With loss.source_anchor the anchor's embedding is held: the other sources move to it, it does not move
      # to them (symmetric pulling let the text drop the shape distinctions the audio makes weakly).
      hold = lambda m, e: jax.lax.stop_gradient(e) if m == lc.source_anchor else e
      terms['align/source_gap'] = losses.source_gap([hold(m, enc['embed'][m]) for m in gen_sources])
      total = total + lc.source_consistency * terms['align/source_gap']
    if captions_on or sem_caption_on or cond_caption_on:
      ids, targets, mask = text_decoder.shift_for_teacher_forcing(batch['text_ids'], pad_id)
      caption_loss = lambda cond: text_decoder.caption_loss(
          mmgan.caption_logits(model, rep_params['text_decoder'], ids, cond), targets, mask, lc.label_smoothing)
      if captions_on:
        terms['caption/loss'] = caption_loss(enc['caption'])
        total = total + lc.caption * terms['caption/loss']
      if sem_caption_on:
        terms['caption/image_only_loss'] = caption_loss(enc['image_caption'])
        total = total + lc.sem_caption * terms['caption/image_only_loss']
      if cond_caption_on:
        # The captioner reads G's condition s ALONE (one memory token, scaled to a LayerNorm'd token's norm) and
        # writes the example's caption, so s must name every attribute: in-batch InfoNCE negatives rarely
        # differ in shape alone, and s kept shape in weak directions where text and audio disagree.
        g = enc['generate']
        token = g['cond'][:, None, :] * jnp.sqrt(jnp.float32(g['cond'].shape[-1]))
        terms['caption/from_condition_loss'] = caption_loss({'tokens': token, 'mask': g['has_cond'][:, None]})
        total = total + lc.cond_caption * terms['caption/from_condition_loss']
    if refiner_on and lc.denoise > 0:
      # On the first refine.train_fraction of the batch: the refiner's forward and backward are ~half of a
      # representation iteration in the demo (docs/training.md, part 12).
      b = max(1, round(batch['image'].shape[0] * ref_fraction))
      cond = jax.tree.map(lambda v: v[:b], enc['generate'])
      x0 = mmgan.to_latent(model, state.codec['params'], state.codec['scale'], batch['image'][:b])
      t = jax.random.randint(ks[0], (b,), 1, num_ref_t + 1)
      eps = jax.random.normal(ks[1], x0.shape, jnp.float32)
      x_t = diffusion.q_sample(ab_ref, x0, t, eps)
      keep = jax.random.uniform(ks[2], (b,)) >= config.model.refiner.cond_dropout
      apply = lambda p, x_t, t, c, keep: model.refiner.apply({'params': p}, x_t, t, c['cond'], keep, c['tokens'],
                                                             c['mask'])
      out = mmgan.checkpointed(model, apply)(rep_params['refiner'], x_t, t, cond, keep)
      target = diffusion.denoising_target(x0, eps, t, ab_ref, prediction)
      terms['refiner/denoise_loss'] = diffusion.denoising_loss(out, target)
      total = total + lc.denoise * terms['refiner/denoise_loss']
    terms['align/logit_scale'] = scale
    return total, (terms, jax.lax.stop_gradient(enc['generate']))

  def rep_part(state: TrainState, batch: Batch, micro):
    """The G stream's keys, and the representation side's loss, terms, (stopped) conditions and gradients."""
    ks = keys(state, _G_STREAM, 12, micro)
    present = sample_presence(model, ks[0], batch['image'].shape[0], config.modality_dropout)
    rep_params = {k: v for k, v in g_side(state.params).items() if k != 'generator'}
    (rep_loss, (terms, cond)), rep_grads = jax.value_and_grad(rep_loss_fn, has_aux=True)(
        rep_params, state, batch, present, ks[1:4])
    return ks, rep_loss, terms, cond, rep_grads

  def gan_part(state: TrainState, batch: Batch, micro):
    """rep_part's keys and (stopped) conditions without the representation's losses: zero gradients."""
    ks = keys(state, _G_STREAM, 12, micro)
    present = sample_presence(model, ks[0], batch['image'].shape[0], config.modality_dropout)
    rep_params = {k: v for k, v in g_side(state.params).items() if k != 'generator'}
    return ks, None, {}, conditions(state, batch, present), jax.tree.map(jnp.zeros_like, rep_params)

  def g_compute(state: TrainState, batch: Batch, micro=None, rep=rep_part, semantic=True, sem_weight=1):
    """Gradients for every G-side component, the adaptive weight, and the loss terms (`rep=gan_part`: G's
    alone, the other components' gradients zero and their terms absent). `semantic=False` (the G-only
    iterations that loss.sem_every skips) leaves out the semantic terms and keeps the last adaptive weight;
    `sem_weight` multiplies the semantic gradient of the G-only iterations that compute it (not the adaptive
    weight, which is measured on the term itself)."""
    semantic = semantic and semantic_on
    ks, rep_loss, terms, cond, rep_grads = rep(state, batch, micro)
    b = batch['image'].shape[0]

    # Generator losses: the first half of the batch's conditions, two samples each (mode seeking), so G, R and
    # D see B samples as in the D step. Conditions and the other networks are frozen here.
    frozen = jax.lax.stop_gradient(state.params)
    frozen_codec = jax.lax.stop_gradient(state.codec['params'])
    b = max(1, b // 2)
    cond = jax.tree.map(lambda v: v[:b], cond)
    cond2 = _tile2(cond)
    gan_cond2 = mmgan.gan_condition(model, state.adaptive, cond2)  # what G and D read (whitened or s itself)
    z = jax.random.normal(ks[4], (2 * b, z_dim), jnp.float32)
    x, vjp_g = jax.vjp(lambda gp: mmgan.generate(model, gp, z, gan_cond2, noise_key=ks[5]),
                       state.params['generator'])
    x_ref, vjp_r = jax.vjp(
        lambda xx: mmgan.refine(model, frozen.get('refiner'), xx, cond2, ks[6], t_start=t_start,
                                num_steps=num_ref_steps, prediction=prediction, num_draws=num_draws), x)
    t = sample_t(ks[7], 2 * b, state.adaptive['t_max'])
    noise_key = ks[8]

    def adv_fn(xr):
      """One D pass: the adversarial loss and (cond_head) D's weighted condition regression on the samples."""
      y, c = diffuse(noise_key, xr, t), gan_cond2['cond']
      if not cond_reg_on:
        return losses.g_nonsaturating_loss(mmgan.discriminate(model, frozen['discriminator'], y, t, c)), jnp.zeros(())
      logits, pred = mmgan.discriminate_with_condition(model, frozen['discriminator'], y, t, c)
      ids, mask = _tile2((batch['text_ids'][:b], batch['text_mask'][:b]))  # the captions of G's conditions
      return losses.g_nonsaturating_loss(logits), lc.cond_reg * head_loss(pred, c, ids, mask)

    def sem_fn(xr):
      zero = jnp.zeros((), jnp.float32)
      if not semantic or (lc.sem <= 0 and not sem_caption_on):
        return zero, (zero, zero)
      images = mmgan.to_image(model, frozen_codec, state.codec['scale'], xr)
      s, cap = mmgan.image_semantics(model, frozen, images, caption=sem_caption_on)
      total, acc, cap_loss = zero, zero, zero
      if lc.sem > 0:
        scale = frozen['fusion']['logit_scale']
        l1, a1 = losses.info_nce(s[:b], cond['cond'], scale)
        l2, a2 = losses.info_nce(s[b:], cond['cond'], scale)
        total, acc = lc.sem * 0.5 * (l1 + l2), 0.5 * (a1['accuracy'] + a2['accuracy'])
      if sem_caption_on:
        # The captioner, reading the sample alone, should write the caption it was generated from (every word:
        # shape and size too, which in-batch InfoNCE negatives rarely isolate).
        ids, targets, mask = _tile2(text_decoder.shift_for_teacher_forcing(batch['text_ids'][:b], pad_id))
        logits = mmgan.caption_logits(model, frozen['text_decoder'], ids, cap)
        cap_loss = text_decoder.caption_loss(logits, targets, mask, label_smoothing=0.0)
        total = total + lc.sem_caption * cap_loss
      return total, (acc, cap_loss)

    def div_fn(xx):
      if lc.div <= 0:
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
      l, d = losses.mode_seeking_loss(xx[:b], xx[b:], z[:b], z[b:])
      return lc.div * l, jnp.mean(d)

    (adv, cond_reg), vjp_d = jax.vjp(adv_fn, x_ref)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    (ct_adv,) = vjp_d((one, zero))
    (sem, (sem_acc, sem_cap)), ct_sem = jax.value_and_grad(sem_fn, has_aux=True)(x_ref)
    (div, div_d), ct_div = jax.value_and_grad(div_fn, has_aux=True)(x)
    # Pull both cotangents back through R. The adaptive weight needs each loss's gradient at G's last layer
    # only: a vjp w.r.t. that layer alone (its forward is the same computation as G's, which XLA shares) is
    # cheap, so the full backward through G runs once, on the weighted sum of the cotangents.
    (ct_x_adv,), (ct_x_sem,) = vjp_r(ct_adv), vjp_r(ct_sem)
    # A lazy term's extra weight (StyleGAN2's lazy regularisation); none on the other steps.
    ct_x_lazy = ct_x_sem * (sem_weight - 1) if sem_weight > 1 else 0.0
    ct_x_sem = ct_x_sem + ct_div
    ct_x_cond = vjp_r(vjp_d((zero, one))[0])[0] if cond_reg_on else 0.0  # weighted by loss.cond_reg, not lambda
    if adaptive_on and not semantic:  # no semantic gradient to anchor on: the last iteration's weight
      lam = state.adaptive['lambda_adv']
    elif adaptive_on:
      gen_params = state.params['generator']

      def g_last(last):
        return mmgan.generate(model, with_last_layer(gen_params, last), z, gan_cond2, noise_key=ks[5])

      _, vjp_last = jax.vjp(g_last, last_layer_params(gen_params))
      lam = losses.adaptive_weight(vjp_last(ct_x_sem)[0], vjp_last(ct_x_adv)[0], max_weight=lc.adaptive_max)
    else:
      lam = jnp.ones((), jnp.float32)
    (gen_grads,) = vjp_g(lc.adv * lam * ct_x_adv + ct_x_sem + ct_x_cond + ct_x_lazy)

    grads = dict(rep_grads, generator=gen_grads)
    metrics = dict(terms)
    if semantic:  # (iterations without the semantic terms log none, rather than zeros)
      metrics.update({'g/sem_loss': sem, 'g/sem_acc': sem_acc})
      if sem_caption_on:
        metrics['g/sem_caption_loss'] = sem_cap
    metrics.update({'g/adv_loss': adv, 'g/div_loss': div, 'g/div_distance': div_d, 'g/lambda_adv': lam,
                    'g/cond_reg': cond_reg, 'g/total': lc.adv * lam * adv + sem_weight * sem + div + cond_reg})
    if rep_loss is not None:
      metrics['rep/total'] = rep_loss
    return grads, lam, metrics

  gan_compute = functools.partial(g_compute, rep=gan_part, sem_weight=sem_every)
  gan_lazy_compute = functools.partial(g_compute, rep=gan_part, semantic=False)

  def rep_compute(state: TrainState, batch: Batch, micro=None):
    """The representation side's gradients alone (G's are zero): the steps before `gan_start`."""
    _, rep_loss, terms, _, rep_grads = rep_part(state, batch, micro)
    grads = dict(rep_grads, generator=jax.tree.map(jnp.zeros_like, state.params['generator']))
    return grads, state.adaptive['lambda_adv'], dict(terms, **{'rep/total': rep_loss})

  def g_step(state: TrainState, batch: Batch, d_finite: jax.Array | None = None, compute=g_compute):
    """The G-side update; `d_finite` (this iteration's D step's `guard/d_finite`) makes the streak of bad
    iterations count an iteration once whichever of its two steps failed."""
    grads, lam, metrics = accumulate(compute, state, batch)
    b = batch['image'].shape[0]
    params_g = g_side(state.params)
    updates, opt_g = tx_g.update(grads, state.opt_g, params_g)
    if compute is rep_compute:
      # G does not train yet: its Adam state stays as it was. Zero gradients would decay the second moment and
      # advance the bias-correction count, making G's first real updates ~10x too large (beta2 = 0.99).
      opt_g = opt_g._replace(inner_states={**opt_g.inner_states, 'gan': state.opt_g.inner_states['gan']})
    new_params = dict(state.params, **optax.apply_updates(params_g, updates))
    if compute in (gan_compute, gan_lazy_compute):
      # Only G trains: the representation side keeps its parameters (AdamW's momentum and weight decay would
      # move them on zero gradients) and its optimiser state (its moments and schedule count stand still).
      new_params = dict(state.params, generator=new_params['generator'])
      opt_g = opt_g._replace(inner_states={k: v if k == 'gan' else state.opt_g.inner_states[k]
                                           for k, v in opt_g.inner_states.items()})
      grads = {'generator': grads['generator']}
    images_seen = state.adaptive['images_seen'] + b
    beta = losses.ema_decay(images_seen, half_life_images=config.ema.half_life_images,
                            rampup=config.ema.rampup, batch_size=b)
    ema = {k: losses.ema_update(state.ema[k], new_params[k], beta) for k in state.ema}
    new = state.replace(step=state.step + 1, params=new_params, opt_g=opt_g, ema=ema,
                        adaptive={**state.adaptive, 'lambda_adv': lam, 'images_seen': images_seen})
    norms = {f'grad_norm/{k}': optax.global_norm(v) for k, v in grads.items()}
    ok = losses.all_finite((metrics.get('rep/total', 0.0), metrics.get('g/total', 0.0), list(norms.values())))
    iteration_ok = ok if d_finite is None else ok & (d_finite > 0)
    new = _guard(ok, new, state, iteration_ok)
    metrics.update(norms)
    metrics.update({'ema/beta': beta, 'guard/g_finite': ok.astype(jnp.float32),
                    'guard/nonfinite_streak': new.adaptive['nonfinite']})
    return new, metrics

  def d_grads(state: TrainState, batch: Batch, micro=None):
    """D's gradients (with R1) as the step computes them; with `micro`, of one micro-batch's random stream."""
    if micro is not None:
      return d_compute(state, batch, True, micro)[0]
    return accumulate(lambda s, b, i: d_compute(s, b, True, i), state, batch)[0]

  def g_grads(state: TrainState, batch: Batch, micro=None):
    """Every G-side component's gradients as the step computes them; `micro` as in `d_grads`."""
    if micro is not None:
      return g_compute(state, batch, micro)[0]
    return accumulate(g_compute, state, batch)[0]

  rules = tuple(config.partition_rules)

  def with_rules(fn):
    """fn traced with the config's rules installed: the modules' activation constraints take effect whenever a
    mesh is set (models/partitioning.py), whoever jits the step."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      with partitioning.activation_rules(rules):
        return fn(*args, **kwargs)
    return wrapped

  return Steps(d_step=with_rules(lambda s, b: d_step_impl(s, b, False)),
               d_step_r1=with_rules(lambda s, b: d_step_impl(s, b, True)), g_step=with_rules(g_step),
               rep_step=with_rules(lambda s, b: g_step(s, b, compute=rep_compute)),
               gan_step=with_rules(lambda s, b, d_finite=None: g_step(s, b, d_finite, compute=gan_compute)),
               gan_step_lazy=with_rules(lambda s, b, d_finite=None: g_step(s, b, d_finite,
                                                                           compute=gan_lazy_compute)),
               d_head_step=with_rules(d_head_step_impl), d_grads=with_rules(d_grads), g_grads=with_rules(g_grads))
