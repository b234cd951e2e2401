r"""Diagnostic: does a trained run's refiner keep what an image shows? SDEdit of REAL held-out images.

  python launch/probe_refiner.py --workdir=runs/shapes

Each held-out "shapes" image is noised to t_start and denoised in the given number of DDIM steps by the run's
refiner (EMA weights), conditioned on its own canonical caption; the attribute oracle then scores the result.
If refinement erased shapes, G could never be rewarded for drawing one (docs/training.md, "D teaches the full
model's G little about the condition").

With --fid_weights (the FID Inception weights) it also prints, per setting, the FID of the refined images
against the unrefined ones (0 for a refiner that gives the image back), and as a scale the FID of the same
images with Gaussian pixel noise of a few sizes added and of a second real set (docs/training.md, part 11):

  python launch/probe_refiner.py --workdir=runs/shapes --num_examples=512 \
      --fid_weights=../shared/fid/inception_2015_12_05_fid.npz
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained shapes run.')
_NUM = flags.DEFINE_integer('num_examples', 128, 'Held-out images refined.')
_SETTINGS = flags.DEFINE_list('settings', ['50:1', '100:1', '100:2', '200:2', '400:4'],
                              't_start:num_steps pairs to try.')
_FID = flags.DEFINE_string('fid_weights', '', 'FID Inception weights (.npz): also print FIDs against the real '
                           'images (the refined ones, noisy ones, a second real set).')
_NOISE = flags.DEFINE_list('noise', ['0.005', '0.01', '0.02', '0.04'], 'With --fid_weights: Gaussian pixel noise '
                           'standard deviations (images in [-1, 1]) whose FID is printed as a scale.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from mmgan_jax.evaluation.evaluator import eval_params  # pylint: disable=g-import-not-at-top
  from mmgan_jax.evaluation.semantic import semantic_accuracy  # pylint: disable=g-import-not-at-top
  from mmgan_jax.models import mmgan  # pylint: disable=g-import-not-at-top
  from mmgan_jax.sampling import Sampler  # pylint: disable=g-import-not-at-top

  try:
    sampler = Sampler.from_workdir(_WORKDIR.value)
    settings = [tuple(int(v) for v in s.split(':')) for s in _SETTINGS.value]
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  spec = shapes.ShapesSpec(image_size=sampler.image_size)
  examples = [shapes.make_example(spec, 0, 'test', i) for i in range(_NUM.value)]
  images = np.stack([e['image'] for e in examples]).astype(np.float32) / 127.5 - 1.0
  attrs = np.stack([e['attributes'] for e in examples])
  batch = sampler._batch(len(images), text=[shapes.canonical_caption(a) for a in attrs], image=images)  # pylint: disable=protected-access
  params = eval_params(sampler.setup.state)
  present = mmgan.only_present(sampler.model, len(images), ('text',))
  inputs = {k: jnp.asarray(v) for k, v in sampler.evaluator._inputs(batch).items()}  # pylint: disable=protected-access
  cond = mmgan.encode(sampler.model, params, inputs, present)['generate']
  fmt = lambda acc: '  '.join(f'{k} {100 * v:.1f}' for k, v in acc.items())
  print(f'real images            {fmt(semantic_accuracy(images, attrs))}')
  gradient = lambda x: np.abs(np.diff(x, axis=1)).mean()  # grain raises it; the real images are flat colours
  fid_to_real = lambda x: ''
  if _FID.value:
    from mmgan_jax.evaluation import fid, inception  # pylint: disable=g-import-not-at-top
    extract = inception.FeatureExtractor.from_npz(_FID.value, batch_size=64)
    real_features = np.asarray(extract(images))
    fid_to_real = lambda x: f'  FID {fid.fid_from_features(real_features, np.asarray(extract(np.clip(x, -1, 1)))):.1f}'
    others = np.stack([shapes.make_example(spec, 0, 'train', i)['image'] for i in range(len(images))])
    print(f'a second real set (train split){fid_to_real(others.astype(np.float32) / 127.5 - 1.0)}')
    rng = np.random.default_rng(0)
    for sigma in (float(v) for v in _NOISE.value):
      print(f'+ pixel noise {sigma:<8g}{fid_to_real(images + sigma * rng.standard_normal(images.shape))}')
  for t_start, num_steps in settings:
    out = np.asarray(mmgan.refine(sampler.model, params['refiner'], jnp.asarray(images), cond,
                                  jax.random.PRNGKey(0), t_start=t_start, num_steps=num_steps))
    print(f't_start {t_start:4d}, {num_steps} steps  {fmt(semantic_accuracy(out, attrs))}  '
          f'mean |dx| {np.abs(out - images).mean():.3f}  mean |vertical gradient| {gradient(out):.3f} '
          f'(real {gradient(images):.3f}){fid_to_real(out)}')


if __name__ == '__main__':
  app.run(main)
