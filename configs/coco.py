r"""COCO Captions at paper scale: text -> image (256 px through an f=8 KL latent codec) and image -> text.

  python launch/train_codec.py --config=configs/coco.py --workdir=runs/coco_codec        # stage 1
  python launch/train.py --config=configs/coco.py --workdir=runs/coco \
      --config.model.codec.checkpoint=runs/coco_codec/codec --config.data.data_dir=DIR    # stage 2

The COCO input pipeline comes with the real-dataset issue; until then both commands stop with a message that
says what is missing. Variants: `res=128` (f=4 codec, 32x32 latents).
"""

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, res=256)
  c = common.get_config()
  c.data.update(name='coco', image_size=arg.res, max_text_len=40, global_batch=256, num_threads=8,
                num_eval=5000)
  c.total_steps = 400_000
  m = c.model
  m.modalities = ('text', 'image')  # COCO has no audio
  m.dtype = 'bfloat16'
  m.width = m.embed_dim = 512
  m.text_encoder = dict(width=512, depth=6, num_heads=8)
  m.image_encoder = dict(patch_size=16, width=512, depth=6, num_heads=8)
  m.fusion = dict(self_depth=2, cross_depth=2, num_heads=8, cross_attention=True)
  codec_levels = (128, 256, 512, 512) if arg.res == 256 else (128, 256, 512)  # f = 8 or 4 -> 32x32 latents
  m.codec = dict(type='kl', channels=codec_levels, latent_channels=4, num_res_blocks=2, num_groups=32,
                 checkpoint='')
  m.generator.update(z_dim=128, w_dim=512, mapping_layers=8, channels=(512, 512, 512, 512),
                     cross_attention_max_res=16, num_heads=8)
  m.refiner.update(channels=(128, 256, 512), num_res_blocks=2, num_groups=32, num_heads=8, patch_size=1)
  m.discriminator.update(channels=(256, 512, 512, 512))
  m.text_decoder = dict(width=512, depth=6, num_heads=8)
  c.codec_stage = dict(steps=100_000, lr=1e-4, kl_weight=1e-6)
  c.ema.half_life_images = 10_000
  c.optim.update(g_lr=2e-3, d_lr=2e-3, rep_lr=3e-4, warmup_steps=5_000)
  c.mesh.shape = (-1, 1, 1)
  c.log_every = 100
  c.sample_every = 5_000
  c.checkpoint_every = 5_000
  c.eval_every = 25_000
  c.eval = dict(num_examples=5000, batch_size=256, beam_size=4, sample_grid=16,
                metrics=('bleu', 'meteor', 'rouge', 'cider'))
  return c
