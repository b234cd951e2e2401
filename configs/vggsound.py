r"""VGGSound at paper scale: audio -> video frame (128 px through an f=4 KL codec) and audio/image -> label text.

  python launch/train_codec.py --config=configs/vggsound.py --workdir=runs/vgg_codec      # stage 1
  python launch/train.py --config=configs/vggsound.py --workdir=runs/vggsound \
      --config.model.codec.checkpoint=runs/vgg_codec/codec --config.data.data_dir=DIR     # stage 2

The VGGSound input pipeline comes with the real-dataset issue; until then both commands stop with a message that
says what is missing. Variants: `seconds=S` (audio clip length, default 5 of the 10 s clips).
"""

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, seconds=5.0)
  c = common.get_config()
  c.data.update(name='vggsound', image_size=128, audio_seconds=arg.seconds, max_text_len=16, global_batch=256,
                num_threads=8, num_eval=5000)
  c.total_steps = 300_000
  m = c.model
  m.modalities = ('text', 'image', 'audio')  # text = the class label (and captions when provided)
  m.dtype = 'bfloat16'
  m.width = m.embed_dim = 512
  m.text_encoder = dict(width=512, depth=4, num_heads=8)
  m.image_encoder = dict(patch_size=8, width=512, depth=6, num_heads=8)
  m.audio_encoder = dict(width=512, depth=6, num_heads=8, n_mels=128, downsample=4)
  m.fusion = dict(self_depth=2, cross_depth=2, num_heads=8, cross_attention=True)
  m.codec = dict(type='kl', channels=(128, 256, 512), latent_channels=4, num_res_blocks=2, num_groups=32,
                 checkpoint='')
  m.generator.update(z_dim=128, w_dim=512, mapping_layers=8, channels=(512, 512, 512, 512),
                     cross_attention_max_res=16, num_heads=8)
  m.refiner.update(channels=(128, 256, 512), num_res_blocks=2, num_groups=32, num_heads=8, patch_size=1)
  m.discriminator.update(channels=(256, 512, 512, 512))
  m.text_decoder = dict(width=512, depth=4, num_heads=8)
  c.codec_stage = dict(steps=100_000, lr=1e-4, kl_weight=1e-6)
  c.ema.half_life_images = 10_000
  c.optim.update(g_lr=2e-3, d_lr=2e-3, rep_lr=3e-4, warmup_steps=5_000)
  c.log_every = 100
  c.sample_every = 5_000
  c.checkpoint_every = 5_000
  c.eval_every = 25_000
  c.eval = dict(num_examples=5000, batch_size=256, beam_size=4, sample_grid=16,
                metrics=('bleu', 'meteor', 'rouge', 'cider'))
  return c
