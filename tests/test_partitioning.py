"""Logical axis names -> mesh axes (models/partitioning.py): parameter specs and activation constraints.

The full-step check of the constraints (a 2 x 2 x 2 data x fsdp x tensor mesh against one device, the case they
fix) is test_train.py::test_sharded_step_equals_single_device; here, the rules themselves and where they apply,
on small programs without collectives.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mmgan_jax.models import layers, partitioning
from mmgan_jax.train import sharding

RULES = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'))


def _mesh(shape=(2, 1, 2)):
  return sharding.make_mesh(shape, ('data', 'fsdp', 'tensor'), jax.devices()[:int(np.prod(shape))])


def test_spec_for_maps_names_and_replicates_what_cannot_split():
  mesh = _mesh((2, 2, 2))
  assert partitioning.spec_for((8, 16), ('batch', 'mlp'), mesh, RULES) == P(('data', 'fsdp'), 'tensor')
  assert partitioning.spec_for((6, 16), ('batch', 'mlp'), mesh, RULES) == P(None, 'tensor')  # 6 % 4 != 0
  assert partitioning.spec_for((16, 3), ('embed', 'mlp'), mesh, RULES) == P('fsdp', None)  # 3 % 2 != 0
  assert partitioning.spec_for((8, 8), ('batch', 'embed'), mesh, RULES) == P(('data', 'fsdp'), None)  # fsdp used
  assert partitioning.spec_for((8, 8), ('unknown', None), mesh, RULES) == P(None, None)
  assert partitioning.spec_for((8, 8), ('embed', 'mlp'), _mesh((4, 1, 1)), RULES) == P(None, None)  # size-1 axes


def test_constrain_is_the_identity_without_rules_or_mesh():
  x = jnp.arange(16.0).reshape(8, 2)
  assert partitioning.constrain(x, ('batch', None)) is x  # no rules installed
  with partitioning.activation_rules(RULES):
    assert partitioning.constrain(x, ('batch', None)) is x  # no mesh set
  with sharding.use_mesh(_mesh((1, 1, 1)), RULES):
    assert partitioning.constrain(x, ('batch', None)) is x  # one device


def test_constrain_pins_the_layout_under_use_mesh():
  """The constrained value's sharding is the rules' spec: batch over the batch axes, the rest replicated, even
  where the input arrives sharded over `tensor` along its features (the layout that tripped XLA)."""
  mesh = _mesh((2, 1, 2))
  x = jax.device_put(np.ones((4, 6, 8), np.float32),
                     jax.sharding.NamedSharding(mesh, P(None, None, 'tensor')))
  with sharding.use_mesh(mesh, RULES):
    y = jax.jit(lambda v: partitioning.batch_only(v * 2.0))(x)
    heads = jax.jit(lambda v: partitioning.constrain(v.reshape(4, 6, 2, 4), ('batch', None, 'heads', None)))(x)
  assert y.sharding.shard_shape(y.shape) == (2, 6, 8)  # batch split in 2, features whole on every device
  assert heads.sharding.shard_shape(heads.shape) == (2, 6, 1, 4)  # batch over data, heads over tensor
  np.testing.assert_array_equal(np.asarray(y), 2.0)
  with sharding.use_mesh(mesh, RULES):  # rank mismatch: a clear error, not a silent no-op
    try:
      partitioning.constrain(jnp.ones((4, 6)), ('batch',))
      raise AssertionError('constrain accepted 1 name for a rank-2 array')
    except ValueError as e:
      assert 'rank 2' in str(e)


def test_block_output_carries_the_constraint_and_the_remat_name():
  mesh = _mesh((2, 1, 2))
  x = jax.device_put(np.ones((4, 3, 8), np.float32), jax.sharding.NamedSharding(mesh, P(None, None, 'tensor')))
  with sharding.use_mesh(mesh, RULES):
    y = jax.jit(layers.block_output)(x)
    jaxpr = str(jax.make_jaxpr(layers.block_output)(x))
  assert y.sharding.shard_shape(y.shape) == (2, 3, 8)
  assert layers.BLOCK_OUTPUT in jaxpr and 'sharding_constraint' in jaxpr  # remat boundary, pinned layout
