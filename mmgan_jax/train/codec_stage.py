"""Stage 1: train the KL latent autoencoder on real images, measure the latent scale, save, freeze (LDM).

  python launch/train_codec.py --config=configs/coco.py --workdir=runs/coco_codec
  python launch/train.py --config=configs/coco.py --config.model.codec.checkpoint=runs/coco_codec/codec ...

The saved item holds the codec params and `scale` = 1 / std(latent mean) over real training images, so the
GAN, the refiner and the discriminator all work on unit-variance latents.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from mmgan_jax.data import registry
from mmgan_jax.models import codec as codec_lib

log = logging.getLogger(__name__)


def load(path: str, codec: Any, image_shape: tuple[int, int, int]) -> tuple[Any, float]:
  """Restores a stage-1 codec; a clear FileNotFoundError when the checkpoint is missing."""
  if not path:
    raise FileNotFoundError(
        "config.model.codec.type='kl' needs a trained stage-1 codec: run launch/train_codec.py with this "
        'config, then pass --config.model.codec.checkpoint=WORKDIR/codec.')
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'codec checkpoint {path} does not exist; train it with launch/train_codec.py.')
  abstract = jax.eval_shape(
      lambda: {'params': codec.init({'params': jax.random.PRNGKey(0), 'noise': jax.random.PRNGKey(0)},
                                    jnp.zeros((1,) + tuple(image_shape)))['params'],
               'scale': jnp.zeros((), jnp.float32)})
  restored = ocp.StandardCheckpointer().restore(path, abstract)
  return restored['params'], float(restored['scale'])


def train_codec(config, workdir: str) -> dict[str, float]:
  """Trains `config.model.codec` (type 'kl') for `config.codec_stage.steps` steps and saves it."""
  c = config.model.codec
  if c.type != 'kl':
    raise ValueError("stage 1 trains the 'kl' codec; this config uses the identity codec (nothing to train).")
  data = registry.make_data(config.data, process_index=jax.process_index(), process_count=jax.process_count())
  codec = codec_lib.KLAutoencoder(channels=tuple(c.channels), latent_channels=c.latent_channels,
                                  num_res_blocks=c.num_res_blocks, num_groups=c.num_groups)
  stage = config.codec_stage
  key = jax.random.PRNGKey(config.seed)
  image_shape = (config.data.image_size, config.data.image_size, 3)
  params = codec.init({'params': key, 'noise': key}, jnp.zeros((1,) + image_shape))['params']
  tx = optax.adam(stage.lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, images, k):
    def loss_fn(p):
      recon, mean, logvar = codec.apply({'params': p}, images, sample=True, rngs={'noise': k})
      loss, aux = codec_lib.kl_codec_loss(images, recon, mean, logvar, kl_weight=stage.kl_weight)
      return loss, aux
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  t0 = time.time()
  loss = np.nan
  for i in range(stage.steps):
    images = jnp.asarray(next(data.train)['image'])
    params, opt, loss = step(params, opt, images, jax.random.fold_in(key, i))
    if (i + 1) % max(1, stage.steps // 10) == 0:
      log.info('codec step %d/%d loss %.4f', i + 1, stage.steps, float(loss))
  latents = [codec.apply({'params': params}, jnp.asarray(next(data.train)['image']), method='encode')[0]
             for _ in range(4)]
  scale = codec_lib.latent_scale_from_data(jnp.concatenate(latents))
  out = os.path.abspath(os.path.join(workdir, 'codec'))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out, {'params': params, 'scale': jnp.asarray(scale, jnp.float32)}, force=True)
  ckptr.wait_until_finished()
  return {'loss': float(loss), 'scale': float(scale), 'seconds': time.time() - t0}
