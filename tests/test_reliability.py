"""The host-side NaN stop, and workdir problems caught before training."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import smoke_config
from mmgan_jax.train import checkpoint as ckpt_lib
from mmgan_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nan_batches_stop_training_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
  """debug.nan_at_steps makes iterations 4.. NaN: their updates are skipped, each bad iteration counts once (its
  D and G steps both fail), the run stops with a clear error right after the 4th (max_nonfinite_steps), and every
  checkpoint (params, EMA, optimizer) is finite and equal to the last good one. The check runs every iteration,
  one step late (log_every is 50 here)."""
  config = smoke_config(**{'total_steps': 20, 'checkpoint_every': 1, 'log_every': 50, 'sample_every': 0,
                           'max_nonfinite_steps': 4, 'max_checkpoints': 20, 'eval.evaluators': ('retrieval',),
                           'debug.nan_at_steps': tuple(range(4, 21))})
  real_next = trainer.next_batch
  served = []

  def counted(s):
    served.append(1)
    return real_next(s)

  monkeypatch.setattr(trainer, 'next_batch', counted)
  with pytest.raises(trainer.NonFiniteError, match='in 4 consecutive iterations') as e:
    trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert 'step 7:' in str(e.value) and 'last good checkpoint' in str(e.value)
  assert len(served) == 8  # 3 good, 4 bad, and the one in flight when the 4th bad one was read

  s = trainer.setup(config, None, devices=jax.devices()[:1])
  abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: s.state), s.state_shardings)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  steps = ck.all_steps()
  assert steps == list(range(1, 8))
  good, _ = ck.restore(abstract, step=3)
  good = jax.device_get(good)
  for step in steps[3:]:
    bad, _ = ck.restore(abstract, step=step)
    bad = jax.device_get(bad)
    for name in ('params', 'ema', 'opt_g', 'opt_d'):
      for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(getattr(good, name))[0],
                              jax.tree.leaves(getattr(bad, name))):
        assert np.all(np.isfinite(np.asarray(b, np.float64))), f'step {step} {name}{jax.tree_util.keystr(path)}'
        np.testing.assert_array_equal(a, b, err_msg=f'step {step} {name}{jax.tree_util.keystr(path)}')
    assert float(bad.adaptive['nonfinite']) == step - 3  # bad iterations counted once each
  ck.close()


def test_unwritable_or_full_workdir_is_refused_before_training(tmp_path, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(trainer.WorkdirError, match='cannot be written'):
    trainer.check_workdir(str(blocker / 'run'))
  monkeypatch.setattr(trainer.shutil, 'disk_usage', lambda p: type('U', (), {'free': 10 * 2**20})())
  with pytest.raises(trainer.WorkdirError, match='10 MiB free'):
    trainer.check_workdir(str(tmp_path / 'run'), need_bytes=2**30)
  trainer.check_workdir(str(tmp_path / 'run'), need_bytes=2**20)  # enough room: fine


def test_launcher_reports_a_bad_workdir_in_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, 'launch/train.py', '--config=configs/shapes.py:smoke',
                         f'--workdir={blocker}/run'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'cannot be written' in proc.stderr and 'Traceback' not in proc.stderr


def test_resuming_with_a_different_config_is_refused_and_an_accepted_change_is_recorded(tmp_path):
  """A workdir with a checkpoint, resumed with another seed and learning rate: refused before anything is built,
  every differing field listed; bookkeeping fields (eval_every) may change; an accepted change is appended to
  config_history.jsonl after the run's first config, and config.json becomes the new config."""
  import json  # pylint: disable=g-import-not-at-top
  from mmgan_jax import config_io  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  first = smoke_config()
  config_io.record(first, workdir, {}, resuming=False)
  os.makedirs(os.path.join(workdir, 'checkpoints', '3'))
  changed = smoke_config(**{'seed': 1, 'optim.g_lr': 1e-3, 'eval_every': 2})
  with pytest.raises(config_io.ConfigChangeError, match=r'2 field\(s\) differ') as e:
    trainer.train_and_evaluate(changed, workdir, devices=jax.devices()[:1])
  assert 'seed: 0 -> 1' in str(e.value) and 'optim.g_lr: 0.005 -> 0.001' in str(e.value)
  assert 'eval_every' not in str(e.value) and '--accept_config_change' in str(e.value)
  assert config_io.load(workdir).seed == 0  # the record is untouched
  assert config_io.check_resume(smoke_config(eval_every=2), workdir, resuming=True, accept_changes=False) == {
      'eval_every': [0, 2]}
  diff = config_io.check_resume(changed, workdir, resuming=True, accept_changes=True)
  config_io.record(changed, workdir, diff, resuming=True)
  with open(os.path.join(workdir, config_io.HISTORY)) as f:
    history = [json.loads(line) for line in f]
  assert [h['event'] for h in history] == ['start', 'resume with changes']
  assert history[0]['config']['seed'] == 0 and history[1]['changes']['seed'] == [0, 1]
  assert config_io.load(workdir).seed == 1
