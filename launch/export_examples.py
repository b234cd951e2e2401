r"""Writes held-out examples of the synthetic set as image / wav / caption files, inputs for launch/sample.py.

  python launch/export_examples.py --workdir=runs/shapes --num=4 --out=examples
  python launch/sample.py --workdir=runs/shapes --audio=examples/example_0.wav --image=examples/example_1.png

The examples are those of the held-out split the evaluation scores, rendered with the run's own data settings
(WORKDIR/config.json, or --config): example_<i>.png, example_<i>.wav (16-bit mono at the model's rate) and
example_<i>.txt (the reference captions and the attributes). Nothing is compiled or restored: it runs in
seconds. Real datasets (COCO, VGGSound) are files already, so this is for `data.name = 'shapes'` only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402

from mmgan_jax import cli  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir whose config.json gives the data settings.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]) instead of a workdir.',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/examples with --workdir, else '
                           './examples).')
_NUM = flags.DEFINE_integer('num', 4, 'How many examples.')
_START = flags.DEFINE_integer('start', 0, 'Index of the first held-out example.')


def _fail(message: str) -> None:
  print('error: ' + ' '.join(str(message).splitlines()[:1]), file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; every option is a --flag.')
  if (_WORKDIR.value is None) == (_CONFIG.value is None):
    _fail('give exactly one of --workdir (a training run) or --config (a config file).')
  from mmgan_jax import config_io, sampling  # pylint: disable=g-import-not-at-top
  try:
    config = _CONFIG.value if _CONFIG.value is not None else config_io.load(_WORKDIR.value)
    out = _OUT.value or (os.path.join(_WORKDIR.value, 'examples') if _WORKDIR.value else 'examples')
    written = sampling.export_examples(config.data, out, _NUM.value, start=_START.value)
  except (sampling.InputError, FileNotFoundError, ValueError, OSError) as e:
    _fail(str(e))
  for ex in written:
    print(f"{ex['image']}  {ex['audio']}  {ex['text']}  ({ex['caption']})")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
