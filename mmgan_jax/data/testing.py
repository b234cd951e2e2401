"""Tiny on-disk datasets in the real formats, made locally: for the tests and the pipeline benchmark.

Nothing here downloads anything. `make_coco_captions` runs the real TFDS ``coco_captions`` builder on a small
fake copy of the raw COCO 2014 files (JPEGs, the instances JSON, Karpathy's dataset_coco.json), so the reader
is tested on exactly the array_record files a user gets from ``launch/prepare_coco.py`` (``tfds build coco_captions``).
`make_conceptual_captions` writes the caption TSV and the image folder. Images are random-noise JPEGs whose
mean colour identifies the example (``example_colour``), so a test can tell which example a batch row holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from unittest import mock

import numpy as np
from PIL import Image

COCO_CATEGORIES = 80  # the coco/2014 builder's ClassLabel has 80 names


def example_colour(index: int) -> np.ndarray:
  """The mean RGB colour of fixture image `index` (distinct for the first few hundred indices)."""
  rng = np.random.default_rng([7, index])
  return rng.integers(40, 216, 3).astype(np.float32)


def write_image(path: str, index: int, size: tuple[int, int], *, noise: float = 20.0) -> None:
  """A JPEG of height x width `size`: colour `example_colour(index)` plus pixel noise."""
  rng = np.random.default_rng([11, index])
  h, w = size
  pixels = example_colour(index) + rng.normal(0.0, noise, (h, w, 3))
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def corrupt_file(path: str, how: str) -> None:
  """Breaks a file in place: 'truncate' keeps the first quarter of its bytes, 'garbage' overwrites it."""
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 4] if how == 'truncate' else b'not an image at all' * 8)


def caption(index: int, k: int) -> str:
  return f'photo number {index} seen from view {k}'


def make_coco_captions(root: str, *, num_train: int = 12, num_restval: int = 4, num_val: int = 2,
                       num_test: int = 6, image_size: tuple[int, int] = (48, 64), captions_per_image: int = 5,
                       corrupt: Sequence[tuple[str, int, str]] = ()) -> str:
  """Builds TFDS coco_captions (array_record) from a fake raw COCO tree under `root`; returns the data_dir.

  Example i of every split gets image `write_image(.., i + offset)` and captions `caption(i + offset, k)`,
  where the offsets number the examples across splits: train 0.., restval, val, test after it (see the
  returned layout in `root/layout.json`). `corrupt` lists (split, index, 'truncate'|'garbage') images to break
  after they are written (the builder stores the file bytes as they are).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  raw = os.path.join(root, 'raw')
  counts = dict(train=num_train, restval=num_restval, val=num_val, test=num_test)
  layout, karpathy, offset = {}, [], 0
  images = {'train2014': [], 'val2014': []}
  for split, n in counts.items():
    folder = 'train2014' if split == 'train' else 'val2014'  # Karpathy's val/test/restval come from val2014
    os.makedirs(os.path.join(raw, folder, folder), exist_ok=True)
    layout[split] = []
    for i in range(n):
      index = offset + i
      name = f'COCO_{folder}_{index + 1:012d}.jpg'
      path = os.path.join(raw, folder, folder, name)
      h, w = image_size if index % 2 else image_size[::-1]
      write_image(path, index, (h, w))
      if (split, i, 'truncate') in corrupt or (split, i, 'garbage') in corrupt:
        corrupt_file(path, 'truncate' if (split, i, 'truncate') in corrupt else 'garbage')
      images[folder].append(dict(id=index + 1, file_name=name, height=h, width=w))
      karpathy.append(dict(filename=name, split=split, sentences=[
          dict(raw=caption(index, k), sentid=index * captions_per_image + k) for k in range(captions_per_image)]))
      layout[split].append(index)
    offset += n
  paths = {}
  for folder, kind in (('train2014', 'train'), ('val2014', 'validation')):
    ann = os.path.join(raw, f'{folder}_annotations', 'annotations')
    os.makedirs(ann, exist_ok=True)
    with open(os.path.join(ann, f'instances_{folder}.json'), 'w') as f:
      json.dump(dict(images=images[folder], annotations=[], categories=[
          dict(id=c + 1, name=f'category{c}', supercategory='thing') for c in range(COCO_CATEGORIES)]), f)
    paths[f'{kind}_images'] = os.path.join(raw, folder)
    paths[f'{kind}_annotations'] = os.path.dirname(ann)
  os.makedirs(os.path.join(raw, 'karpathy'), exist_ok=True)
  with open(os.path.join(raw, 'karpathy', 'dataset_coco.json'), 'w') as f:
    json.dump(dict(images=karpathy), f)
  paths['karpathy_and_li_splits'] = os.path.join(raw, 'karpathy')
  with open(os.path.join(root, 'layout.json'), 'w') as f:
    json.dump(layout, f)

  def download_and_extract(self, urls):  # the builder's only network call, answered from the fake tree
    del self
    return {k: paths.get(k, os.path.join(raw, 'unused')) for k in urls}

  data_dir = os.path.join(root, 'tfds')
  with mock.patch.object(tfds.download.DownloadManager, 'download_and_extract', download_and_extract):
    tfds.builder('coco_captions', data_dir=data_dir).download_and_prepare(file_format='array_record')
  return data_dir


def make_conceptual_captions(root: str, *, num_train: int = 12, num_validation: int = 6,
                             image_size: tuple[int, int] = (40, 56), missing: Sequence[tuple[str, int]] = (),
                             corrupt: Sequence[tuple[str, int, str]] = ()) -> str:
  """Writes `root/{split}.tsv` (caption<TAB>url) and the images `root/{split}/{shard}/{row:09d}.jpg`.

  Row i of a split holds example `offset + i` (train first). `missing` rows get no image (never downloaded);
  `corrupt` rows get a broken one. Returns `root` (the data_dir).
  """
  offset = 0
  for split, n in (('train', num_train), ('validation', num_validation)):
    with open(os.path.join(root, f'{split}.tsv'), 'w', encoding='utf-8') as f:
      for row in range(n):
        f.write(f'{caption(offset + row, 0)}\thttp://example.invalid/{split}/{row}.jpg\n')
        if (split, row) in missing:
          continue
        folder = os.path.join(root, split, f'{row // 10_000:05d}')
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f'{row:09d}.jpg')
        write_image(path, offset + row, image_size)
        for how in ('truncate', 'garbage'):
          if (split, row, how) in corrupt:
            corrupt_file(path, how)
    offset += n
  return root


VGGSOUND_LABELS = ('playing bass guitar', 'dog barking', 'rain on surface', 'church bell ringing')


def vggsound_audio(index: int, num_samples: int) -> np.ndarray:
  """Fixture clip `index`'s int16 audio: a ramp (sample j holds j + 8 * index), so a window of a known clip says
  where it starts."""
  return (np.arange(num_samples) + 8 * index).astype(np.int16)


def make_vggsound(root: str, *, num_train: int = 10, num_test: int = 4, clip_seconds: float = 1.0,
                  sample_rate: int = 16_000, frame_size: int = 48, missing: Sequence[int] = ()) -> tuple[str, str]:
  """Builds VGGSound array_record shards with our TFDS builder from pre-extracted wav + jpg clips.

  Clip i (train first, then test) has label VGGSOUND_LABELS[i % 4], audio `vggsound_audio(i, ..)`, and a frame
  of colour `example_colour(i)`; clips listed in `missing` are in the index but have no files. Returns
  (data_dir, tfds_name) for config.data.
  """
  import wave  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data.vggsound import vggsound_dataset_builder as vgg  # pylint: disable=g-import-not-at-top
  manual = os.path.join(root, 'manual')
  for sub in ('audio', 'frames'):
    os.makedirs(os.path.join(manual, sub), exist_ok=True)
  rows = []
  n = int(round(clip_seconds * sample_rate))
  for i in range(num_train + num_test):
    youtube_id, start = f'clip{i:07d}', 10 * i
    rows.append(f'{youtube_id},{start},"{VGGSOUND_LABELS[i % len(VGGSOUND_LABELS)]}",'
                f'{"train" if i < num_train else "test"}\n')
    if i in missing:
      continue
    clip = vgg.clip_id(youtube_id, start)
    with wave.open(os.path.join(manual, 'audio', f'{clip}.wav'), 'wb') as w:
      w.setnchannels(1)
      w.setsampwidth(2)
      w.setframerate(sample_rate)
      w.writeframes(vggsound_audio(i, n).tobytes())
    write_image(os.path.join(manual, 'frames', f'{clip}.jpg'), i, (frame_size, frame_size * 4 // 3))
  with open(os.path.join(manual, 'vggsound.csv'), 'w') as f:
    f.writelines(rows)
  config = vgg.make_config(sample_rate=sample_rate, clip_seconds=clip_seconds, frame_size=frame_size)
  data_dir = os.path.join(root, 'tfds')
  builder = vgg.Vggsound(config=config, data_dir=data_dir, num_workers=1)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False),
      file_format='array_record')
  return data_dir, f'vggsound/{config.name}'
