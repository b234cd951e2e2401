"""The run's config, saved in its workdir as JSON, so tools that work from a workdir need no --config.

`launch/train.py` writes `WORKDIR/config.json` (process 0, at every start; a resumed run must have the same
model, see train/checkpoint.py). `load(workdir)` reads it back as a locked ConfigDict equal to the original:
JSON has no tuples, and every sequence in our configs is a tuple (ml_collections keeps the type it was given),
so lists are turned back into tuples.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

FILENAME = 'config.json'

# Fields added to configs/common.py after runs were saved, with the value that reproduces how those runs
# trained; `load` fills them into an older config.json (and nothing else: any other missing field is an error
# of the config checks).
ADDED_FIELDS = {'gan_start': 0, 'rep_every': 1, 'model.image_encoder.stem': 'patch',
                'loss.sem_caption': 0.0, 'loss.source_consistency': 0.0, 'loss.cond_caption': 0.0,
                'loss.source_anchor': '',
                'optim.condition_frozen_after': 0, 'refine.in_training': True,
                'model.whiten_condition': False, 'model.whiten_eps': 1e-3, 'debug.nan_at_steps': (),
                'model.discriminator.cond_head': False, 'loss.cond_reg': 1.0,
                'model.discriminator.cond_head_target': 'condition', 'loss.sem_every': 1,
                'refine.train_fraction': 1.0, 'refine.num_draws': 1, 'd_head_warmup': False}


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


# Fields that change how a run is watched, not what it trains: a resumed run may change them freely (still
# recorded in the history). Everything else (seed, model, data, losses, optimiser, schedule) must match the run's
# record unless the change is accepted explicitly.
BOOKKEEPING = ('log_every', 'sample_every', 'checkpoint_every', 'max_checkpoints', 'eval_every', 'eval.',
               'max_nonfinite_steps', 'debug.')
HISTORY = 'config_history.jsonl'


class ConfigChangeError(ValueError):
  """A run is resumed with a config that differs from the one it was trained with."""


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def changes(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict[str, list]:
  """{'dotted.path': [old value, new value]} for every field that differs (absent: None)."""
  a, b = _flat(old.to_dict()), _flat(new.to_dict())
  return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _append_history(workdir: str, entry: dict) -> None:
  with open(os.path.join(workdir, HISTORY), 'a') as f:
    f.write(json.dumps(entry, sort_keys=True) + '\n')


def check_resume(config: ml_collections.ConfigDict, workdir: str, *, resuming: bool,
                 accept_changes: bool) -> dict[str, list]:
  """Compares `config` with the run's record (WORKDIR/config.json) before a resumed run starts.

  Returns {field: [old, new]} for every difference (nothing for a fresh run: `resuming` False). A difference in a
  field outside BOOKKEEPING raises ConfigChangeError listing every one, unless `accept_changes`.
  """
  if not resuming or not os.path.isfile(path(workdir)):
    return {}
  diff = changes(load(workdir), config)
  training = {k: v for k, v in diff.items() if not k.startswith(BOOKKEEPING)}
  if training and not accept_changes:
    shown = '\n'.join(f'  {k}: {v[0]!r} -> {v[1]!r}' for k, v in list(training.items())[:40])
    more = f'\n  ... and {len(training) - 40} more' if len(training) > 40 else ''
    raise ConfigChangeError(
        f'{workdir} holds a run trained with a different config; {len(training)} field(s) differ from its '
        f'config.json:\n{shown}{more}\nResume with the same config, or pass --accept_config_change to continue '
        f'with the new values (recorded in {os.path.join(workdir, HISTORY)}), or use a new workdir.')
  return diff


def record(config: ml_collections.ConfigDict, workdir: str, diff: dict[str, list], *, resuming: bool) -> None:
  """Writes the run's record once it has started: WORKDIR/config.json becomes `config` (what evaluation and
  sampling read), and WORKDIR/config_history.jsonl gets the first config of the run, then one line per resume
  that changed something (`diff`, from check_resume), so what the run was is never lost."""
  stamp = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  if not os.path.isfile(os.path.join(workdir, HISTORY)):
    first = load(workdir) if resuming and os.path.isfile(path(workdir)) else config
    _append_history(workdir, {'time': stamp, 'event': 'start' if not resuming else 'record (before the history)',
                              'config': first.to_dict()})
  if diff:
    _append_history(workdir, {'time': stamp, 'event': 'resume with changes', 'changes': diff})
  save(config, workdir)
