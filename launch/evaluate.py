r"""Evaluates a trained checkpoint (EMA weights) with the evaluators the config names.

  python launch/evaluate.py --config=configs/shapes.py --workdir=runs/shapes
  python launch/evaluate.py --config=configs/shapes.py --workdir=runs/shapes --step=750 --num_examples=10000 \
      --config.eval.evaluators="('semantic','fid','retrieval')" --config.eval.fid.weights=PATH/inception.npz

With --robustness, the robustness curves instead (WORKDIR/eval/robustness.json). Writes WORKDIR/eval/metrics.json and WORKDIR/eval/metrics.md (the numbers plus N, resolution, refinement
steps, seed and checkpoint step). Real-set FID features are cached in WORKDIR/eval/cache. The config is the
one the run was trained with (WORKDIR/config.json) unless --config gives another. A missing checkpoint, weights file or a bad config value stops with one line saying what
to do (exit status 2). Several processes: the flags of launch/train.py (--coordinator_address, --num_processes,
--process_id), or none on TPU pods / srun / mpirun; every process evaluates, process 0 writes the files.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402

from mmgan_jax import cli  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]); default: the '
                                          "workdir's config.json (what the run was trained with).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run directory (holds checkpoints/).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
_NUM = flags.DEFINE_integer('num_examples', None, 'Held-out examples to score (default: config.eval.num_examples).')
_OUT = flags.DEFINE_string('out_dir', None, 'Where metrics.json/.md go (default: WORKDIR/eval).')
_ROBUSTNESS = flags.DEFINE_bool('robustness', False, 'Instead of the metrics: the robustness curves (semantic '
                                'accuracy and BLEU-4 vs audio SNR, caption word dropout, image noise; '
                                'mmgan_jax/evaluation/robustness.py) -> OUT_DIR/robustness.json.')
# Multi-process jobs (docs/tpu_pods.md, docs/gpu_clusters.md). Unset: TPU pods, srun and mpirun are detected.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, which serves the JAX '
                                   'coordinator there (default: JAX_COORDINATOR_ADDRESS or auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job (default: auto-detected).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes) '
                                   '(default: auto-detected).')
_DIST_TIMEOUT = flags.DEFINE_integer('distributed_timeout_s', 300, 'Seconds to wait for the coordinator and every '
                                     'process before stopping with an error.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  from mmgan_jax.data.registry import DatasetUnavailableError  # pylint: disable=g-import-not-at-top
  from mmgan_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                         timeout_s=_DIST_TIMEOUT.value)
    from mmgan_jax import config_io  # pylint: disable=g-import-not-at-top
    config = _CONFIG.value if _CONFIG.value is not None else config_io.load(_WORKDIR.value)
    if _ROBUSTNESS.value:
      result = trainer.robustness_checkpoint(config, _WORKDIR.value, step=_STEP.value,
                                             num_examples=_NUM.value, out_dir=_OUT.value)
    else:
      metrics, proto = trainer.evaluate_checkpoint(config, _WORKDIR.value, step=_STEP.value,
                                                   num_examples=_NUM.value, out_dir=_OUT.value)
  except (DatasetUnavailableError, FileNotFoundError, ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if _ROBUSTNESS.value:
    for name, curve in result['curves'].items():
      for metric, values in curve.items():
        if metric != 'levels':
          print(f'{name} {metric}: ' + ', '.join(f'{lv:g}: {v:.3f}' for lv, v in zip(curve['levels'], values)))
  else:
    print(report.markdown(metrics, proto))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
