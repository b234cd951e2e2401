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
    c.total_steps = 6
    c.data.global_batch = 8
    c.data.audio_seconds = 0.5
    c.data.num_train = 256
    m = c.model
    m.width = m.embed_dim = 32
    m.text_encoder = dict(width=32, depth=1, num_heads=2)
    m.image_encoder = dict(patch_size=8, width=32, depth=1, num_heads=2)
    m.audio_encoder = dict(width=32, depth=1, num_heads=2, n_mels=32, downsample=8)
    m.fusion = dict(self_depth=1, cross_depth=1, num_heads=2, cross_attention=True)
    m.generator.update(z_dim=16, w_dim=32, mapping_layers=2, channels=(32, 16, 16, 8), num_heads=2)
    m.refiner.update(channels=(8, 16), num_groups=4, num_heads=2)
    m.discriminator.update(channels=(8, 16, 16, 32))
    m.text_decoder = dict(width=32, depth=1, num_heads=2)
    c.loss.r1_interval = 4
    c.log_every = 2
    c.sample_every = 3
    c.checkpoint_every = 3
    c.eval.update(num_examples=16, batch_size=8, sample_grid=4, retrieval_ks=(1, 5))
  if arg.steps:
    c.total_steps = arg.steps
  return c
