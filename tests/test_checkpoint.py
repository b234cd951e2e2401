"""Checkpoint robustness: a damaged newest checkpoint falls back to the previous one; a config mismatch is a
clear error listing the differing arrays, never a partial load."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgan_jax.train import checkpoint as ckpt_lib


def _state(scale=1.0):
  return {'params': {'w': jnp.arange(12.0).reshape(3, 4) * scale, 'b': jnp.full((4,), scale),
                     'big': jnp.linspace(0.0, scale, 64 * 1024).reshape(256, 256)},  # a data file of its own
          'step': jnp.asarray(7, jnp.int32)}


def _abstract(tree):
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)


def _save(directory, steps):
  ck = ckpt_lib.Checkpointer(str(directory), async_save=False)
  for s in steps:
    ck.save(s, _state(float(s)), {'next_index': s}, force=True)
  ck.close()


@pytest.mark.parametrize('what', ['array data', 'metadata'])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, what):
  _save(tmp_path, (1, 2))
  # Truncate step 2's largest array file to 100 bytes, or its metadata to a third (a write cut short by a full
  # disk or a kill).
  files = [os.path.join(root, f) for root, _, fs in os.walk(tmp_path / 'checkpoints' / '2' / 'state') for f in fs]
  if what == 'array data':
    damaged = [max((f for f in files if os.path.basename(os.path.dirname(f)) == 'd'), key=os.path.getsize)]
  else:
    damaged = [f for f in files if os.path.basename(f).startswith(('manifest', '_METADATA'))]
  assert damaged
  for f in damaged:
    with open(f, 'r+b') as fh:
      fh.truncate(100 if what == 'array data' else os.path.getsize(f) // 3)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    state, data = ck.restore(_abstract(_state()))
  ck.close()
  assert data == {'next_index': 1}
  np.testing.assert_array_equal(state['params']['b'], np.full((4,), 1.0))
  assert any('unreadable' in r.getMessage() for r in caplog.records)
  if what == 'array data':  # the warning names the truncated file
    assert any(f'damaged file: {damaged[0]} (100 bytes)' in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
  assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [1, 2]  # a read-only restore moves nothing

  # Training resumes: the damaged step is moved aside (kept), and the retrained step 2 is saved again (orbax
  # does not save a step <= its latest, so a damaged step 2 left in place would swallow it).
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.restore(_abstract(_state()), move_damaged=True)
  ck.save(2, _state(5.0), {'next_index': 2}, force=True)
  ck.close()
  aside = os.listdir(tmp_path / 'damaged_checkpoints')
  assert len(aside) == 1 and aside[0].startswith('step_2_'), aside
  assert os.listdir(tmp_path / 'damaged_checkpoints' / aside[0])  # its files are kept for inspection
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  state, data = ck.restore(_abstract(_state()))
  ck.close()
  assert data == {'next_index': 2}
  np.testing.assert_array_equal(state['params']['b'], np.full((4,), 5.0))


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  _save(tmp_path, (1,))
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '1' / 'state'):
    for f in files:
      os.remove(os.path.join(root, f))
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointError, match='no readable checkpoint'):
    ck.restore(_abstract(_state()))
  ck.close()


def test_config_mismatch_lists_every_differing_array(tmp_path):
  _save(tmp_path, (1, 2))
  other = {'params': {'w': jnp.ones((3, 5)), 'b': jnp.ones((4,)), 'gamma': jnp.ones((2,)),
                     'big': jnp.ones((256, 256))},
           'step': jnp.asarray(0, jnp.int32)}
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(_abstract(other))
  ck.close()
  msg = str(e.value)
  assert 'step 2' in msg and '1 arrays differ' not in msg
  assert 'params/w: checkpoint float32[3, 4] vs config float32[3, 5]' in msg
  assert 'params/gamma: in the config float32[2], not in the checkpoint' in msg
  assert 'params/b:' not in msg and 'params/big' not in msg  # what matches is not listed
  # The same config restores fine.
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  state, _ = ck.restore(_abstract(_state()))
  ck.close()
  np.testing.assert_array_equal(state['params']['b'], np.full((4,), 2.0))
