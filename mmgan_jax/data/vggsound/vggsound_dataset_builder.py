r"""VGGSound (Chen, Xie, Vedaldi, Zisserman, ICASSP 2020) as a TFDS builder over locally downloaded clips.

Anchor: the official index `vggsound.csv` (https://www.robots.ox.ac.uk/~vgg/data/vggsound/): one row per 10 s
YouTube clip, `youtube_id,start_seconds,label,split`, split `train` or `test`. The clips themselves are not
distributable, so users download them (the common download scripts save the already-cut 10 s clip as
`{youtube_id}_{start_seconds:06d}.mp4`) and this builder turns them into TFDS shards (array_record for grain).

Exact definition of one example (config `c`, default `16k_10s`):
  * `audio`: int16 [round(c.sample_rate * c.clip_seconds)], mono. The clip's first audio stream is decoded
    from the start of the file, down-mixed to mono and resampled to `c.sample_rate` s16 by FFmpeg's swresample
    (`av.AudioResampler`); the first `clip_seconds` are kept. Audio shorter than `c.min_seconds` (default
    0.9 * clip_seconds) is a truncated download and the clip is skipped; audio between `min_seconds` and
    `clip_seconds` is zero-padded at the end.
  * `image`: the video frame whose timestamp (relative to the first video frame) is nearest to
    `c.frame_time * min(duration, clip_seconds)` (default the middle of the stored window), as RGB, resized
    (PIL bicubic, antialiased) so that its SHORT side is `c.frame_size`, aspect ratio kept. Frames whose short
    side is already <= frame_size are stored as they are (never upscaled: upscaling adds bytes, not
    information; the input pipeline resizes to the model's resolution anyway). Stored as JPEG (quality 95).
  * `label` (the class name, text), `youtube_id`, `start_seconds` (int32), `clip` (`{youtube_id}_{start:06d}`).

Where a clip's files come from, per clip (no option to set): `video/{clip}.{mp4,mkv,webm,avi}` if one exists
(first in that order), else the pre-extracted pair `audio/{clip}.wav` + `frames/{clip}.jpg` (the wav in any
rate/channel layout, decoded with PyAV like the video's audio; the jpg with PIL; the jpg is taken as the
frame, whatever time it was taken at). A present but broken video is skipped, not replaced by an extracted pair.

Bad clips never stop the build: a clip that is missing, truncated or undecodable is skipped, counted per
reason (`SKIP_REASONS`), logged (the first few per split) and recorded in `Vggsound.skipped`; the builder
writes `skipped_clips.tsv` (a `#` summary, then one row per skipped clip) into the dataset directory
(`builder.data_dir`) together with the shards. A split with no usable clip at all is an error.

Output order is deterministic: within a split, examples are in clip-id order (TFDS shuffling is disabled), so
two builds from the same files give the same dataset. Decoding runs on `num_workers` threads (FFmpeg and PIL
release the GIL) with an ordered, bounded look-ahead, which does not change the order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import io
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

log = logging.getLogger(__name__)

INDEX_NAME = 'vggsound.csv'
REPORT_NAME = 'skipped_clips.tsv'
SPLITS = ('train', 'test')
VIDEO_DIR, AUDIO_DIR, FRAMES_DIR = 'video', 'audio', 'frames'
VIDEO_EXTENSIONS = ('mp4', 'mkv', 'webm', 'avi')  # preference order when several exist for one clip
DEFAULT_CONFIG_NAME = '16k_10s'
JPEG_QUALITY = 95
MAX_LOGGED_SKIPS = 10  # per split; every skip is in `skipped` and in the report

# Why a clip was skipped (the `reason` column of the report).
MISSING = 'missing'                  # no video file and no complete audio/ + frames/ pair
UNDECODABLE = 'undecodable'          # corrupt or unreadable container (video or wav)
NO_AUDIO_STREAM = 'no_audio_stream'  # the file has no audio stream
NO_VIDEO_FRAME = 'no_video_frame'    # the video has no video stream, or no frame could be decoded
AUDIO_TOO_SHORT = 'audio_too_short'  # decoded audio shorter than min_seconds (a truncated download)
BAD_IMAGE = 'bad_image'              # the extracted frames/{clip}.jpg is not a readable image
DUPLICATE = 'duplicate'              # the index lists the clip more than once in a split (the first is kept)
SKIP_REASONS = (MISSING, UNDECODABLE, NO_AUDIO_STREAM, NO_VIDEO_FRAME, AUDIO_TOO_SHORT, BAD_IMAGE, DUPLICATE)

_CITATION = """\
@inproceedings{chen2020vggsound,
  title={{VGGSound}: A Large-scale Audio-Visual Dataset},
  author={Chen, Honglie and Xie, Weidi and Vedaldi, Andrea and Zisserman, Andrew},
  booktitle={ICASSP},
  year={2020}
}"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
VGGSound clips come from YouTube and must be downloaded by you. Put into the manual dir (--manual_dir):

  vggsound.csv        the official index (https://www.robots.ox.ac.uk/~vgg/data/vggsound/), no header, rows
                      `youtube_id,start_seconds,label,split` with split `train` or `test` (labels containing
                      commas are quoted, as in the official file).
  and, per clip, with clip = {youtube_id}_{start_seconds:06d} (e.g. `-0jeONf82dE_000021`), EITHER
  video/{clip}.mp4    the already-cut 10 s clip, as the common download scripts save it
                      (.mkv, .webm and .avi are accepted too; audio and video in the same file)
  OR the pre-extracted pair
  audio/{clip}.wav    the clip's audio (any sample rate and channel count; resampled to mono)
  frames/{clip}.jpg   one frame of the clip (taken as the clip's image)

The builder uses video/ when a clip has a video file, else the audio/ + frames/ pair; clips may mix the
two layouts. Clips that are missing, truncated or undecodable are skipped and listed in skipped_clips.tsv
next to the built shards. Build with:

  python launch/prepare_vggsound.py --manual_dir=DIR --data_dir=OUT
"""


class SkippedClip(NamedTuple):
  """One clip left out of the dataset, and why."""
  split: str
  clip: str
  reason: str  # one of SKIP_REASONS
  detail: str  # what exactly was wrong (file, error message, length)


class IndexRow(NamedTuple):
  """One row of vggsound.csv."""
  youtube_id: str
  start_seconds: int
  label: str
  split: str

  @property
  def clip(self) -> str:
    return clip_id(self.youtube_id, self.start_seconds)


def clip_id(youtube_id: str, start_seconds: int) -> str:
  """The clip's file stem, `{youtube_id}_{start_seconds:06d}` (as the common download scripts name clips)."""
  return f'{youtube_id}_{int(start_seconds):06d}'


def _num_name(x: float) -> str:
  return f'{x:g}'.replace('.', 'p').replace('-', 'm')


@dataclasses.dataclass(eq=False)
class VggsoundConfig(tfds.core.BuilderConfig):
  """What one built VGGSound dataset contains (see the module docstring for the exact definition).

  Attributes:
    sample_rate: audio sample rate in Hz (mono int16).
    clip_seconds: seconds of audio stored per clip (from the start of the clip file).
    min_seconds: clips whose decoded audio is shorter are skipped as truncated; shorter-but-acceptable audio
      is zero-padded to clip_seconds. None means 0.9 * clip_seconds (9 s for the 10 s clips).
    frame_time: which frame to keep, as a fraction of the stored window (0.5 = the middle).
    frame_size: the stored frame's short side in pixels (smaller frames are not upscaled).
    limit: if > 0, only the first `limit` clips of each split (in clip-id order) are considered; for trial
      builds.
  """
  sample_rate: int = 16000
  clip_seconds: float = 10.0
  min_seconds: float | None = None
  frame_time: float = 0.5
  frame_size: int = 256
  limit: int = 0

  def __post_init__(self):
    if self.min_seconds is None:
      self.min_seconds = round(0.9 * self.clip_seconds, 6)
    if not (isinstance(self.sample_rate, (int, np.integer)) and self.sample_rate > 0):
      raise ValueError(f'VggsoundConfig.sample_rate must be a positive integer (Hz), got {self.sample_rate!r}.')
    if not self.clip_seconds > 0:
      raise ValueError(f'VggsoundConfig.clip_seconds must be positive, got {self.clip_seconds!r}.')
    if not 0 < self.min_seconds <= self.clip_seconds:
      raise ValueError(f'VggsoundConfig.min_seconds must be in (0, clip_seconds={self.clip_seconds}], got '
                       f'{self.min_seconds!r}.')
    if not 0.0 <= self.frame_time <= 1.0:
      raise ValueError(f'VggsoundConfig.frame_time is a fraction of the clip, in [0, 1]; got {self.frame_time!r}.')
    if not (isinstance(self.frame_size, (int, np.integer)) and self.frame_size > 0):
      raise ValueError(f'VggsoundConfig.frame_size must be a positive integer, got {self.frame_size!r}.')
    if not (isinstance(self.limit, (int, np.integer)) and self.limit >= 0):
      raise ValueError(f'VggsoundConfig.limit must be an integer >= 0 (0 = all clips), got {self.limit!r}.')
    if self.description is None:
      self.description = (
          f'{self.sample_rate} Hz mono int16 audio, {self.clip_seconds:g} s per clip (clips shorter than '
          f'{self.min_seconds:g} s skipped, shorter ones zero-padded); the frame at {self.frame_time:g} of the '
          f'window, short side {self.frame_size} px (never upscaled)'
          + (f'; first {self.limit} clips per split only' if self.limit else '') + '.')

  @property
  def num_samples(self) -> int:
    return int(round(self.sample_rate * self.clip_seconds))

  @property
  def min_samples(self) -> int:
    return int(round(self.sample_rate * self.min_seconds))


def make_config(*, name: str | None = None, sample_rate: int = 16000, clip_seconds: float = 10.0,
                min_seconds: float | None = None, frame_time: float = 0.5, frame_size: int = 256,
                limit: int = 0) -> VggsoundConfig:
  """A VggsoundConfig whose name says how it differs from the default (e.g. `16k_5s_128px`).

  The name is the dataset's directory under `data_dir/vggsound/`; read a non-default config back with
  `tfds.data_source('vggsound/<name>', data_dir=...)`. The default settings give the registered config
  itself (TFDS refuses a second config object under a registered name).

  Returns:
    The config (validated; raises ValueError on a bad value).
  """
  if name is None:
    name = f'{_num_name(sample_rate / 1000)}k_{_num_name(clip_seconds)}s'
    if frame_size != 256:
      name += f'_{frame_size}px'
    if min_seconds is not None and round(min_seconds, 6) != round(0.9 * clip_seconds, 6):
      name += f'_min{_num_name(min_seconds)}s'
    if frame_time != 0.5:
      name += f'_t{_num_name(frame_time)}'
    if limit:
      name += f'_first{limit}'
  config = VggsoundConfig(name=name, sample_rate=sample_rate, clip_seconds=clip_seconds, min_seconds=min_seconds,
                          frame_time=frame_time, frame_size=frame_size, limit=limit)
  registered = _REGISTERED.get(name)
  if registered is not None:
    if _settings(config) != _settings(registered):
      raise ValueError(f'config name {name!r} is the default config\'s, whose settings are '
                       f'{_settings(registered)}; give these settings another name.')
    return registered
  return config


def _settings(config: VggsoundConfig) -> dict[str, Any]:
  return {f: getattr(config, f) for f in ('sample_rate', 'clip_seconds', 'min_seconds', 'frame_time', 'frame_size',
                                          'limit')}


_REGISTERED: dict[str, VggsoundConfig] = {}
DEFAULT_CONFIG = _REGISTERED[DEFAULT_CONFIG_NAME] = make_config(name=DEFAULT_CONFIG_NAME)


# ----------------------------------------------------------------------------------------------- the index


def read_index(path: str | os.PathLike) -> list[IndexRow]:
  """Reads vggsound.csv (no header; a header-like first row is tolerated).

  Args:
    path: the csv file.

  Returns:
    The rows in file order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a row that is not `youtube_id,start_seconds,label,split` (names the line).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'VGGSound index {path} not found: put the official vggsound.csv in the manual dir.')
  rows = []
  with open(path, newline='', encoding='utf-8') as f:
    for line_no, row in enumerate(csv.reader(f), start=1):
      if not row or all(not cell.strip() for cell in row):
        continue
      if len(row) != 4:
        raise ValueError(f'{path} line {line_no}: expected 4 columns youtube_id,start_seconds,label,split, got '
                         f'{len(row)}: {row!r}. Quote labels that contain commas.')
      youtube_id, start, label, split = (cell.strip() for cell in row)
      try:
        start_f = float(start)
        if start_f != int(start_f) or start_f < 0:
          raise ValueError
        start_seconds = int(start_f)
      except (ValueError, OverflowError):
        if line_no == 1 and not rows:  # a header row
          continue
        raise ValueError(f'{path} line {line_no}: start_seconds must be a non-negative integer, got '
                         f'{start!r}.') from None
      if split not in SPLITS:
        raise ValueError(f'{path} line {line_no}: split must be one of {SPLITS}, got {split!r}.')
      if not youtube_id:
        raise ValueError(f'{path} line {line_no}: empty youtube_id.')
      rows.append(IndexRow(youtube_id, start_seconds, label, split))
  if not rows:
    raise ValueError(f'{path} has no rows; expected the official VGGSound index.')
  return rows


# ------------------------------------------------------------------------------------------------ decoding


class SkipClip(Exception):
  """A clip that cannot go into the dataset (reason is one of SKIP_REASONS)."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.reason = reason
    self.detail = detail


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
  """Resizes so that the short side is `size`, keeping the aspect ratio; smaller images are returned as is."""
  w, h = image.size
  short = min(w, h)
  if short <= size:
    return image
  scale = size / short
  new = (size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), size)
  return image.resize(new, Image.Resampling.BICUBIC)


def _encode_jpeg(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format='JPEG', quality=JPEG_QUALITY)
  return buf.getvalue()


def fit_audio(samples: np.ndarray, config: VggsoundConfig, what: str) -> np.ndarray:
  """Truncates to `num_samples` or zero-pads up to it; raises SkipClip if shorter than `min_seconds`."""
  n = samples.shape[0]
  if n < config.min_samples:
    raise SkipClip(AUDIO_TOO_SHORT, f'{what}: {n / config.sample_rate:.2f} s of audio, fewer than '
                   f'min_seconds={config.min_seconds:g}')
  out = np.zeros((config.num_samples,), np.int16)
  k = min(n, config.num_samples)
  out[:k] = samples[:k]
  return out


AV_INSTALL = "pip install -e '.[vggsound]'"


def _av():
  """PyAV, imported only when clips are decoded: reading the built shards for training does not need it."""
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'building VGGSound decodes the clips with PyAV, which is not installed: {AV_INSTALL}') from None
  return av


def _open(path: str, what: str):
  av = _av()
  try:
    return av.open(path, metadata_errors='ignore')
  except Exception as e:  # pylint: disable=broad-except  (any FFmpeg error means a file we cannot read)
    raise SkipClip(UNDECODABLE, f'{what}: cannot open ({type(e).__name__}: {e})') from None


class _AudioCollector:
  """Decoded audio frames -> mono s16 at the target rate (FFmpeg swresample), concatenated."""

  def __init__(self, sample_rate: int):
    self._resampler = _av().AudioResampler(format='s16', layout='mono', rate=sample_rate)
    self._chunks: list[np.ndarray] = []
    self.num_samples = 0

  def add(self, frame) -> None:
    for out in self._resampler.resample(frame):
      chunk = out.to_ndarray().reshape(-1)
      self._chunks.append(chunk)
      self.num_samples += chunk.shape[0]

  def finish(self) -> np.ndarray:
    self.add(None)  # flush the resampler
    if not self._chunks:
      return np.zeros((0,), np.int16)
    return np.concatenate(self._chunks).astype(np.int16, copy=False)


def _container_seconds(container, stream) -> float | None:
  if container.duration is not None and container.duration > 0:
    return container.duration / _av().time_base
  if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
    return float(stream.duration * stream.time_base)
  return None


def decode_video_clip(path: str, config: VggsoundConfig) -> tuple[np.ndarray, Image.Image]:
  """Decodes one clip file: (int16 audio [num_samples], the RGB frame nearest to the config's frame time).

  One demux pass over the file; video packets are decoded only up to the wanted frame, and reading stops as
  soon as enough audio is collected and the frame is found.

  Raises:
    SkipClip: the file is unreadable, has no audio stream / no video frame, or its audio is too short.
  """
  what = os.path.basename(path)
  container = _open(path, what)
  with container:
    if not container.streams.audio:
      raise SkipClip(NO_AUDIO_STREAM, f'{what} has no audio stream')
    if not container.streams.video:
      raise SkipClip(NO_VIDEO_FRAME, f'{what} has no video stream')
    astream, vstream = container.streams.audio[0], container.streams.video[0]
    duration = _container_seconds(container, vstream)
    window = config.clip_seconds if duration is None else min(duration, config.clip_seconds)
    target = config.frame_time * window
    rate = float(vstream.average_rate or vstream.guessed_rate or 25)
    audio = _AudioCollector(config.sample_rate)
    before = after = None  # (time, frame): the last frame at or before the target, the first one after it
    origin, index = None, 0
    try:
      for packet in container.demux(astream, vstream):
        if packet.stream.type == 'video':
          if after is not None:
            continue  # the frame is found; later video packets are not decoded
          for frame in packet.decode():
            t = frame.time if frame.time is not None else index / rate
            index += 1
            origin = t if origin is None else origin
            if t - origin <= target:
              before = (t - origin, frame)
            elif after is None:
              after = (t - origin, frame)
        else:
          for frame in packet.decode():
            audio.add(frame)
        if after is not None and audio.num_samples >= config.num_samples:
          break
      samples = audio.finish()
    except Exception as e:  # pylint: disable=broad-except  (a corrupt stream: skip the clip, keep building)
      raise SkipClip(UNDECODABLE, f'{what}: decoding failed ({type(e).__name__}: {e})') from None
    if before is None and after is None:
      raise SkipClip(NO_VIDEO_FRAME, f'{what}: no video frame could be decoded')
    if before is None or (after is not None and after[0] - target < target - before[0]):
      chosen = after[1]
    else:
      chosen = before[1]
    try:
      image = chosen.to_image().convert('RGB')
    except Exception as e:  # pylint: disable=broad-except
      raise SkipClip(NO_VIDEO_FRAME, f'{what}: the frame cannot be converted to RGB ({e})') from None
  return fit_audio(samples, config, what), image


def decode_wav(path: str, config: VggsoundConfig) -> np.ndarray:
  """Decodes an audio file (any rate and channel layout) to int16 mono [num_samples] at the config's rate."""
  what = os.path.basename(path)
  container = _open(path, what)
  with container:
    if not container.streams.audio:
      raise SkipClip(NO_AUDIO_STREAM, f'{what} has no audio stream')
    audio = _AudioCollector(config.sample_rate)
    try:
      for frame in container.decode(container.streams.audio[0]):
        audio.add(frame)
        if audio.num_samples >= config.num_samples:
          break
      samples = audio.finish()
    except Exception as e:  # pylint: disable=broad-except
      raise SkipClip(UNDECODABLE, f'{what}: decoding failed ({type(e).__name__}: {e})') from None
  return fit_audio(samples, config, what)


def read_frame(path: str) -> Image.Image:
  """Reads an extracted frame as RGB (raises SkipClip(BAD_IMAGE) if it is not a complete image)."""
  try:
    with Image.open(path) as im:
      im.load()
      return im.convert('RGB')
  except Exception as e:  # pylint: disable=broad-except
    what = os.path.basename(path)
    raise SkipClip(BAD_IMAGE, f'{what}: not a readable image ({type(e).__name__}: {e})') from None


class ClipFiles:
  """Which files the manual dir holds for each clip (one directory listing per layout folder, not a stat per
  clip: the full index has ~200k clips)."""

  def __init__(self, manual_dir: str | os.PathLike):
    self.manual_dir = os.fspath(manual_dir)
    self.video = self._list(VIDEO_DIR, VIDEO_EXTENSIONS)
    self.audio = self._list(AUDIO_DIR, ('wav',))
    self.frames = self._list(FRAMES_DIR, ('jpg',))

  def _list(self, folder: str, extensions: tuple[str, ...]) -> dict[str, str]:
    directory = os.path.join(self.manual_dir, folder)
    found: dict[str, tuple[int, str]] = {}
    if not os.path.isdir(directory):
      return {}
    with os.scandir(directory) as it:
      for entry in it:
        stem, dot, ext = entry.name.rpartition('.')
        if not dot or ext.lower() not in extensions:
          continue
        rank = extensions.index(ext.lower())
        if stem not in found or (rank, entry.name) < found[stem]:
          found[stem] = (rank, entry.name)
    return {stem: os.path.join(directory, name) for stem, (_, name) in found.items()}

  @property
  def num_files(self) -> int:
    return len(self.video) + len(self.audio) + len(self.frames)


def load_clip(row: IndexRow, files: ClipFiles, config: VggsoundConfig) -> dict[str, Any]:
  """Decodes one clip into a TFDS example dict (the image as JPEG bytes).

  Raises:
    SkipClip: the clip cannot go into the dataset.
  """
  clip = row.clip
  if clip in files.video:
    audio, image = decode_video_clip(files.video[clip], config)
  elif clip in files.audio and clip in files.frames:
    image = read_frame(files.frames[clip])
    audio = decode_wav(files.audio[clip], config)
  else:
    parts = [f'{VIDEO_DIR}/{clip}.{{{",".join(VIDEO_EXTENSIONS)}}}']
    if clip in files.audio:
      parts.append(f'{FRAMES_DIR}/{clip}.jpg (its {AUDIO_DIR}/{clip}.wav exists)')
    elif clip in files.frames:
      parts.append(f'{AUDIO_DIR}/{clip}.wav (its {FRAMES_DIR}/{clip}.jpg exists)')
    else:
      parts.append(f'{AUDIO_DIR}/{clip}.wav + {FRAMES_DIR}/{clip}.jpg')
    raise SkipClip(MISSING, 'no ' + ' and no '.join(parts))
  image = resize_short_side(image, config.frame_size)
  return {
      'audio': audio,
      'image': _encode_jpeg(image),
      'label': row.label,
      'youtube_id': row.youtube_id,
      'start_seconds': np.int32(row.start_seconds),
      'clip': clip,
  }


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], num_workers: int) -> Iterator[tuple[Any, Any]]:
  """Yields (item, fn(item)) in input order; with num_workers > 1, on threads with a bounded look-ahead."""
  if num_workers <= 1:
    for item in items:
      yield item, fn(item)
    return
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix='vggsound') as pool:
    pending = collections.deque((item, pool.submit(fn, item)) for item in itertools.islice(items, 4 * num_workers))
    while pending:
      item, future = pending.popleft()
      for nxt in itertools.islice(items, 1):
        pending.append((nxt, pool.submit(fn, nxt)))
      yield item, future.result()


def write_report(path: str | os.PathLike, skipped: list[SkippedClip], counts: dict[str, dict[str, int]]) -> None:
  """Writes the skipped-clips report: `#` summary lines, then a TSV `split clip reason detail`, sorted.

  Args:
    path: the file to write.
    skipped: the skipped clips.
    counts: per split, {'considered': n, 'written': n, <reason>: n, ...}.
  """
  lines = ['# VGGSound build: clips skipped (missing, truncated or undecodable). Summary:']
  for split in sorted(counts):
    c = counts[split]
    reasons = ', '.join(f'{r}={c[r]}' for r in SKIP_REASONS if c.get(r))
    lines.append(f'# {split}: {c.get("considered", 0)} index rows, {c.get("written", 0)} written, '
                 f'{sum(c.get(r, 0) for r in SKIP_REASONS)} skipped' + (f' ({reasons})' if reasons else ''))
  lines.append('split\tclip\treason\tdetail')
  for s in sorted(skipped, key=lambda s: (s.split, s.clip, s.reason)):
    detail = s.detail.replace('\t', ' ').replace('\n', ' ')
    lines.append(f'{s.split}\t{s.clip}\t{s.reason}\t{detail}')
  tmp = f'{os.fspath(path)}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  os.replace(tmp, path)


def read_report(path: str | os.PathLike) -> list[SkippedClip]:
  """Reads the rows of a skipped-clips report (the `#` summary lines are ignored)."""
  with open(path, encoding='utf-8') as f:
    rows = [line.rstrip('\n').split('\t') for line in f if line.strip() and not line.startswith('#')]
  return [SkippedClip(*(r + [''] * (4 - len(r)))[:4]) for r in rows[1:]]


# ------------------------------------------------------------------------------------------------- builder


class Vggsound(tfds.core.GeneratorBasedBuilder):
  """VGGSound from user-downloaded clips; see the module docstring.

  Extra constructor arguments (not part of the dataset's identity):
    num_workers: decoding threads (default: min(8, CPU count)).
    log_every: a progress line every this many clips (0: none).

  After `download_and_prepare`, `skipped` lists the clips left out and `counts[split]` has 'considered',
  'written' and one count per skip reason; the same is in `<data_dir>/skipped_clips.tsv`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: 16 kHz mono int16 audio, one JPEG frame, label text.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [DEFAULT_CONFIG]
  DEFAULT_BUILDER_CONFIG_NAME = DEFAULT_CONFIG_NAME

  def __init__(self, *, num_workers: int | None = None, log_every: int = 1000, **kwargs):
    super().__init__(**kwargs)
    self.num_workers = int(num_workers) if num_workers else min(8, os.cpu_count() or 1)
    self.log_every = int(log_every)
    self.skipped: list[SkippedClip] = []
    self.counts: dict[str, collections.Counter] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self.dataset_info_from_configs(
        description=('VGGSound: ~200k 10 s YouTube clips in 309 sound classes. One example per clip: the audio '
                     '(mono int16), one video frame (JPEG) and the class label. ' + (config.description or '')),
        features=tfds.features.FeaturesDict({
            'audio': tfds.features.Tensor(shape=(config.num_samples,), dtype=np.int16),
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.Text(),
            'youtube_id': tfds.features.Text(),
            'start_seconds': tfds.features.Scalar(dtype=np.int32),
            'clip': tfds.features.Text(),
        }),
        supervised_keys=None,
        metadata=tfds.core.MetadataDict(sample_rate=config.sample_rate, clip_seconds=config.clip_seconds),
        homepage='https://www.robots.ox.ac.uk/~vgg/data/vggsound/',
        citation=_CITATION,
        disable_shuffling=True,  # examples stay in clip-id order: two builds give the same dataset
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    rows = read_index(os.path.join(manual_dir, INDEX_NAME))
    files = ClipFiles(manual_dir)
    if not files.num_files:
      raise FileNotFoundError(
          f'{manual_dir} holds no clips: expected {VIDEO_DIR}/{{clip}}.mp4 (or .mkv/.webm/.avi) or '
          f'{AUDIO_DIR}/{{clip}}.wav + {FRAMES_DIR}/{{clip}}.jpg with clip = {{youtube_id}}_{{start:06d}}.')
    self.skipped, self.counts = [], {}
    by_split: dict[str, list[IndexRow]] = {split: [] for split in SPLITS}
    seen: set[tuple[str, str]] = set()
    for row in rows:
      key = (row.split, row.clip)
      if key in seen:
        self._skip(row.split, row.clip, DUPLICATE, f'listed again with label {row.label!r}; the first row is kept')
        continue
      seen.add(key)
      by_split[row.split].append(row)
    return {split: self._generate_examples(split, sorted(by_split[split], key=lambda r: r.clip), files)
            for split in SPLITS}

  def _skip(self, split: str, clip: str, reason: str, detail: str) -> None:
    self.skipped.append(SkippedClip(split, clip, reason, detail))
    counts = self.counts.setdefault(split, collections.Counter())
    counts[reason] += 1
    n = sum(counts[r] for r in SKIP_REASONS)
    if n <= MAX_LOGGED_SKIPS:
      log.warning('vggsound %s: skipped %s (%s: %s)', split, clip, reason, detail)
      if n == MAX_LOGGED_SKIPS:
        log.warning('vggsound %s: further skipped clips are only counted (progress lines) and listed in %s.',
                    split, REPORT_NAME)

  def _generate_examples(self, split: str, rows: list[IndexRow], files: ClipFiles):
    config = self.builder_config
    if config.limit:
      rows = rows[:config.limit]
    counts = self.counts.setdefault(split, collections.Counter())
    counts['considered'] = len(rows) + counts[DUPLICATE]  # index rows looked at (duplicates included)
    counts['written'] = 0

    def load(row: IndexRow):
      try:
        return load_clip(row, files, config)
      except SkipClip as e:
        return e
      except Exception as e:  # pylint: disable=broad-except  (never let one clip stop the build)
        return SkipClip(UNDECODABLE, f'{row.clip}: {type(e).__name__}: {e}')

    start = time.time()
    for i, (row, result) in enumerate(_ordered_map(load, rows, self.num_workers)):
      if isinstance(result, SkipClip):
        self._skip(split, row.clip, result.reason, result.detail)
      else:
        counts['written'] += 1
        yield i, result  # int keys in clip-id order (TFDS keeps key order when shuffling is disabled)
      if self.log_every and (i + 1) % self.log_every == 0:
        rate = (i + 1) / max(time.time() - start, 1e-9)
        skipped = ', '.join(f'{r}={counts[r]}' for r in SKIP_REASONS if counts.get(r))
        log.info('vggsound %s: %d/%d clips (%.1f clips/s), %d written, skipped: %s', split, i + 1, len(rows),
                 rate, counts['written'], skipped or 'none')
    if not counts['written']:
      reasons = ', '.join(f'{r}={counts[r]}' for r in SKIP_REASONS if counts.get(r)) or 'the index lists none'
      examples = '; '.join(f'{s.clip}: {s.reason} ({s.detail})' for s in self.skipped if s.split == split)[:600]
      raise ValueError(
          f'VGGSound split {split!r} is empty: none of its {len(rows)} clips could be used ({reasons}). '
          f'Check the manual dir layout ({VIDEO_DIR}/{{youtube_id}}_{{start:06d}}.mp4 or {AUDIO_DIR}/ + '
          f'{FRAMES_DIR}/). First skipped: {examples}')
    log.info('vggsound %s: %d of %d clips written, %d skipped in %.1f s.', split, counts['written'], len(rows),
             len(rows) - counts['written'], time.time() - start)

  def _download_and_prepare(self, dl_manager, download_config=None):  # pylint: disable=arguments-differ
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # self.data_dir is still TFDS's temporary directory here: the report is moved with the shards, atomically.
    write_report(os.path.join(os.fspath(self.data_dir), REPORT_NAME), self.skipped, self.counts)

