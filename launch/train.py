r"""Trains (and at the end evaluates) a config.

  python launch/train.py --config=configs/shapes.py --workdir=runs/shapes
  python launch/train.py --config=configs/shapes.py:smoke --workdir=/tmp/smoke --config.seed=3

Running it again with the same workdir resumes from the latest checkpoint. A config problem, a missing
dataset or a missing codec checkpoint stops with one line saying what to do (exit status 2).

Several processes (one per host, or per GPU): start the same command on each, with the same workdir (a
shared filesystem or gs://) and the job's coordinates. TPU pods, SLURM `srun` and `mpirun` are detected;
elsewhere pass them, e.g. two processes on one machine:

  python launch/train.py --config=configs/shapes.py:smoke --workdir=/tmp/mp \
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=0 &
  python launch/train.py --config=configs/shapes.py:smoke --workdir=/tmp/mp \
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=1

See docs/tpu_pods.md and docs/gpu_clusters.md.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402

from mmgan_jax import cli  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and results.')
# Multi-process jobs (docs/tpu_pods.md, docs/gpu_clusters.md). Unset: TPU pods, srun and mpirun are detected.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, which serves the JAX '
                                   'coordinator there (default: JAX_COORDINATOR_ADDRESS or auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job (default: auto-detected).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes) '
                                   '(default: auto-detected).')
_DIST_TIMEOUT = flags.DEFINE_integer('distributed_timeout_s', 300, 'Seconds to wait for the coordinator and every '
                                     'process before stopping with an error.')
_ACCEPT = flags.DEFINE_bool('accept_config_change', False, 'Resume a run whose config.json differs from --config '
                            'in fields that change training (seed, model, data, losses, optimiser, schedule); the '
                            'changes are appended to WORKDIR/config_history.jsonl. Without it such a resume stops '
                            'and lists the differences.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  cli.quiet_console()
  from mmgan_jax.data.registry import DatasetUnavailableError  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from mmgan_jax.data.records import DataError  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    # Before anything touches a JAX device: the devices of a multi-process job exist only after joining it.
    trainer.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                         timeout_s=_DIST_TIMEOUT.value)
    results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, accept_config_change=_ACCEPT.value)
  except (DatasetUnavailableError, FileNotFoundError, ValueError, trainer.NonFiniteError, trainer.WorkdirError,
          CheckpointError, DataError, trainer.DistributedError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not results:
    print('Stopped by SIGTERM. Run the same command to resume from the newest checkpoint in the workdir.',
          file=sys.stderr)
  if results:
    print(cli.results_table(results, os.path.join(_WORKDIR.value, 'eval_results.json')))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
