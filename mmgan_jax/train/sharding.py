"""Device mesh and parameter/batch shardings from the config's logical-axis rules.

Models name their parameter axes logically ('embed', 'mlp', 'heads', 'kv', 'vocab', 'conv_in', 'conv_out');
`config.partition_rules` maps those names to mesh axes ('data', 'fsdp', 'tensor'). A dimension that does not
divide evenly over its mesh axes is replicated instead (so tiny test models and odd widths always shard).
Optimizer-state leaves take the sharding of the parameter they mirror (matched by key-path suffix and shape).
`use_mesh(mesh, rules)` is the context every sharded program is traced in: the mesh, and the same rules for the
activation constraints inside the modules (models/partitioning.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmgan_jax.models import partitioning
from mmgan_jax.models.partitioning import mesh_axes_size, rules_dict, spec_for

Tree = Any


def resolve_mesh_shape(shape: Sequence[int], axes: Sequence[str], num_devices: int) -> tuple[int, ...]:
  """The mesh shape with its -1 entry (if any) filled in; ValueError naming the allowed values otherwise."""
  shape, axes = tuple(int(s) for s in shape), tuple(axes)
  if len(shape) != len(axes):
    raise ValueError(f'has {len(shape)} entries but config.mesh.axes={axes} has {len(axes)}; allowed: one size '
                     f'per axis ({len(axes)} entries).')
  if shape.count(-1) > 1:
    raise ValueError('has more than one -1; allowed: at most one -1 (it takes the remaining devices).')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'the fixed axes need a multiple of {known} devices, found {num_devices}; allowed: fixed '
                       f'sizes whose product divides {num_devices}.')
    return tuple(num_devices // known if s == -1 else s for s in shape)
  if known != num_devices:
    raise ValueError(f'needs {known} devices, found {num_devices}; allowed: sizes whose product is '
                     f'{num_devices}, e.g. {(num_devices,) + (1,) * (len(shape) - 1)} or a -1 entry.')
  return shape


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """A mesh of `shape` over all (or the given) devices; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  try:
    resolved = resolve_mesh_shape(shape, axes, len(devices))
  except ValueError as e:
    raise ValueError(f'config.mesh.shape={tuple(shape)} {e}') from None
  return jax.make_mesh(resolved, tuple(axes), axis_types=(AxisType.Auto,) * len(axes), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
  """Sets `mesh` (jax.set_mesh) and installs `rules` for the modules' activation constraints while tracing."""
  with jax.set_mesh(mesh), partitioning.activation_rules(rules):
    yield mesh


def param_shardings(abstract_boxed: Tree, mesh: Mesh, rules) -> Tree:
  """NamedShardings for a boxed (nn.Partitioned) abstract param tree; the result matches the unboxed tree."""

  def one(x):
    if isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, spec_for(x.value.shape, x.names, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _path_key(path) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(out)


def mirror_shardings(abstract_tree: Tree, params_abstract: Tree, params_shardings: Tree, mesh: Mesh) -> Tree:
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror params: longest key-path suffix match."""
  table = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                              jax.tree_util.tree_leaves(params_shardings)):
    table[_path_key(path)] = (tuple(leaf.shape), sh)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    key = _path_key(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    for i in range(len(key)):
      hit = table.get(key[i:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  axis = rules_dict(rules).get('batch', ('data', 'fsdp'))
  return NamedSharding(mesh, P(axis, *([None] * (ndim - 1))))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch mesh axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
          for k, v in local.items()}


def check_batch_divisible(global_batch_size: int, mesh: Mesh, rules) -> None:
  n = mesh_axes_size(mesh, rules_dict(rules).get('batch', ('data', 'fsdp')))
  if global_batch_size % n:
    raise ValueError(f'config.data.global_batch={global_batch_size} must be divisible by the {n} devices of '
                     'the batch mesh axes.')
