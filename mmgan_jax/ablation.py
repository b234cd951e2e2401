"""The ablation study behind launch/ablate.py: run a sweep, aggregate over seeds, write the table and the plots.

Each run of a sweep (configs/ablations.py: name, seed, config overrides) is trained by `launch/train.py` in its
own process, in WORKDIR/<name>/seed_<seed> (its final evaluation lands in eval_results.json), then scored for
robustness by `launch/evaluate.py --robustness` (eval/robustness.json). A run whose output file exists is not
run again, so an interrupted sweep continues where it stopped (train.py itself resumes a half-trained run).

Aggregation: per variant, the mean and the sample standard deviation over its seeds of every headline metric
(semantic accuracy of refined samples, FID / precision / recall with N, BLEU-4 / METEOR, retrieval R@1, training
steps/s), and the difference from `full`. Nothing is typed in: the markdown table and the robustness PNG are
rendered from the JSON files the runs wrote.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (key in eval_results.json, column title, format, higher is better).
METRICS = (
    ('text_to_image/refined/mean', 'text→image sem. acc. %', 'pct', True),
    ('audio_to_image/refined/mean', 'audio→image sem. acc. %', 'pct', True),
    ('text_audio_to_image/refined/mean', 'text+audio→image %', 'pct', True),
    ('text_to_image/refined/fid', 'FID (text→image)', 'f1', False),
    ('text_to_image/refined/precision', 'precision', 'f2', True),
    ('text_to_image/refined/recall', 'recall', 'f2', True),
    ('image_to_text/BLEU-4', 'BLEU-4 (image→text)', 'f3', True),
    ('image_to_text/METEOR', 'METEOR (image→text)', 'f3', True),
    ('retrieval/text_to_image/R@1', 'R@1 text→image', 'f3', True),
    ('steps_per_sec', 'steps/s', 'f2', True),
)
BEGIN, END = '<!-- ablation -->', '<!-- /ablation -->'


def flag_value(v: Any) -> str:
  """A config value as ml_collections' command-line parser reads it."""
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(repr(x) for x in v) + (',)' if len(v) == 1 else ')')
  return repr(v) if isinstance(v, str) else str(v)


def run_dir(workdir: str, run: Mapping[str, Any]) -> str:
  return os.path.join(workdir, run['name'], f"seed_{run['seed']}")


def train_command(base: str, run: Mapping[str, Any], workdir: str, eval_flags: Sequence[str]) -> list[str]:
  overrides = [f'--config.{k}={flag_value(v)}' for k, v in run['overrides'].items()]
  return [sys.executable, os.path.join(ROOT, 'launch', 'train.py'), f'--config={base}',
          f'--workdir={run_dir(workdir, run)}', *overrides, *eval_flags]


def robustness_command(run: Mapping[str, Any], workdir: str, num_examples: int) -> list[str]:
  return [sys.executable, os.path.join(ROOT, 'launch', 'evaluate.py'), f'--workdir={run_dir(workdir, run)}',
          '--robustness', f'--num_examples={num_examples}']


def execute(cmd: Sequence[str], log_path: str, say: Callable[[str], Any]) -> float:
  """Runs `cmd` with its output in `log_path`; returns its wall seconds. RuntimeError (with the log's tail)
  if it fails."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  t = time.time()
  with open(log_path, 'w') as log:
    log.write(' '.join(cmd) + '\n')
    log.flush()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  seconds = time.time() - t
  if proc.returncode:
    with open(log_path, errors='replace') as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f'{cmd[1]} exited with {proc.returncode} after {seconds:.0f} s (log: {log_path}):\n{tail}')
  say(f'  done in {seconds / 60:.1f} min')
  return seconds


def run_sweep(sweep: Mapping[str, Any], workdir: str, *, eval_flags: Sequence[str], robustness_examples: int,
              robustness_seeds: int = 0, say: Callable[[str], Any] = print) -> None:
  """Trains (and robustness-scores, if robustness_examples > 0, the seeds below robustness_seeds or all if 0)
  every run whose results are missing.

  Seed-major order (every variant's seed 0 first), so an interrupted sweep has covered every variant; the runs
  share one persistent compilation cache (WORKDIR/.jax_cache unless JAX_COMPILATION_CACHE_DIR is set), so the
  seeds of a variant after the first do not compile again."""
  names = list(dict.fromkeys(r['name'] for r in sweep['runs']))
  runs = sorted(sweep['runs'], key=lambda r: (r['seed'], names.index(r['name'])))
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.abspath(workdir), '.jax_cache'))
  for i, run in enumerate(runs):
    d = run_dir(workdir, run)
    tag = f"[{i + 1}/{len(runs)}] {run['name']} seed {run['seed']}"
    if not os.path.isfile(os.path.join(d, 'eval_results.json')):
      say(f'{tag}: training in {d}')
      execute(train_command(sweep['base'], run, workdir, eval_flags), os.path.join(d, 'train.log'), say)
    wants_curves = robustness_examples and (not robustness_seeds or run['seed'] < robustness_seeds)
    if wants_curves and not os.path.isfile(os.path.join(d, 'eval', 'robustness.json')):
      say(f'{tag}: robustness curves')
      execute(robustness_command(run, workdir, robustness_examples), os.path.join(d, 'robustness.log'), say)


# ------------------------------------------------------------------------------------------------------------
# Aggregation.


def load_results(sweep: Mapping[str, Any], workdir: str) -> dict[str, list[dict[str, Any]]]:
  """{variant: [{'seed', 'metrics', 'robustness'}, ...]} for the runs that finished (in sweep order)."""
  out: dict[str, list[dict[str, Any]]] = {}
  for run in sweep['runs']:
    d = run_dir(workdir, run)
    path = os.path.join(d, 'eval_results.json')
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      metrics = json.load(f)
    rob = None
    rpath = os.path.join(d, 'eval', 'robustness.json')
    if os.path.isfile(rpath):
      with open(rpath) as f:
        rob = json.load(f)
    out.setdefault(run['name'], []).append(dict(seed=run['seed'], metrics=metrics, robustness=rob))
  return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for one value) of the finite values; NaN if none."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(results: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
  """{variant: {metric: {'mean', 'std', 'n', 'values'}}} over the seeds, for every metric of METRICS."""
  out = {}
  for name, runs in results.items():
    row = {}
    for key, *_ in METRICS:
      values = [r['metrics'].get(key) for r in runs]
      m, s = mean_std(values)
      row[key] = dict(mean=m, std=s, n=sum(v is not None for v in values), values=values)
    out[name] = row
  return out


def aggregate_robustness(results: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
  """{curve: {'levels': [...], metric: {variant: (means per level, stds per level)}}}."""
  out: dict[str, dict[str, Any]] = {}
  for name, runs in results.items():
    curves = [r['robustness']['curves'] for r in runs if r.get('robustness')]
    if not curves:
      continue
    for curve in curves[0]:
      levels = curves[0][curve]['levels']
      entry = out.setdefault(curve, {'levels': levels})
      for metric in curves[0][curve]:
        if metric == 'levels':
          continue
        stacked = np.asarray([c[curve][metric] for c in curves if curve in c], np.float64)
        entry.setdefault(metric, {})[name] = (stacked.mean(0).tolist(),
                                              (stacked.std(0, ddof=1) if len(stacked) > 1
                                               else np.zeros(len(levels))).tolist())
  return out


# ------------------------------------------------------------------------------------------------------------
# Report.


def _fmt(x: float, kind: str) -> str:
  if x is None or not np.isfinite(x):
    return '—'
  if kind == 'pct':
    return f'{100 * x:.1f}'
  return f'{x:.{int(kind[1:])}f}'


def table(agg: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> list[str]:
  """Markdown: one row per variant, mean ± std over seeds; a second table of differences from `full`."""
  names = [n for n in order if n in agg]
  cols = [(k, title, kind) for k, title, kind, _ in METRICS if any(agg[n][k]['n'] for n in names)]
  lines = ['| variant | seeds | ' + ' | '.join(t for _, t, _ in cols) + ' |',
           '| --- | --- |' + ' --- |' * len(cols)]
  for n in names:
    seeds = max(agg[n][k]['n'] for k, _, _ in cols)
    cells = [f"{_fmt(agg[n][k]['mean'], kind)} ± {_fmt(agg[n][k]['std'], kind)}" for k, _, kind in cols]
    lines.append(f'| {n} | {seeds} | ' + ' | '.join(cells) + ' |')
  if 'full' in agg and len(names) > 1:
    lines += ['', 'Difference from `full` (variant mean − full mean; **bold**: larger than the two runs\' '
              'spreads combined, √(s²_variant + s²_full)):', '',
              '| variant | ' + ' | '.join(t for _, t, _ in cols) + ' |', '| --- |' + ' --- |' * len(cols)]
    for n in names:
      if n == 'full':
        continue
      cells = []
      for k, _, kind in cols:
        a, b = agg[n][k], agg['full'][k]
        d = a['mean'] - b['mean']
        spread = math.hypot(a['std'], b['std'])
        text = _fmt(d, kind)
        if text != '—' and not text.startswith('-'):
          text = '+' + text
        cells.append(f'**{text}**' if np.isfinite(d) and spread > 0 and abs(d) > spread else text)
      lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
  return lines


def machine() -> str:
  from mmgan_jax.benchmarking import cpu_model  # pylint: disable=g-import-not-at-top
  return f'{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}'


def _chance() -> float:
  from mmgan_jax.data import shapes  # pylint: disable=g-import-not-at-top
  return shapes.chance_accuracy()


def render(sweep: Mapping[str, Any], results, agg, rob, *, command: str, order: Sequence[str],
           plot: str | None, n_eval: int | None, n_robust: int | None) -> str:
  """The markdown section (between the ablation markers of docs/results.md)."""
  seeds = sorted({r['seed'] for rs in results.values() for r in rs})
  steps = sorted({int(r['metrics'].get('steps', 0)) for rs in results.values() for r in rs})
  out = [f'Generated by `{command}` on {datetime.date.today().isoformat()} ({machine()}); seeds '
         f'{", ".join(map(str, seeds))}; {"/".join(map(str, steps))} training steps per run; evaluation on '
         f'N = {n_eval} held-out examples per run (one sample each; FID / precision / recall of text→image '
         f'refined samples against the N real images, so FID is biased upward at this N and comparable only '
         f'within the table). Mean ± sample std over the seeds.', '']
  out += table(agg, order)
  if rob:
    counts = sorted({sum(1 for r in rs if r.get('robustness')) for rs in results.values()} - {0})
    out += ['', f'Robustness (N = {n_robust} held-out examples per level, the same corrupted inputs for every '
            f'model; mean over {"/".join(map(str, counts))} seed(s) per variant): semantic accuracy of refined '
            f'samples (a uniform guess scores {_chance():.3f}) and BLEU-4 against corruption strength.', '']
    for curve, entry in rob.items():
      for metric, per_variant in entry.items():
        if metric == 'levels':
          continue
        out.append(f'| {curve} → {metric} | ' + ' | '.join(f'{lv:g}' for lv in entry['levels']) + ' |')
        out.append('| --- |' + ' --- |' * len(entry['levels']))
        for n in [v for v in order if v in per_variant]:
          means, stds = per_variant[n]
          out.append(f'| {n} | ' + ' | '.join(f'{m:.3f}' for m in means) + ' |')
        out.append('')
    if plot:
      out.append(f'![robustness curves]({plot})')
  return '\n'.join(out).rstrip() + '\n'


def write_section(path: str, section: str) -> None:
  """Replaces the text between the ablation markers of `path` (appends a section with them if absent)."""
  text = ''
  if os.path.isfile(path):
    with open(path) as f:
      text = f.read()
  block = f'{BEGIN}\n{section}{END}'
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
  else:
    text = text.rstrip('\n') + ('\n\n' if text else '') + '## Ablation study\n\n' + block + '\n'
  with open(path, 'w') as f:
    f.write(text)


def plot_robustness(rob: Mapping[str, Any], path: str, order: Sequence[str]) -> str:
  """One panel per (corruption, metric): mean over seeds per variant, ± std as a band; writes a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [(c, m) for c, e in rob.items() for m in e if m != 'levels']
  cols = min(2, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
  for ax, (curve, metric) in zip(axes.ravel(), panels):
    levels = rob[curve]['levels']
    finite = [lv if np.isfinite(lv) else None for lv in levels]
    x = np.arange(len(levels))  # categorical axis: inf dB and 0 sit at the ends
    for name in [v for v in order if v in rob[curve][metric]]:
      means, stds = (np.asarray(a) for a in rob[curve][metric][name])
      ax.plot(x, means, marker='o', label=name, linewidth=2.5 if name == 'full' else 1.2)
      ax.fill_between(x, means - stds, means + stds, alpha=0.12)
    if 'semantic' in metric:  # the oracle's floor: a uniform guess of each attribute
      ax.axhline(_chance(), color='grey', linestyle='--', linewidth=1, label='chance')
    ax.set_xticks(x, ['clean' if lv is None else f'{lv:g}' for lv in finite])
    ax.set_xlabel(curve.replace('_', ' '))
    ax.set_ylabel(metric.replace('/', ' ').replace('_', ' '))
    ax.grid(alpha=0.3)
  for ax in axes.ravel()[len(panels):]:
    ax.axis('off')
  axes.ravel()[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
