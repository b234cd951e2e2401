"""Learning curves from a run's own evaluations: the `eval/...` scalars the trainer writes to TensorBoard.

A run with `--config.eval_every=N` evaluates every N steps and at the end; each evaluation is a set of
`eval/<setting>/<stage>/<attribute>` scalars (semantic accuracy), `eval/<setting>/<stage>/fid` when FID is evaluated, and
`eval/<task>/BLEU-4` for captions. `read_evaluations` collects them per step with the wall time at which they
were written (seconds since the run's first event: compilation and the evaluations themselves included), and
`plot` / `markdown_table` render them (launch/learning_curve.py).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np

EVAL_PREFIX = 'eval/'
ATTRIBUTES = ('shape', 'colour', 'size', 'position', 'mean', 'all_correct')


def _event_files(workdir: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*')))
  if not files:
    raise FileNotFoundError(f'no TensorBoard event files in {workdir}: is it a training workdir?')
  return files


def read_evaluations(workdir: str) -> dict[int, dict[str, float]]:
  """{step: {name without 'eval/': value, 'wall_s': seconds since the run's first event}} of every evaluation.

  A resumed run's later events win for a step written twice. Raises FileNotFoundError without event files and
  ValueError when the run has no evaluations.
  """
  # TensorBoard's own event reader (it ships with the tensorflow dependency).
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  out: dict[int, dict[str, float]] = {}
  start = None
  for path in _event_files(workdir):
    for event in event_file_loader.EventFileLoader(path).Load():
      start = event.wall_time if start is None else min(start, event.wall_time)
      for value in event.summary.value:
        if not value.tag.startswith(EVAL_PREFIX):
          continue
        number = (float(tensor_util.make_ndarray(value.tensor)) if value.HasField('tensor')
                  else float(value.simple_value))
        row = out.setdefault(int(event.step), {})
        row[value.tag[len(EVAL_PREFIX):]] = number
        row['wall_s'] = max(row.get('wall_s', 0.0), event.wall_time)
  if not out:
    raise ValueError(f'{workdir} has no evaluations (eval/... scalars): train with --config.eval_every=N, or let '
                     'the run finish (it evaluates at the end).')
  for row in out.values():
    row['wall_s'] -= start
  return dict(sorted(out.items()))


def markdown_table(curve: dict[int, dict[str, float]], setting: str = 'text_to_image', stage: str = 'refined'
                   ) -> str:
  """One row per evaluation: step, wall time, the per-attribute semantic accuracy (%) and FID when present."""
  fid_key = f'{setting}/{stage}/fid'  # the FID evaluator's key
  fid_key = fid_key if any(fid_key in row for row in curve.values()) else None
  head = ['step', 'wall (s)'] + list(ATTRIBUTES) + (['FID'] if fid_key else [])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for step, row in curve.items():
    cells = [str(step), f"{row['wall_s']:.0f}"]
    cells += [f'{100 * row[k]:.1f}' if k in row else '' for k in (f'{setting}/{stage}/{a}' for a in ATTRIBUTES)]
    if fid_key:
      cells.append(f'{row[fid_key]:.1f}' if fid_key in row else '')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(curves: dict[str, dict[int, dict[str, float]]], path: str, *, setting: str = 'text_to_image',
         stages: Sequence[str] = ('refined', 'pre_refine')) -> str:
  """Semantic accuracy per attribute against steps and wall time, one line style per run and stage; a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  attrs = ATTRIBUTES[:5]
  fig, axes = plt.subplots(2, len(attrs), figsize=(3.2 * len(attrs), 5.6), sharey=True, squeeze=False)
  styles = ['-', '--', ':', '-.']
  for r, (label, curve) in enumerate(curves.items()):
    steps = np.array(list(curve))
    wall = np.array([row['wall_s'] for row in curve.values()]) / 60.0
    for s, stage in enumerate(stages):
      for a, attr in enumerate(attrs):
        key = f'{setting}/{stage}/{attr}'
        y = np.array([row.get(key, np.nan) for row in curve.values()]) * 100.0
        if np.all(np.isnan(y)):
          continue
        kw = dict(ls=styles[s % len(styles)], color=f'C{r}', marker='o', ms=3,
                  label=f'{label} ({stage})' if a == 0 else None)
        axes[0, a].plot(steps, y, **kw)
        axes[1, a].plot(wall, y, **kw)
  for a, attr in enumerate(attrs):
    axes[0, a].set_title(attr)
    axes[0, a].set_xlabel('iteration')
    axes[1, a].set_xlabel('wall time (min)')
  axes[0, 0].set_ylabel(f'{setting} accuracy (%)')
  axes[1, 0].set_ylabel(f'{setting} accuracy (%)')
  axes[0, 0].legend(fontsize=7, loc='lower right')
  for ax in axes.flat:
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
