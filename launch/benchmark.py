r"""Benchmarks a config: train-step time, FLOPs and MFU, memory, input headroom, sampling latency, sharding cost.

  python launch/benchmark.py --config=configs/shapes.py --out=shapes.json                      # ~12 min here
  python launch/benchmark.py --config=configs/coco.py --batch=2 --steps=3 --warmup=1 --r1_steps=1 \
      --sample_repeats=2 --profile_repeats=1 --synthetic=64 --sections=train,pipeline,sampling,breakdown \
      --out=coco.json                                                                          # ~25 min here
  python launch/performance_report.py --json=shapes.json,coco.json --out=docs/performance.md

The model has random weights (a random codec too: configs/coco.py needs no stage-1 checkpoint), so the figures
are the config's cost, not a trained model's. Reported, as JSON in --out and as a table on stdout:
  * train: median after --warmup of the D + G iteration and of each step (and of the lazy-R1 D step), examples/s,
    compile time, FLOPs from XLA's cost analysis of the lowered HLO, achieved FLOP/s, MFU against the device's
    dense bf16 peak (TPU v4/v5e/v5p/v6e, A100, H100, H200; mmgan_jax/benchmarking.py lists the sources) or, on a
    CPU, against a dense f32 matmul timed in this process between the train iterations; memory from the compiled
    executables (and the device allocator's peak where the backend has one);
  * pipeline: the input pipeline's records/s (a synthetic fixture for coco/vggsound when no data_dir), and the
    headroom: that / the examples/s the train iteration consumes;
  * sampling: latency of G only, G + K-step refinement (K = --ks), and a --ddim_steps DDIM of the same refiner
    from pure noise, and their ratios;
  * sharding: the same iteration on 1 CPU device vs a data-parallel mesh of --host_devices virtual CPU devices;
  * breakdown: each component's forward and backward pass timed alone, a per-op trace of the iteration
    (`jax.profiler`: time per op kind and per component), and the model's conv sizes alone (CPU).
On a CPU the main figures use one device (virtual CPU devices share the same cores); on GPUs/TPUs, all of them.
A bad flag or config prints one `error: ...` line and exits with status 2.
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmgan_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Write the figures here as JSON.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch (0: config.data.global_batch).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train iterations (medians are reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed iterations first (after compilation).')
_R1_STEPS = flags.DEFINE_integer('r1_steps', 3, 'Timed D+R1 steps (0: skip the R1 step).')
_SAMPLE_REPEATS = flags.DEFINE_integer('sample_repeats', 5, 'Timed calls per sampling latency.')
_KS = flags.DEFINE_list('ks', ['1', '2', '4'], 'Refinement step counts K timed after G.')
_DDIM_STEPS = flags.DEFINE_integer('ddim_steps', 50, 'Steps of the DDIM baseline sampled from pure noise.')
_HOST_DEVICES = flags.DEFINE_integer('host_devices', 8, 'Virtual CPU devices for the sharding comparison '
                                     '(sets XLA_FLAGS before JAX starts; 0: leave XLA_FLAGS as it is).')
_SHARDING_STEPS = flags.DEFINE_integer('sharding_steps', 0, 'Timed iterations per mesh in the sharding '
                                       'comparison (0: --steps).')
_DEVICES = flags.DEFINE_integer('devices', 0, 'Devices of the main mesh (0: all accelerators; 1 on a CPU).')
_DATA_BATCH = flags.DEFINE_integer('data_batch', 64, 'Batch of the input-pipeline measurement (records/s only; '
                                   'large enough that prefetching cannot hide the decoding).')
_DATA_BATCHES = flags.DEFINE_integer('data_batches', 10, 'Input-pipeline batches timed.')
_SYNTHETIC = flags.DEFINE_integer('synthetic', 128, 'Records of the synthetic coco/vggsound fixture built when '
                                  'config.data.data_dir is empty.')
_PROFILE_REPEATS = flags.DEFINE_integer('profile_repeats', 2, 'Timed calls per profiled sub-computation, and '
                                        'traced iterations of the per-op profile.')
_SECTIONS = flags.DEFINE_list('sections', ['train', 'pipeline', 'sampling', 'sharding', 'breakdown'],
                              'What to measure (train is always measured).')
flags.mark_flags_as_required(['config', 'out'])

SECTIONS = ('train', 'pipeline', 'sampling', 'sharding', 'breakdown')  # as mmgan_jax.benchmarking.SECTIONS


class UsageError(ValueError):
  """A flag value the benchmark cannot run with."""


def _load_config():
  """The parsed config; a config file that could not be loaded is a UsageError (config_flags defers it)."""
  config = _CONFIG.value
  try:
    config.data  # pylint: disable=pointless-statement
  except OSError as e:
    raise UsageError(f'--config: {cli.one_line(e)}') from None
  return config


def _check_flags() -> tuple[int, ...]:
  counts = (_STEPS.value, _SAMPLE_REPEATS.value, _PROFILE_REPEATS.value)
  if min(counts) < 1 or min(_WARMUP.value, _R1_STEPS.value) < 0:
    raise UsageError('--steps, --sample_repeats and --profile_repeats must be >= 1, --warmup and --r1_steps >= 0.')
  if _BATCH.value < 0 or _DEVICES.value < 0 or _HOST_DEVICES.value < 0 or min(_DATA_BATCH.value,
                                                                             _DATA_BATCHES.value) < 1:
    raise UsageError('--batch, --devices and --host_devices must be >= 0, --data_batch and --data_batches >= 1.')
  if _DDIM_STEPS.value < 1:
    raise UsageError(f'--ddim_steps must be >= 1, got {_DDIM_STEPS.value}.')
  unknown = set(_SECTIONS.value) - set(SECTIONS)
  if unknown:
    raise UsageError(f'--sections has unknown entries {sorted(unknown)}; choose from {", ".join(SECTIONS)}.')
  try:
    ks = tuple(int(k) for k in _KS.value)
  except ValueError:
    raise UsageError(f'--ks must be a comma-separated list of integers, got {",".join(_KS.value)!r}.') from None
  if not ks or min(ks) < 1:
    raise UsageError('--ks needs at least one refinement step count, each >= 1.')
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  if not os.path.isdir(out_dir):
    raise UsageError(f'--out={_OUT.value}: the directory {out_dir} does not exist.')
  return ks


def _set_host_devices(n: int) -> None:
  """Asks XLA for n virtual CPU devices (only possible before JAX initialises its backends)."""
  if n <= 0:
    return
  if 'jax' in sys.modules:
    logging.warning('JAX was imported before --host_devices could take effect; using its CPU devices as they are.')
    return
  current = os.environ.get('XLA_FLAGS', '')
  kept = [f for f in current.split() if not f.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(kept + [f'--xla_force_host_platform_device_count={n}'])


def _config_name() -> str:
  return flags.FLAGS['config'].serialize().split('=', 1)[-1]


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}; every option is a --flag.', file=sys.stderr)
    sys.exit(2)
  logging.getLogger().setLevel(logging.WARNING)
  try:
    ks = _check_flags()
    config = _load_config()
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  _set_host_devices(_HOST_DEVICES.value)
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  from mmgan_jax.data.registry import DatasetUnavailableError  # pylint: disable=g-import-not-at-top
  from mmgan_jax import benchmarking as bm  # pylint: disable=g-import-not-at-top
  try:
    result = bm.benchmark(
        config, config_name=_config_name(), batch=_BATCH.value, devices=bm.default_devices(_DEVICES.value),
        steps=_STEPS.value, warmup=_WARMUP.value, r1_steps=_R1_STEPS.value, ks=ks, ddim_steps=_DDIM_STEPS.value,
        sample_repeats=_SAMPLE_REPEATS.value, sections=_SECTIONS.value, host_devices=_HOST_DEVICES.value,
        sharding_steps=_SHARDING_STEPS.value, data_batch=_DATA_BATCH.value, data_batches=_DATA_BATCHES.value,
        synthetic=_SYNTHETIC.value,
        profile_repeats=_PROFILE_REPEATS.value, say=lambda msg: print(msg, flush=True))
  except (DatasetUnavailableError, FileNotFoundError, ValueError) as e:
    print('error: ' + ' '.join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
    sys.exit(2)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2)
  print(bm.format_table(result))
  print(f'Wrote {_OUT.value}.')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
