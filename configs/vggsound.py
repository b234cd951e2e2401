r"""VGGSound at paper scale: audio -> video frame (128 px through an f=4 KL codec) and audio/image -> label text.

  python launch/train_codec.py --config=configs/vggsound.py --workdir=runs/vgg_codec      # stage 1
  python launch/train.py --config=configs/vggsound.py --workdir=runs/vggsound \
      --config.model.codec.checkpoint=runs/vgg_codec/codec --config.data.data_dir=DIR     # stage 2

DIR is where `python launch/prepare_vggsound.py --manual_dir=CLIPS --data_dir=DIR` wrote the array_record
shards (see docs/datasets.md); without it both commands stop with a message that says so. The text is the class
label (WordPiece vocabulary learned from the training labels, cached in DIR/mmgan_jax_vocab).
Variants: `seconds=S` (audio window, default 5 s of the 10 s clips: a random window in training, the centred
one in evaluation); `smoke` (a few steps of a tiny pixel-space model at 32x32, what the tests run).
"""

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, seconds=5.0, smoke=False)
  c = common.paper_scale(common.get_config())
  c.data.update(name='vggsound', image_size=128, audio_seconds=arg.seconds, max_text_len=16, global_batch=256,
                num_threads=8, num_train=0, num_eval=5000)
  c.data.tokenizer.vocab_size = 2048  # 309 class labels
  c.total_steps = 300_000
  m = c.model
  m.modalities = ('text', 'image', 'audio')  # text = the class label (and captions when provided)
  m.dtype = 'bfloat16'
  m.width = m.embed_dim = 512
  m.text_encoder.update(width=512, depth=4, num_heads=8)
  m.image_encoder.update(patch_size=8, width=512, depth=6, num_heads=8)
  m.audio_encoder.update(width=512, depth=6, num_heads=8, n_mels=128, downsample=4)
  m.fusion = dict(self_depth=2, cross_depth=2, num_heads=8, cross_attention=True)
  m.codec = dict(type='kl', channels=(128, 256, 512), latent_channels=4, num_res_blocks=2, num_groups=32,
                 checkpoint='')
  m.text_decoder = dict(width=512, depth=4, num_heads=8)
  if arg.smoke:
    common.smoke(c)
    c.data.update(num_threads=2, audio_seconds=min(arg.seconds, 0.5))
  return c
