"""Shared defaults for every mmgan_jax config, and the `file.py:arg` parser.

Every config file does `config = common.get_config()` and then changes what differs. Every loss weight and
component has a switch here (DESIGN.md "losses" and "adaptive" rows), so an ablation is a command-line override:

  refinement off            --config.model.refiner.enabled=False   (or --config.refine.num_steps=0)
  cross-attention off       --config.model.fusion.cross_attention=False --config.model.generator.cross_attention_max_res=0
  plain D (not noise-aware) --config.model.discriminator.noise_aware=False
  unconditional D           --config.model.discriminator.projection=False --config.loss.mismatch=0
  contrastive off           --config.loss.align=0 --config.loss.sem=0
  adaptive weighting off    --config.loss.adaptive=False --config.diffusion_gan.adaptive=False
  a modality off            --config.model.modalities="('image','text')"      (image is required)
  D's condition head on     --config.model.discriminator.cond_head=True [--config.loss.cond_reg=W]  (off here; the
                            shapes demo's names the caption's words: cond_head_target='words')
"""

from __future__ import annotations

import ast

import ml_collections


def parse_arg(arg: str | None, **defaults):
  """Parses 'key=value,key2=value2' (or a bare flag 'smoke') into a ConfigDict of typed values.

  Types come from `defaults`; unknown keys raise, so a typo in a variant string fails loudly (big_vision style).
  A bare word sets that boolean default to True.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    if not item:
      continue
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}.')
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f'config argument {key!r} needs a value ({kind.__name__}).')
      out[key] = True
    elif kind is bool:
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config argument {key!r} must be true/false, got {value!r}.')
      out[key] = value.lower() in ('true', '1')
    elif kind in (tuple, list):
      out[key] = kind(ast.literal_eval(value))
    else:
      out[key] = kind(value)
  return out


def encoder_fields(type: str = 'own', pretrained: str = '',  # pylint: disable=redefined-builtin
                   mode: str = 'finetune', lr_mul: float = 1.0, unfreeze_after: int = 0,
                   freeze: tuple[str, ...] = (), **hf_config) -> dict:
  """Where a modality encoder comes from and how it trains (mmgan_jax/models/pretrained.py; absent = these).

  type: 'own' | text: 'bert', 'clip_text' | image: 'clip_vision', 'vit' | audio: 'wav2vec2'.
  pretrained: a local transformers model directory, or a hub name on a machine with internet (HF_HUB_OFFLINE is
    respected); '' = random init from `hf_config` (transformers config overrides, e.g. hidden_size=32).
  train: mode 'finetune' | 'frozen'; lr_mul multiplies the learning rate; unfreeze_after=N keeps it fixed for the
    first N steps; freeze lists regular expressions of parameter paths kept fixed (e.g. 'embeddings').
  """
  return dict(type=type, pretrained=pretrained, hf_config=dict(hf_config),
              train=dict(mode=mode, lr_mul=float(lr_mul), unfreeze_after=int(unfreeze_after),
                         freeze=tuple(freeze)))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  # Iterations that train only the representation side (encoders, fusion, captioner, refiner) before G and D
  # start, as DF-GAN/AttnGAN pretrain their text encoder (DAMSM) before the GAN: G and D then learn from
  # conditions that already tell the attributes apart, not from the random features of fresh encoders.
  c.gan_start = 0
  # Before gan_start, D's features and its condition head (model.discriminator.cond_head) also train on the real
  # images, the head's loss alone, so that D can name what it sees when G starts (a pretrained AC-GAN classifier).
  c.d_head_warmup = False
  # From gan_start on, the representation side updates on every rep_every-th iteration; the others run the GAN's
  # G step alone on conditions computed without gradient (no representation losses or backward: a different
  # split of compute between the parts). 1: every iteration (joint training); 0: never (the representation is
  # frozen once the GAN starts, as DF-GAN trains its GAN on a fixed text encoder).
  c.rep_every = 1

  # Data. `name` picks the pipeline in mmgan_jax/data/registry.py.
  c.data = ml_collections.ConfigDict(dict(
      name='shapes', image_size=32, noisy=False, audio_seconds=1.0, sample_rate=16_000,
      num_train=50_000, num_eval=10_000, max_text_len=16, global_batch=32, num_threads=1, seed=0,
      data_dir='',  # real datasets: the TFDS data directory (coco, vggsound) or the CC folder
      tfds_name='',  # '' = the dataset's own (coco_captions, vggsound); e.g. 'vggsound/16k_5s' for another build
      train_split='', eval_split='',  # '' = the dataset's own (coco: train+restval / test)
      # Captions -> ids. path='': shapes' closed vocabulary, or a WordPiece vocabulary learned from the real
      # dataset's training captions (vocab_size, min_frequency; cached in data_dir). A tokenizer.json file or a
      # model directory (e.g. a pretrained text encoder's) is used as is, with its special tokens named here.
      tokenizer=dict(path='', pad='[PAD]', bos='[BOS]', eos='[EOS]', vocab_size=8192, min_frequency=2),
  ))

  # Model. Widths are the CPU demo's; coco.py / vggsound.py scale them up.
  m = ml_collections.ConfigDict()
  m.modalities = ('text', 'image', 'audio')
  m.dtype = 'float32'  # compute dtype ('bfloat16': bf16 activations and matmuls; parameters stay float32)
  m.remat = 'none'  # rematerialisation: 'none' | 'blocks' (keep residual-block outputs) | 'full' (per component)
  m.width = 64  # shared token width D
  m.embed_dim = 64  # shared-latent vector size E
  # G and D read the condition vector ZCA-whitened by its running statistics (models/mmgan.py, gan_condition).
  m.whiten_condition = False
  # Its eigenvalue floor, relative to the largest eigenvalue: directions with less variance than this are
  # amplified less. The conditions of one caption from text, audio or both differ in weak directions that a small
  # floor blows up (cos 0.96 before whitening, 0.20 after at 1e-3); see docs/training.md.
  m.whiten_eps = 1e-3
  # Encoders: ours (type='own': the size fields) or a transformers Flax model; see encoder_fields().
  m.text_encoder = dict(width=64, depth=2, num_heads=4, **encoder_fields())
  m.image_encoder = dict(patch_size=4, width=64, depth=2, num_heads=4, stem='patch', **encoder_fields())
  m.audio_encoder = dict(width=64, depth=2, num_heads=4, n_mels=64, downsample=4, **encoder_fields())
  m.fusion = dict(self_depth=1, cross_depth=1, num_heads=4, cross_attention=True)
  m.generator = dict(z_dim=64, w_dim=128, mapping_layers=4, mapping_lr_mul=0.01, channels=(128, 64, 32, 16),
                     cross_attention_max_res=16, num_heads=4, architecture='skip', noise_injection=True)
  m.refiner = dict(enabled=True, channels=(32, 64), num_res_blocks=1, attention=True, num_heads=4,
                   num_groups=8, num_timesteps=1000, prediction='eps', cond_dropout=0.1, patch_size=2)
  # downsample='stride': each down conv is evaluated at every other pixel. StyleGAN2's average pool before the
  # conv blurs 6-10 px objects; a D built that way classified the shapes of real images at 0.54 after 800
  # supervised steps, strided at 0.90 (docs/training.md, "Why D could not see shapes").
  # cond_head: a linear head on D's features predicts cond_head_target from real images, G's samples are scored by
  # it (loss.cond_reg): 'condition' regresses the (whitened) condition (InfoGAN's Q), 'words' names which
  # vocabulary words the example's caption holds (AC-GAN with the caption's words as labels).
  m.discriminator = dict(channels=(16, 32, 64, 128), noise_aware=True, projection=True, mbstd_group_size=4,
                         num_timesteps=1000, downsample='stride', cond_head=False, cond_head_target='condition')
  m.text_decoder = dict(width=64, depth=2, num_heads=4)
  m.codec = dict(type='identity', channels=(64, 128), latent_channels=4, num_res_blocks=1, num_groups=16,
                 checkpoint='')  # kl: path of a stage-1 codec checkpoint (launch/train_codec.py)
  c.model = m
  # Stage 1 for codec.type='kl' (launch/train_codec.py).
  c.codec_stage = dict(steps=2000, lr=2e-4, kl_weight=1e-6)

  # Which modalities each training example keeps (any subset is valid; at least one condition is kept).
  # 0.5: a quarter of the examples train each single-source setting (text->image, audio->image) that evaluation
  # and sampling use; at 0.3 text alone was 15 % of training and scored 20 points below text + audio.
  c.modality_dropout = 0.5

  # SDEdit refinement used when sampling and (in_training) on G's samples before D and the semantic loss see
  # them. in_training=False refines only at sampling and evaluation: the refiner still trains (loss.denoise),
  # G's iterations skip its forward and backward. train_fraction: the share of each batch the refiner's denoising
  # loss trains on (its cost scales with it). num_draws: the refined sample is the mean of that many refinements,
  # in antithetic pairs of noise (eps, -eps) (the refiner's cost scales with it).
  c.refine = dict(t_start=200, num_steps=2, guidance=1.0, in_training=True, train_fraction=1.0, num_draws=1)

  # Losses (0 switches a term off).
  c.loss = ml_collections.ConfigDict(dict(
      adv=1.0,  # adversarial (non-saturating logistic); scaled by the adaptive weight when adaptive=True
      adaptive=True,  # VQGAN-style lambda_adv = |grad sem| / |grad adv| at G's last layer
      adaptive_max=1e4,
      sem=1.0,  # XMC-GAN semantic consistency: InfoNCE(image-encoder(G out), condition)
      # With rep_every=0: the semantic terms (and the adaptive weight) on every N-th G iteration only, their
      # gradient weighted N (lazy, as StyleGAN2 does R1); the others keep the last adaptive weight.
      sem_every=1,
      # Caption consistency (MirrorGAN's STREAM, redescription): cross-entropy of the example's caption by the
      # captioner reading G's sample alone; teaches G every word, shape and size included.
      sem_caption=0.0,
      # The captioner reads the condition s alone and writes the example's caption: s must name every attribute.
      cond_caption=0.0,
      div=0.1,  # MSGAN mode seeking
      align=1.0,  # CLIP InfoNCE between modalities
      # 1 - |mean of one example's unit text and audio embeddings|^2: the sources of an example give one condition
      # (InfoNCE stops pulling once the positive outranks the negatives; whitening amplifies what is left).
      source_consistency=0.0,
      # '' pulls every source toward their mean; a source's name ('text') holds that one fixed and pulls the
      # others to it (docs/training.md, part 9).
      source_anchor='',
      caption=1.0,  # captioning cross-entropy
      label_smoothing=0.1,
      denoise=1.0,  # refiner denoising loss on real latents
      mismatch=1.0,  # matching-aware pairs in D
      cond_reg=1.0,  # D's condition regression (model.discriminator.cond_head): D on reals, G on its samples
      r1_gamma=0.01,  # StyleGAN2-ADA's value for 32x32 (CIFAR-10); every config here is 32x32 (pixels or latents)
      r1_interval=16,
  ))

  # Diffusion-GAN instance noise for the discriminator, with adaptive T_max.
  # sigma: Diffusion-GAN's noise scale sigma_d (0.05 in its StyleGAN2 code); 0.5 hid G's artefacts from D.
  c.diffusion_gan = dict(enabled=True, adaptive=True, t_max_init=0.0, t_lo=0.0, t_hi=500.0, target=0.6,
                         step_size=2.0, sigma=0.05)

  # Optimisers: G (Adam, beta1=0 as in StyleGAN2), D (same), the representation side (encoders, fusion,
  # decoder, refiner: AdamW). `frozen` lists top-level params (e.g. 'text_encoder') to keep fixed.
  c.optim = ml_collections.ConfigDict(dict(
      g_lr=2e-3, d_lr=2e-3, gan_b1=0.0, gan_b2=0.99,
      rep_lr=5e-4, rep_b1=0.9, rep_b2=0.99, rep_weight_decay=1e-4, warmup_steps=100,
      grad_clip=0.0, frozen=(),
      # From this iteration on the text and audio encoders and the fusion stop training (0: never), so G and D
      # learn on conditions that no longer move; the image encoder, captioner and refiner keep learning.
      condition_frozen_after=0,
      grad_accum=1,  # micro-batches per step (gradients averaged; activation memory of one micro-batch)
  ))
  c.ema = dict(half_life_images=5_000, rampup=0.05)
  c.max_nonfinite_steps = 5  # consecutive bad iterations (NaN/Inf; their updates skipped) before training stops
  # Testing the fault handling: the batches of these iterations (1-based) are made NaN, e.g.
  # --config.debug.nan_at_steps="(3,4,5,6,7)" stops a run at iteration 7 with max_nonfinite_steps=5.
  c.debug = ml_collections.ConfigDict(dict(nan_at_steps=()))

  # Mesh and partitioning: logical axis -> mesh axis; -1 fills the remaining devices.
  c.mesh = dict(shape=(-1, 1, 1), axes=('data', 'fsdp', 'tensor'))
  c.partition_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'), ('kv', None), ('vocab', 'tensor'),
      ('conv_in', 'fsdp'), ('conv_out', 'tensor'),
  )

  # Logging, checkpoints, evaluation.
  c.log_every = 50
  c.sample_every = 500
  c.checkpoint_every = 500
  c.max_checkpoints = 3
  c.eval_every = 0  # 0: only at the end
  c.eval = eval_config(num_examples=256, batch_size=64, beam_size=1, metrics=('bleu',),
                       evaluators=('semantic', 'captions', 'retrieval'))
  return c


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """Evaluation settings (mmgan_jax/evaluation/evaluator.py): which plug-ins run, on how many examples."""
  e = ml_collections.ConfigDict(dict(
      num_examples=256,  # held-out examples scored (<= data.num_eval); N is reported with every number
      batch_size=64,  # examples per compiled evaluation call
      beam_size=1,  # caption decoding: 1 = greedy
      sample_grid=16,  # images in the TensorBoard sample grids
      metrics=('bleu',),  # caption metrics: any of bleu, meteor, rouge, cider (meteor needs Java)
      evaluators=('semantic', 'captions', 'retrieval'),  # plug-ins: semantic, captions, retrieval, fid
      generate=('text_to_image', 'audio_to_image', 'text_audio_to_image'),  # settings sampled for semantic
      captions=('image_to_text', 'image_audio_to_text', 'audio_to_text'),  # settings captioned
      retrieval_ks=(1, 5, 10),
      fid=dict(
          weights='',  # FID Inception .npz (or env MMGAN_FID_WEIGHTS); required when 'fid' is evaluated
          settings=('text_to_image',),  # conditioning settings whose samples get FID / precision / recall
          stages=('refined',),  # pre_refine and/or refined
          precision_recall=True, k=3,  # improved precision/recall (Kynkaanniemi et al. 2019)
          batch_size=32,  # Inception batch (a divisor of eval.batch_size wastes no padding)
          cache_dir='',  # real-set features cache; '' = <workdir>/eval/cache
      ),
  ))
  e.update(overrides)
  return e


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a tiny model at 32x32 in pixel space: what the end-to-end tests of every config run."""
  c.total_steps = 6
  c.gan_start = 0
  c.data.update(global_batch=8, image_size=32)
  m = c.model
  m.dtype = 'float32'
  m.width = m.embed_dim = 32
  m.text_encoder.update(width=32, depth=1, num_heads=2)
  m.image_encoder.update(patch_size=8, width=32, depth=1, num_heads=2)
  m.audio_encoder.update(width=32, depth=1, num_heads=2, n_mels=32, downsample=8)
  m.fusion = dict(self_depth=1, cross_depth=1, num_heads=2, cross_attention=True)
  m.generator.update(z_dim=16, w_dim=32, mapping_layers=2, channels=(32, 16, 16, 8), num_heads=2)
  m.refiner.update(channels=(8, 16), num_groups=4, num_heads=2, num_res_blocks=1, patch_size=2)
  m.discriminator.update(channels=(8, 16, 16, 32))
  m.text_decoder = dict(width=32, depth=1, num_heads=2)
  m.codec = dict(type='identity', channels=(64, 128), latent_channels=4, num_res_blocks=1, num_groups=16,
                 checkpoint='')
  c.loss.r1_interval = 4
  c.log_every = 2
  c.sample_every = 3
  c.checkpoint_every = 3
  c.eval_every = 0
  c.eval = eval_config(num_examples=16, batch_size=8, sample_grid=4, retrieval_ks=(1, 5), metrics=('bleu',),
                       evaluators=tuple(e for e in c.eval.evaluators if e != 'fid'), beam_size=1)
  return c


def paper_scale(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What COCO and VGGSound share: StyleGAN2-width G and D on 32x32x4 KL latents, an LDM-size refiner, long
  schedules and the full caption protocol. The dataset configs set the data, encoders and codec."""
  m = c.model
  m.generator.update(z_dim=128, w_dim=512, mapping_layers=8, channels=(512, 512, 512, 512),
                     cross_attention_max_res=16, num_heads=8)
  m.refiner.update(channels=(128, 256, 512), num_res_blocks=2, num_groups=32, num_heads=8, patch_size=1)
  m.discriminator.update(channels=(256, 512, 512, 512))
  c.codec_stage = dict(steps=100_000, lr=1e-4, kl_weight=1e-6)
  c.ema.half_life_images = 10_000
  c.optim.update(g_lr=2e-3, d_lr=2e-3, rep_lr=3e-4, warmup_steps=5_000)
  c.log_every = 100
  c.sample_every = 5_000
  c.checkpoint_every = 5_000
  c.eval_every = 25_000
  c.eval = eval_config(num_examples=5000, batch_size=256, beam_size=4,
                       metrics=('bleu', 'meteor', 'rouge', 'cider'), evaluators=('fid', 'captions', 'retrieval'))
  return c
