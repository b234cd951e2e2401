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
