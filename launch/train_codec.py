r"""Stage 1: trains the KL latent codec of a config and saves it to WORKDIR/codec.

  python launch/train_codec.py --config=configs/coco.py --workdir=runs/coco_codec

Then train the GAN on its latents with --config.model.codec.checkpoint=runs/coco_codec/codec.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402

from mmgan_jax import cli  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the codec checkpoint.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  from mmgan_jax.data.registry import DatasetUnavailableError  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import codec_stage  # pylint: disable=g-import-not-at-top
  try:
    out = codec_stage.train_codec(_CONFIG.value, _WORKDIR.value)
  except (DatasetUnavailableError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f"codec saved to {os.path.join(os.path.abspath(_WORKDIR.value), 'codec')}: "
        f"loss {out['loss']:.4f}, latent scale {out['scale']:.4f}, {out['seconds']:.0f} s")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
