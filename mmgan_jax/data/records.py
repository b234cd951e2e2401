"""Bad-record handling for random-access sources: a record that cannot be read or fails its checks is skipped
and counted, never a crash and never silent.

Anchor: the "skip corrupt records" policy of large input pipelines (tf.data's `ignore_errors`, webdataset's
`handler=warn_and_continue`), adapted to grain's random access so that data order and checkpointed iterator
state stay exact: a bad record at index i is replaced by the next good record (i+1, i+2, ... modulo the
length), a pure function of the index, so every resume sees the same stream. Each replacement is counted
(`RecordCounter`, logged by the trainer as `data/bad_records`) and logged with the index and the reason;
`max_consecutive` bad records in a row is a `DataError` (a broken dataset, not a bad record).

The counter is per process and counts the records this process has read since it started (a resumed run
starts again from 0); lookups are thread-safe (grain reads with threads).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Check = Callable[[dict[str, Any]], 'str | None']  # None if the record is good, else the reason


class DataError(RuntimeError):
  """The data source is broken beyond single bad records."""


class RecordCounter:
  """Thread-safe tally of skipped records, with the first few reasons kept for the log."""

  def __init__(self, max_logged: int = 20):
    self._lock = threading.Lock()
    self._count = 0
    self._max_logged = max_logged

  def add(self, index: int, reason: str) -> None:
    with self._lock:
      self._count += 1
      n = self._count
    if n <= self._max_logged:
      log.warning('Skipped bad record %d (%s); %d skipped so far.', index, reason, n)
    elif n == self._max_logged + 1:
      log.warning('More bad records are being skipped; see the data/bad_records summary for the count.')

  @property
  def count(self) -> int:
    with self._lock:
      return self._count


class SkipBadRecords:
  """Wraps a random-access source (`__len__`, `__getitem__`); bad records are replaced by the next good one."""

  def __init__(self, source, check: Check, counter: RecordCounter, *, max_consecutive: int = 64):
    if len(source) <= 0:
      raise DataError(f'{source!r} is empty.')
    self.source, self.check, self.counter, self.max_consecutive = source, check, counter, int(max_consecutive)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self.source)
    index = int(index) % n
    for offset in range(min(self.max_consecutive, n)):
      i = (index + offset) % n
      try:
        record = self.source[i]
        reason = self.check(record)
      except Exception as e:  # pylint: disable=broad-except  # an unreadable record is one bad record
        record, reason = None, f'{type(e).__name__}: {e}'
      if reason is None:
        return record
      self.counter.add(i, reason)
    raise DataError(f'{min(self.max_consecutive, n)} consecutive bad records from index {index} in '
                    f'{self.source!r}: the dataset looks broken (see the warnings above for the reasons).')

  def __repr__(self) -> str:
    return f'SkipBadRecords({self.source!r})'


def _image_problem(r: dict[str, Any], image_size: int) -> str | None:
  image = np.asarray(r.get('image'))
  if image.shape != (image_size, image_size, 3) or image.dtype != np.uint8:
    return f'image is {image.dtype}{list(image.shape)}, expected uint8[{image_size}, {image_size}, 3]'
  return None


def _captions_problem(r: dict[str, Any]) -> str | None:
  captions = r.get('captions')
  if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
    return 'no caption, or an empty one'
  return None


def check_shapes_record(image_size: int, audio_samples: int) -> Check:
  """The checks a "shapes"-style record (image, captions, audio, attributes) must pass before it is used."""

  def check(r: dict[str, Any]) -> str | None:
    if (problem := _image_problem(r, image_size)) is not None:
      return problem
    audio = np.asarray(r.get('audio'))
    if audio.shape != (audio_samples,) or not np.issubdtype(audio.dtype, np.floating):
      return f'audio is {audio.dtype}{list(audio.shape)}, expected float[{audio_samples}]'
    if not np.all(np.isfinite(audio)):
      return 'audio has NaN/Inf samples'
    if (problem := _captions_problem(r)) is not None:
      return problem
    attributes = np.asarray(r.get('attributes'))
    if attributes.shape != (4,) or not np.issubdtype(attributes.dtype, np.integer):
      return f'attributes are {attributes.dtype}{list(attributes.shape)}, expected 4 integers'
    return None

  return check


def check_decoded_record(image_size: int, audio_samples: int | None) -> Check:
  """The checks a decoded real-dataset record (``sources.Decoded``) must pass: image, captions, and audio at
  least `audio_samples` long (None: the dataset has no audio)."""

  def check(r: dict[str, Any]) -> str | None:
    problem = _image_problem(r, image_size) or _captions_problem(r)
    if problem is not None:
      return problem
    if audio_samples is not None:
      audio = np.asarray(r.get('audio'))
      if audio.ndim != 1 or len(audio) < audio_samples:
        return f'audio has {audio.shape} samples, expected at least {audio_samples} (a truncated clip?)'
      if not np.all(np.isfinite(audio)):
        return 'audio has NaN/Inf samples'
    return None

  return check
