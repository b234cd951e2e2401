r"""Learning curves of one or more runs from their own evaluations (train with --config.eval_every=N).

  python launch/learning_curve.py --workdirs=runs/shapes --out=docs/figures/learning_curve.png
  python launch/learning_curve.py --workdirs=runs/a,runs/b --labels=full,no_refiner --out=curves.png

Prints a markdown table per run (step, wall time, text->image accuracy per attribute, FID when evaluated) and
writes a PNG of accuracy against iterations and wall time (mmgan_jax/evaluation/learning_curve.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Training workdirs (comma-separated).')
_LABELS = flags.DEFINE_list('labels', [], 'A label per workdir (default: the directory names).')
_SETTING = flags.DEFINE_string('setting', 'text_to_image', 'Conditioning setting plotted (as in eval_results.json).')
_OUT = flags.DEFINE_string('out', 'learning_curve.png', 'Where the PNG goes.')
flags.mark_flags_as_required(['workdirs'])


def main(argv):
  del argv
  from mmgan_jax.evaluation import learning_curve  # pylint: disable=g-import-not-at-top
  labels = _LABELS.value or [os.path.basename(os.path.normpath(w)) for w in _WORKDIRS.value]
  if len(labels) != len(_WORKDIRS.value):
    print(f'error: {len(_WORKDIRS.value)} workdirs but {len(labels)} labels.', file=sys.stderr)
    sys.exit(2)
  curves = {}
  for label, workdir in zip(labels, _WORKDIRS.value):
    try:
      curves[label] = learning_curve.read_evaluations(workdir)
    except (FileNotFoundError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    print(f'\n{label} ({workdir}), {_SETTING.value}, refined:\n')
    print(learning_curve.markdown_table(curves[label], _SETTING.value))
  print('\nwrote', learning_curve.plot(curves, _OUT.value, setting=_SETTING.value))


if __name__ == '__main__':
  app.run(main)
