"""launch/benchmark.py's measurements (mmgan_jax/benchmarking.py) on the smoke config, and its report.

One short benchmark of the smoke model (1 CPU device, 2 timed iterations; its train steps are the programs
test_train.py compiles too, so the compile cache serves both) is shared by the checks: every field present and
JSON-able, positive times, FLOPs, MFU in (0, 1], and refinement cheaper than a 50-step DDIM. The sharding
comparison is not run here (8 virtual devices in the test process; tests/sharded_equality.py says why).
"""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from helpers import smoke_config
from mmgan_jax import benchmarking as bm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_FIELDS = ('median_s', 'examples_per_s', 'flops', 'achieved_flops_per_s', 'mfu', 'times_s', 'compile_s',
               'lower_s', 'flops_compiled_per_device', 'memory')
MACHINE_FIELDS = ('config', 'batch', 'dtype', 'platform', 'device_kind', 'devices_used', 'device_count',
                  'cpu_model', 'cpu_count', 'jax', 'jaxlib', 'command', 'latent_shape', 'load_average')


@pytest.fixture(scope='module')
def result():
  out = bm.benchmark(smoke_config(), config_name='configs/shapes.py:smoke', batch=8, devices=jax.devices()[:1],
                     steps=2, warmup=1, r1_steps=0, ks=(1,), ddim_steps=50, sample_repeats=2,
                     sections=('train', 'pipeline', 'sampling'), data_batch=16, data_batches=2)
  return json.loads(json.dumps(out))  # what --out holds: JSON-able, and read back as such


def test_every_field_is_reported(result):
  assert set(MACHINE_FIELDS) <= set(result['machine'])
  assert result['machine']['batch'] == 8 and result['machine']['platform'] == 'cpu'
  per_program = ('lower_s', 'memory', 'flops_compiled_per_device')  # the iteration is two programs
  for name in ('iteration', 'd_step', 'g_step'):
    missing = [f for f in STEP_FIELDS if f not in result['train'][name]
               and not (name == 'iteration' and f in per_program)]
    assert not missing, (name, missing)
  for name in ('d_step', 'g_step'):
    assert set(result['train'][name]['memory']) >= {'argument', 'output', 'temp', 'peak_estimate'}
  peak_fields = {'source', 'flops_per_s', 'cpu_matmul_f32_flops_per_s', 'cpu_matmul_bf16_flops_per_s'}
  assert peak_fields <= set(result['peak'])
  assert result['pipeline']['records_per_s_mean'] > 0 and result['pipeline_headroom'] > 0
  s = result['sampling']
  assert set(s['latency_s']) == {'encode', 'generator', 'g_plus_1', 'ddim_50', 'decode'}
  assert set(s['ratio_ddim_over_g_plus_k']) == set(s['ratio_ddim_over_g_plus_k_end_to_end']) == {'1'}
  assert result['flops_source'] and result['memory_peak_estimate_bytes'] > 0


def test_times_flops_and_mfu_are_consistent(result):
  tr = result['train']
  for name in ('iteration', 'd_step', 'g_step'):
    r = tr[name]
    assert r['median_s'] > 0 and all(t > 0 for t in r['times_s']) and len(r['times_s']) == 2
    assert r['flops'] > 0
    assert math.isclose(r['examples_per_s'] * r['median_s'], 8, rel_tol=1e-9)
    assert math.isclose(r['achieved_flops_per_s'], r['flops'] / r['median_s'], rel_tol=1e-9)
    assert 0 < r['mfu'] <= 1, (name, r['mfu'])
  assert math.isclose(tr['iteration']['flops'], tr['d_step']['flops'] + tr['g_step']['flops'])
  # The G step runs the encoders' and refiner's backward passes, G's and D's: it costs more than the D step.
  assert tr['g_step']['flops'] > tr['d_step']['flops']
  for name in ('d_step', 'g_step'):  # the optimised executable does about the same work as the lowered program
    assert 0.5 < tr[name]['flops_compiled_per_device'] / tr[name]['flops'] < 2.0
    assert tr[name]['compile_s'] > 0
  assert result['peak']['flops_per_s'] == tr['peak_flops_per_s'] > 1e8  # a real CPU does > 0.1 GFLOP/s


def test_refinement_is_cheaper_than_ddim(result):
  lat = result['sampling']['latency_s']
  assert all(v > 0 for v in lat.values())
  assert lat['ddim_50'] > lat['g_plus_1']
  assert result['sampling']['ratio_ddim_over_g_plus_k']['1'] > 1


def test_peak_table_and_device_kinds():
  assert bm.peak_flops('NVIDIA H100 80GB HBM3')[0] == 'H100 SXM'
  assert bm.peak_flops('NVIDIA H100 PCIe')[0] == 'H100 PCIe'
  assert bm.peak_flops('NVIDIA H200')[0] == 'H200 SXM'
  assert bm.peak_flops('NVIDIA A100-SXM4-80GB')[0] == 'A100'
  assert bm.peak_flops('TPU v5 lite')[0] == 'TPU v5e' and bm.peak_flops('TPU v6 lite')[0] == 'TPU v6e'
  assert bm.peak_flops('TPU v4')[0] == 'TPU v4' and bm.peak_flops('TPU v5p')[0] == 'TPU v5p'
  assert bm.peak_flops('TPU v5')[0] == 'TPU v5p'  # v5p's device kind has no suffix
  assert bm.peak_flops('cpu') is None and bm.peak_flops('TPU v4 lite') is None
  assert bm.largest_divisor(12, 8) == 6 and bm.largest_divisor(7, 8) == 7 and bm.largest_divisor(2, 1) == 1
  assert 'skipped' in bm.sharding_overhead(smoke_config(), 1, 8, steps=1, warmup=0)  # batch 1: nothing to split


def test_report_renders_and_keeps_the_interpretation(result, tmp_path):
  path = tmp_path / 'smoke.json'
  path.write_text(json.dumps(result))
  md = tmp_path / 'performance.md'
  md.write_text('old\n<!-- interpretation -->\nHand-written: keep me.\n<!-- /interpretation -->\n')
  table = bm.format_table(result)
  assert 'iteration' in table and 'DDIM-50' in table
  proc = subprocess.run([sys.executable, 'launch/performance_report.py', f'--json={path}', f'--out={md}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = md.read_text()
  assert 'Hand-written: keep me.' in text and not text.startswith('old')
  assert 'H100 SXM' in text and 'not measured here' in text
  assert f"{result['train']['iteration']['examples_per_s']:.2f}" in text


def test_launcher_rejects_bad_flags_in_one_line(tmp_path):
  for bad in (['--steps=0'], ['--ks=1,x'], ['--no_such_flag=1'], ['--config=configs/shapes.py:smok']):
    args = ['--config=configs/shapes.py:smoke', f'--out={tmp_path}/x.json'] + bad
    proc = subprocess.run([sys.executable, 'launch/benchmark.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2, (bad, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith('error: ') and 'Traceback' not in proc.stderr, (bad, proc.stderr[-2000:])


def test_hlo_ops_attributes_ops_to_kind_component_and_pass():
  """The per-op profile's index: a conv and a dense inside a module named 'generator', differentiated."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(8, (3, 3), name='conv')(x)
      return nn.Dense(4, name='dense')(h.reshape(h.shape[0], -1))

  net = Net(name='generator')
  x = jnp.ones((2, 8, 8, 3))
  params = net.init(jax.random.PRNGKey(0), x)['params']
  loss = lambda p: jnp.sum(net.apply({'params': p}, x) ** 2)
  text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  ops = bm.hlo_ops(text)
  kinds = {(cat, comp, pass_) for cat, comp, pass_, _ in ops.values()}
  assert ('convolution', 'generator', 'forward') in kinds
  assert ('matmul (dot)', 'generator', 'forward') in kinds and ('matmul (dot)', 'generator', 'backward') in kinds
  assert sum(op[0] == 'convolution' for op in ops.values()) >= 2  # the forward conv and a gradient conv
  assert all(comp in bm.COMPONENTS + (bm.UPDATE, bm.UNNAMED) for _, comp, _ in kinds)
