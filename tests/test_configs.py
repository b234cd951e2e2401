"""Configs: variant parsing, the paper-scale configs build, missing datasets give a clear error."""

import jax
import numpy as np
import pytest

from configs import coco, common, shapes, vggsound
from mmgan_jax.data import registry, tokenizer
from mmgan_jax.models import mmgan


def test_parse_arg_types_and_unknown_keys():
  a = common.parse_arg('smoke,res=64', smoke=False, res=32, steps=0)
  assert a.smoke is True and a.res == 64 and a.steps == 0
  with pytest.raises(ValueError, match='unknown config argument'):
    common.parse_arg('resolution=64', res=32)
  with pytest.raises(ValueError):
    common.parse_arg('res', res=32)


def test_shapes_variants():
  assert shapes.get_config('smoke').total_steps < shapes.get_config().total_steps
  assert shapes.get_config('noisy').data.noisy
  assert shapes.get_config('res=64').data.image_size == 64
  assert shapes.get_config('steps=7').total_steps == 7


@pytest.mark.parametrize('module, arg', [(coco, None), (coco, 'res=128'), (vggsound, None)])
def test_paper_scale_configs_build_the_model(module, arg):
  c = module.get_config(arg)
  model = mmgan.build_model(c.model, image_size=c.data.image_size, vocab_size=30522,
                            max_text_len=c.data.max_text_len, sample_rate=c.data.sample_rate)
  assert model.latent_shape == (32, 32, 4)  # through the KL codec
  audio = int(c.data.sample_rate * c.data.audio_seconds)
  params = jax.eval_shape(lambda k: mmgan.init_params(model, k, mmgan.dummy_batch(model, 2, audio)),
                          jax.random.PRNGKey(0))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert count > 50e6  # paper scale, not the demo
  assert 'codec' in params and jax.tree.leaves(params['codec'])


@pytest.mark.parametrize('name, needle', [('coco', 'COCO'), ('vggsound', 'VGGSound'), ('laion', 'unknown')])
def test_unavailable_dataset_is_a_clear_error(name, needle):
  cfg = shapes.get_config('smoke').data
  cfg.name = name
  with pytest.raises(registry.DatasetUnavailableError, match=needle):
    registry.make_data(cfg)


def test_kl_codec_without_checkpoint_is_a_clear_error():
  from mmgan_jax.train import codec_stage  # pylint: disable=g-import-not-at-top
  c = coco.get_config()
  model = mmgan.build_model(c.model, image_size=256, vocab_size=tokenizer.shapes_text_codec().vocab_size,
                            max_text_len=40, sample_rate=16_000)
  with pytest.raises(FileNotFoundError, match='train_codec'):
    codec_stage.load('', model.codec, model.image_shape)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    codec_stage.load('/nonexistent/codec', model.codec, model.image_shape)


def test_kl_codec_stage_one_then_frozen_in_the_gan(tmp_path):
  """Stage 1 trains and saves the KL codec; stage 2 loads it frozen and works on its latents."""
  from mmgan_jax.train import codec_stage, trainer  # pylint: disable=g-import-not-at-top
  c = shapes.get_config('smoke')
  c.mesh.shape = (1, 1, 1)
  c.model.codec.update(type='kl', channels=(8, 16), latent_channels=4, num_res_blocks=1, num_groups=4)
  c.model.generator.channels = (32, 16, 8)  # latents are 16x16: resolutions 4, 8, 16
  c.model.discriminator.channels = (8, 16, 32)
  c.codec_stage.steps = 2
  out = codec_stage.train_codec(c, str(tmp_path))
  assert np.isfinite(out['loss']) and out['scale'] > 0
  c.model.codec.checkpoint = str(tmp_path / 'codec')
  s = trainer.setup(c, None, devices=jax.devices()[:1])
  assert s.model.latent_shape == (16, 16, 4)
  assert 'codec' not in s.state.params  # frozen: outside the optimisers
  np.testing.assert_allclose(float(s.state.codec['scale']), out['scale'], rtol=1e-6)
  restored, _ = codec_stage.load(str(tmp_path / 'codec'), s.model.codec, s.model.image_shape)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(s.state.codec['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
