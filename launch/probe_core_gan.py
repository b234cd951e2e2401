r"""Diagnostic: the GAN core alone, conditioned directly on the attribute labels of the shapes dataset.

  python launch/probe_core_gan.py --steps=800 --lr=5e-3 --mapping_lr_mul=1 --noise_injection=false

The model's own Generator and Discriminator modules (configs/shapes.py widths, 32x32 pixels) with a one-hot
vector of the four attributes as the condition s; no encoders, fusion, refiner, semantic loss or instance
noise. StyleGAN2 losses (non-saturating logistic, lazy R1 every 16 steps), matching-aware pairs, Adam(0, 0.99)
and an EMA of G. Every --every steps it prints the oracle's accuracy of EMA samples for 256 held-out label sets,
and at the end writes a sample grid (--out). It tells what the core can learn in a given number of steps,
separately from the conditioning path (docs/training.md, "What made the generator learn").

  python launch/probe_core_gan.py --classify --steps=800 --lr=5e-3 --d_downsample=stride --num_train=8000

trains D's features and a linear head per attribute on real images instead, and prints held-out accuracy: can
D see shape at all (docs/training.md, "Why D could not see shapes"). --classify_net=vit_patch|vit_conv asks the
same of the image encoder behind the semantic losses (docs/training.md, "The captioner as G's shape teacher").

  python launch/probe_core_gan.py --steps=2400 --every=400 --cond_from=runs/shapes [--cond_whiten]

conditions G and D on a trained run's frozen text conditions instead of the labels (optionally whitened as
model.whiten_condition does): how much the learned condition itself slows the core (docs/training.md,
"Whitening the condition"). --cond_mix draws each example's condition from its text, its audio or both, as the
full model's modality dropout does; --whiten_eps sets the whitening's eigenvalue floor (docs/training.md,
"Conditions from three sources"). --cond_class_mean replaces each condition by the mean of its attribute set
(is it the spread within a class or the class means themselves that slow the core?); --cond_stats prints
each attribute's share of the variance and its discriminant (Fisher) ratios (docs/training.md, part 9).
--cond_words replaces each condition by the probabilities of the caption's words read off it by a fitted linear
head (a label-like code); --cond_readout (with --cond_mix) prints how well a linear classifier reads each
attribute off s, per source: the most of each attribute a G reading s could draw (docs/training.md, part 11).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 800, 'Training iterations (one D step and one G step each).')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_LR = flags.DEFINE_float('lr', 5e-3, 'Adam learning rate of G and D.')
_D_LR = flags.DEFINE_float('d_lr', 0.0, "D's Adam learning rate (0: --lr).")
_MAP_LR = flags.DEFINE_float('mapping_lr_mul', 1.0, 'Learning-rate multiplier of the mapping network.')
_NOISE = flags.DEFINE_bool('noise_injection', False, "G's per-pixel noise.")
_R1 = flags.DEFINE_float('r1_gamma', 0.01, 'R1 weight (applied every 16 steps, times 16).')
_MISMATCH = flags.DEFINE_float('mismatch', 1.0, 'Weight of the matching-aware pairs.')
_HARD = flags.DEFINE_bool('hard_negatives', False, 'Mismatched labels differ from the true ones in ONE attribute '
                          '(default: another example of the batch).')
_D_CHANNELS = flags.DEFINE_list('d_channels', ['16', '32', '64', '128'], 'D channels at 32, 16, 8, 4 px.')
_D_DOWN = flags.DEFINE_enum('d_downsample', 'stride', ['avg', 'max', 'stride'],
                            "D's downsampling (the configs' is 'stride').")
_RECON = flags.DEFINE_float('recon', 0.0, 'Weight of the paired L1 fidelity term |G(z, c_i) - x_i| (0 = off).')
_RECON_LOSS = flags.DEFINE_enum('recon_loss', 'l1', ['l1', 'l2'], "--recon's distance: mean |.| or mean (.)^2.")
_G_CHANNELS = flags.DEFINE_list('g_channels', [], "G channels at 4, 8, 16, 32 px (default: configs/shapes.py's).")
_MAP_LAYERS = flags.DEFINE_integer('mapping_layers', 0, "G's mapping layers (0: configs/shapes.py's).")
_G_B1 = flags.DEFINE_float('g_b1', 0.0, "G's Adam beta1.")
_G_ARCH = flags.DEFINE_enum('g_arch', 'skip', ['skip', 'resnet'], "G's architecture.")
_XATTN = flags.DEFINE_integer('cross_attention_max_res', 0, 'G cross-attends at resolutions <= this to one token per '
                              'attribute (its one-hot in the condition layout); one-hot conditions only.')
_ADV = flags.DEFINE_float('adv', 1.0, "Weight of G's adversarial loss.")
_AUX = flags.DEFINE_float('aux_cls', 0.0, 'AC-GAN: weight of an attribute classifier head on D features, '
                          'trained on reals, applied to fakes (0 = off).')
_COND_REG = flags.DEFINE_float('cond_reg', 0.0, "Weight of D's condition regression (InfoGAN's Q for a continuous "
                                'code): a linear head on D\'s features predicts the condition; D fits it on reals '
                                '(mean squared error), G makes its samples\' prediction match their condition.')
_CLASSIFY = flags.DEFINE_bool('classify', False, 'Instead of the GAN: train D (its features phi) and a linear head '
                               'per attribute with cross-entropy on REAL images, and print the held-out accuracy '
                               '(can D see the attributes at all, and how fast).')
_NET = flags.DEFINE_enum('classify_net', 'd', ['d', 'vit_patch', 'vit_conv'],
                        "--classify: whose features: D's, or the demo's image encoder (a ViT, width 64, depth 2, "
                        "4x4 patches; mean-pooled tokens) with the patchify stem or the conv stem.")
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initialisation and the batches.')
_EVERY = flags.DEFINE_integer('every', 200, 'Evaluate every this many steps.')
_TRAIN = flags.DEFINE_integer('num_train', 20_000, 'Training examples rendered up front.')
_OUT = flags.DEFINE_string('out', 'core_probe.png', 'Where the final sample grid goes.')
_COND_FROM = flags.DEFINE_string('cond_from', '', "A trained run's workdir: condition G and D on that run's FROZEN "
                                 "text condition vector s (text encoder + fusion, text only) of one caption per "
                                 "example instead of the one-hot labels. Tells the learned condition's share of "
                                 "the gap between the core and the full model.")
_SEM = flags.DEFINE_float('sem', 0.0, "With --cond_from: weight of the full model's semantic loss on G, InfoNCE "
                          "between that run's frozen image encoder reading G's samples and the (unwhitened) s.")
_STATS = flags.DEFINE_bool('cond_stats', False, "With --cond_from: print each attribute's share of the "
                           "conditions' variance (between-class over total) and exit.")
_WHITEN = flags.DEFINE_bool('cond_whiten', False, 'With --cond_from: ZCA-whiten the conditions as '
                            'model.whiten_condition does (here with the training set\'s statistics).')

_INSTANCE_NOISE = flags.DEFINE_bool('instance_noise', False, "The full model's Diffusion-GAN instance noise: D is "
                                    'noise-aware and reads real and fake images diffused to t ~ p(t) ∝ t on '
                                    '{1..T_max}, T_max adapting toward r_sign 0.6 (configs/common.py '
                                    'diffusion_gan: sigma 0.05, step 2, cap 500).')
_COND_STEP = flags.DEFINE_integer('cond_step', None, "With --cond_from: the run's checkpoint step to read the "
                                  'conditions from (default: its newest, read once).')
_MIX = flags.DEFINE_bool('cond_mix', False, "With --cond_from: each example's condition comes from its text alone, "
                         'its audio alone or both (1/4, 1/4, 1/2: what modality_dropout 0.5 gives the full model), '
                         'redrawn every step; held-out samples still use text alone.')
_WHITEN_EPS = flags.DEFINE_float('whiten_eps', 1e-3, "--cond_whiten's eigenvalue floor, relative to the largest "
                                  "eigenvalue (models/mmgan.py's WHITEN_EPS by default).")
_CLASS_MEAN = flags.DEFINE_bool('cond_class_mean', False, "With --cond_from: replace every condition by the mean "
                                 'of its source over the training examples with the same four attributes (no '
                                 'wording or per-example variation left): is it the spread within a class, or '
                                 'the geometry of the class means, that slows the core?')
_WORDS = flags.DEFINE_bool('cond_words', False, "With --cond_from: replace every condition s by the probabilities "
                           "of the caption's words that a linear head reads off s (fitted here on the training "
                           "conditions, multi-label logistic regression on the bag of words): a label-like code.")
_READOUT = flags.DEFINE_bool('cond_readout', False, "With --cond_from --cond_mix: fit a softmax classifier per "
                             'attribute on the training conditions of each source (text, audio, both) and print '
                             'its accuracy on 1000 held-out examples, then exit.')
_PAIRS = flags.DEFINE_bool('pairs', False, "The full model's G step: half the batch's conditions, two samples each, "
                           'with the MSGAN term (--div).')
_DIV = flags.DEFINE_float('div', 0.01, "With --pairs: the MSGAN term's weight (configs/shapes.py's loss.div).")

_PRETRAIN_D = flags.DEFINE_integer('pretrain_d', 0, "Before the GAN: this many supervised steps of D's features and "
                                   "the attribute head (--aux_cls's) on real images, as the full model could in its "
                                   "representation warm-up; D's Adam state is reset after.")
_AUX_WORDS = flags.DEFINE_enum('aux_words', '', ['', 'random', 'union'], "--aux_cls's head names caption words "
                                "(sigmoid BCE over the vocabulary, as the full model's word head) instead of the "
                                "attributes: the words of one random caption of the example, or of all its captions.")
R1_INTERVAL = 16


def head_logits(dp, feats):
  """The linear attribute head on D's features: one logits array per attribute (shape, colour, size, position)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data import shapes  # pylint: disable=g-import-not-at-top
  logits = feats @ dp['head']['w'] + dp['head']['b']
  bounds = np.cumsum((0,) + shapes.NUM_CLASSES)
  return [logits[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from mmgan_jax.evaluation.semantic import semantic_accuracy  # pylint: disable=g-import-not-at-top
  from mmgan_jax.models.discriminator import Discriminator  # pylint: disable=g-import-not-at-top
  from mmgan_jax.models.generator import Generator  # pylint: disable=g-import-not-at-top
  from mmgan_jax.sampling import save_png  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import losses  # pylint: disable=g-import-not-at-top

  spec = shapes.ShapesSpec(image_size=32)
  train = [shapes.make_example(spec, 0, 'train', i) for i in range(_TRAIN.value)]
  images = np.stack([e['image'] for e in train]).astype(np.float32) / 127.5 - 1.0
  labels = np.stack([e['attributes'] for e in train])
  held_out = np.stack([shapes.make_example(spec, 0, 'test', i)['attributes'] for i in range(256)])
  cond_dim = n_attr = sum(shapes.NUM_CLASSES)
  if _AUX_WORDS.value:  # one multi-hot bag of words per caption: (N, captions, V)
    vocab = sorted({w for e in train for cap in e['captions'] for w in cap.split()})
    word_id = {w: i for i, w in enumerate(vocab)}
    bags = np.zeros((len(train), len(train[0]['captions']), len(vocab)), np.float32)
    for n, e in enumerate(train):
      for j, cap in enumerate(e['captions']):
        bags[n, j, [word_id[w] for w in cap.split()]] = 1.0
    n_attr = len(vocab)
    print(f'--aux_words={_AUX_WORDS.value}: {len(vocab)} words', flush=True)

  def one_hot(attrs):
    return jnp.concatenate([jax.nn.one_hot(attrs[:, i], k) for i, k in enumerate(shapes.NUM_CLASSES)], -1)

  if _COND_FROM.value:  # the trained run's frozen conditions, looked up by example index
    rng_cap = np.random.default_rng(_SEED.value + 1)
    step = _COND_STEP.value  # None: the newest, loaded once (load_run caches it) for every lookup below
    run_model, run_params = load_run(_COND_FROM.value, step)
    train_caps = [e['captions'][rng_cap.integers(len(e['captions']))] for e in train]
    train_s = learned_conditions(_COND_FROM.value, train_caps, step)
    if _MIX.value:  # (N, 3, E): text alone, audio alone, both
      train_audio = np.stack([e['audio'] for e in train])
      train_s = np.stack([train_s, learned_conditions(_COND_FROM.value, None, step, audio=train_audio),
                          learned_conditions(_COND_FROM.value, train_caps, step, audio=train_audio)], axis=1)
    held_s = learned_conditions(_COND_FROM.value, [shapes.make_example(spec, 0, 'test', i)['captions'][0]
                                                   for i in range(256)], step)
    cond_dim = train_s.shape[-1]
    if _CLASS_MEAN.value:
      train_s, held_s = class_means(train_s, held_s, labels, held_out)
    if _WORDS.value:
      train_s, held_s = word_code(_COND_FROM.value, step, train_s, held_s, train_caps)
      cond_dim = train_s.shape[-1]
    raw_train_s = train_s
    if _READOUT.value:
      return print_readout(_COND_FROM.value, step, train_s, labels, spec)
    if _STATS.value:
      return print_source_stats(train_s, labels) if _MIX.value else print_condition_stats(train_s, labels)
    if _WHITEN.value:
      from mmgan_jax.models import mmgan  # pylint: disable=g-import-not-at-top
      flat = train_s.reshape(-1, cond_dim)
      mu, cov = flat.mean(0), np.cov(flat, rowvar=False)
      train_s = np.asarray(mmgan.whiten(flat, mu, cov, eps=_WHITEN_EPS.value)).reshape(train_s.shape)
      held_s = np.asarray(mmgan.whiten(held_s, mu, cov, eps=_WHITEN_EPS.value))

  g = shapes_config.get_config().model.generator
  gen = Generator(out_channels=3, resolution=32, cond_dim=cond_dim,
                  channels=tuple(int(v) for v in _G_CHANNELS.value) or tuple(g.channels), z_dim=g.z_dim,
                  w_dim=g.w_dim, mapping_layers=_MAP_LAYERS.value or g.mapping_layers, mapping_lr_mul=_MAP_LR.value,
                  cross_attention_max_res=_XATTN.value, noise_injection=_NOISE.value, architecture=_G_ARCH.value)
  bounds = np.cumsum((0,) + shapes.NUM_CLASSES)

  def tokens_of(c):
    """(B, 4, n_attr): attribute i's slice of the one-hot condition, the rest zero (--cross_attention_max_res)."""
    if not _XATTN.value:
      return None
    return jnp.stack([c * ((jnp.arange(c.shape[-1]) >= lo) & (jnp.arange(c.shape[-1]) < hi))
                      for lo, hi in zip(bounds[:-1], bounds[1:])], axis=1)
  disc = Discriminator(resolution=32, channels=tuple(int(c) for c in _D_CHANNELS.value), cond_dim=cond_dim,
                       noise_aware=_INSTANCE_NOISE.value, downsample=_D_DOWN.value)
  dgc = shapes_config.get_config().diffusion_gan
  from mmgan_jax.models import diffusion  # pylint: disable=g-import-not-at-top
  ab_disc = jnp.asarray(diffusion.cosine_alpha_bar(1000))

  def noisy(k, y, t_max):
    """(y diffused to t, t) as the full model's D sees them; (y, None) without --instance_noise."""
    if not _INSTANCE_NOISE.value:
      return y, None
    k_t, k_e = jax.random.split(k)
    t = losses.sample_priority_t(k_t, (y.shape[0],), jnp.round(t_max).astype(jnp.int32))
    return losses.diffuse(y, t, ab_disc, k_e, sigma=dgc.sigma), t
  b, z_dim = _BATCH.value, g.z_dim
  key = jax.random.PRNGKey(_SEED.value)
  gp = gen.init({'params': key, 'noise': key}, jnp.zeros((b, z_dim)), jnp.zeros((b, cond_dim)),
                tokens_of(jnp.zeros((b, cond_dim))))['params']
  t0_init = jnp.zeros((b,), jnp.int32) if _INSTANCE_NOISE.value else None
  dp = disc.init(jax.random.fold_in(key, 1), jnp.zeros((b, 32, 32, 3)), t0_init, jnp.zeros((b, cond_dim)))['params']
  feat_dim = int(_D_CHANNELS.value[-1])
  dp = {'disc': dp, 'head': {'w': jax.random.normal(jax.random.fold_in(key, 2), (feat_dim, n_attr)) / feat_dim ** 0.5,
                             'b': jnp.zeros((n_attr,))},
        'q': {'w': jax.random.normal(jax.random.fold_in(key, 3), (feat_dim, cond_dim)) / feat_dim ** 0.5,
              'b': jnp.zeros((cond_dim,))}}

  def cond_reg_loss(dp, feats, c):
    return jnp.mean(jnp.sum(jnp.square(feats @ dp['q']['w'] + dp['q']['b'] - c), -1))

  def disc_apply(dp, y, s, t=None):
    return disc.apply({'params': dp['disc']}, y, t, s)

  def aux_ce(dp, feats, attrs):
    if _AUX_WORDS.value:  # attrs is the (B, V) bag of words here
      return losses.word_presence_loss(feats @ dp['head']['w'] + dp['head']['b'], attrs)
    return sum(optax.softmax_cross_entropy_with_integer_labels(logits, attrs[:, i]).mean()
               for i, logits in enumerate(head_logits(dp, feats)))
  if _CLASSIFY.value and _NET.value != 'd':  # the image encoder's features instead of D's
    import flax.linen  # pylint: disable=g-import-not-at-top
    from mmgan_jax.models.encoders import ImageEncoder  # pylint: disable=g-import-not-at-top
    i = shapes_config.get_config().model.image_encoder
    enc = ImageEncoder(patch_size=i.patch_size, width=i.width, depth=i.depth, num_heads=i.num_heads,
                       posemb='sincos2d', stem=_NET.value[len('vit_'):])
    dp = {'disc': flax.linen.unbox(enc.init(key, jnp.zeros((1, 32, 32, 3)))['params']),
          'head': {'w': jax.random.normal(jax.random.fold_in(key, 2), (i.width, n_attr)) / i.width ** 0.5,
                   'b': jnp.zeros((n_attr,))}}
    disc_apply = lambda dp, y, s: (None, {'features': enc.apply({'params': dp['disc']}, y)[0].mean(1)})
  tx = optax.adam(_LR.value, b1=_G_B1.value, b2=0.99)
  tx_d = optax.adam(_D_LR.value or _LR.value, b1=0.0, b2=0.99)
  if _CLASSIFY.value and _NET.value != 'd':  # the optimiser the encoders train with (config.optim.rep_*)
    o = shapes_config.get_config().optim
    tx_d = optax.adamw(_LR.value, b1=o.rep_b1, b2=o.rep_b2, weight_decay=o.rep_weight_decay)
  opt_g, opt_d, ema = tx.init(gp), tx_d.init(dp), gp
  if _CLASSIFY.value:
    return classify(dp, opt_d, tx_d, disc_apply, aux_ce, images, labels, spec, b)
  if _PRETRAIN_D.value:
    t_zero = jnp.zeros((b,), jnp.int32) if _INSTANCE_NOISE.value else None

    @jax.jit
    def pre_step(dp, opt_d, x, c, attrs):
      loss, grads = jax.value_and_grad(lambda p: aux_ce(p, disc_apply(p, x, c, t_zero)[1]['features'], attrs))(dp)
      updates, opt_d = tx_d.update(grads, opt_d, dp)
      return optax.apply_updates(dp, updates), opt_d, loss
    rng_pre = np.random.default_rng(_SEED.value + 100)
    t_pre = time.time()
    for i in range(_PRETRAIN_D.value):
      idx = rng_pre.integers(0, len(images), b)
      dp, opt_d, pre_loss = pre_step(dp, opt_d, jnp.asarray(images[idx]), jnp.zeros((b, cond_dim)),
                                     jnp.asarray(labels[idx]))
    print(f'pretrained D for {_PRETRAIN_D.value} steps in {time.time() - t_pre:.0f} s, head loss '
          f'{float(pre_loss):.3f}', flush=True)
    opt_d = tx_d.init(dp)

  def generate(params, z, c, k):
    return gen.apply({'params': params}, z, c, tokens_of(c), noise=_NOISE.value, rngs={'noise': k})[0]

  def d_step(gp, dp, opt_d, x, c, c_wrong, attrs, k, with_r1, t_max):
    k_z, k_n, k_r, k_f = jax.random.split(k, 4)
    fake = jax.lax.stop_gradient(generate(gp, jax.random.normal(k_z, (b, z_dim)), c, k_n))
    y_real, t_real = noisy(k_r, x, t_max)
    y_fake, t_fake = noisy(k_f, fake, t_max)

    def loss_fn(dp):
      d = lambda y, s, t: disc_apply(dp, y, s, t)[0]
      real, real_aux = disc_apply(dp, y_real, c, t_real)
      loss, aux = losses.d_logistic_loss(real, d(y_fake, c, t_fake),
                                         d(y_real, c_wrong, t_real) if _MISMATCH.value else None, _MISMATCH.value)
      if _AUX.value:
        loss = loss + _AUX.value * aux_ce(dp, real_aux['features'], attrs)
      if _COND_REG.value:
        loss = loss + _COND_REG.value * cond_reg_loss(dp, real_aux['features'], c)
      if with_r1:
        loss = loss + 0.5 * _R1.value * R1_INTERVAL * losses.r1_penalty(lambda y: d(y, c, t_real), y_real)[0]
      return loss, aux

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(dp)
    updates, opt_d = tx_d.update(grads, opt_d, dp)
    if _INSTANCE_NOISE.value:
      t_max = losses.update_t_max(t_max, aux['r_sign'], target=dgc.target, step=dgc.step_size, t_lo=dgc.t_lo,
                                  t_hi=dgc.t_hi)
    return optax.apply_updates(dp, updates), opt_d, aux, t_max

  def g_step(gp, dp, opt_g, ema, x, c, attrs, k, beta, s_raw, t_max):
    k_z, k_n, k_d = jax.random.split(k, 3)
    z = jax.random.normal(k_z, (b, z_dim))
    if _PAIRS.value:  # half the conditions, two samples each
      h = b // 2
      c, s_raw, attrs, x = (jnp.concatenate([v[:h], v[:h]]) for v in (c, s_raw, attrs, x))

    def loss_fn(gp):
      fake = generate(gp, z, c, k_n)
      y, t = noisy(k_d, fake, t_max)
      logits, aux = disc_apply(dp, y, c, t)
      loss = _ADV.value * losses.g_nonsaturating_loss(logits)
      if _PAIRS.value and _DIV.value:
        loss = loss + _DIV.value * losses.mode_seeking_loss(fake[:b // 2], fake[b // 2:], z[:b // 2], z[b // 2:])[0]
      if _SEM.value:
        from mmgan_jax.models import mmgan  # pylint: disable=g-import-not-at-top
        s_img = mmgan.image_embedding(run_model, run_params, fake)
        loss = loss + _SEM.value * losses.info_nce(s_img, s_raw, run_params['fusion']['logit_scale'])[0]
      if _AUX.value:
        loss = loss + _AUX.value * aux_ce(dp, aux['features'], attrs)
      if _COND_REG.value:
        loss = loss + _COND_REG.value * cond_reg_loss(dp, aux['features'], c)
      if _RECON.value:
        err = fake - x
        loss = loss + _RECON.value * jnp.mean(jnp.abs(err) if _RECON_LOSS.value == 'l1' else jnp.square(err))
      return loss

    grads = jax.grad(loss_fn)(gp)
    updates, opt_g = tx.update(grads, opt_g, gp)
    gp = optax.apply_updates(gp, updates)
    return gp, opt_g, losses.ema_update(ema, gp, beta)

  d_step = jax.jit(d_step, static_argnums=8)
  t_max = jnp.zeros((), jnp.float32)
  g_step = jax.jit(g_step)
  sample = jax.jit(lambda params, c, k: generate(params, jax.random.normal(k, (c.shape[0], z_dim)), c,
                                                 jax.random.fold_in(k, 1)))
  rng = np.random.default_rng(_SEED.value)
  t0 = time.time()
  for step in range(1, _STEPS.value + 1):
    idx = rng.integers(0, len(images), b)
    attrs = labels[idx]
    if _HARD.value:  # one attribute of each row moved to another value
      wrong = attrs.copy()
      which = rng.integers(0, 4, b)
      for r, a in enumerate(which):
        k = shapes.NUM_CLASSES[a]
        wrong[r, a] = (wrong[r, a] + rng.integers(1, k)) % k
    else:
      wrong = np.roll(attrs, 1, axis=0)
    k = jax.random.fold_in(key, step)
    x, c, a = jnp.asarray(images[idx]), one_hot(attrs), jnp.asarray(attrs)
    if _AUX_WORDS.value:
      a = jnp.asarray(bags[idx].max(1) if _AUX_WORDS.value == 'union'
                      else bags[idx, rng.integers(0, bags.shape[1], b)])
    c_wrong = one_hot(wrong)
    if _COND_FROM.value:
      src = rng.choice(3, size=b, p=(0.25, 0.25, 0.5)) if _MIX.value else None
      pick = (lambda s: s[idx, src]) if _MIX.value else (lambda s: s[idx])
      c = jnp.asarray(pick(train_s))
      c_wrong = jnp.roll(c, 1, axis=0)
    dp, opt_d, aux, t_max = d_step(gp, dp, opt_d, x, c, c_wrong, a, jax.random.fold_in(k, 0),
                                   step % R1_INTERVAL == 0, t_max)
    beta = losses.ema_decay(step * b, half_life_images=5_000, rampup=0.05, batch_size=b)
    s_raw = jnp.asarray(pick(raw_train_s)) if _COND_FROM.value else c
    gp, opt_g, ema = g_step(gp, dp, opt_g, ema, x, c, a, jax.random.fold_in(k, 1), beta, s_raw, t_max)
    if step % _EVERY.value == 0 or step == _STEPS.value:
      held_c = jnp.asarray(held_s) if _COND_FROM.value else one_hot(held_out)
      out = np.asarray(sample(ema, held_c, jax.random.PRNGKey(7)))
      acc = semantic_accuracy(out, held_out)
      print(f'step {step}  {time.time() - t0:.0f} s  D(real) {float(aux["real_logit_mean"]):+.2f}  '
            f'D(fake) {float(aux["fake_logit_mean"]):+.2f}  T_max {float(t_max):.0f}  '
            + '  '.join(f'{name} {v:.3f}' for name, v in acc.items()), flush=True)
  from mmgan_jax.data import oracle  # pylint: disable=g-import-not-at-top
  pred = oracle.predict_attributes(out)
  confusion = np.zeros((4, 4), int)
  np.add.at(confusion, (held_out[:, 0], pred[:, 0]), 1)
  print('shape confusion (rows: asked, columns: drawn; circle square triangle cross):')
  print(confusion)
  np.savez(_OUT.value + '.npz', samples=out, labels=held_out, pred=pred)
  print('wrote', save_png(out[:48], _OUT.value, columns=8))


def load_run(workdir, step=None):
  """(sampler, model, params) of a trained run's checkpoint, loaded once per (workdir, step)."""
  from mmgan_jax.sampling import Sampler  # pylint: disable=g-import-not-at-top
  if (workdir, step) not in _RUNS:
    sampler = Sampler.from_workdir(workdir, step=step)
    _RUNS[workdir, step] = sampler, sampler.model, sampler.setup.state.params
  return _RUNS[workdir, step][1:]


_RUNS = {}


def learned_conditions(workdir, captions, step=None, audio=None):
  """The condition vectors s (N, E) a trained run's encoders and fusion give `captions` and/or `audio` (each
  None: that source is missing)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmgan_jax.models import mmgan  # pylint: disable=g-import-not-at-top
  model, params = load_run(workdir, step)
  sampler = _RUNS[workdir, step][0]

  given = {'text': captions is not None, 'audio': audio is not None}
  n_all = len(captions if captions is not None else audio)

  @jax.jit
  def encode(batch):
    n = batch['text_ids'].shape[0]
    present = {task: {m: jnp.full((n,), given.get(m, False)) for m in srcs} for task, srcs in model.tasks.items()}
    return mmgan.encode(model, params, batch, present)['generate']['cond']

  chunk = lambda v, i: None if v is None else v[i:i + 256]
  out = [np.asarray(encode(sampler._batch(min(256, n_all - i), text=chunk(captions, i), audio=chunk(audio, i))))  # pylint: disable=protected-access
         for i in range(0, n_all, 256)]
  return np.concatenate(out)


def fit_linear(x, out_dim, loss, steps, log=''):
  """{'w', 'b'} of a linear map x (N, E) -> (N, out_dim) minimising loss(logits), full-batch Adam at 1e-2 from zero;
  with `log`, the loss is printed every 500 steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.adam(1e-2)

  @jax.jit
  def update(p, o):
    l, g = jax.value_and_grad(lambda p: loss(x @ p['w'] + p['b']))(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l
  p = {'w': jnp.zeros((x.shape[1], out_dim)), 'b': jnp.zeros((out_dim,))}
  o = tx.init(p)
  for i in range(steps):
    p, o, l = update(p, o)
    if log and (i % 500 == 0 or i == steps - 1):
      print(f'{log} step {i}: loss {float(l):.4f}', flush=True)
  return p


def word_code(workdir, step, train_s, held_s, captions, steps=1500):
  """--cond_words: sigmoid(s W + b), W fitted by full-batch Adam on the bag of words of each example's caption."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmgan_jax.models import text_decoder  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import losses  # pylint: disable=g-import-not-at-top
  model, _ = load_run(workdir, step)
  batch = _RUNS[workdir, step][0]._batch(len(captions), text=captions)  # pylint: disable=protected-access
  y = np.asarray(text_decoder.words_present(jnp.asarray(batch['text_ids']), jnp.asarray(batch['text_mask']),
                                            model.vocab_size), np.float32)
  keep = y.max(0) > 0  # words some caption holds
  y = y[:, keep]
  x = train_s.reshape(len(captions), -1, train_s.shape[-1])
  xs, ys = jnp.asarray(x.reshape(-1, x.shape[-1])), jnp.asarray(np.repeat(y, x.shape[1], 0))
  loss = lambda logits: losses.word_presence_loss(logits, ys) / ys.shape[1]
  params = fit_linear(xs, ys.shape[1], loss, steps, log='word head')
  code = lambda s: np.asarray(jax.nn.sigmoid(jnp.asarray(s) @ params['w'] + params['b']))
  print(f'word code: {int(keep.sum())} words', flush=True)
  return code(train_s).astype(np.float32), code(held_s).astype(np.float32)


def print_readout(workdir, step, train_s, labels, spec, num_held_out=1000, steps=1000):
  """--cond_readout: held-out accuracy of a linear softmax classifier of each attribute, per source."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data import shapes  # pylint: disable=g-import-not-at-top
  ce = optax.softmax_cross_entropy_with_integer_labels
  if train_s.ndim != 3:
    raise ValueError('--cond_readout needs --cond_mix (the text, audio and both conditions of each example).')
  held = [shapes.make_example(spec, 0, 'test', i) for i in range(num_held_out)]
  held_labels = np.stack([e['attributes'] for e in held])
  captions = [e['captions'][0] for e in held]
  audio = np.stack([e['audio'] for e in held])
  held_s = [learned_conditions(workdir, captions, step), learned_conditions(workdir, None, step, audio=audio),
            learned_conditions(workdir, captions, step, audio=audio)]
  names = ('shape', 'colour', 'size', 'position')
  for j, source in enumerate(('text', 'audio', 'both')):
    accs = []
    for a, k in enumerate(shapes.NUM_CLASSES):
      y = jnp.asarray(labels[:, a])
      p = fit_linear(jnp.asarray(train_s[:, j]), k, lambda logits, y=y: ce(logits, y).mean(), steps)
      accs.append(np.mean(np.argmax(held_s[j] @ np.asarray(p['w']) + np.asarray(p['b']), -1) == held_labels[:, a]))
    print(f'linear read-out of s from {source:5s}: ' + '  '.join(f'{n} {100 * v:.1f}' for n, v in zip(names, accs)),
          flush=True)


def class_means(train_s, held_s, labels, held_labels):
  """--cond_class_mean: each training condition replaced by the mean, per source, of those with the same four
  attributes; each held-out (text) condition by its attributes' training mean of the text source."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  keys = [tuple(a) for a in labels]
  groups = {}
  for i, k in enumerate(keys):
    groups.setdefault(k, []).append(i)
  means = {k: train_s[np.asarray(v)].mean(0) for k, v in groups.items()}
  text = lambda m: m[0] if m.ndim == 2 else m
  missing = [tuple(a) for a in held_labels if tuple(a) not in means]
  if missing:
    raise ValueError(f'{len(missing)} held-out attribute sets have no training example; raise --num_train.')
  return (np.stack([means[k] for k in keys]),
          np.stack([text(means[tuple(a)]) for a in held_labels]).astype(held_s.dtype))


def fisher_ratios(s, y):
  """The leading eigenvalues of S_w^-1 S_b (linear discriminant analysis) of one attribute: how far apart its
  classes lie along each discriminant direction, in within-class standard deviations squared. k classes give
  k - 1 directions; a small last one means two of the classes are hard to tell apart from s."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  classes = np.unique(y)
  means = np.stack([s[y == k].mean(0) for k in classes])
  within = sum(np.cov(s[y == k], rowvar=False) for k in classes) / len(classes)
  between = np.cov(means, rowvar=False)
  ev = np.linalg.eigvals(np.linalg.solve(within + 1e-6 * np.eye(len(within)), between)).real
  return np.round(np.sort(ev)[::-1][:len(classes) - 1], 1).tolist()


def print_condition_stats(s, labels):
  """Per attribute, the variance of its class means over the conditions' total variance (one-hot: ~equal)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data import shapes  # pylint: disable=g-import-not-at-top
  centred = s - s.mean(0)
  total = np.mean(np.sum(centred ** 2, axis=1))
  print(f'{len(s)} conditions, mean norm {np.linalg.norm(s, axis=1).mean():.3f}, total variance {total:.3f}')
  for i, name in enumerate(shapes.ATTRIBUTE_NAMES):
    between = sum(np.mean(labels[:, i] == k) * np.sum(centred[labels[:, i] == k].mean(0) ** 2)
                  for k in np.unique(labels[:, i]))
    print(f'{name}: {between / total:.3f} of the variance; Fisher ratios {fisher_ratios(s, labels[:, i])}')


def print_source_stats(s3, labels):
  """--cond_stats --cond_mix: how alike one example's conditions from text, audio and both are, before and after
  whitening with several eigenvalue floors, and each attribute's share of the whitened text conditions."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmgan_jax.models import mmgan  # pylint: disable=g-import-not-at-top
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cos = lambda x, y: float(np.mean(np.sum(unit(x) * unit(y), -1)))
  flat = s3.reshape(-1, s3.shape[-1])
  mu, cov = flat.mean(0), np.cov(flat, rowvar=False)
  print('eigenvalues of the pooled conditions:', np.round(np.linalg.eigvalsh(cov)[::-1][:16], 4))
  print(f'unwhitened: cos(text, audio) {cos(s3[:, 0], s3[:, 1]):.3f}  cos(text, both) {cos(s3[:, 0], s3[:, 2]):.3f}'
        f'  cos(audio, both) {cos(s3[:, 1], s3[:, 2]):.3f}')
  for eps in (1e-3, 1e-2, 0.03, 0.1, 0.3):
    w = np.asarray(mmgan.whiten(flat, mu, cov, eps=eps)).reshape(s3.shape)
    print(f'whitened, floor {eps:g}: cos(text, audio) {cos(w[:, 0], w[:, 1]):.3f}  '
          f'cos(text, both) {cos(w[:, 0], w[:, 2]):.3f}; text conditions:')
    print_condition_stats(w[:, 0], labels)


def classify(dp, opt_d, tx_d, disc_apply, aux_ce, images, labels, spec, b):
  """--classify: supervised attribute classification of real images by D's features and a linear head."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data import oracle, shapes  # pylint: disable=g-import-not-at-top

  test = [shapes.make_example(spec, 0, 'test', i) for i in range(512)]
  x_test = jnp.asarray(np.stack([e['image'] for e in test]).astype(np.float32) / 127.5 - 1.0)
  y_test = np.stack([e['attributes'] for e in test])
  no_cond = jnp.zeros((b, sum(shapes.NUM_CLASSES)))

  @jax.jit
  def step(dp, opt_d, x, attrs):
    loss, grads = jax.value_and_grad(lambda p: aux_ce(p, disc_apply(p, x, no_cond)[1]['features'], attrs))(dp)
    updates, opt_d = tx_d.update(grads, opt_d, dp)
    return optax.apply_updates(dp, updates), opt_d, loss

  @jax.jit
  def predict(dp, x):
    feats = disc_apply(dp, x, jnp.zeros((x.shape[0], no_cond.shape[1])))[1]['features']
    return jnp.stack([jnp.argmax(logits, -1) for logits in head_logits(dp, feats)], -1)

  rng = np.random.default_rng(_SEED.value)
  t0 = time.time()
  for i in range(1, _STEPS.value + 1):
    idx = rng.integers(0, len(images), b)
    dp, opt_d, loss = step(dp, opt_d, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
    if i % _EVERY.value == 0 or i == _STEPS.value:
      acc = oracle.attribute_accuracy(predict(dp, x_test), y_test)
      print(f'step {i}  {time.time() - t0:.0f} s  loss {float(loss):.3f}  '
            + '  '.join(f'{n} {acc[n]:.3f}' for n in shapes.ATTRIBUTE_NAMES), flush=True)


if __name__ == '__main__':
  app.run(main)
