r"""The ablation study: the demo model, and the demo with one component switched off at a time, 3 seeds each.

  python launch/ablate.py --sweep=configs/ablations.py --workdir=runs/ablations \
      --fid_weights=../shared/fid/inception_2015_12_05_fid.npz --report=docs/results.md --plots_dir=docs/figures

`get_sweep(arg)` is plain Python: the base config and, per run, its name, seed and the config overrides
(dotted paths, as on the command line). Variants (arg, comma-separated): `seeds=N` (default 3), `steps=N`
(training steps per run; default 0 = the base config's 1000).

  full                 the whole model (configs/shapes.py)
  no_refinement        no diffusion refiner: G's output is the sample, no denoising loss
  no_cross_attention   no cross-modal attention in the fusion, no token cross-attention in G
  plain_discriminator  D without instance noise and timestep input (a StyleGAN2 projection D)
  no_contrastive       no InfoNCE alignment between modalities and no semantic-consistency loss on G
  fixed_weights        constant loss weights and a fixed discriminator noise level (no adaptive lambda / T_max)
"""

from configs import common

BASE = 'configs/shapes.py'

VARIANTS = (
    ('full', {}),
    ('no_refinement', {'model.refiner.enabled': False}),
    ('no_cross_attention', {'model.fusion.cross_attention': False, 'model.generator.cross_attention_max_res': 0}),
    ('plain_discriminator', {'model.discriminator.noise_aware': False, 'diffusion_gan.enabled': False}),
    ('no_contrastive', {'loss.align': 0.0, 'loss.sem': 0.0}),
    ('fixed_weights', {'loss.adaptive': False, 'diffusion_gan.adaptive': False}),
)


def get_sweep(arg: str | None = None) -> dict:
  """{'base': config string, 'runs': [{'name', 'seed', 'overrides'}, ...]} (variant-major, then seed)."""
  arg = common.parse_arg(arg, seeds=3, steps=0)
  if arg.seeds < 1:
    raise ValueError(f'seeds must be >= 1, got {arg.seeds}.')
  runs = []
  for name, overrides in VARIANTS:
    for seed in range(arg.seeds):
      o = dict(overrides, seed=seed)
      if arg.steps:
        o['total_steps'] = arg.steps
      runs.append(dict(name=name, seed=seed, overrides=o))
  return dict(base=BASE, runs=runs)
