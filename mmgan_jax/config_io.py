"""The run's config, saved in its workdir as JSON, so tools that work from a workdir need no --config.

`launch/train.py` writes `WORKDIR/config.json` (process 0, at every start; a resumed run must have the same
model, see train/checkpoint.py). `load(workdir)` reads it back as a locked ConfigDict equal to the original:
JSON has no tuples, and every sequence in our configs is a tuple (ml_collections keeps the type it was given),
so lists are turned back into tuples.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

FILENAME = 'config.json'

# Fields added to configs/common.py after runs were saved, with the value that reproduces how those runs
# trained; `load` fills them into an older config.json (and nothing else: any other missing field is an error
# of the config checks).
ADDED_FIELDS = {'gan_start': 0, 'model.image_encoder.stem': 'patch',
                'loss.sem_caption': 0.0,
                'model.whiten_condition': False, 'debug.nan_at_steps': ()}


def path(workdir: str) -> str:
  return os.path.join(workdir, FILENAME)


def _tuples(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def save(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes WORKDIR/config.json atomically; returns its path."""
  os.makedirs(workdir, exist_ok=True)
  target = path(workdir)
  tmp = target + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, target)
  return target


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was started with (locked).

  Raises:
    FileNotFoundError: the workdir has no config.json (a run from before it was written: pass --config).
    ValueError: the file is not a config (unreadable JSON, not an object).
  """
  p = path(workdir)
  if not os.path.isfile(p):
    raise FileNotFoundError(f'{p} does not exist: {workdir} is not a training workdir (launch/train.py writes it '
                            'at the start), or was made before config.json was saved; pass --config=... with the '
                            'config it was trained with.')
  try:
    with open(p) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{p} is not readable JSON ({e}); pass --config=... instead.') from None
  if not isinstance(data, dict) or 'model' not in data or 'data' not in data:
    raise ValueError(f'{p} is not an mmgan_jax config (no model/data sections); pass --config=... instead.')
  for dotted, value in ADDED_FIELDS.items():
    *parents, leaf = dotted.split('.')
    node = data
    for name in parents:
      node = node.setdefault(name, {})
    node.setdefault(leaf, value)
  config = ml_collections.ConfigDict(_tuples(data))
  config.lock()
  return config
