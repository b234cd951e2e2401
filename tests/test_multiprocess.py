"""Multi-process training: 2 JAX processes on localhost (CPU, gloo) behave as one process on the same batches.

The job: two `launch/train.py` processes joined with --coordinator_address/--num_processes/--process_id, each
with 2 virtual CPU devices, so the (data=1, fsdp=4, tensor=1) mesh spans both processes and FSDP splits
parameters across them. Each process reads its own slice of the training set; their per-process batches form
the global batch. The run trains, checkpoints (every process takes part in the orbax save), writes the sample
grids and the final evaluation, and exits 0. Then:

* a one-process reference (tests/multiprocess_worker.py reference, one device) trains the same steps on the
  same global batches (process 0's per-process batch, then process 1's);
* a second 2-process job (tests/multiprocess_worker.py check) restores the launcher's checkpoint on the global
  mesh (a multi-process resume), gathers the parameters to the host, saves the state again and restores it,
  comparing every restored shard on every process.

Properties: the launcher job exits 0, with one summary file and one eval_results.json (process 0 writes them)
and the checkpoint of the last step; the gathered parameters equal the reference's (tolerance below); the
checkpoint round trip is exact; a newest step damaged on one process's side makes both processes fall back to
the same step and is moved aside; a bad coordinator stops with one line, not a hang.

Cost: compiling is most of it, so the model is the smoke model with its optional parts off (see
multiprocess_worker.OVERRIDES), XLA:CPU compiles at -O0 (both sides alike), the check job restores without
compiling the init program, and the one-process reference uses the test session's compile cache (warm after a
first run). The 2-process programs are always compiled afresh: jax writes only process 0's cache entries (the
processes' cache keys differ on CPU), and in-process CPU collectives from cached programs have deadlocked here
(see tests/sharded_equality.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multiprocess_worker as worker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'multiprocess_worker.py')
STEPS = worker.OVERRIDES['total_steps']
# Faster XLA:CPU compiles (LLVM at -O0): the compile is most of this test's time. Numerics change slightly
# against the default settings, the same way for the reference and the 2-process job.
FAST_XLA = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
TIMEOUT_S = 900  # per phase; a cold compile on a busy 2-core machine takes minutes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int, cache: bool = False) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_FLAGS', 'JAX_'))}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_XLA}', JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='3', PYTHONUNBUFFERED='1')
  if cache and jax.config.jax_compilation_cache_dir:  # the session's cache (tests/conftest.py)
    env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  return env


class Child:
  """One subprocess, its stdout+stderr in a file."""

  def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir) -> None:
    self.name = name
    self.log_path = os.path.join(str(log_dir), f'{name}.log')
    with open(self.log_path, 'w') as f:
      self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)

  def tail(self, n: int = 4000) -> str:
    with open(self.log_path, errors='replace') as f:
      return f'--- {self.name} (exit {self.proc.poll()}) ---\n{f.read()[-n:]}'


def _wait_all(children: list[Child], timeout_s: float) -> None:
  """Waits for every child; on a timeout or a failure kills the others and fails with everyone's output."""
  deadline = time.time() + timeout_s
  while True:
    codes = [c.proc.poll() for c in children]
    failed = any(code not in (None, 0) for code in codes)
    if None not in codes and not failed:
      return
    if failed or time.time() > deadline:
      for c in children:
        if c.proc.poll() is None:
          c.proc.kill()
          c.proc.wait()
      why = 'a child failed' if failed else f'timed out after {timeout_s} s'
      pytest.fail(f'{why}:\n' + '\n'.join(c.tail() for c in children))
    time.sleep(0.5)


def _launcher(pid: int, port: int, workdir, env, log_dir) -> Child:
  return Child(f'train{pid}', ['launch/train.py', f'--workdir={workdir}', *worker.launcher_flags(),
                               f'--coordinator_address=127.0.0.1:{port}',
                               f'--num_processes={worker.NUM_PROCESSES}', f'--process_id={pid}',
                               '--distributed_timeout_s=120'], env, log_dir)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Phase 1: the 2-process launcher job and the one-process reference in parallel; phase 2: the check job."""
  tmp = tmp_path_factory.mktemp('multiprocess')
  workdir, out_dir = tmp / 'run', tmp / 'check'
  out_dir.mkdir()
  t0 = time.time()
  port = _free_port()
  env = _env(worker.DEVICES_PER_PROCESS)
  phase1 = [_launcher(i, port, workdir, env, tmp) for i in range(worker.NUM_PROCESSES)]
  phase1.append(Child('reference', [WORKER, 'reference', str(tmp / 'reference.npz'), str(STEPS)],
                      _env(1, cache=True), tmp))
  _wait_all(phase1, TIMEOUT_S)
  t1 = time.time()
  port = _free_port()
  phase2 = [Child(f'check{i}', [WORKER, 'check', str(i), str(worker.NUM_PROCESSES), str(port), str(workdir),
                                str(out_dir)], env, tmp) for i in range(worker.NUM_PROCESSES)]
  _wait_all(phase2, TIMEOUT_S)
  print(f'multi-process test: phase 1 {t1 - t0:.0f} s, phase 2 {time.time() - t1:.0f} s')
  return {'workdir': workdir, 'logs': {c.name: c.tail(200_000) for c in phase1 + phase2},
          'reference': dict(np.load(tmp / 'reference.npz')), 'check': dict(np.load(out_dir / 'check.npz')),
          'lr': max(worker.run_config().optim[k] for k in ('g_lr', 'd_lr', 'rep_lr'))}


def test_launcher_job_trains_checkpoints_and_evaluates_once(runs):
  workdir = runs['workdir']
  for i in range(worker.NUM_PROCESSES):
    log = runs['logs'][f'train{i}']
    assert f'JAX process {i} of {worker.NUM_PROCESSES}: {worker.DEVICES_PER_PROCESS} local devices, ' \
           f'{worker.NUM_PROCESSES * worker.DEVICES_PER_PROCESS} global devices' in log, log[-3000:]
    assert 'Traceback' not in log, log[-3000:]
  assert (workdir / 'checkpoints' / str(STEPS)).is_dir()
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(STEPS)]  # one save, made by both processes together
  # Summaries and results come from process 0 alone: one event file, one results file, with the evaluators.
  assert len([f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]) == 1
  results = json.loads((workdir / 'eval_results.json').read_text())
  assert results['steps'] == STEPS and results['num_examples'] == 16
  assert 0.0 <= results['text_to_image/refined/mean'] <= 1.0 and 'image_to_text/BLEU-4' in results
  assert 'retrieval/text_to_image/R@1' in results
  # Both processes computed the same evaluation (each prints its results table: rows and metric lines).
  printed = [[line for line in runs['logs'][f'train{i}'].splitlines() if '->' in line and 'R@1' in line
              or line.startswith('text->image refined')] for i in range(worker.NUM_PROCESSES)]
  assert len(printed[0]) >= 2 and printed[0] == printed[1], printed


def test_two_processes_end_with_the_parameters_of_one(runs):
  ref, mp = runs['reference'], runs['check']
  assert int(mp['process_count']) == worker.NUM_PROCESSES and int(mp['local_device_count']) == 2
  assert int(mp['device_count']) == 4
  assert bool(mp['cross_process_fsdp'])  # parameters really are split across the two processes
  assert int(mp['start_step']) == STEPS  # the check job resumed the launcher job's last checkpoint
  names = sorted(k for k in ref if k.startswith('param/'))
  assert names and names == sorted(k for k in mp if k.startswith('param/'))
  # Attention key biases get a gradient that is exactly zero in exact arithmetic (softmax ignores a constant
  # added to every logit of a query), so theirs is pure round-off, which Adam scales up to steps of about +-lr:
  # they are noise of size <= STEPS * lr in both runs, and only that is checked for them.
  noise = [k for k in names if k.endswith("['key']['bias']")]
  bound = STEPS * runs['lr']
  for k in noise:
    assert np.abs(ref[k]).max() <= bound and np.abs(mp[k]).max() <= bound, k
  # Everything else: one device sums the batch in one order, four devices on two processes sum partial sums
  # (XLA within a process, gloo across): float32 round-off through a few Adam steps, nothing more.
  worst = 0.0
  for k in sorted(set(names) - set(noise)):
    a, b = ref[k], mp[k]
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32, k
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=k)
    worst = max(worst, float(np.max(np.abs(a - b) / (np.abs(a) + 1e-3))))
  print(f'{len(names) - len(noise)} parameter arrays match, largest relative difference {worst:.2g}')


def test_multi_process_checkpoint_round_trip_is_exact(runs):
  mp = runs['check']
  assert list(mp['restored_equal_per_process']) == [1] * worker.NUM_PROCESSES
  assert int(mp['data_state_next_index']) == STEPS  # the iterator state came back with the arrays


def test_damaged_step_on_one_process_falls_back_on_both_and_is_moved_aside(runs):
  """Process 1's data file of the newest step truncated: both processes resume the same older step (never one
  each), the damaged step is moved to damaged_checkpoints/, and the retrained step is saved and read back."""
  mp = runs['check']
  assert list(mp['damaged_fallback_next_index']) == [STEPS] * worker.NUM_PROCESSES
  aside = list(mp['damaged_aside'])
  assert len(aside) == 1 and aside[0].startswith(f'step_{STEPS + 1}_'), aside
  assert list(mp['steps_after_resave']) == [STEPS, STEPS + 1]
  assert int(mp['next_index_after_resave']) == -7


def test_unreachable_coordinator_is_one_line_not_a_hang(tmp_path):
  env = _env(1)
  t0 = time.time()
  proc = subprocess.run([sys.executable, 'launch/train.py', f'--workdir={tmp_path}',
                         '--config=configs/shapes.py:smoke', f'--coordinator_address=127.0.0.1:{_free_port()}',
                         '--num_processes=2', '--process_id=1', '--distributed_timeout_s=3'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert time.time() - t0 < 60
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'coordinator' in errors[0] and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
