"""What every launcher shares: absl flag parsing where a bad flag or config override is one line and exit 2.

  app.run(main, flags_parser=cli.parse_flags)

ml_collections applies `--config.a.b=v` overrides while absl parses the command line, so a typo in a field name
surfaces there as a KeyError or AttributeError with three chained tracebacks. `parse_flags` turns every such
failure into `error: ...` naming the bad override and the nearest valid fields, before anything (a workdir, a
device) has been touched.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
from typing import Any, Iterator

from absl import flags


def one_line(e: BaseException) -> str:
  """The first line of an error and, for one that carries a traceback (a config file that raised), its last."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}'


def fail(message: str) -> None:
  """Prints `error: message` to stderr and exits with status 2 (a usage error)."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _dotted_fields(node: Any, prefix: str = '') -> Iterator[str]:
  items = node.items() if hasattr(node, 'items') else ()
  for key, value in items:
    path = f'{prefix}{key}'
    yield path
    if hasattr(value, 'items'):
      yield from _dotted_fields(value, path + '.')


def _base_config(argv: list[str]) -> Any | None:
  """The config named by `--config=path[:arg]` in argv, without overrides; None if it cannot be loaded."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if not spec:
    return None
  path, _, arg = spec.partition(':')
  try:
    module_spec = importlib.util.spec_from_file_location('_mmgan_cli_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except  (the caller reports the original error instead)
    return None


def bad_override(argv: list[str], config: Any) -> str | None:
  """The first `--config.X=...` in argv whose field X the config does not have, with the nearest valid fields."""
  fields = list(_dotted_fields(config))
  known = set(fields)
  for a in argv:
    if not a.startswith('--config.'):
      continue
    name = a[len('--config.'):].split('=', 1)[0]
    if name in known:
      continue
    nearest = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    leaf = name.rsplit('.', 1)[-1]
    nearest += [f for f in difflib.get_close_matches(leaf, fields, n=3, cutoff=0.6) if f not in nearest]
    nearest += [f for f in fields if f.rsplit('.', 1)[-1] == leaf and f not in nearest]
    hint = f'; nearest: {", ".join(nearest[:3])}' if nearest else ''
    return f'--config.{name}: the config has no field {name!r}{hint}.'
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser; any bad flag, config file or config override is one `error:` line and exit status 2."""
  try:
    remaining = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (parsing only: whatever fails here is a usage error)
    config = _base_config(argv)
    message = bad_override(argv, config) if config is not None else None
    if message is None:
      text = str(e.args[0]) if isinstance(e, KeyError) and e.args else one_line(e)
      spec = next((a for a in argv if a.startswith('--config=')), '--config')
      message = text if isinstance(e, flags.Error) else f'{spec}: the config raised {type(e).__name__}: {text}'
    fail(message)
  # config_flags defers a config file that failed to load (missing, or it raised) to the first field access.
  if 'config' in flags.FLAGS and flags.FLAGS['config'].value is not None:
    try:
      flags.FLAGS['config'].value['data']  # pylint: disable=pointless-statement
    except OSError as e:
      fail(f'--config: {str(e).strip().splitlines()[-1].strip()}')
    except (KeyError, AttributeError):
      pass
  return remaining


# Start-up lines of TensorFlow's C++ runtime (tfds and grain import it): INFO only, and its oneDNN string-op
# notice, which an AVX2 machine prints at ERROR level in a healthy run. Set before TensorFlow is imported;
# a value the user exported wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

_OWN = (os.sep + 'mmgan_jax' + os.sep, os.sep + 'launch' + os.sep)


class _ConsoleFilter(logging.Filter):
  """INFO lines from this project pass (the trainer's one progress line every log_every steps among them);
  libraries' INFO chatter (orbax's ~190 lines per run, jax's TPU probe on a CPU, CLU's notices) does not.
  Warnings and errors always pass. Every scalar is in TensorBoard and WORKDIR/metrics.jsonl."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return any(p in (record.pathname or '') for p in _OWN)


def quiet_console() -> None:
  """Keeps the console to this project's lines: call at the start of a launcher's main (absl's handler is
  installed by then). Everything still reaches TensorBoard; `--verbosity=1` style debugging is unaffected for
  warnings."""
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
      handler.addFilter(_ConsoleFilter())


_ATTRS = ('mean', 'colour', 'shape', 'size', 'position', 'all_correct')

# The training scalars the console's progress line shows (label, key, format); the rest go to TensorBoard only.
_PROGRESS = (('D', 'd/loss', '.3f'), ('G adv', 'g/adv_loss', '.3f'), ('sem acc', 'g/sem_acc', '.2f'),
             ('lambda_adv', 'g/lambda_adv', '.3g'), ('T_max', 'diffusion_gan/t_max', '.0f'),
             ('align', 'align/loss', '.3f'), ('denoise', 'refiner/denoise_loss', '.3f'))


def _setting_name(key: str) -> str:
  """'text_audio_to_image' -> 'text+audio->image'."""
  return key.replace('_to_', '->').replace('_', '+')


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f'{seconds // 60} min {seconds % 60:02d} s' if seconds >= 60 else f'{seconds} s'


def progress_line(step: int, total: int, scalars: dict, steps_per_sec: float | None) -> str:
  """One console line per log_every steps: where the run is, its speed and ETA (from the steps after the first,
  compiling, one), and the few losses a person watches."""
  width = len(str(total))
  head = f'[{step:>{width}}/{total}]'
  if steps_per_sec:
    head += f' {steps_per_sec:.2f} it/s, ETA {_duration((total - step) / steps_per_sec)}'
  losses = [f'{label} {float(scalars[key]):{fmt}}' for label, key, fmt in _PROGRESS if key in scalars]
  return ' | '.join([head] + losses) if losses else head


def eval_line(step: int, results: dict) -> str:
  """A mid-run evaluation in one line: each image setting's refined mean and shape accuracy (the full table
  comes at the end of the run; every number is in TensorBoard)."""
  parts = []
  for key in sorted(results):
    if key.endswith('/refined/mean'):
      setting = key.split('/')[0]
      shape = results.get(f'{setting}/refined/shape')
      extra = f' (shape {100 * shape:.1f})' if shape is not None else ''
      parts.append(f'{_setting_name(setting)} {100 * results[key]:.1f}{extra}')
  return f'Evaluation at step {step}, semantic accuracy %: ' + ('; '.join(parts) if parts else 'no image settings')


def results_table(results: dict, path: str = '') -> str:
  """The end-of-run results as a short labelled table: semantic accuracy per setting (rows) and attribute
  (columns), caption BLEU-4, retrieval R@1, FID, and the run's time. Every number is in `path` (JSON)."""
  rows, other = {}, []
  for key, value in results.items():
    parts = key.split('/')
    if parts[-1] in _ATTRS and len(parts) >= 2:
      setting = _setting_name(parts[0])
      stage = ' '.join(parts[1:-1]).replace('pre_refine', 'before refinement')
      rows.setdefault(f'{setting} {stage}'.strip(), {})[parts[-1]] = value
  lines = []
  if rows:
    n = int(results.get('num_examples', 0))
    lines.append(f'Semantic accuracy (%, oracle; N = {n} held-out examples)')
    width = max(len(r) for r in rows) + 2
    lines.append(' ' * width + ''.join(f'{a.replace("all_correct", "all four"):>10}' for a in _ATTRS))
    for name in sorted(rows):
      lines.append(f'{name:<{width}}' + ''.join(f'{100 * rows[name][a]:>10.1f}' if a in rows[name] else ' ' * 10
                                                 for a in _ATTRS))
  for key in sorted(results):
    tail = key.rsplit('/', 1)[-1]
    if tail in ('BLEU-4', 'METEOR', 'R@1', 'fid', 'precision', 'recall') or key.startswith('fid'):
      other.append(f'{key.replace("_to_", "->")} {results[key]:.4f}')
  if other:
    lines.append('')
    lines.extend('  '.join(other[i:i + 4]) for i in range(0, len(other), 4))
  if 'train_seconds' in results:
    speed = f', {results["steps_per_sec"]:.2f} steps/s after the first' if 'steps_per_sec' in results else ''
    lines.append(f'\n{int(results.get("steps", 0))} steps in {results["train_seconds"]:.0f} s{speed}.')
  if path:
    lines.append(f'All {len(results)} numbers: {path}')
  return '\n'.join(lines)
