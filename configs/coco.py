r"""COCO Captions at paper scale: text -> image (256 px through an f=8 KL latent codec) and image -> text.

  python launch/train_codec.py --config=configs/coco.py --workdir=runs/coco_codec        # stage 1
  python launch/train.py --config=configs/coco.py --workdir=runs/coco \
      --config.model.codec.checkpoint=runs/coco_codec/codec --config.data.data_dir=DIR    # stage 2

DIR is where `python launch/prepare_coco.py --data_dir=DIR` put the dataset (see
docs/datasets.md); without it both commands stop with a message that says so. The caption vocabulary is a
WordPiece one learned from the training captions at the first start (cached in DIR/mmgan_jax_vocab).
Variants: `res=128` (f=4 codec, 32x32 latents); `smoke` (a few steps of a tiny pixel-space model at 32x32, what
the tests run on a fixture; no codec stage needed).
"""

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, res=256, smoke=False)
  c = common.paper_scale(common.get_config())
  c.data.update(name='coco', image_size=arg.res, max_text_len=40, global_batch=256, num_threads=8,
                num_train=0, num_eval=5000)
  c.total_steps = 400_000
  m = c.model
  m.modalities = ('text', 'image')  # COCO has no audio
  m.dtype = 'bfloat16'
  m.width = m.embed_dim = 512
  m.text_encoder.update(width=512, depth=6, num_heads=8)
  m.image_encoder.update(patch_size=16, width=512, depth=6, num_heads=8)
  m.fusion = dict(self_depth=2, cross_depth=2, num_heads=8, cross_attention=True)
  codec_levels = (128, 256, 512, 512) if arg.res == 256 else (128, 256, 512)  # f = 8 or 4 -> 32x32 latents
  m.codec = dict(type='kl', channels=codec_levels, latent_channels=4, num_res_blocks=2, num_groups=32,
                 checkpoint='')
  m.text_decoder = dict(width=512, depth=6, num_heads=8)
  if arg.smoke:
    common.smoke(c)
    c.data.update(max_text_len=16, num_threads=2)
  return c
