r"""Input-pipeline throughput: decoded, batched training records per second of a config's grain pipeline.

  python launch/benchmark_data.py --config=configs/coco.py --config.data.data_dir=DIR --out=data.json
  python launch/benchmark_data.py --config=configs/coco.py --synthetic=2048 --threads=1,2 --out=data.json

With --synthetic=N it first builds a COCO-like fixture of N random 640x480 JPEGs (the median COCO size) through
the real TFDS coco_captions builder in a temporary directory (or a VGGSound one of N 10 s clips for
configs/vggsound.py), so the figure needs no dataset. It reports, per grain thread count, the median
records/s over --batches batches after --warmup, and the per-process CPU time per record; compare it with what
one training step consumes (docs/datasets.md does, for this CPU and for an accelerator).
"""

import json
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402

from mmgan_jax import cli  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
_SYNTHETIC = flags.DEFINE_integer('synthetic', 0, 'Build a synthetic dataset of this many records first.')
_THREADS = flags.DEFINE_list('threads', ['1', '2'], 'grain read-thread counts to measure.')
_BATCHES = flags.DEFINE_integer('batches', 20, 'Batches timed per thread count (after the warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Batches read before timing.')
_FLOPS = flags.DEFINE_bool('flops', False, "Also estimate what one training iteration consumes: XLA's cost "
                            'analysis (before compilation) of the D and G steps at batch 8, in FLOP per example.')
_OUT = flags.DEFINE_string('out', '', 'Write the figures here as JSON.')

# The accelerators whose consumption is estimated (their dense bf16 peaks: mmgan_jax/benchmarking.py).
PEAK_ROWS = ('H100 SXM', 'A100', 'TPU v5e', 'TPU v4')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  from mmgan_jax import benchmarking as bm  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  with tempfile.TemporaryDirectory() as tmp:
    with cfg.unlocked():
      if _SYNTHETIC.value:
        t = time.time()
        bm.synthetic_data(cfg, _SYNTHETIC.value, tmp)
        print(f'Built {_SYNTHETIC.value} synthetic records in {time.time() - t:.0f} s.')
      rows = [bm.measure(cfg, int(n), _BATCHES.value, _WARMUP.value) for n in _THREADS.value]
  result = dict(config=cfg.data.name, image_size=cfg.data.image_size, audio_seconds=cfg.data.audio_seconds,
                synthetic=_SYNTHETIC.value, cpu_count=os.cpu_count(), rows=rows)
  for r in rows:
    print(f"threads={r['threads']}: {r['records_per_s_median']:.0f} records/s (median of batches; mean "
          f"{r['records_per_s_mean']:.0f}), {r['cpu_ms_per_record']:.1f} ms CPU per record")
  if _FLOPS.value:
    flops = bm.flops_per_example(cfg)
    cpu_s = min(r['cpu_ms_per_record'] for r in rows) / 1e3
    result['train_flop_per_example'] = flops
    result['consumption_at_40pct_mfu'] = {}
    print(f'One training iteration: {flops / 1e12:.3f} TFLOP per example.')
    for device in PEAK_ROWS:
      peak = bm.PEAK_BF16_FLOPS[device]
      rate = 0.4 * peak / flops
      result['consumption_at_40pct_mfu'][device] = dict(examples_per_s=rate, decode_cores=rate * cpu_s)
      print(f'  {device} at 40 % MFU consumes {rate:.0f} examples/s = {rate * cpu_s:.1f} CPU cores of decoding.')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
