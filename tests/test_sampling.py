"""launch/sample.py and mmgan_jax/sampling.py on a 2-step smoke workdir: every mode, as a new user runs them.

One workdir is trained per module (launch/train.py's library entry point, so it writes config.json as a run
does); the library checks use it in process, the CLI check runs the real launcher once with every mode.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile

from helpers import smoke_config
from mmgan_jax import config_io, sampling
from mmgan_jax.data import shapes
from mmgan_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = (shapes.canonical_caption([0, 0, 2, 0]), shapes.canonical_caption([1, 3, 0, 4]))  # in-vocabulary


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('sample_run'))
  config = smoke_config(**{'total_steps': 2, 'checkpoint_every': 2, 'sample_every': 0, 'log_every': 1,
                           'eval.evaluators': ('retrieval',)})
  trainer.train_and_evaluate(config, path, devices=jax.devices()[:1])
  return path


@pytest.fixture(scope='module')
def sampler(workdir):
  return sampling.Sampler.from_workdir(workdir)


def test_workdir_config_round_trips(workdir, tmp_path):
  """config.json read back is the config the run was started with (tuples included), locked."""
  config = smoke_config(**{'total_steps': 2, 'checkpoint_every': 2, 'sample_every': 0, 'log_every': 1,
                           'eval.evaluators': ('retrieval',)})
  loaded = config_io.load(workdir)
  assert loaded.to_dict() == config.to_dict()
  assert isinstance(loaded.model.generator.channels, tuple) and loaded.is_locked
  with pytest.raises(FileNotFoundError, match='config.json'):
    config_io.load(os.path.dirname(workdir))
  # A config.json saved before a field was added reads back with the value that reproduces its training.
  older = tmp_path / 'older'
  older.mkdir()
  saved = json.loads(open(config_io.path(workdir)).read())
  for dotted in config_io.ADDED_FIELDS:
    *parents, leaf = dotted.split('.')
    node = saved
    for name in parents:
      node = node[name]
    del node[leaf]
  (older / config_io.FILENAME).write_text(json.dumps(saved))
  assert config_io.load(str(older)).to_dict() == config.to_dict()


def test_text_to_image_is_seeded_and_prompt_major(sampler):
  pre, post = sampler.text_to_image(list(PROMPTS), num_samples=3, seed=5)
  size = sampler.image_size
  assert pre.shape == post.shape == (6, size, size, 3)
  assert np.all(np.isfinite(post)) and post.min() >= -1.0 and post.max() <= 1.0
  again = sampler.text_to_image(list(PROMPTS), num_samples=3, seed=5)[1]
  np.testing.assert_array_equal(post, again)
  other = sampler.text_to_image(list(PROMPTS), num_samples=3, seed=6)[1]
  assert np.abs(post - other).max() > 1e-3  # another seed, other latents
  assert np.abs(post[0] - post[1]).max() > 1e-4  # samples of one prompt differ from each other
  assert np.abs(post - pre).max() > 1e-4  # refinement changes the image
  with pytest.raises(sampling.InputError, match='non-empty'):
    sampler.text_to_image(['  '], num_samples=1, seed=0)


def test_audio_and_image_inputs_give_images_and_captions(sampler, tmp_path):
  spec = shapes.ShapesSpec(image_size=sampler.image_size, sample_rate=sampler.sample_rate,
                           audio_seconds=sampler.audio_samples / sampler.sample_rate)
  ex = shapes.make_example(spec, 0, 'test', 0)
  path = str(tmp_path / 'clip.wav')  # stereo int16: down-mixed and scaled on load
  wavfile.write(path, sampler.sample_rate, (np.stack([ex['audio']] * 2, axis=1) * 32767).astype(np.int16))
  clip = sampling.load_wav(path, sampler.sample_rate, sampler.audio_samples)
  assert clip.shape == (sampler.audio_samples,) and clip.dtype == np.float32
  np.testing.assert_allclose(clip, ex['audio'], atol=1e-4)
  sine = str(tmp_path / 'sine.wav')  # 8 kHz, 0.25 s of 440 Hz: resampled to the model's rate, zero-padded
  wavfile.write(sine, 8000, (0.5 * np.sin(2 * np.pi * 440 * np.arange(2000) / 8000)).astype(np.float32))
  up = sampling.load_wav(sine, 16_000, 8000)
  want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(4000) / 16_000)
  np.testing.assert_allclose(up[200:3800], want[200:3800], atol=0.02)  # away from the edges' filter ringing
  assert np.all(up[4000:] == 0)
  pre, post = sampler.audio_to_image(clip[None], num_samples=2, seed=0)
  assert post.shape == (2, sampler.image_size, sampler.image_size, 3)
  image = str(tmp_path / 'wide.png')
  Image.fromarray(np.concatenate([ex['image'], ex['image'][:, :8]], axis=1)).save(image)  # non-square: centre crop
  loaded = sampling.load_image(image, sampler.image_size)
  assert loaded.shape == (sampler.image_size, sampler.image_size, 3) and -1 <= loaded.min() <= loaded.max() <= 1
  captions = sampler.image_to_text(loaded[None]) + sampler.audio_to_text(clip[None])
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
  with pytest.raises(sampling.InputError, match='not a readable'):
    sampling.load_wav(image, 16_000, 100)
  with pytest.raises(sampling.InputError, match='not a readable'):
    sampling.load_image(path, 32)


def test_zero_refinement_steps_is_the_generator_alone(workdir):
  s0 = sampling.Sampler.from_workdir(workdir, refine_steps=0)
  pre, post = s0.text_to_image([PROMPTS[0]], num_samples=2, seed=1)
  np.testing.assert_array_equal(pre, post)
  with pytest.raises(ValueError, match='refine_steps'):
    sampling.Sampler.from_workdir(workdir, refine_steps=-1)


def test_exported_examples_are_the_held_out_ones(sampler, tmp_path):
  """export_examples writes held-out example i as files that load back as that example's audio and image."""
  written = sampling.export_examples(sampler.config.data, str(tmp_path), 2, start=3)
  spec = shapes.ShapesSpec(image_size=sampler.image_size, sample_rate=sampler.sample_rate,
                           audio_seconds=sampler.audio_samples / sampler.sample_rate)
  for i, files in zip((3, 4), written):
    ex = shapes.make_example(spec, sampler.config.data.seed, 'test', i)
    assert files['image'].endswith(f'example_{i}.png') and files['caption'] == ex['captions'][0]
    clip = sampling.load_wav(files['audio'], sampler.sample_rate, sampler.audio_samples)
    np.testing.assert_allclose(clip, ex['audio'], atol=1.0 / 32768)  # 16-bit PCM
    np.testing.assert_array_equal(np.asarray(Image.open(files['image'])), ex['image'])
    lines = open(files['text']).read().splitlines()
    assert lines[:-1] == ex['captions'] and shapes.canonical_caption(ex['attributes']) in lines[-1]
  with pytest.raises(sampling.InputError, match='synthetic'):
    sampling.export_examples(smoke_config(**{'data.name': 'coco'}).data, str(tmp_path), 1)


def test_cli_writes_every_output_and_fails_in_one_line(workdir, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  # The inputs a new user gets from the run itself: held-out examples exported as files.
  proc = subprocess.run([sys.executable, 'launch/export_examples.py', f'--workdir={workdir}', '--num=2',
                         f'--out={tmp_path}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  wav, png = str(tmp_path / 'example_0.wav'), str(tmp_path / 'example_1.png')
  out = tmp_path / 'out'
  args = [sys.executable, 'launch/sample.py', f'--workdir={workdir}', f'--out={out}', '--num_samples=3',
          '--seed=2', f'--prompt={PROMPTS[0]}', f'--prompt={PROMPTS[1]}', f'--audio={wav}', f'--image={png}']
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  for name, rows in (('text_to_image', 2), ('audio_to_image', 1)):
    for suffix in ('', '_unrefined'):
      grid = np.asarray(Image.open(out / f'{name}{suffix}.png'))
      assert grid.shape == (rows * 97 + 1, 3 * 97 + 1, 3), (name, grid.shape)  # 32 px tiles x3, 1 px borders
      tile = grid[1:97, 1:97]  # nearest-neighbour: every 3x3 block is one generated pixel
      assert np.array_equal(tile, tile[::3, ::3].repeat(3, 0).repeat(3, 1)), name
  lines = (out / 'captions.txt').read_text().splitlines()
  assert [line.split('\t')[0] for line in lines] == [wav, png]
  assert 'Checkpoint step 2' in proc.stdout and 'Wrote' in proc.stdout
  for bad, message in (([f'--image={tmp_path}/missing.png'], 'no such file'),
                       (['--prompt=x', f'--workdir={tmp_path}'], 'no checkpoints'),
                       ([], 'nothing to do')):
    argv = [sys.executable, 'launch/sample.py', f'--workdir={workdir}', *bad]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, (bad, p.stderr[-2000:])
    assert p.stderr.strip().splitlines()[-1].startswith('error: ') and message in p.stderr, (bad, p.stderr)


def test_hostile_input_files_are_one_clear_error(tmp_path):
  """Malformed, truncated, hostile and enormous --image / --audio files: an InputError naming the file, or (a
  long clip) only the samples kept are read."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top
  from scipy.io import wavfile  # pylint: disable=g-import-not-at-top

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
  bomb = tmp_path / 'bomb.png'  # a valid header claiming 10000 x 8000 pixels (a decompression bomb's first bytes)
  bomb.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 10_000, 8_000, 8, 2, 0, 0, 0))
                   + chunk(b'IEND', b''))
  with pytest.raises(sampling.InputError, match=r'bomb.png: 10000x8000 pixels is more than'):
    sampling.load_image(str(bomb), 32)
  good = tmp_path / 'good.png'
  Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(good)
  cut = tmp_path / 'cut.png'
  cut.write_bytes(good.read_bytes()[:70])
  with pytest.raises(sampling.InputError, match='cut.png: not a readable image'):
    sampling.load_image(str(cut), 32)
  long_wav = tmp_path / 'long.wav'  # 10 minutes at 8 kHz: resampled to 16 kHz, only the first 0.1 s is kept
  wavfile.write(long_wav, 8000, (np.sin(np.arange(8000 * 600) * 0.05) * 20000).astype(np.int16))
  clip = sampling.load_wav(str(long_wav), 16_000, 1600)
  assert clip.shape == (1600,) and 0.5 < np.abs(clip).max() < 0.7
  header_only = tmp_path / 'header.wav'
  header_only.write_bytes(long_wav.read_bytes()[:44])
  bad_rate = tmp_path / 'rate0.wav'
  raw = bytearray(long_wav.read_bytes()[:4000])
  raw[24:28] = struct.pack('<I', 0)  # the fmt chunk's sample rate
  bad_rate.write_bytes(bytes(raw))
  for f in (header_only, bad_rate, good):
    with pytest.raises(sampling.InputError, match=f'{f.name}: '):
      sampling.load_wav(str(f), 16_000, 1600)
