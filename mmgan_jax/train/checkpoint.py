"""Orbax checkpoints of the train state AND the data-iterator state, so a resumed run continues exactly.

Resume order (documented in docs/training.md): build the model and the abstract sharded state -> restore the
latest checkpoint in the workdir onto it (arrays land directly on their shards) -> restore the grain iterator
state -> continue from `state.step`. Saves are asynchronous; `close()` waits for the last one.

The iterator state is the same JSON on every process (all processes consume batches in lock-step), so a run
can be resumed on a different number of hosts as long as the global batch is unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items 'state' (pytree) and 'data' (JSON)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(directory, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))

  def all_steps(self) -> list[int]:
    return sorted(int(x) for x in self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
    """Restores onto `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings); None if no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return out['state'], dict(out['data'] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
