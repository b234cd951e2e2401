r"""Samples a trained model: text prompts -> image grid, wav -> images and a caption, image -> caption.

  python launch/sample.py --workdir=runs/shapes --prompt="a large red circle in the top left" \
      --prompt="a small blue square" --num_samples=8 --seed=0
  python launch/sample.py --workdir=runs/shapes --audio=clip.wav            # images and a caption from audio
  python launch/sample.py --workdir=runs/shapes --image=photo.png           # captions of an image

Uses the EMA generator and refiner of the newest checkpoint in --workdir (or --step), with the config the run
was trained with (WORKDIR/config.json; --config overrides it). Writes to --out (default WORKDIR/samples):
  text_to_image.png / audio_to_image.png   one row per prompt / clip, --num_samples columns, refined
  *_unrefined.png                          the same samples before the diffusion refinement
  captions.txt                             one line per --image / --audio: file, then the generated caption
and prints what it wrote. --refine_steps overrides the config's number of refinement steps (0: G alone), --seed
fixes the latents (the same seed and inputs give the same files). A missing or unreadable input, a workdir
without a checkpoint, or an input the model has no encoder for prints one `error: ...` line, exit status 2.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402

from mmgan_jax import cli  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (checkpoints/ and config.json).')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]); default: the '
                                          "workdir's config.json.", lock_config=True)
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'Text prompt -> images (repeat the flag for several).')
_AUDIO = flags.DEFINE_multi_string('audio', [], 'Wav file -> images and a caption (repeatable).')
_IMAGE = flags.DEFINE_multi_string('image', [], 'Image file -> a caption (repeatable).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default WORKDIR/samples).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 8, 'Images per prompt / clip.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the latents and the refinement noise.')
_REFINE_STEPS = flags.DEFINE_integer('refine_steps', None, 'Refinement steps (default: config.refine.num_steps).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.mark_flags_as_required(['workdir'])


def _fail(message: str) -> None:
  print('error: ' + ' '.join(line.strip() for line in str(message).splitlines() if line.strip()), file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; every option is a --flag (quote prompts with spaces).')
  if not (_PROMPT.value or _AUDIO.value or _IMAGE.value):
    _fail('nothing to do: give at least one --prompt, --audio or --image.')
  if _NUM_SAMPLES.value < 1:
    _fail(f'--num_samples must be >= 1, got {_NUM_SAMPLES.value}.')
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax's notes while restoring (e.g. per-item metadata)
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  from mmgan_jax import sampling  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data.registry import DatasetUnavailableError  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top

  for flag, paths in (('audio', _AUDIO.value), ('image', _IMAGE.value)):
    for p in paths:  # before the (slow) restore
      if not os.path.isfile(p):
        _fail(f'--{flag}={p}: no such file.')
  out = _OUT.value or os.path.join(_WORKDIR.value, 'samples')
  n, seed = _NUM_SAMPLES.value, _SEED.value
  try:
    sampler = sampling.Sampler.from_workdir(_WORKDIR.value, config=_CONFIG.value, step=_STEP.value,
                                            refine_steps=_REFINE_STEPS.value)
    clips = [sampling.load_wav(p, sampler.sample_rate, sampler.audio_samples) for p in _AUDIO.value]
    images = [sampling.load_image(p, sampler.image_size) for p in _IMAGE.value]
    print(f'Checkpoint step {sampler.step} of {_WORKDIR.value}; refinement steps '
          f'{int(sampler.config.refine.num_steps)}; seed {seed}.')
    written, lines = [], []
    if _PROMPT.value:
      pre, post = sampler.text_to_image(_PROMPT.value, num_samples=n, seed=seed)
      written.append(sampling.save_png(post, os.path.join(out, 'text_to_image.png'), columns=n))
      written.append(sampling.save_png(pre, os.path.join(out, 'text_to_image_unrefined.png'), columns=n))
      for i, p in enumerate(_PROMPT.value):
        print(f'  row {i + 1}: {p}')
    if clips:
      import numpy as np  # pylint: disable=g-import-not-at-top
      pre, post = sampler.audio_to_image(np.stack(clips), num_samples=n, seed=seed)
      written.append(sampling.save_png(post, os.path.join(out, 'audio_to_image.png'), columns=n))
      written.append(sampling.save_png(pre, os.path.join(out, 'audio_to_image_unrefined.png'), columns=n))
      if sampler.model.text_decoder is not None:
        lines += [f'{p}\t{c}' for p, c in zip(_AUDIO.value, sampler.audio_to_text(np.stack(clips)))]
    if images:
      import numpy as np  # pylint: disable=g-import-not-at-top
      lines += [f'{p}\t{c}' for p, c in zip(_IMAGE.value, sampler.image_to_text(np.stack(images)))]
    if lines:
      path = os.path.join(out, 'captions.txt')
      os.makedirs(out, exist_ok=True)
      with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
      written.append(path)
      for line in lines:
        source, caption = line.split('\t', 1)
        print(f'  {source}: {caption}')
  except (sampling.InputError, FileNotFoundError, ValueError, DatasetUnavailableError, CheckpointError) as e:
    _fail(str(e))
  for path in written:
    print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
