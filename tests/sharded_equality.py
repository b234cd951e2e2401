"""Child process of test_sharded_step_equals_single_device: one step on 1 device and on a 2x4 mesh.

Run apart from the test session on purpose: with 8 virtual CPU devices, XLA:CPU's in-process collectives
can deadlock (a rendezvous "termination timeout" abort, seen on 2-core machines) when a program comes from
the persistent compilation cache, and an abort would take the whole pytest worker down. Here the programs
are compiled fresh, and a crash is reported as a test failure with the child's output.

  python tests/sharded_equality.py OUT.npz
"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import test_train as t  # noqa: E402  (its helpers; importing it runs no test)
from mmgan_jax.train import trainer  # noqa: E402


def main(out: str) -> None:
  single = t.one_device_setup(t.smoke_config())
  multi = trainer.setup(t.smoke_config(**{'mesh.shape': (2, 4, 1)}), None, devices=jax.devices()[:8])
  fsdp = any('fsdp' in str(x.sharding.spec) for x in jax.tree.leaves(multi.state.params))
  s1, m1, b1 = t.run(single, single.state, 1)
  s8, m8, b8 = t.run(multi, multi.state, 1)
  arrays = {'fsdp_sharded': np.asarray(fsdp), 'batch_1': b1[0], 'batch_8': b8[0],
            'lr': np.asarray(max(single.config.optim.g_lr, single.config.optim.d_lr, single.config.optim.rep_lr))}
  arrays.update({f'metric_1/{k}': np.asarray(v) for k, v in m1[0].items()})
  arrays.update({f'metric_8/{k}': np.asarray(v) for k, v in m8[0].items()})
  for tag, s in (('param_1', s1), ('param_8', s8)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(t.host(s.params))[0]:
      arrays[f'{tag}/{jax.tree_util.keystr(path)}'] = leaf
  np.savez(out, **arrays)


if __name__ == '__main__':
  main(sys.argv[1])
