"""Generation from a trained workdir: text -> images, audio -> images, image -> captions, audio -> captions.

What launch/sample.py runs. The model is restored from a checkpoint (the newest, or a given step) and sampled
with its EMA generator and refiner, through the same compiled functions the evaluator uses (so a sample here is
what the evaluation scored). Inputs come from files: a wav (any sample rate, mono or the channels averaged,
resampled to the model's rate and cut or zero-padded to its clip length) and an image (any size PIL reads,
centre-cropped to a square and resized to the model's resolution).

  sampler = Sampler.from_workdir('runs/shapes')
  pre, post = sampler.text_to_image(['a large red circle in the top left'], num_samples=8, seed=0)
  captions = sampler.image_to_text(load_image('photo.png', sampler.image_size))
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import signal
from scipy.io import wavfile

from mmgan_jax import config_io
from mmgan_jax.train import sharding, summaries

log = logging.getLogger(__name__)


class InputError(ValueError):
  """An input file that cannot be used (missing, unreadable, wrong kind); the message says which and why."""


# ------------------------------------------------------------------------------------------------------------
# Input files.


def load_wav(path: str, sample_rate: int, num_samples: int) -> np.ndarray:
  """A wav file as float32 (num_samples,) mono at `sample_rate`: channels averaged, resampled (polyphase),
  then the first num_samples kept or zero-padded at the end."""
  if not os.path.isfile(path):
    raise InputError(f'--audio={path}: no such file.')
  try:  # memory-mapped: an hours-long file costs only the samples kept
    rate, data = wavfile.read(path, mmap=True)
  except ValueError:  # formats scipy cannot map (e.g. 24-bit PCM) are read whole
    try:
      rate, data = wavfile.read(path)
    except Exception as e:  # pylint: disable=broad-except  (a malformed or hostile header: anything goes)
      raise InputError(f'--audio={path}: not a readable wav file ({type(e).__name__}: {e}).') from None
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f'--audio={path}: not a readable wav file ({type(e).__name__}: {e}).') from None
  if not rate or rate <= 0:
    raise InputError(f'--audio={path}: the header gives a sample rate of {rate}.')
  keep = int(math.ceil(num_samples * rate / sample_rate)) + 64  # what the first num_samples at our rate need
  x = np.array(data[:keep])
  if x.size == 0:
    raise InputError(f'--audio={path}: the file has no samples.')
  if np.issubdtype(x.dtype, np.integer):  # PCM: scale to [-1, 1)
    x = x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1) if x.dtype != np.uint8 else (x - 128.0) / 128.0
  x = x.astype(np.float64)
  if x.ndim == 2:
    x = x.mean(axis=1)
  if not np.all(np.isfinite(x)):
    raise InputError(f'--audio={path}: the file holds NaN or Inf samples.')
  if rate != sample_rate:
    g = math.gcd(int(rate), int(sample_rate))
    x = signal.resample_poly(x, sample_rate // g, int(rate) // g)
  out = np.zeros(num_samples, np.float32)
  n = min(num_samples, len(x))
  out[:n] = x[:n]
  return out


MAX_IMAGE_PIXELS = 50_000_000  # a 7000 x 7000 photo; anything larger is refused before decoding


def load_image(path: str, size: int) -> np.ndarray:
  """An image file as float32 (size, size, 3) in [-1, 1]: RGB, centre square crop, bicubic resize."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(f'--image={path}: no such file.')
  try:
    with Image.open(path) as im:
      if im.width * im.height > MAX_IMAGE_PIXELS:  # checked from the header, before anything is decoded
        raise InputError(f'--image={path}: {im.width}x{im.height} pixels is more than the {MAX_IMAGE_PIXELS:,} '
                         'accepted; downscale it first.')
      im = im.convert('RGB')
      w, h = im.size
      s = min(w, h)
      left, top = (w - s) // 2, (h - s) // 2
      im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
      arr = np.asarray(im, np.float32)
  except InputError:
    raise
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
    raise InputError(f'--image={path}: not a readable image ({type(e).__name__}: {e}).') from None
  return arr / 127.5 - 1.0


def export_examples(data_config, out: str, num: int, *, start: int = 0) -> list[dict[str, str]]:
  """Writes held-out examples of the synthetic set as the files launch/sample.py reads.

  Example i of the held-out split (the one the evaluation scores, for `data_config`'s seed, size and clip
  length) becomes OUT/example_<i>.png (the image), OUT/example_<i>.wav (the 16-bit mono clip) and
  OUT/example_<i>.txt (its captions, one per line, then its attributes). Returns one dict of paths (and the
  first caption) per example. Real datasets are files already: for them this raises InputError.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data import registry, shapes  # pylint: disable=g-import-not-at-top
  if data_config.name != 'shapes':
    raise InputError(f'example export is for the synthetic set; {data_config.name!r} examples are files already '
                     '(use its images / wav clips directly).')
  if num < 1 or start < 0:
    raise InputError(f'need num >= 1 and start >= 0, got num={num}, start={start}.')
  spec = registry.shapes_spec(data_config)
  os.makedirs(out, exist_ok=True)
  written = []
  for i in range(start, start + num):
    ex = shapes.make_example(spec, data_config.seed, 'test', i)
    stem = os.path.join(out, f'example_{i}')
    Image.fromarray(ex['image']).save(stem + '.png')
    pcm = np.round(np.clip(ex['audio'], -1.0, 32767 / 32768) * 32768).astype(np.int16)
    wavfile.write(stem + '.wav', spec.sample_rate, pcm)
    ids = ', '.join(f'{n}={int(a)}' for n, a in zip(shapes.ATTRIBUTE_NAMES, ex['attributes']))
    with open(stem + '.txt', 'w') as f:
      f.write('\n'.join(ex['captions']) + f'\n# attributes: {shapes.canonical_caption(ex["attributes"])} '
              f'({ids})\n')
    written.append(dict(image=stem + '.png', audio=stem + '.wav', text=stem + '.txt', caption=ex['captions'][0]))
  return written


def save_png(images: np.ndarray, path: str, columns: int) -> str:
  """(N, H, W, 3) images in [-1, 1] -> one PNG grid with `columns` per row, tiles upscaled (nearest neighbour)
  to at least summaries.MIN_TILE_PIXELS; returns the path."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = summaries.image_grid(images, columns=columns)[0]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.round(grid * 255.0).astype(np.uint8)).save(path)
  return path


# ------------------------------------------------------------------------------------------------------------
# The sampler.


class Sampler:
  """A restored model and its evaluator's compiled sampling and captioning functions, on one device (the
  checkpoint is restored onto it whatever mesh it was saved from)."""

  def __init__(self, setup, evaluator):
    self.setup = setup
    self.evaluator = evaluator
    self.model = setup.model
    self.config = setup.config
    self.codec = setup.data.text_codec
    self.step = int(jax.device_get(setup.state.step))

  @classmethod
  def from_workdir(cls, workdir: str, *, config=None, step: int | None = None,
                   refine_steps: int | None = None) -> 'Sampler':
    """Restores `workdir`'s newest (or `step`) checkpoint; the config is WORKDIR/config.json unless given.

    Raises:
      FileNotFoundError: no workdir, checkpoint or config.
      ValueError: refine_steps < 0, or a config the checkpoint does not fit.
    """
    from mmgan_jax.train import trainer  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(os.path.join(workdir, 'checkpoints')):  # before reading config.json: the clearer error
      raise FileNotFoundError(f'no checkpoints in {workdir}: train first (launch/train.py --workdir={workdir}).')
    config = copy.deepcopy(config if config is not None else config_io.load(workdir))
    if refine_steps is not None and refine_steps < 0:
      raise ValueError(f'--refine_steps must be >= 0, got {refine_steps}.')
    with config.unlocked():
      config.eval.evaluators = ()  # sampling scores nothing (and FID would need its weights)
      if refine_steps is not None:
        config.refine.num_steps = int(refine_steps)
      config.mesh.shape = (1,) * len(config.mesh.axes)  # one device, whatever mesh the run trained on
    s = trainer.restore_trained(config, workdir, step=step, devices=jax.local_devices()[:1])
    evaluator = trainer.make_evaluator(s, None)
    return cls(s, evaluator)

  @property
  def image_size(self) -> int:
    return int(self.model.image_shape[0])

  @property
  def sample_rate(self) -> int:
    return int(self.setup.data.sample_rate)

  @property
  def audio_samples(self) -> int:
    return int(self.setup.data.audio_samples)

  def _batch(self, n: int, *, text: Sequence[str] | None = None, audio: np.ndarray | None = None,
             image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A model input batch of n rows; the inputs not given are zeros (and marked missing by the caller)."""
    h, w, c = self.model.image_shape
    length = self.model.max_text_len
    batch = {'image': np.zeros((n, h, w, c), np.float32) if image is None else np.asarray(image, np.float32),
             'text_ids': np.full((n, length), self.codec.pad_id, np.int32),
             'text_mask': np.zeros((n, length), bool)}
    if text is not None:
      batch['text_ids'], batch['text_mask'] = self.codec.encode_batch(list(text), length)
    if 'audio' in self.model.modalities:
      batch['audio'] = (np.zeros((n, self.audio_samples), np.float32) if audio is None
                        else np.asarray(audio, np.float32))
    return batch

  def _need(self, modality: str, what: str) -> None:
    if modality not in self.model.modalities:
      raise InputError(f'{what}: this model has no {modality} encoder (config.model.modalities='
                       f'{self.model.modalities}).')

  def _chunks(self, batch: dict[str, np.ndarray]):
    size = self.evaluator.batch_size
    n = len(batch['image'])
    for i in range(0, n, size):
      yield {k: v[i:i + size] for k, v in batch.items()}

  def _generate(self, batch: dict[str, np.ndarray], sources: tuple[str, ...], seed: int):
    key = jax.random.PRNGKey(seed)
    pre, post = [], []
    with sharding.use_mesh(self.setup.mesh, self.config.partition_rules):
      for i, chunk in enumerate(self._chunks(batch)):
        a, b = self.evaluator.samples(self.setup.state, chunk, sources, key=jax.random.fold_in(key, i))
        pre.append(a)
        post.append(b)
    return np.concatenate(pre), np.concatenate(post)

  def text_to_image(self, prompts: Sequence[str], *, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(before refinement, refined) images in [-1, 1], (len(prompts) * num_samples, H, W, 3), prompt-major."""
    self._need('text', '--prompt')
    if not prompts or any(not p.strip() for p in prompts):
      raise InputError('--prompt: every prompt must be a non-empty text.')
    text = [p for p in prompts for _ in range(num_samples)]
    return self._generate(self._batch(len(text), text=text), ('text',), seed)

  def audio_to_image(self, clips: np.ndarray, *, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """clips (N, audio_samples) -> (pre, refined) images, (N * num_samples, H, W, 3), clip-major."""
    self._need('audio', '--audio')
    audio = np.repeat(np.asarray(clips, np.float32), num_samples, axis=0)
    return self._generate(self._batch(len(audio), audio=audio), ('audio',), seed)

  def _caption(self, batch: dict[str, np.ndarray], sources: tuple[str, ...]) -> list[str]:
    if self.model.text_decoder is None:
      raise InputError('captions: this model has no text decoder (it was trained without text).')
    out = []
    with sharding.use_mesh(self.setup.mesh, self.config.partition_rules):
      for chunk in self._chunks(batch):
        out += self.evaluator.captions(self.setup.state, chunk, sources)
    return out

  def image_to_text(self, images: np.ndarray) -> list[str]:
    """images (N, H, W, 3) in [-1, 1] at the model's size -> N captions."""
    images = np.asarray(images, np.float32)
    if images.shape[1:] != tuple(self.model.image_shape):
      raise InputError(f'images must be (N, {", ".join(map(str, self.model.image_shape))}), got {images.shape}.')
    return self._caption(self._batch(len(images), image=images), ('image',))

  def audio_to_text(self, clips: np.ndarray) -> list[str]:
    """clips (N, audio_samples) -> N captions written from the audio alone."""
    self._need('audio', '--audio')
    clips = np.asarray(clips, np.float32)
    return self._caption(self._batch(len(clips), audio=clips), ('audio',))
