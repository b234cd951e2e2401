r"""The demo: the full model on the embedded synthetic tri-modal dataset "shapes", on a CPU.

  python launch/train.py --config=configs/shapes.py --workdir=runs/shapes

Variants (config string after the colon, comma-separated):
  smoke            a few steps of a tiny model; the end-to-end test uses it (well under a minute).
  noisy            the noisy/cluttered variant of the dataset (VGGSound-like).
  res=64           64x64 images instead of 32x32.
  steps=N          total training steps.

Any value can also be overridden on the command line, e.g. `--config.seed=3 --config.loss.div=0`.
See configs/common.py for the ablation switches. Measured wall time: see README.md ("Demo").
"""

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, smoke=False, noisy=False, res=32, steps=0)
  c = common.get_config()
  c.data.noisy = arg.noisy
  c.data.image_size = arg.res
  c.total_steps = 1000
  c.sample_every = c.checkpoint_every = 250
  if arg.res == 64:
    c.model.generator.channels = (128, 64, 32, 16, 16)
    c.model.discriminator.channels = (16, 16, 32, 64, 128)
    c.model.image_encoder.patch_size = 8

  if arg.smoke:
    common.smoke(c)
    c.data.audio_seconds = 0.5
    c.data.num_train = 256
  if arg.steps:
    c.total_steps = arg.steps
  return c
