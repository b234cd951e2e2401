"""Preemption: SIGKILL at random steps and SIGTERM against the real launcher, compared with an uninterrupted run.

Anchor: the preemption handling of maxtext / the Flax examples (orbax `CheckpointManager` with the train state
AND the data-iterator state, a checkpoint on SIGTERM, `wait_until_finished()` before exit) and the resume order
documented in mmgan_jax/train/checkpoint.py. The properties checked, on a CPU with the smoke config and one seed:

* SIGKILL (no chance to clean up) at 3 random points spread over a run -- one of them while an asynchronous
  checkpoint write is in flight -- then a restart each time: every restart resumes from the newest checkpoint
  on disk, and the final checkpoint is bit-for-bit the final checkpoint of an uninterrupted run: parameters,
  optimizer states, EMA, step, rng, adaptive-loss state and the data-iterator state; every step re-run after
  a kill logs exactly the metrics of the uninterrupted run (same batches, same order).
* SIGTERM: the trainer finishes the step it is in, writes a checkpoint (state + iterator) of that step, and
  exits with status 0 within a bounded time; the checkpoint equals the uninterrupted run's checkpoint of the
  same step, and the next start resumes from it (its first trained step is the one after it).

* SIGTERM during start-up (model init, checkpoint restore) also exits 0 (the handler is installed first).

The runs are subprocesses of `launch/train.py` (one CPU device, the test compile cache, so only the first run
on a machine compiles). The uninterrupted reference run is started once per module, in the background, and
shared by both tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmgan_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 10
SEED = 0
# Every run: the smoke config, a checkpoint and a log line after every step, no mid-run samples, the cheapest
# evaluator at the end. Only host-side settings differ from the smoke defaults, so the compiled programs (and
# the compile cache entries) are shared by all runs.
FLAGS = ('--config=configs/shapes.py:smoke', f'--config.total_steps={TOTAL_STEPS}', f'--config.seed={SEED}',
         '--config.checkpoint_every=1', '--config.log_every=1', '--config.sample_every=0',
         "--config.eval.evaluators=('retrieval',)")
STARTUP_TIMEOUT_S = 1200  # import, set-up, first step: a cold compile takes minutes on a busy 2-core CPU
RUN_TIMEOUT_S = 1200  # a whole 10-step run
SIGTERM_EXIT_BOUND_S = 60  # SIGTERM -> exit: one step, one checkpoint write, close
TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax writes step k to k.orbax-checkpoint-tmp, then renames it to k
STATE_PARTS = ('params', 'opt_g', 'opt_d', 'ema', 'step', 'rng', 'adaptive')


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as a user's laptop
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir or ''
  return env


class Run:
  """One `launch/train.py` subprocess on `workdir`, its stdout/stderr in files next to the workdir."""

  def __init__(self, workdir: str, name: str, *extra_flags: str, env: dict[str, str] | None = None):
    self.workdir = workdir
    self.name = name
    base = os.path.join(os.path.dirname(workdir), f'{os.path.basename(workdir)}.{name}')
    self.out_path, self.err_path = base + '.out', base + '.err'
    self.metrics_path = os.path.join(workdir, 'metrics.jsonl')
    # This run's rows of WORKDIR/metrics.jsonl come after what earlier runs on the workdir appended.
    self.metrics_offset = os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.proc = subprocess.Popen([sys.executable, 'launch/train.py', f'--workdir={workdir}', *FLAGS,
                                    *extra_flags], cwd=ROOT, env=env or _env(), stdout=out, stderr=err)

  def log(self) -> str:
    with open(self.err_path, errors='replace') as f:
      return f.read()

  def stdout(self) -> str:
    with open(self.out_path, errors='replace') as f:
      return f.read()

  def tail(self) -> str:
    return f'--- {self.name} stdout:\n{self.stdout()[-2000:]}\n--- {self.name} stderr:\n{self.log()[-6000:]}'

  def wait(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'{self.name} did not exit within {timeout:.0f} s.\n{self.tail()}')

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  def wait_for(self, predicate, timeout: float, what: str):
    """Polls `predicate()` every 10 ms until it is truthy; fails if the process exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      value = predicate()
      if value:
        return value
      if self.proc.poll() is not None:
        pytest.fail(f'{self.name} exited ({self.proc.returncode}) before {what}.\n{self.tail()}')
      time.sleep(0.01)
    self.kill()
    pytest.fail(f'{self.name}: timed out after {timeout:.0f} s waiting for {what}.\n{self.tail()}')

  def resumed_step(self) -> int | None:
    """The step of the 'Resumed from ... at step N.' log line (None: it started from scratch)."""
    found = re.findall(r'Resumed from \S+ at step (\d+)\.', self.log())
    assert len(found) <= 1, found
    return int(found[0]) if found else None

  def logged_metrics(self) -> dict[int, dict[str, str]]:
    """Per-step training scalars this run appended to WORKDIR/metrics.jsonl (6 significant digits), without the
    wall-clock ones; a line cut short by SIGKILL is left out."""
    out = {}
    if not os.path.exists(self.metrics_path):
      return out
    with open(self.metrics_path) as f:
      f.seek(self.metrics_offset)
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        step = int(row.pop('step'))
        out[step] = {k: f'{v:.6g}' for k, v in row.items() if not k.startswith('steps_per_sec')}
    return out


def _entries(workdir: str) -> list[str]:
  try:
    return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  except FileNotFoundError:
    return []


def saved_steps(workdir: str) -> list[int]:
  """Finalized checkpoints (orbax renames a step's directory to its bare number once it is complete)."""
  return sorted(int(e) for e in _entries(workdir) if e.isdigit())


def started_steps(workdir: str) -> list[int]:
  """Steps whose checkpoint write has at least started (finalized or still in the temporary directory)."""
  return sorted({int(e[:-len(TMP_SUFFIX)]) if e.endswith(TMP_SUFFIX) else int(e) for e in _entries(workdir)
                 if e.isdigit() or (e.endswith(TMP_SUFFIX) and e[:-len(TMP_SUFFIX)].isdigit())})


def in_flight(workdir: str) -> list[str]:
  return [e for e in _entries(workdir) if e.endswith(TMP_SUFFIX)]


def restore(workdir: str, step: int) -> tuple[dict[str, np.ndarray], dict]:
  """Step `step` as saved on disk (no target tree: exactly what was written), as {path: host array}, data."""
  options = ocp.CheckpointManagerOptions(read_only=True)
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), options=options,
                                  item_names=('state', 'data'))
  try:
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        data=ocp.args.JsonRestore()))
  finally:
    manager.close()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(out['state']))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}, dict(out['data'] or {})


def assert_same_checkpoint(workdir_a: str, workdir_b: str, step: int) -> None:
  """The two runs' checkpoints of `step` are identical bit for bit, state and data-iterator state."""
  state_a, data_a = restore(workdir_a, step)
  state_b, data_b = restore(workdir_b, step)
  assert sorted(state_a) == sorted(state_b)
  parts = {k[2:].split("'", 1)[0] for k in state_a}
  assert set(STATE_PARTS) <= parts, parts
  assert int(state_a["['step']"]) == step
  for key, a in state_a.items():
    b = state_b[key]
    assert a.dtype == b.dtype and a.shape == b.shape, key
    np.testing.assert_array_equal(a, b, err_msg=f'step {step}: {key}')
    assert a.tobytes() == b.tobytes(), f'step {step}: {key} differs in its bits (e.g. -0.0 vs 0.0 or NaN payload)'
  assert data_a and data_a == data_b, (data_a, data_b)


def assert_same_metrics(run: Run, reference: dict[int, dict[str, str]]) -> set[int]:
  """Every step `run` logged has the reference's scalars for that step (same batch, same update)."""
  logged = run.logged_metrics()
  for step, metrics in logged.items():
    assert metrics == reference[step], (
        f'{run.name}: step {step} logged other training scalars than the uninterrupted run: '
        f'{ {k: (v, reference[step].get(k)) for k, v in metrics.items() if reference[step].get(k) != v} }')
  return set(logged)


class Reference:
  """The uninterrupted run, started in the background when first requested; every checkpoint kept."""

  def __init__(self, workdir: str):
    self.run = Run(workdir, 'reference', f'--config.max_checkpoints={TOTAL_STEPS + 1}')
    self._metrics = None

  @property
  def workdir(self) -> str:
    return self.run.workdir

  def finish(self) -> dict[int, dict[str, str]]:
    """Waits for the run; returns its per-step logged scalars."""
    if self._metrics is None:
      rc = self.run.wait(RUN_TIMEOUT_S)
      assert rc == 0, self.run.tail()
      assert saved_steps(self.workdir) == list(range(1, TOTAL_STEPS + 1)), _entries(self.workdir)
      self._metrics = self.run.logged_metrics()
      assert sorted(self._metrics) == list(range(1, TOTAL_STEPS + 1)), sorted(self._metrics)
    return self._metrics


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  ref = Reference(str(tmp_path_factory.mktemp('preemption') / 'reference'))
  yield ref
  ref.run.kill()


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bitwise_exact(tmp_path, reference):
  """3 SIGKILLs at random steps (one mid checkpoint write), restarts: the final state is the uninterrupted one."""
  rng = np.random.default_rng(20250101)
  # One random target step in each part of the run, so the kills spread over it; each kill waits until the
  # checkpoint write of a step >= its target has begun, then (mode 'write') kills at once, while that write is
  # in flight, or (mode 'delay') after a random delay, i.e. anywhere in the following step or write.
  targets = [int(rng.integers(2, 4)), int(rng.integers(4, 7)), int(rng.integers(7, TOTAL_STEPS - 1))]
  modes = ['write', 'delay', 'delay']
  delays = rng.uniform(0.0, 0.5, size=3)  # short: a fast machine must not finish the run before the kill
  workdir = str(tmp_path / 'killed')
  runs: list[Run] = []
  newest_on_start = []  # the newest complete checkpoint on disk when each run started
  interrupted_writes = 0
  try:
    for i, (target, mode, delay) in enumerate(zip(targets, modes, delays)):
      before = saved_steps(workdir)
      newest_on_start.append(before[-1] if before else None)
      run = Run(workdir, f'run{i}')
      runs.append(run)
      # Progress in this run: a write of a step past both the target and the step it resumed from has begun.
      first_new = max(target, (before[-1] if before else 0) + 1)
      if mode == 'write':
        run.wait_for(lambda: any(e in in_flight(workdir) for e in (f'{s}{TMP_SUFFIX}' for s in
                                                                     range(first_new, TOTAL_STEPS + 1))),
                     STARTUP_TIMEOUT_S, f'the checkpoint write of a step >= {first_new}')
      else:
        run.wait_for(lambda: any(s >= first_new for s in started_steps(workdir)), STARTUP_TIMEOUT_S,
                     f'the checkpoint write of a step >= {first_new}')
        time.sleep(delay)
      assert run.proc.poll() is None, f'{run.name} finished before it could be killed.\n{run.tail()}'
      run.proc.send_signal(signal.SIGKILL)
      assert run.wait(30) == -signal.SIGKILL
      interrupted_writes += bool(in_flight(workdir))
      # The restart (the next run) must resume from the newest complete checkpoint left by this one.
      assert saved_steps(workdir), f'{run.name} left no complete checkpoint: {_entries(workdir)}'

    newest_on_start.append(saved_steps(workdir)[-1])
    final = Run(workdir, 'final')
    runs.append(final)
    assert final.wait(RUN_TIMEOUT_S) == 0, final.tail()
  finally:
    for run in runs:
      run.kill()

  # Each restart resumed (not restarted from scratch) from the newest checkpoint a kill left on disk -- none was
  # left unreadable -- and from a later step than the previous one.
  resumed = [r.resumed_step() for r in runs]
  assert resumed == newest_on_start, (resumed, newest_on_start)
  assert resumed[0] is None and all(s is not None for s in resumed[1:]), resumed
  assert all(a < b for a, b in zip(resumed[1:], resumed[2:])), resumed
  for target, step in zip(targets, resumed[1:]):
    assert step >= target - 1, (targets, resumed)
  assert f'{TOTAL_STEPS} steps in ' in final.stdout(), final.tail()
  assert interrupted_writes >= 1, 'no kill hit an in-flight checkpoint write'

  ref_metrics = reference.finish()
  # The steps each run trained (including those re-run after a kill) are the reference's steps, batch for batch.
  covered = set()
  for run in runs:
    covered |= assert_same_metrics(run, ref_metrics)
  assert covered == set(range(1, TOTAL_STEPS + 1)), sorted(covered)
  assert saved_steps(workdir)[-1] == TOTAL_STEPS
  assert_same_checkpoint(reference.workdir, workdir, TOTAL_STEPS)
  # ... so the final evaluation is the same too.
  results = []
  for w in (reference.workdir, workdir):
    with open(os.path.join(w, 'eval_results.json')) as f:
      results.append({k: v for k, v in json.load(f).items() if k not in trainer.WALL_CLOCK_RESULTS})
  assert results[0] == results[1]


@pytest.mark.slow
def test_sigterm_checkpoints_current_step_exits_zero_and_resumes(tmp_path, reference):
  """SIGTERM: the step in progress finishes, a checkpoint of it is written, exit 0; the next start resumes it."""
  rng = np.random.default_rng(7)
  workdir = str(tmp_path / 'terminated')
  runs = []
  stops = []
  try:
    for i in range(2):
      before = saved_steps(workdir)
      run = Run(workdir, f'run{i}', f'--config.max_checkpoints={TOTAL_STEPS + 1}')  # keep what is compared
      runs.append(run)
      # Wait for a step trained in this run to be checkpointed, then SIGTERM a random time into the next step.
      first_new = (before[-1] if before else 0) + 1
      run.wait_for(lambda: any(s >= first_new for s in saved_steps(workdir)), STARTUP_TIMEOUT_S,
                   f'a checkpoint of step >= {first_new}')
      time.sleep(float(rng.uniform(0.0, 0.5)))
      observed = saved_steps(workdir)[-1]
      assert run.proc.poll() is None, f'{run.name} finished before SIGTERM.\n{run.tail()}'
      sent = time.monotonic()
      run.proc.send_signal(signal.SIGTERM)
      rc = run.wait(SIGTERM_EXIT_BOUND_S + 30)
      took = time.monotonic() - sent
      assert rc == 0, f'{run.name}: SIGTERM gave exit status {rc}, not 0.\n{run.tail()}'
      assert took <= SIGTERM_EXIT_BOUND_S, f'{run.name}: exit took {took:.1f} s after SIGTERM'
      found = re.findall(r'SIGTERM: checkpoint written at step (\d+); exiting', run.log())
      assert len(found) == 1, run.tail()
      stopped = int(found[0])
      # The checkpoint is of the step the trainer was at (the one after the newest complete checkpoint, or the
      # one after that if its write was still in flight), complete (no write left in flight), and the newest.
      assert observed <= stopped <= observed + 2 and stopped < TOTAL_STEPS, (observed, stopped)
      assert saved_steps(workdir)[-1] == stopped, _entries(workdir)
      assert not in_flight(workdir), _entries(workdir)
      assert max(run.logged_metrics()) == stopped
      assert not os.path.exists(os.path.join(workdir, 'eval_results.json'))  # stopped, not finished
      stops.append(stopped)
  finally:
    for run in runs:
      run.kill()

  # The second start resumed from the SIGTERM checkpoint: it says so, and the first step it trained is the next.
  assert runs[0].resumed_step() is None
  assert runs[1].resumed_step() == stops[0], runs[1].tail()
  assert min(runs[1].logged_metrics()) == stops[0] + 1
  assert stops[1] > stops[0]
  ref_metrics = reference.finish()
  for run in runs:
    assert_same_metrics(run, ref_metrics)
  # What SIGTERM saved (state + data iterator) is the uninterrupted run's checkpoint of that step, bit for bit.
  for step in stops:
    assert_same_checkpoint(reference.workdir, workdir, step)


@pytest.mark.slow
def test_sigterm_during_startup_exits_cleanly(tmp_path):
  """SIGTERM while the trainer is still setting up (after model init, at the checkpoint restore) -> exit 0."""
  run = Run(str(tmp_path / 'startup'), 'startup')
  try:
    # setup() creates the checkpoint manager after initialising the state, before the restore and the steps.
    run.wait_for(lambda: 'Checkpoints: ' in run.log(), STARTUP_TIMEOUT_S,
                 'set-up to reach the checkpointer')
    run.proc.send_signal(signal.SIGTERM)
    rc = run.wait(STARTUP_TIMEOUT_S)
  finally:
    run.kill()
  assert rc == 0, f'SIGTERM during start-up gave exit status {rc}, not 0.\n{run.tail()[-1500:]}'
  assert 'Traceback' not in run.log()


def test_sigterm_in_a_long_native_call_exits_within_30_s(tmp_path):
  """A SIGTERM that lands in a long native call is not at a step boundary for minutes: here the first XLA
  compile (an empty compile cache); the same holds for an evaluation. The watchdog exits with status 0 within
  the ~30 s a preemptible VM gives, saying what the process was doing; nothing had been checkpointed yet."""
  workdir = str(tmp_path / 'run')
  env = dict(_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'empty_cache'))
  run = Run(workdir, 'compile', env=env)
  run.wait_for(lambda: 'Compiling the train steps' in run.log(), STARTUP_TIMEOUT_S, 'the compile')
  t0 = time.monotonic()
  run.proc.send_signal(signal.SIGTERM)
  code = run.wait(60)
  seconds = time.monotonic() - t0
  assert code == 0, run.tail()
  assert seconds < 30, (seconds, run.tail())
  assert 'SIGTERM: still compiling the train steps' in run.log() and 'Traceback' not in run.log(), run.tail()
