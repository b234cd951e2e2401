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
import re
import shutil
import time
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
      raise CheckpointError(f'step {step} has no readable array metadata in {os.path.join(self.directory, str(step))}')
    wanted = _shapes(abstract_state)
    problems = [f'  {k}: in the config {wanted[k]}, not in the checkpoint' for k in sorted(wanted.keys() - saved.keys())]
    problems += [f'  {k}: in the checkpoint {saved[k]}, not in the config' for k in sorted(saved.keys() - wanted.keys())]
    problems += [f'  {k}: checkpoint {saved[k]} vs config {wanted[k]}' for k in sorted(wanted.keys() & saved.keys())
                 if saved[k] != wanted[k]]
    return problems

  def restore(self, abstract_state: Any, step: int | None = None, *, move_damaged: bool = False
              ) -> tuple[Any, dict] | None:
    """Restores onto `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings); None if no checkpoint.

    Without `step`, the newest readable checkpoint wins: an unreadable one (a truncated or half-written file)
    is skipped with a warning naming the damaged file, and the previous one is tried. With `move_damaged` (a
    training run resuming) the skipped steps are then moved to WORKDIR/damaged_checkpoints/ (kept for
    inspection, never deleted): orbax does not save a step <= its latest, so a damaged step left in place would
    block the retrained one from ever being saved. A checkpoint whose arrays do not match `abstract_state`
    (resumed with another model config) raises CheckpointMismatchError listing the differences; nothing is ever
    partially loaded.
    """
    steps = self.all_steps()[::-1] if step is None else [step]
    if not steps:
      return None
    failures = []
    for s in steps:
      out, damaged = None, None
      try:
        problems = self.mismatches(s, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # unreadable metadata: a damaged checkpoint
        problems, damaged = None, e
      if problems:
        shown = '\n'.join(problems[:40]) + (f'\n  ... and {len(problems) - 40} more' if len(problems) > 40 else '')
        raise CheckpointMismatchError(
            f'the checkpoint at step {s} in {self.directory} does not match this config ({len(problems)} '
            f'arrays differ); resume with the config it was trained with, or use a new workdir:\n{shown}')
      if _everywhere(problems is not None):
        try:
          out = self.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                data=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except
          damaged = e
      # Every process reads its own shards: all of them take this step only if all of them could read it, so a
      # file damaged on one process's side never leaves the processes on different steps.
      if _everywhere(out is not None):
        if failures:
          log.warning('Resumed from step %d instead of the newer, unreadable checkpoint(s) %s.', s,
                      [f for f, _ in failures])
          if move_damaged:
            self._move_aside([f for f, _ in failures])
        return out['state'], dict(out['data'] or {})
      damaged = damaged or CheckpointError('another process could not read this step (see its log)')
      log.warning('Checkpoint step %d in %s is unreadable: %s; trying the previous one.', s, self.directory,
                  describe_damage(damaged, os.path.join(self.directory, str(s))))
      failures.append((s, damaged))
    last_step, last_error = failures[-1]
    last = describe_damage(last_error, os.path.join(self.directory, str(last_step)))
    raise CheckpointError(f'no readable checkpoint in {self.directory} (tried steps {[f for f, _ in failures]}); '
                          f'the last error: {last}. '
                          'Move the damaged step directories away, or start in a new workdir.')

  def _move_aside(self, steps: list[int]) -> None:
    """Moves damaged step directories to WORKDIR/damaged_checkpoints/step_<N>_<UTC time> (process 0)."""
    if '://' in self.directory:
      log.warning('Damaged checkpoint step(s) %s in %s stay in place (not moved on a remote filesystem): the '
                  'retrained steps up to them will not be saved; move them away by hand.', steps, self.directory)
      return
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')
      os.makedirs(aside, exist_ok=True)
      stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
      for s in steps:
        target = os.path.join(aside, f'step_{s}_{stamp}')
        shutil.move(os.path.join(self.directory, str(s)), target)
        log.warning('Moved the damaged checkpoint step %d to %s (kept for inspection); the steps retrained '
                    'after it are saved as usual.', s, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('mmgan_jax_damaged_checkpoints_moved')
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every JAX process (itself on one process)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.int32(bool(ok)))))


def describe_damage(e: BaseException, step_dir: str) -> str:
  """One line on why a checkpoint did not restore: the innermost error and, where its size shows, the file.

  Orbax reports the array it was reading; the cause underneath (tensorstore) gives the byte range and the size it
  found, which for a truncated file identifies it among the step's data files.
  """
  root = e
  while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
    root = root.__cause__ or root.__context__
  text = ' '.join(str(root).split())[:300] or type(root).__name__
  size = re.search(r'value of size (\d+)', text)
  if size and os.path.isdir(step_dir):
    hits = [os.path.join(d, f) for d, _, files in os.walk(step_dir) for f in files
            if os.path.getsize(os.path.join(d, f)) == int(size.group(1))]
    if len(hits) == 1:
      return f'{type(root).__name__}: {text}; damaged file: {hits[0]} ({size.group(1)} bytes)'
  return f'{type(root).__name__}: {text}'


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
