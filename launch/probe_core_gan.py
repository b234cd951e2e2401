r"""Diagnostic: the GAN core alone, conditioned directly on the attribute labels of the shapes dataset.

  python launch/probe_core_gan.py --steps=800 --lr=5e-3 --mapping_lr_mul=1 --noise_injection=false

The model's own Generator and Discriminator modules (configs/shapes.py widths, 32x32 pixels) with a one-hot
vector of the four attributes as the condition s; no encoders, fusion, refiner, semantic loss or instance
noise. StyleGAN2 losses (non-saturating logistic, lazy R1 every 16 steps), matching-aware pairs, Adam(0, 0.99)
and an EMA of G. Every --every steps it prints the oracle's accuracy of EMA samples for 256 held-out label sets,
and at the end writes a sample grid (--out). It tells what the core can learn in a given number of steps,
separately from the conditioning path (docs/training.md, "What made the generator learn").
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 800, 'Training iterations (one D step and one G step each).')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_LR = flags.DEFINE_float('lr', 5e-3, 'Adam learning rate of G and D.')
_MAP_LR = flags.DEFINE_float('mapping_lr_mul', 1.0, 'Learning-rate multiplier of the mapping network.')
_NOISE = flags.DEFINE_bool('noise_injection', False, "G's per-pixel noise.")
_R1 = flags.DEFINE_float('r1_gamma', 0.01, 'R1 weight (applied every 16 steps, times 16).')
_MISMATCH = flags.DEFINE_float('mismatch', 1.0, 'Weight of the matching-aware pairs.')
_HARD = flags.DEFINE_bool('hard_negatives', False, 'Mismatched labels differ from the true ones in ONE attribute '
                          '(default: another example of the batch).')
_D_CHANNELS = flags.DEFINE_list('d_channels', ['16', '32', '64', '128'], 'D channels at 32, 16, 8, 4 px.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initialisation and the batches.')
_EVERY = flags.DEFINE_integer('every', 200, 'Evaluate every this many steps.')
_TRAIN = flags.DEFINE_integer('num_train', 20_000, 'Training examples rendered up front.')
_OUT = flags.DEFINE_string('out', 'core_probe.png', 'Where the final sample grid goes.')

R1_INTERVAL = 16


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
  cond_dim = sum(shapes.NUM_CLASSES)

  def one_hot(attrs):
    return jnp.concatenate([jax.nn.one_hot(attrs[:, i], k) for i, k in enumerate(shapes.NUM_CLASSES)], -1)

  g = shapes_config.get_config().model.generator
  gen = Generator(out_channels=3, resolution=32, cond_dim=cond_dim, channels=tuple(g.channels), z_dim=g.z_dim,
                  w_dim=g.w_dim, mapping_layers=g.mapping_layers, mapping_lr_mul=_MAP_LR.value,
                  cross_attention_max_res=0, noise_injection=_NOISE.value)
  disc = Discriminator(resolution=32, channels=tuple(int(c) for c in _D_CHANNELS.value), cond_dim=cond_dim,
                       noise_aware=False)
  b, z_dim = _BATCH.value, g.z_dim
  key = jax.random.PRNGKey(_SEED.value)
  gp = gen.init({'params': key, 'noise': key}, jnp.zeros((b, z_dim)), jnp.zeros((b, cond_dim)))['params']
  dp = disc.init(jax.random.fold_in(key, 1), jnp.zeros((b, 32, 32, 3)), None, jnp.zeros((b, cond_dim)))['params']
  tx = optax.adam(_LR.value, b1=0.0, b2=0.99)
  opt_g, opt_d, ema = tx.init(gp), tx.init(dp), gp

  def generate(params, z, c, k):
    return gen.apply({'params': params}, z, c, noise=_NOISE.value, rngs={'noise': k})[0]

  def d_step(gp, dp, opt_d, x, c, c_wrong, k, with_r1):
    k_z, k_n = jax.random.split(k)
    fake = jax.lax.stop_gradient(generate(gp, jax.random.normal(k_z, (b, z_dim)), c, k_n))

    def loss_fn(dp):
      d = lambda y, s: disc.apply({'params': dp}, y, None, s)[0]
      loss, aux = losses.d_logistic_loss(d(x, c), d(fake, c), d(x, c_wrong) if _MISMATCH.value else None,
                                         _MISMATCH.value)
      if with_r1:
        loss = loss + 0.5 * _R1.value * R1_INTERVAL * losses.r1_penalty(lambda y: d(y, c), x)[0]
      return loss, aux

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(dp)
    updates, opt_d = tx.update(grads, opt_d, dp)
    return optax.apply_updates(dp, updates), opt_d, aux

  def g_step(gp, dp, opt_g, ema, c, k, beta):
    k_z, k_n = jax.random.split(k)
    z = jax.random.normal(k_z, (b, z_dim))
    loss_fn = lambda gp: losses.g_nonsaturating_loss(disc.apply({'params': dp}, generate(gp, z, c, k_n), None,
                                                                c)[0])
    grads = jax.grad(loss_fn)(gp)
    updates, opt_g = tx.update(grads, opt_g, gp)
    gp = optax.apply_updates(gp, updates)
    return gp, opt_g, losses.ema_update(ema, gp, beta)

  d_step = jax.jit(d_step, static_argnums=7)
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
    dp, opt_d, aux = d_step(gp, dp, opt_d, jnp.asarray(images[idx]), one_hot(attrs), one_hot(wrong),
                            jax.random.fold_in(k, 0), step % R1_INTERVAL == 0)
    beta = losses.ema_decay(step * b, half_life_images=5_000, rampup=0.05, batch_size=b)
    gp, opt_g, ema = g_step(gp, dp, opt_g, ema, one_hot(attrs), jax.random.fold_in(k, 1), beta)
    if step % _EVERY.value == 0 or step == _STEPS.value:
      out = np.asarray(sample(ema, one_hot(held_out), jax.random.PRNGKey(7)))
      acc = semantic_accuracy(out, held_out)
      print(f'step {step}  {time.time() - t0:.0f} s  D(real) {float(aux["real_logit_mean"]):+.2f}  '
            f'D(fake) {float(aux["fake_logit_mean"]):+.2f}  '
            + '  '.join(f'{name} {v:.3f}' for name, v in acc.items()), flush=True)
  print('wrote', save_png(out[:48], _OUT.value, columns=8))


if __name__ == '__main__':
  app.run(main)
