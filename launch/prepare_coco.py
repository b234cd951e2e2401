r"""Builds TFDS coco_captions (COCO 2014 with Karpathy's splits) as array_record, the format grain reads by index.

  python launch/prepare_coco.py --data_dir=/data/tfds [--download_dir=/data/downloads]

Run it once on a machine with internet (it downloads COCO 2014, about 19 GB, and Karpathy's split file), then
copy DATA_DIR/coco_captions/ to the training machines and pass --config.data.data_dir=DATA_DIR. This is
`tfds build coco_captions --file_format=array_record` without the tfds CLI, which needs apache_beam.
Running it again on a built dataset does nothing.
"""

import logging
import os
import sys
import time

from absl import app, flags

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where the TFDS dataset is written (DATA_DIR/coco_captions/).')
_DOWNLOAD_DIR = flags.DEFINE_string('download_dir', None, 'Where the raw downloads go (default DATA_DIR/downloads).')
flags.mark_flags_as_required(['data_dir'])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(_DATA_DIR.value)
  builder = tfds.builder('coco_captions', data_dir=data_dir)
  if builder.is_prepared():
    print(f'coco_captions is already built in {builder.data_dir}; nothing to do.')
    return
  start = time.time()
  try:
    builder.download_and_prepare(
        download_dir=_DOWNLOAD_DIR.value, file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except  # no network, no space: one line, not a traceback
    print(f'error: building coco_captions in {data_dir} failed ({type(e).__name__}: {str(e)[:500]}). It needs '
          'internet access (images.cocodataset.org, cs.stanford.edu) and about 40 GB of free disk.', file=sys.stderr)
    sys.exit(2)
  for split, info in sorted(builder.info.splits.items()):
    print(f'{split}: {info.num_examples} images')
  print(f'Built coco_captions in {builder.data_dir} in {time.time() - start:.0f} s; train with '
        f'--config=configs/coco.py --config.data.data_dir={data_dir}')


if __name__ == '__main__':
  app.run(main)
