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
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
_SYNTHETIC = flags.DEFINE_integer('synthetic', 0, 'Build a synthetic dataset of this many records first.')
_THREADS = flags.DEFINE_list('threads', ['1', '2'], 'grain read-thread counts to measure.')
_BATCHES = flags.DEFINE_integer('batches', 20, 'Batches timed per thread count (after the warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Batches read before timing.')
_FLOPS = flags.DEFINE_bool('flops', False, "Also estimate what one training iteration consumes: XLA's cost "
                            'analysis (before compilation) of the D and G steps at batch 8, in FLOP per example.')
_OUT = flags.DEFINE_string('out', '', 'Write the figures here as JSON.')

# Dense bf16 peaks (FLOP/s) for the consumption estimate at 40 % MFU.
PEAKS = {'H100 SXM': 989e12, 'A100': 312e12, 'TPU v5e': 197e12, 'TPU v4': 275e12}
flags.mark_flags_as_required(['config'])


def _synthetic(cfg, n: int, root: str) -> None:
  """Points cfg.data at a freshly built synthetic dataset of n records in the real format."""
  from mmgan_jax.data import testing  # pylint: disable=g-import-not-at-top
  if cfg.data.name == 'vggsound':
    data_dir, name = testing.make_vggsound(root, num_train=n, num_test=max(4, n // 50), clip_seconds=10.0,
                                           frame_size=256)
    cfg.data.update(data_dir=data_dir, tfds_name=name)
  elif cfg.data.name == 'coco':
    cfg.data.data_dir = testing.make_coco_captions(root, num_train=n, num_restval=1, num_val=1,
                                                   num_test=max(4, n // 50), image_size=(480, 640))
  else:
    raise ValueError(f'--synthetic supports the coco and vggsound configs, not {cfg.data.name!r}.')


def measure(cfg, threads: int, batches: int, warmup: int) -> dict[str, float]:
  from mmgan_jax.data import registry  # pylint: disable=g-import-not-at-top
  cfg.data.num_threads = threads
  data = registry.make_data(cfg.data)
  batch = cfg.data.global_batch
  for _ in range(warmup):
    next(data.train)
  times = []
  cpu0, t0 = time.process_time(), time.perf_counter()
  for _ in range(batches):
    t = time.perf_counter()
    next(data.train)
    times.append(time.perf_counter() - t)
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  times.sort()
  median = times[len(times) // 2]
  return dict(threads=threads, global_batch=batch, records_per_s_median=batch / median,
              records_per_s_mean=batch * batches / wall, cpu_ms_per_record=1e3 * cpu / (batch * batches),
              bad_records=data.bad_records.count)


def flops_per_example(cfg, batch: int = 8) -> float:
  """FLOP per example of one iteration (D step + G step) of `cfg`'s model at `batch`, from the lowered HLO."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmgan_jax.models import mmgan  # pylint: disable=g-import-not-at-top
  from mmgan_jax.train import state as state_lib, steps as steps_lib  # pylint: disable=g-import-not-at-top
  d = cfg.data
  n_audio = int(round(d.audio_seconds * d.sample_rate))
  model = mmgan.build_model(cfg.model, image_size=d.image_size, vocab_size=d.tokenizer.vocab_size,
                            max_text_len=d.max_text_len, sample_rate=d.sample_rate)
  tx_g, tx_d = state_lib.make_optimizers(cfg.optim, cfg.total_steps)
  small = mmgan.dummy_batch(model, 2, n_audio)
  key = jax.random.PRNGKey(0)
  codec = jax.eval_shape(lambda k: mmgan.init_params(model, k, small), key).get('codec')
  state = jax.eval_shape(lambda k: state_lib.init_state(model, cfg, k, small, tx_g, tx_d, codec, 1.0), key)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mmgan.dummy_batch(model, batch, n_audio))
  fns = steps_lib.make_steps(model, cfg, tx_g, tx_d)
  total = 0.0
  for name in ('d_step', 'g_step'):
    cost = jax.jit(getattr(fns, name)).lower(state, batch).cost_analysis()
    total += float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  return total / batch['image'].shape[0]


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  cfg = _CONFIG.value
  with tempfile.TemporaryDirectory() as tmp:
    with cfg.unlocked():
      if _SYNTHETIC.value:
        t = time.time()
        _synthetic(cfg, _SYNTHETIC.value, tmp)
        print(f'Built {_SYNTHETIC.value} synthetic records in {time.time() - t:.0f} s.')
      rows = [measure(cfg, int(n), _BATCHES.value, _WARMUP.value) for n in _THREADS.value]
  result = dict(config=cfg.data.name, image_size=cfg.data.image_size, audio_seconds=cfg.data.audio_seconds,
                synthetic=_SYNTHETIC.value, cpu_count=os.cpu_count(), rows=rows)
  for r in rows:
    print(f"threads={r['threads']}: {r['records_per_s_median']:.0f} records/s (median of batches; mean "
          f"{r['records_per_s_mean']:.0f}), {r['cpu_ms_per_record']:.1f} ms CPU per record")
  if _FLOPS.value:
    flops = flops_per_example(cfg)
    cpu_s = min(r['cpu_ms_per_record'] for r in rows) / 1e3
    result['train_flop_per_example'] = flops
    result['consumption_at_40pct_mfu'] = {}
    print(f'One training iteration: {flops / 1e12:.3f} TFLOP per example.')
    for device, peak in PEAKS.items():
      rate = 0.4 * peak / flops
      result['consumption_at_40pct_mfu'][device] = dict(examples_per_s=rate, decode_cores=rate * cpu_s)
      print(f'  {device} at 40 % MFU consumes {rate:.0f} examples/s = {rate * cpu_s:.1f} CPU cores of decoding.')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main)
