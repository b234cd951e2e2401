"""Config validation: bad fields are named with their allowed values, all at once, before anything compiles.

The rules are checked against the code that enforces them: configs the validator accepts build and initialise
(`jax.eval_shape`), configs it rejects for model reasons fail there too, and its mesh rule agrees with
`sharding.make_mesh` on the 8 virtual devices of conftest.py.
"""

import math
import os
import subprocess
import sys
import time

import jax
import pytest

from configs import coco, conceptual_captions, shapes, vggsound
from helpers import override
from mmgan_jax import config_validation as cv
from mmgan_jax.data import tokenizer
from mmgan_jax.models import mmgan
from mmgan_jax.train import sharding, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(**overrides):
  """The smoke config with dotted-path overrides ('model.refiner.num_heads': 3)."""
  return override(shapes.get_config('smoke'), **overrides)


def problems_of(config, num_devices=1):
  with pytest.raises(cv.ConfigError) as e:
    cv.validate(config, num_devices=num_devices)
  assert str(e.value).count('\n  - ') == len(e.value.problems)  # one line per problem in the message
  return e.value.problems


# (overrides, num_devices, field named, allowed values named): each row is one mistake a user can make.
BAD = [
    ({'data.name': 'laion'}, 1, 'config.data.name', "one of ('shapes', 'coco', 'vggsound', 'cc')"),
    ({'data.image_size': 48}, 1, 'config.data.image_size', '4, 8, 16, 32, ... (= 4 * 1 * 2**k)'),
    ({'data.image_size': 64}, 1, 'config.model.generator.channels', '5 entries, or config.data.image_size=32'),
    ({'model.codec.type': 'kl', 'model.codec.channels': (8,) * 7}, 1, 'config.data.image_size',
     'codec downsampling factor 64'),
    ({'model.codec.type': 'vq'}, 1, 'config.model.codec.type', "one of ('identity', 'kl')"),
    ({'data.sample_rate': 1000}, 1, 'config.data.sample_rate', '>= 4000 Hz'),
    ({'model.image_encoder.patch_size': 5}, 1, 'config.model.image_encoder.patch_size',
     'a divisor of 32: [1, 2, 4, 8, 16, 32]'),
    ({'data.global_batch': 7}, 2, 'config.data.global_batch', 'a multiple of 2'),
    ({'data.global_batch': 0}, 1, 'config.data.global_batch', 'an integer >= 1'),
    ({'mesh.shape': (2, 4, 1)}, 4, 'config.mesh.shape',
     'needs 8 devices, found 4; allowed: sizes whose product is 4'),
    ({'mesh.shape': (-1, -1, 1)}, 8, 'config.mesh.shape', 'at most one -1'),
    ({'mesh.shape': (-1, 1)}, 1, 'config.mesh.shape', 'one size per axis (3 entries)'),
    ({'mesh.shape': (3, -1, 1)}, 8, 'config.mesh.shape', 'product divides 8'),
    ({'partition_rules': (('batch', ('data', 'pipe')),)}, 1, 'config.partition_rules',
     "allowed mesh axes: ('data'"),
    ({'model.modalities': ('text', 'video')}, 1, 'config.model.modalities',
     "subset of ('text', 'image', 'audio')"),
    ({'model.modalities': ('text', 'audio')}, 1, 'config.model.modalities', "must include 'image'"),
    ({'model.modalities': ('image',)}, 1, 'config.model.modalities', "needs 'text' or 'audio'"),
    ({'refine.num_steps': 300}, 1, 'config.refine.num_steps', 'an integer in [0, 200]'),
    ({'refine.t_start': 1001}, 1, 'config.refine.t_start', 'an integer in [0, 1000]'),
    ({'refine.guidance': -1.0}, 1, 'config.refine.guidance', '[0, inf)'),
    ({'refine.train_fraction': 0.0}, 1, 'config.refine.train_fraction', '(0, 1]'),
    ({'refine.num_draws': 0}, 1, 'config.refine.num_draws', 'an integer >= 1'),
    ({'model.dtype': 'float16'}, 1, 'config.model.dtype', "one of ('float32', 'bfloat16')"),
    ({'model.remat': 'some'}, 1, 'config.model.remat', "one of ('none', 'blocks', 'full')"),
    ({'optim.grad_accum': 3}, 1, 'config.optim.grad_accum', 'does not divide config.data.global_batch=8'),
    ({'optim.grad_accum': 8}, 1, 'config.optim.grad_accum', 'micro-batches of 1 example'),
    ({'optim.grad_accum': 4}, 4, 'config.optim.grad_accum', 'a multiple of 4 * grad_accum'),
    ({'model.text_encoder.num_heads': 3}, 1, 'config.model.text_encoder.num_heads', '[1, 2, 4, 8, 16, 32]'),
    ({'model.text_decoder.num_heads': 64}, 1, 'config.model.text_decoder.num_heads', '[1, 2, 4, 8, 16, 32]'),
    ({'model.audio_encoder.num_heads': 5}, 1, 'config.model.audio_encoder.num_heads', 'config.model.audio_encoder'
     '.width=32'),
    ({'model.fusion.num_heads': 5}, 1, 'config.model.fusion.num_heads', 'config.model.width=32'),
    ({'model.refiner.num_heads': 3}, 1, 'config.model.refiner.num_heads',
     'channels[-1]=16; allowed: one of [1, 2'),
    ({'model.refiner.patch_size': 32}, 1, 'config.model.refiner.patch_size', 'patch_size in [1, 2, 4, 8, 16]'),
    ({'model.image_encoder.width': 30}, 1, 'config.model.image_encoder.width', 'multiple of 4'),
    ({'model.generator.architecture': 'cips'}, 1, 'config.model.generator.architecture', "('skip', 'resnet')"),
    ({'model.refiner.prediction': 'x0'}, 1, 'config.model.refiner.prediction', "('eps', 'v')"),
    ({'optim.g_lr': 0.0}, 1, 'config.optim.g_lr', '(0, inf)'),
    ({'optim.d_lr': float('nan')}, 1, 'config.optim.d_lr', 'a finite number in (0, inf)'),
    ({'optim.gan_b2': 1.0}, 1, 'config.optim.gan_b2', '[0, 1)'),
    ({'optim.frozen': ('generator',)}, 1, 'config.optim.frozen', "('text_encoder', 'image_encoder'"),
    ({'loss.sem': -1.0}, 1, 'config.loss.sem', '[0, inf)'),
    ({'loss.source_consistency': -1.0}, 1, 'config.loss.source_consistency', '[0, inf)'),
    ({'loss.source_anchor': 'image'}, 1, 'config.loss.source_anchor', "('', 'text', 'audio')"),
    ({'loss.cond_caption': 1.0, 'model.embed_dim': 16}, 1, 'config.loss.cond_caption',
     'model.width == model.embed_dim'),
    ({'optim.condition_frozen_after': 7}, 1, 'config.optim.condition_frozen_after', 'an integer in [0, 6]'),
    ({'loss.r1_interval': -1}, 1, 'config.loss.r1_interval', 'an integer >= 0'),
    ({'loss.sem_every': 0}, 1, 'config.loss.sem_every', 'an integer >= 1'),
    ({'loss.sem_every': 4}, 1, 'config.loss.sem_every', 'needs rep_every=0'),
    ({'loss.label_smoothing': 1.0}, 1, 'config.loss.label_smoothing', '[0, 1)'),
    ({'ema.half_life_images': 0}, 1, 'config.ema.half_life_images', '(0, inf)'),
    ({'diffusion_gan.target': 1.5}, 1, 'config.diffusion_gan.target', '(-1, 1)'),
    ({'diffusion_gan.t_hi': 2000.0}, 1, 'config.diffusion_gan.t_hi', '[0, 1000]'),
    ({'modality_dropout': 1.5}, 1, 'config.modality_dropout', '[0, 1]'),
    ({'total_steps': 0}, 1, 'config.total_steps', 'an integer >= 1'),
    ({'gan_start': 6}, 1, 'config.gan_start', 'an integer in [0, 5]'),  # the smoke config trains 6 steps
    ({'rep_every': -1}, 1, 'config.rep_every', 'an integer >= 0'),
    ({'model.image_encoder.stem': 'resnet'}, 1, 'config.model.image_encoder.stem', "one of ('patch', 'conv')"),
    ({'model.image_encoder.stem': 'conv', 'model.image_encoder.patch_size': 6}, 1,
     'config.model.image_encoder.stem', 'not a power of 2'),
    ({'loss.sem_caption': 1.0, 'model.modalities': ('image', 'audio')}, 1, 'config.loss.sem_caption',
     'allowed here: 0'),
    ({'model.discriminator.cond_head_target': 'tokens'}, 1, 'config.model.discriminator.cond_head_target',
     "('condition', 'words')"),
    ({'model.discriminator.cond_head': True, 'loss.cond_reg': 0.0}, 1, 'config.model.discriminator.cond_head',
     'loss.cond_reg > 0'),
    ({'d_head_warmup': True, 'gan_start': 2}, 1, 'config.d_head_warmup', 'needs model.discriminator.cond_head=True'),
    ({'model.whiten_eps': 0.0}, 1, 'config.model.whiten_eps', '(0.0, 1.0]'),
    ({'log_every': 0}, 1, 'config.log_every', 'an integer >= 1'),
    ({'checkpoint_every': -3}, 1, 'config.checkpoint_every', 'an integer >= 1'),
    ({'data.max_text_len': 1}, 1, 'config.data.max_text_len', 'an integer >= 2'),
    ({'eval.num_examples': 20_000}, 1, 'config.eval.num_examples', 'an integer in [1, 10000]'),
    ({'eval.batch_size': 0}, 1, 'config.eval.batch_size', 'an integer >= 1'),
    ({'eval.evaluators': ('semantic', 'bleu')}, 1, 'config.eval.evaluators', "'fid'"),
    ({'eval.evaluators': ('retrieval', 'retrieval')}, 1, 'config.eval.evaluators', 'at most once'),
    ({'eval.metrics': ('bleu', 'spice')}, 1, 'config.eval.metrics', "('bleu', 'meteor', 'rouge', 'cider')"),
    ({'eval.generate': ('text_to_video',)}, 1, 'config.eval.generate', "'text_to_image'"),
    ({'eval.fid.stages': ('final',)}, 1, 'config.eval.fid.stages', "('pre_refine', 'refined')"),
]


@pytest.mark.parametrize('overrides, num_devices, field, allowed', BAD,
                         ids=[','.join(row[0]) + f'@{row[1]}' for row in BAD])
def test_bad_config_is_rejected_naming_the_field_and_the_allowed_values(overrides, num_devices, field, allowed):
  if 'eval.fid.stages' in overrides:
    overrides = dict(overrides, **{'eval.evaluators': ('fid',)})  # fid settings are read only when fid runs
  found = problems_of(smoke(**overrides), num_devices)
  hits = [line for line in found if line.startswith(field) and allowed in line]
  assert hits, f'no line names {field} with {allowed!r}:\n' + '\n'.join(found)


def test_the_table_covers_the_issue_list():
  fields = {row[2] for row in BAD}
  assert len(BAD) >= 15
  for must in ('config.data.image_size', 'config.data.global_batch', 'config.model.modalities',
               'config.mesh.shape', 'config.refine.num_steps', 'config.refine.t_start'):
    assert must in fields


def test_every_problem_is_reported_at_once():
  c = smoke(**{'data.global_batch': 7, 'model.text_encoder.num_heads': 3, 'optim.g_lr': -1.0,
               'refine.t_start': 5000, 'eval.evaluators': ('semantic', 'nope'), 'model.dtype': 'fp8'})
  found = problems_of(c, num_devices=2)
  for field in ('config.data.global_batch=7', 'config.model.text_encoder.num_heads=3', 'config.optim.g_lr=-1.0',
                'config.refine.t_start=5000', 'config.eval.evaluators=', "config.model.dtype='fp8'"):
    assert sum(line.startswith(field) for line in found) == 1, found
  assert len(found) == 6


SHIPPED = [(shapes, None, 1), (shapes, 'smoke', 1), (shapes, 'noisy', 1), (shapes, 'res=64', 1),
           (shapes, 'steps=7', 1), (shapes, 'smoke', 8), (shapes, None, 8), (coco, None, 8), (coco, 'res=128', 8),
           (coco, None, 1), (vggsound, None, 8), (vggsound, 'seconds=10', 8), (vggsound, None, 1),
           (shapes, 'pretrained_text', 1), (coco, 'smoke', 1), (vggsound, 'smoke', 1), (conceptual_captions, None, 8),
           (conceptual_captions, 'smoke', 1)]


@pytest.mark.parametrize('module, arg, num_devices', SHIPPED,
                         ids=[f'{m.__name__.split(".")[-1]}:{a or ""}@{n}' for m, a, n in SHIPPED])
def test_every_shipped_config_validates(module, arg, num_devices):
  c = module.get_config(arg)
  t0 = time.perf_counter()
  cv.validate(c, num_devices=num_devices)
  assert time.perf_counter() - t0 < 0.5  # pure Python: no tracing, no compilation


# Configs on both sides of the model's own rules: the validator must agree with build_model + init.
AGREE = [
    ({}, True),
    ({'model.refiner.patch_size': 16}, True),  # 32x32 latents, 2 levels: 16 * 2 = 32 divides 32
    ({'model.refiner.patch_size': 32}, False),
    ({'model.image_encoder.patch_size': 16}, True),
    ({'model.image_encoder.patch_size': 5}, False),
    ({'model.text_encoder.num_heads': 3}, False),
    ({'model.generator.num_heads': 3}, True),  # the generator uses gcd(num_heads, channels) heads
    ({'data.image_size': 64}, False),  # 4 generator levels make 32x32
]


@pytest.mark.parametrize('overrides, ok', AGREE, ids=[','.join(o) or 'smoke' for o, _ in AGREE])
def test_validator_agrees_with_the_model(overrides, ok):
  c = smoke(**overrides)
  assert (not cv.problems(c, num_devices=1)) == ok

  def build_and_init():
    model = mmgan.build_model(c.model, image_size=c.data.image_size,
                              vocab_size=tokenizer.shapes_text_codec().vocab_size,
                              max_text_len=c.data.max_text_len, sample_rate=c.data.sample_rate)
    audio = int(c.data.sample_rate * c.data.audio_seconds)
    jax.eval_shape(lambda k: mmgan.init_params(model, k, mmgan.dummy_batch(model, 2, audio)),
                   jax.random.PRNGKey(0))

  if ok:
    build_and_init()
  else:
    with pytest.raises(Exception):  # flax / the modules raise their own (less specific) errors
      build_and_init()


@pytest.mark.parametrize('shape', [(-1, 1, 1), (2, -1, 1), (2, 4, 1), (8, 1, 1), (3, -1, 1), (-1, -1, 1),
                                   (4, 4, 1), (2, 2, 1), (-1, 1), (1, 1, -1)])
def test_mesh_rule_agrees_with_make_mesh(shape):
  axes = ('data', 'fsdp', 'tensor')
  c = smoke(**{'mesh.shape': shape})
  mesh_problems = [p for p in cv.problems(c, num_devices=8) if p.startswith('config.mesh.')]
  try:
    mesh = sharding.make_mesh(shape, axes, jax.devices()[:8])
  except ValueError:
    assert mesh_problems
  else:
    assert not mesh_problems
    batch_problems = [p for p in cv.problems(c, num_devices=8) if p.startswith('config.data.global_batch')]
    n = math.prod(mesh.shape[a] for a in ('data', 'fsdp'))
    assert bool(batch_problems) == bool(c.data.global_batch % n)
    try:
      sharding.check_batch_divisible(c.data.global_batch, mesh, c.partition_rules)
    except ValueError:
      assert batch_problems


def test_setup_rejects_a_bad_config_before_building_anything(monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError('setup went past validation')

  monkeypatch.setattr(trainer.registry, 'make_data', forbidden)
  monkeypatch.setattr(trainer.mmgan, 'build_model', forbidden)
  monkeypatch.setattr(trainer.sharding, 'make_mesh', forbidden)
  t0 = time.perf_counter()
  with pytest.raises(cv.ConfigError, match=r'config\.data\.global_batch=7'):
    trainer.setup(smoke(**{'data.global_batch': 7}), None, devices=jax.devices()[:2])
  assert time.perf_counter() - t0 < 5.0


def test_launcher_prints_the_field_and_exits_2(tmp_path):
  """launch/train.py on a bad config: exit status 2, the field named, no traceback. Without XLA_FLAGS the host
  has one CPU device, where a batch of 7 is legal; a fixed 2-device mesh makes both fields wrong."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, 'launch/train.py', '--config=configs/shapes.py:smoke',
                         '--config.data.global_batch=7', '--config.mesh.shape=(2,1,1)', f'--workdir={tmp_path}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert 'config.data.global_batch=7' in proc.stderr and 'a multiple of 2' in proc.stderr
  print(f'launcher wall time {time.perf_counter() - t0:.1f} s')


def test_config_override_typos_name_the_nearest_fields(tmp_path):
  """A misspelt `--config.X` override: one `error:` line naming the nearest valid fields, exit status 2, and no
  workdir left behind (ml_collections raises a KeyError with three chained tracebacks at flag parsing)."""
  from mmgan_jax import cli  # pylint: disable=g-import-not-at-top
  config = smoke()
  argv = ['train.py', '--config=x.py', '--config.seed=1', '--config.total_step=3']
  assert "'total_step'; nearest: total_steps." in cli.bad_override(argv, config)
  assert 'model.generator.z_dim' in cli.bad_override(['--config.model.generator.z_dm=3'], config)
  assert cli.bad_override(['--config.seed=1', '--config.model.generator.z_dim=8'], config) is None
  workdir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, 'launch/train.py', '--config=configs/shapes.py:smoke',
                         '--config.trian.steps=3', f'--workdir={workdir}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: --config.trian.steps') and 'total_steps' in lines[0], lines
  assert not workdir.exists()
