"""Orbax checkpoints of the train state AND the data-iterator state, so a resumed run continues exactly.

Resume order (documented in docs/training.md): build the model and the abstract sharded state -> restore the
latest checkpoint in the workdir onto it (arrays land directly on their shards) -> restore the grain iterator
state -> continue from `state.step`. Saves are asynchronous; `close()` waits for the last one.

Several processes: every process calls `save` and `restore` (they are collective); each writes and reads only
the shards it holds, and process 0 writes the metadata and the iterator JSON. The iterator state is the same
JSON on every process (all processes consume batches in lock-step: {'next_index': batches consumed}). The arrays
restore onto any mesh and process count (orbax reshards); with another process count the iterator continues at
the same batch count but each process's slice of the data is a different one, so the examples after a resume
differ from an uninterrupted run's (the global batch size must stay the same and divisible).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be read."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's arrays do not match the model the config builds."""


def _shapes(tree: Any) -> dict[str, str]:
  """{'params/generator/...': 'float32[3, 4]'} for every array-like leaf (paths as plain names)."""
  def name(entry) -> str:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)

  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      try:
        dtype = np.dtype(leaf.dtype).name
      except TypeError:  # e.g. typed PRNG keys
        dtype = str(leaf.dtype)
      out['/'.join(name(e) for e in path)] = f'{dtype}{list(leaf.shape)}'
  return out


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items 'state' (pytree) and 'data' (JSON)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    path = os.path.join(directory, 'checkpoints')
    self.directory = path if '://' in path else os.path.abspath(path)  # gs://: orbax/tensorstore write it
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

  def mismatches(self, step: int, abstract_state: Any) -> list[str]:
    """Differences between the arrays saved at `step` and `abstract_state`: missing, unexpected, reshaped."""
    meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), 'state'))
    saved = _shapes(getattr(meta, 'item_metadata', meta))
    if not saved:
      raise CheckpointError(f'step {step} has no readable array metadata')
    wanted = _shapes(abstract_state)
    problems = [f'  {k}: in the config {wanted[k]}, not in the checkpoint' for k in sorted(wanted.keys() - saved.keys())]
    problems += [f'  {k}: in the checkpoint {saved[k]}, not in the config' for k in sorted(saved.keys() - wanted.keys())]
    problems += [f'  {k}: checkpoint {saved[k]} vs config {wanted[k]}' for k in sorted(wanted.keys() & saved.keys())
                 if saved[k] != wanted[k]]
    return problems

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
    """Restores onto `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings); None if no checkpoint.

    Without `step`, the newest readable checkpoint wins: an unreadable one (a truncated or half-written file)
    is skipped with a warning and the previous one is tried. A checkpoint whose arrays do not match
    `abstract_state` (resumed with another model config) raises CheckpointMismatchError listing the
    differences; nothing is ever partially loaded.
    """
    steps = self.all_steps()[::-1] if step is None else [step]
    if not steps:
      return None
    failures = []
    for s in steps:
      try:
        problems = self.mismatches(s, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # unreadable metadata: a damaged checkpoint
        problems, damaged = None, e
      if problems:
        shown = '\n'.join(problems[:40]) + (f'\n  ... and {len(problems) - 40} more' if len(problems) > 40 else '')
        raise CheckpointMismatchError(
            f'the checkpoint at step {s} in {self.directory} does not match this config ({len(problems)} '
            f'arrays differ); resume with the config it was trained with, or use a new workdir:\n{shown}')
      if problems is not None:
        try:
          out = self.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                data=ocp.args.JsonRestore()))
          if failures:
            log.warning('Resumed from step %d instead of the newer, unreadable checkpoint(s) %s.', s,
                        [f for f, _ in failures])
          return out['state'], dict(out['data'] or {})
        except Exception as e:  # pylint: disable=broad-except
          damaged = e
      log.warning('Checkpoint step %d in %s is unreadable (%s: %s); trying the previous one.', s, self.directory,
                  type(damaged).__name__, str(damaged)[:300])
      failures.append((s, damaged))
    raise CheckpointError(f'no readable checkpoint in {self.directory} (tried steps {[f for f, _ in failures]}); '
                          f'the last error was {type(failures[-1][1]).__name__}: {str(failures[-1][1])[:300]}. '
                          'Move the damaged step directories away, or start in a new workdir.')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
