r"""Builds the VGGSound TFDS dataset (array_record shards) from locally downloaded clips.

  python launch/prepare_vggsound.py --manual_dir=/data/vggsound_raw --data_dir=/data/tfds
  python launch/prepare_vggsound.py --manual_dir=DIR --data_dir=OUT --clip_seconds=5 --frame_size=128 --limit=100

The manual dir holds `vggsound.csv` and, per clip `{youtube_id}_{start_seconds:06d}`, either
`video/{clip}.mp4` (.mkv/.webm/.avi) or `audio/{clip}.wav` + `frames/{clip}.jpg` (see
mmgan_jax/data/vggsound/vggsound_dataset_builder.py). The dataset lands in OUT/vggsound/<config>/1.0.0/ with
`skipped_clips.tsv` (the clips left out, and why); read it back with

  from mmgan_jax.data.vggsound import vggsound_dataset_builder  # registers `vggsound`
  source = tfds.data_source('vggsound', data_dir=OUT, split='train')   # 'vggsound/<config>' for non-defaults

Non-default settings give a config named after them (e.g. `16k_5s_128px`, `16k_10s_first100` with --limit),
so a trial build never shadows the full one. Running it again on a built config does nothing. A missing manual
dir or index, a bad setting or a split without any usable clip stops with one line (exit status 2).
"""

import importlib.util
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `mmgan_jax` from a checkout

from absl import app, flags  # noqa: E402

_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Holds vggsound.csv and video/ (or audio/ + frames/).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir to write the dataset into.')
_SAMPLE_RATE = flags.DEFINE_integer('sample_rate', 16000, 'Audio sample rate (Hz, mono int16).')
_CLIP_SECONDS = flags.DEFINE_float('clip_seconds', 10.0, 'Seconds of audio stored per clip (from its start).')
_MIN_SECONDS = flags.DEFINE_float('min_seconds', None, 'Shorter audio is skipped as truncated; between this and '
                                  'clip_seconds it is zero-padded. Default 0.9 * clip_seconds.')
_FRAME_TIME = flags.DEFINE_float('frame_time', 0.5, 'Which frame, as a fraction of the clip (0.5: middle).')
_FRAME_SIZE = flags.DEFINE_integer('frame_size', 256, 'Short side of the stored frame (never upscaled).')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Only the first N clips of each split (clip-id order); 0 = all.')
_CONFIG_NAME = flags.DEFINE_string('config_name', None, 'Config name (default: derived from the settings).')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None, 'Decoding threads (default: min(8, CPU count)).')
_LOG_EVERY = flags.DEFINE_integer('log_every', 1000, 'A progress line every this many clips (0: none).')
flags.mark_flags_as_required(['manual_dir', 'data_dir'])


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  manual_dir, data_dir = os.path.expanduser(_MANUAL_DIR.value), os.path.expanduser(_DATA_DIR.value)
  # Checked before TensorFlow is imported, so the common mistakes answer at once.
  if not os.path.isdir(manual_dir):
    _fail(f'--manual_dir={manual_dir} is not a directory; it must hold vggsound.csv and video/ (or audio/ + '
          'frames/) with the downloaded clips.')
  if not os.path.isfile(os.path.join(manual_dir, 'vggsound.csv')):
    _fail(f'{os.path.join(manual_dir, "vggsound.csv")} not found; put the official VGGSound index there '
          '(rows youtube_id,start_seconds,label,split; https://www.robots.ox.ac.uk/~vgg/data/vggsound/).')
  if importlib.util.find_spec('av') is None:
    _fail("PyAV is not installed; it decodes the clips: pip install -e '.[vggsound]'")
  logging.getLogger().setLevel(logging.INFO)

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data.vggsound import vggsound_dataset_builder as vgg  # pylint: disable=g-import-not-at-top

  try:
    config = vgg.make_config(name=_CONFIG_NAME.value, sample_rate=_SAMPLE_RATE.value,
                             clip_seconds=_CLIP_SECONDS.value, min_seconds=_MIN_SECONDS.value,
                             frame_time=_FRAME_TIME.value, frame_size=_FRAME_SIZE.value, limit=_LIMIT.value)
    builder = vgg.Vggsound(config=config, data_dir=data_dir, num_workers=_NUM_WORKERS.value,
                           log_every=_LOG_EVERY.value)
    report = os.path.join(os.fspath(builder.data_dir), vgg.REPORT_NAME)
    already = builder.is_prepared()
    if already:
      print(f'vggsound/{config.name} is already built in {builder.data_dir}; nothing to do (delete that '
            'directory to rebuild).')
    start = time.time()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False),
        file_format='array_record')
  except (ValueError, FileNotFoundError) as e:
    _fail(str(e))
  seconds = time.time() - start

  counts = builder.counts  # empty when nothing was built now
  skipped = builder.skipped if not already else (vgg.read_report(report) if os.path.isfile(report) else [])
  considered = sum(c.get('considered', 0) for c in counts.values())
  if not already:
    print(f'Built vggsound/{config.name} in {builder.data_dir}: {considered} index rows in {seconds:.1f} s '
          f'({considered / max(seconds, 1e-9):.2f} clips/s).')
  for split, info in sorted(builder.info.splits.items()):
    reasons = {}
    for s in skipped:
      if s.split == split:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    why = ', '.join(f'{r}={reasons[r]}' for r in vgg.SKIP_REASONS if r in reasons)
    print(f'{split}: {info.num_examples} examples, {sum(reasons.values())} clips skipped' +
          (f' ({why})' if why else ''))
  print(f'Skipped clips (split, clip, reason, detail): {report}')
  name = 'vggsound' if config.name == vgg.DEFAULT_CONFIG_NAME else f'vggsound/{config.name}'
  print(f"Read with: tfds.data_source('{name}', data_dir='{data_dir}') after importing "
        'mmgan_jax.data.vggsound.vggsound_dataset_builder')


if __name__ == '__main__':
  app.run(main)
