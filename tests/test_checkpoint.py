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
  return {'params': {'w': jnp.arange(12.0).reshape(3, 4) * scale, 'b': jnp.full((4,), scale)},
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
  # Truncate step 2's array files or its metadata (a write cut short by a full disk or a kill).
  damaged = 0
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '2' / 'state'):
    for f in files:
      if (what == 'array data' and (os.sep + 'd' in root or f.startswith('ocdbt'))) or (
          what == 'metadata' and f.startswith(('manifest', '_METADATA'))):
        with open(os.path.join(root, f), 'r+b') as fh:
          fh.truncate(max(0, os.path.getsize(os.path.join(root, f)) // 3))
        damaged += 1
  assert damaged
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    state, data = ck.restore(_abstract(_state()))
  ck.close()
  assert data == {'next_index': 1}
  np.testing.assert_array_equal(state['params']['b'], np.full((4,), 1.0))
  assert any('unreadable' in r.getMessage() for r in caplog.records)


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
  other = {'params': {'w': jnp.ones((3, 5)), 'b': jnp.ones((4,)), 'gamma': jnp.ones((2,))},
           'step': jnp.asarray(0, jnp.int32)}
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore(_abstract(other))
  ck.close()
  msg = str(e.value)
  assert 'step 2' in msg and '1 arrays differ' not in msg
  assert 'params/w: checkpoint float32[3, 4] vs config float32[3, 5]' in msg
  assert 'params/gamma: in the config float32[2], not in the checkpoint' in msg
  assert 'params/b' not in msg  # what matches is not listed
  # The same config restores fine.
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  state, _ = ck.restore(_abstract(_state()))
  ck.close()
  np.testing.assert_array_equal(state['params']['b'], np.full((4,), 2.0))
