"""One training step on 1 device and on meshes of 2, 4, 8 virtual CPU devices; parameters and metrics compared.

The child process of test_sharded_step_equals_single_device (one 2 x 2 x 2 data x fsdp x tensor mesh), and the
script behind the 1/2/4/8-device exactness table of docs/training.md:

  python tests/sharded_equality.py OUT.npz 2x1x1,1x2x2,2x2x2,2x4x1   # prints the largest differences

Run apart from the test session on purpose: with 8 virtual CPU devices, XLA:CPU's in-process collectives
can deadlock (a rendezvous "termination timeout" abort, seen on 2-core machines) when a program comes from
the persistent compilation cache, and an abort would take the whole pytest worker down. Here the programs
are compiled fresh, and a crash is reported as a test failure with the child's output.

"""

import os
import sys

# 8 virtual devices; LLVM at -O0: a third less compile time, and both sides of the comparison use it.
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import test_train as t  # noqa: E402  (its helpers; importing it runs no test)
from mmgan_jax.train import trainer  # noqa: E402


def main(out: str, meshes: list[tuple[int, ...]]) -> None:
  single = t.one_device_setup(t.smoke_config())
  s1, m1, b1 = t.run(single, single.state, 1)
  arrays = {'batch_1': b1[0], 'lr': np.asarray(max(single.config.optim.g_lr, single.config.optim.d_lr,
                                                   single.config.optim.rep_lr))}
  results = {'1': (s1, m1)}
  for shape in meshes:
    tag = 'x'.join(map(str, shape))
    multi = trainer.setup(t.smoke_config(**{'mesh.shape': shape}), None, devices=jax.devices()[:np.prod(shape)])
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(multi.state.params)]
    arrays[f'sharded_axes_{tag}'] = np.asarray([a for a in ('fsdp', 'tensor') if any(a in sp for sp in specs)])
    sn, mn, bn = t.run(multi, multi.state, 1)
    arrays[f'batch_{tag}'] = bn[0]
    results[tag] = (sn, mn)
  p1 = jax.tree.leaves(t.host(s1.params))
  for tag, (s, m) in results.items():
    arrays.update({f'metric_{tag}/{k}': np.asarray(v) for k, v in m[0].items()})
    leaves = jax.tree_util.tree_flatten_with_path(t.host(s.params))[0]
    for path, leaf in leaves:
      arrays[f'param_{tag}/{jax.tree_util.keystr(path)}'] = leaf
    if tag != '1':
      diff = max(float(np.max(np.abs(a - b))) for a, (_, b) in zip(p1, leaves))
      loss = max(abs(float(m[0][k]) - float(m1[0][k])) / max(abs(float(m1[0][k])), 1e-6)
                 for k in m1[0] if k.endswith('loss'))
      print(f'{np.prod(tuple(map(int, tag.split("x")))):>2} devices (data x fsdp x tensor = {tag}): max |param '
            f'difference| after one step {diff:.2e} (learning rate {float(arrays["lr"]):.0e}); largest relative '
            f'loss difference {loss:.2e}', flush=True)
  np.savez(out, **arrays)


if __name__ == '__main__':
  main(sys.argv[1], [tuple(int(n) for n in m.split('x')) for m in (sys.argv[2] if len(sys.argv) > 2 else
                                                                   '2x2x2').split(',')])
