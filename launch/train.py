r"""Trains (and at the end evaluates) a config.

  python launch/train.py --config=configs/shapes.py --workdir=runs/shapes
  python launch/train.py --config=configs/shapes.py:smoke --workdir=/tmp/smoke --config.seed=3

Running it again with the same workdir resumes from the latest checkpoint. A config problem, a missing
dataset or a missing codec checkpoint stops with one line saying what to do (exit status 2).
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  from mmgan_jax.data.registry import DatasetUnavailableError  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data.records import DataError  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (DatasetUnavailableError, FileNotFoundError, ValueError, trainer.NonFiniteError, trainer.WorkdirError,
          CheckpointError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not results:
    print('Stopped by SIGTERM; the checkpoint is in the workdir. Run the same command to resume.', file=sys.stderr)
  for k in sorted(results):
    print(f'{k}: {results[k]:.4f}' if isinstance(results[k], float) else f'{k}: {results[k]}')


if __name__ == '__main__':
  app.run(main)
