"""Random-access sources for the real datasets: COCO Captions and VGGSound (TFDS array_record) and Conceptual
Captions (caption TSV + a folder of downloaded images).

Anchor: the grain + ``tfds.data_source`` recipe of big_vision / maxtext: a TFDS dataset prepared once as
array_record is read by index, so grain can shard, shuffle and checkpoint it exactly. Images are read as
their encoded bytes (``tfds.decode.SkipDecoding``) and decoded here once, straight to the training size
(``decode_image``), which is several times cheaper than decoding full-size COCO images and resizing them.

Every source returns "raw" records, nothing decoded yet:
``{'image': bytes, 'captions': list[str], 'key': str}`` plus ``'audio': int16 (n,)`` for VGGSound. Decoding
happens inside ``records.SkipBadRecords`` (see ``Decoded``), so a corrupt image or a short clip is one
skipped and counted record, never a crash.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# What each real dataset is and how a user prepares it. `{data_dir}` is filled in from the config.
PREPARE = {
    'coco': ('COCO Captions (TFDS coco_captions, Karpathy splits)',
             'python launch/prepare_coco.py --data_dir={data_dir}',
             '{data_dir}/coco_captions/2014/<version>/'),
    'vggsound': ('VGGSound (built from the vggsound.csv index and your downloaded 10 s clips)',
                 'python launch/prepare_vggsound.py --manual_dir=<your clips> --data_dir={data_dir}',
                 '{data_dir}/vggsound/<config>/<version>/'),
    'cc': ('Conceptual Captions (the caption TSVs plus your downloaded images)',
           'put train.tsv / validation.tsv (the official caption<TAB>url files, renamed) and the folders '
           'train/ and validation/ with the images named by TSV row (img2dataset --output_format files) in '
           '{data_dir}',
           '{data_dir}/train.tsv, {data_dir}/train/'),
}


class DatasetUnavailableError(RuntimeError):
  """A dataset the config names is not available on this machine."""


def unavailable(name: str, data_dir: str, detail: str) -> DatasetUnavailableError:
  """The one message a missing dataset gets: what is missing, where it was looked for, how to prepare it."""
  what, command, where = PREPARE[name]
  data_dir = data_dir or '<DIR>'
  return DatasetUnavailableError(
      f"config.data.name='{name}' needs {what}, which is not in config.data.data_dir={data_dir!r} ({detail}). "
      f'Prepare it with: {command.format(data_dir=data_dir)} (expected at {where.format(data_dir=data_dir)}), '
      f'then pass --config.data.data_dir={data_dir}. Nothing is downloaded at run time.')


# ------------------------------------------------------------------------------------------------ decoding
def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 (size, size, 3): centre square crop, bicubic resize (antialiased).

  JPEGs are decoded at the smallest 1/2^k scale whose sides stay >= `size` (PIL's ``draft``), so a 640x480
  COCO image bound for 256x256 is decoded at 320x240-or-larger instead of full size.
  Raises (PIL's errors) on a corrupt or truncated file; ``SkipBadRecords`` counts that record.
  """
  with Image.open(io.BytesIO(data)) as im:
    im.draft('RGB', (size, size))
    im = im.convert('RGB')
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


class Decoded:
  """A raw source with its images decoded to `image_size` and its audio converted to float32 in [-1, 1]."""

  def __init__(self, source, image_size: int):
    self.source, self.image_size = source, int(image_size)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = self.source[index]
    out = dict(image=decode_image(raw['image'], self.image_size), captions=list(raw['captions']), key=raw['key'])
    if 'audio' in raw:
      out['audio'] = np.asarray(raw['audio'], np.int16).astype(np.float32) * np.float32(1 / 32768)
    return out

  def __repr__(self) -> str:
    return f'Decoded({self.source!r}, image_size={self.image_size})'


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------------------------ TFDS
def tfds_source(name: str, tfds_name: str, data_dir: str, split: str):
  """``tfds.data_source`` with images left encoded; a dataset that is not prepared is DatasetUnavailableError."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy; only the real datasets need it
  if not data_dir:
    raise unavailable(name, data_dir, 'config.data.data_dir is empty')
  if not os.path.isdir(data_dir):
    raise unavailable(name, data_dir, 'the directory does not exist')
  if name == 'vggsound':
    from mmgan_jax.data.vggsound import vggsound_dataset_builder  # pylint: disable=g-import-not-at-top,unused-import  # registers the builder
  if not os.path.isdir(os.path.join(data_dir, tfds_name.split('/')[0])):
    raise unavailable(name, data_dir, f'it has no {tfds_name.split("/")[0]}/ folder')
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
  except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, AssertionError, NotImplementedError) as e:
    raise unavailable(name, data_dir, f'{tfds_name} split {split!r}: {type(e).__name__}: {e}') from None
  except ValueError as e:  # e.g. an unknown split, or a dataset prepared in another file format
    raise unavailable(name, data_dir, f'{tfds_name} split {split!r}: {e}') from None


class CocoCaptions:
  """TFDS ``coco_captions`` (Karpathy splits: train 82,783, restval 30,504, val 5,000, test 5,000 images),
  every reference caption of an image kept (usually 5)."""

  def __init__(self, data_dir: str, split: str, tfds_name: str = 'coco_captions'):
    self.split = split
    self._ds = tfds_source('coco', tfds_name, data_dir, split)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    r = self._ds[int(index)]
    return dict(image=r['image'], captions=[_text(t) for t in r['captions']['text']],
                key=_text(r['image/filename']))

  def __repr__(self) -> str:
    return f'CocoCaptions({self.split!r}, {len(self)} images)'


class VGGSound:
  """The VGGSound array_record shards written by launch/prepare_vggsound.py: 16 kHz int16 mono audio, one
  video frame, and the class label, which is the text ('playing bass guitar')."""

  def __init__(self, data_dir: str, split: str, tfds_name: str = 'vggsound'):
    self.split = split
    self._ds = tfds_source('vggsound', tfds_name, data_dir, split)

  def check_audio(self, sample_rate: int, samples: int) -> None:
    """Raises a ValueError unless the clips are at `sample_rate` and hold at least `samples` samples."""
    info = self._ds.dataset_info
    stored = int(info.features['audio'].shape[0])
    rate = int((info.metadata or {}).get('sample_rate', sample_rate))
    name = f'vggsound/{info.config_name}'
    if rate != sample_rate:
      raise ValueError(f'config.data.sample_rate={sample_rate}, but {name} was built at {rate} Hz; set '
                       f'--config.data.sample_rate={rate} or rebuild with --sample_rate={sample_rate}.')
    if samples > stored:
      raise ValueError(f'config.data.audio_seconds asks for {samples} samples ({samples / rate:g} s), but the clips '
                       f'of {name} hold {stored} ({stored / rate:g} s); lower config.data.audio_seconds or rebuild '
                       'with a longer --clip_seconds.')

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    r = self._ds[int(index)]
    return dict(image=r['image'], captions=[_text(r['label'])], key=_text(r['clip']), audio=r['audio'])

  def __repr__(self) -> str:
    return f'VGGSound({self.split!r}, {len(self)} clips)'


# ------------------------------------------------------------------------------------------------ CC
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')


def _image_index(folder: str) -> dict[int, str]:
  """Row number -> image path for every image file under `folder` whose name (without suffix) is a number."""
  index = {}
  for root, _, files in os.walk(folder):
    for f in files:
      stem, suffix = os.path.splitext(f)
      if suffix.lower() in IMAGE_SUFFIXES and stem.isdigit():
        index[int(stem)] = os.path.join(root, f)
  return index


class ConceptualCaptions:
  """Conceptual Captions: ``{data_dir}/{split}.tsv`` (the official caption<TAB>url file, no header) plus the
  downloaded images under ``{data_dir}/{split}/``, each named by its 0-based TSV row (``000001234.jpg``, in
  any sub-folders: the layout of ``img2dataset --output_format files`` run on the TSV in its order).

  Rows whose image was never downloaded (typically 10-30 % of CC: dead links) are left out and their number is
  logged once; a downloaded file that turns out corrupt is a bad record, skipped and counted in training.
  """

  def __init__(self, data_dir: str, split: str):
    self.split = split
    tsv, folder = os.path.join(data_dir, f'{split}.tsv'), os.path.join(data_dir, split)
    if not data_dir:
      raise unavailable('cc', data_dir, 'config.data.data_dir is empty')
    for path in (tsv, folder):
      if not os.path.exists(path):
        raise unavailable('cc', data_dir, f'{path} does not exist')
    images = _image_index(folder)
    self._rows: list[tuple[str, str, int]] = []  # (caption, image path, TSV row)
    rows = malformed = 0
    with open(tsv, encoding='utf-8', newline='') as f:
      for row, fields in enumerate(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE)):
        rows += 1
        if len(fields) < 1 or not fields[0].strip():
          malformed += 1
          continue
        path = images.get(row)
        if path is not None:
          self._rows.append((fields[0].strip(), path, row))
    self.num_rows, self.num_missing = rows, rows - malformed - len(self._rows)
    if not self._rows:
      raise unavailable('cc', data_dir, f'none of the {rows} rows of {tsv} has an image in {folder} '
                        '(images must be named by their 0-based TSV row, e.g. 000000017.jpg)')
    log.info('Conceptual Captions %s: %d of %d rows have a downloaded image (%d not downloaded, %d malformed '
             'rows); the rest are left out.', split, len(self._rows), rows, self.num_missing, malformed)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict[str, Any]:
    caption, path, row = self._rows[int(index)]
    with open(path, 'rb') as f:
      return dict(image=f.read(), captions=[caption], key=str(row))

  def captions(self) -> Iterator[str]:
    return (c for c, _, _ in self._rows)

  def __repr__(self) -> str:
    return f'ConceptualCaptions({self.split!r}, {len(self)} images)'


def all_captions(source) -> Iterator[str]:
  """Every caption of a raw source, in index order (for learning the vocabulary)."""
  if hasattr(source, 'captions'):
    yield from source.captions()
    return
  for i in range(len(source)):
    try:
      yield from source[i]['captions']
    except Exception as e:  # pylint: disable=broad-except  # an unreadable record adds no words
      log.warning('Record %d of %r is unreadable while collecting captions (%s); skipped.', i, source, e)
