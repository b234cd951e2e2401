"""Memory and precision switches of the train step: rematerialisation, gradient accumulation, bf16 compute.

Each is checked on the discriminator's gradients (the smallest program that runs every component's forward
under the switch; text + image only, to keep the compilations short) against the plain float32 step on the same
state and batch: remat must not change the gradients, accumulation must be the mean over its micro-batches and
shrink the step's temporary memory, bf16 must keep float32 parameters and gradients close to float32's.
docs/performance.md has the memory each switch saves at the real sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import smoke_config
from mmgan_jax.train import trainer

BASE = {'model.modalities': ('text', 'image'), 'data.global_batch': 8}


def _setup(**overrides):
  return trainer.setup(smoke_config(**BASE, **overrides), None, devices=jax.devices()[:1])


def _grads(setup, batch, *args):
  """D's gradients (R1 included) and the compiled function's temporary memory in bytes."""
  with jax.set_mesh(setup.mesh):
    compiled = jax.jit(setup.steps.d_grads).lower(setup.state, batch, *args).compile()
    grads = jax.device_get(compiled(setup.state, batch, *args))
  return grads, compiled.memory_analysis().temp_size_in_bytes


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope='module')
def plain():
  s = _setup()
  with jax.set_mesh(s.mesh):
    batch = trainer.next_batch(s)
  grads, temp = _grads(s, batch)
  return s, batch, grads, temp


def _assert_same_gradients(a, b, tol):
  """Leaf by leaf, up to `tol` times the largest gradient of the same component (float re-association)."""
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a))
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(y, x, rtol=0, atol=tol * scale + 1e-12, err_msg=jax.tree_util.keystr(path))


def test_remat_leaves_gradients_unchanged(plain):
  _, batch, grads, _ = plain
  s = _setup(**{'model.remat': 'blocks'})
  assert s.model.remat == 'blocks'
  g, _ = _grads(s, batch)
  _assert_same_gradients(grads, g, 1e-4)


def test_grad_accumulation_is_the_mean_over_micro_batches_and_saves_memory(plain):
  _, batch, _, temp_plain = plain
  s = _setup(**{'optim.grad_accum': 2})
  g, temp = _grads(s, batch)
  # Micro-batch i is rows i, i + 2, ... with its own random stream (index i).
  micro = [_grads(s, jax.tree.map(lambda x, i=i: x[i::2], batch), jnp.int32(i))[0] for i in range(2)]
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *micro)
  _assert_same_gradients(mean, g, 1e-5)
  assert not np.allclose(_flat(micro[0]), _flat(micro[1]))  # two different halves, not one counted twice
  assert temp < 0.85 * temp_plain, (temp, temp_plain)


def test_bfloat16_compute_keeps_float32_parameters_and_close_gradients(plain):
  _, batch, grads, _ = plain
  s = _setup(**{'model.dtype': 'bfloat16'})
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s.state.params))
  g, _ = _grads(s, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
  a, b = _flat(grads), _flat(g)
  assert np.all(np.isfinite(b))
  cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  assert cosine > 0.95, cosine
