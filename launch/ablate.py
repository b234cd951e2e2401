r"""Runs an ablation sweep and writes its table and robustness plot from the runs' own result files.

  python launch/ablate.py --sweep=configs/ablations.py --workdir=runs/ablations \
      --fid_weights=../shared/fid/inception_2015_12_05_fid.npz \
      --report=docs/results.md --plots_dir=docs/figures
  python launch/ablate.py --sweep=configs/ablations.py:seeds=1,steps=300 --workdir=/tmp/abl   # a quick look

Every run of the sweep (configs/ablations.py) trains in WORKDIR/<variant>/seed_<seed> with launch/train.py
(final evaluation on --num_examples held-out examples: semantic accuracy, captions with BLEU and METEOR,
retrieval, and FID / precision / recall when --fid_weights is given), then gets its robustness curves with
launch/evaluate.py --robustness. Finished runs are skipped, so the same command continues an interrupted sweep;
--report_only re-renders from what is there. Writes WORKDIR/ablation.json (every number, per seed), the
markdown section between the `<!-- ablation -->` markers of --report, and --plots_dir/robustness.png.
"""

import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs.*`

from absl import app, flags  # noqa: E402

_SWEEP = flags.DEFINE_string('sweep', 'configs/ablations.py', 'Sweep file (path[:arg]) with get_sweep(arg).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Parent directory of the runs.')
_BASE = flags.DEFINE_string('base', None, "Base config string instead of the sweep's (e.g. configs/shapes.py:smoke).")
_ONLY = flags.DEFINE_list('only', [], 'Run only these variants (default: all).')
_NUM = flags.DEFINE_integer('num_examples', 512, 'Held-out examples of each final evaluation (the N of FID).')
_ROBUST = flags.DEFINE_integer('robustness_examples', 256, 'Held-out examples per robustness level (0: no '
                               'robustness curves).')
_ROBUST_SEEDS = flags.DEFINE_integer('robustness_seeds', 0, 'Robustness curves for the seeds below this only '
                                    '(0: every seed).')
_FID = flags.DEFINE_string('fid_weights', '', 'FID Inception .npz; empty: no FID / precision / recall.')
_METEOR = flags.DEFINE_bool('meteor', True, 'Score METEOR too (needs Java).')
_REPORT = flags.DEFINE_string('report', None, 'Markdown file whose ablation section is (re)written.')
_PLOTS = flags.DEFINE_string('plots_dir', None, 'Where robustness.png goes (default: WORKDIR).')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only aggregate the finished runs and write the report.')
flags.mark_flags_as_required(['workdir'])


def _fail(message: str) -> None:
  print('error: ' + ' '.join(str(message).splitlines()[:1]), file=sys.stderr)
  sys.exit(2)


def load_sweep(spec: str) -> dict:
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    _fail(f'--sweep={spec}: no such file.')
  module_spec = importlib.util.spec_from_file_location('sweep_module', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    sweep = module.get_sweep(arg or None)
  except (AttributeError, ValueError, KeyError) as e:
    _fail(f'--sweep={spec}: {e}')
  return sweep


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; every option is a --flag.')
  from mmgan_jax import ablation  # pylint: disable=g-import-not-at-top
  sweep = load_sweep(_SWEEP.value)
  if _BASE.value:
    sweep['base'] = _BASE.value
  order = list(dict.fromkeys(r['name'] for r in sweep['runs']))
  if _ONLY.value:
    unknown = set(_ONLY.value) - set(order)
    if unknown:
      _fail(f'--only has unknown variants {sorted(unknown)}; the sweep has {order}.')
    sweep['runs'] = [r for r in sweep['runs'] if r['name'] in _ONLY.value]
    order = [n for n in order if n in _ONLY.value]
  if _FID.value and not os.path.isfile(_FID.value):
    _fail(f'--fid_weights={_FID.value}: no such file.')
  evaluators = ('semantic', 'captions', 'retrieval') + (('fid',) if _FID.value else ())
  eval_flags = [f'--config.eval.num_examples={_NUM.value}', f'--config.eval.evaluators={evaluators!r}',
                f"--config.eval.metrics={('bleu', 'meteor') if _METEOR.value else ('bleu',)!r}"]
  if _FID.value:
    eval_flags.append(f'--config.eval.fid.weights={os.path.abspath(_FID.value)}')
  if not _REPORT_ONLY.value:
    try:
      ablation.run_sweep(sweep, _WORKDIR.value, eval_flags=eval_flags, robustness_examples=_ROBUST.value,
                         robustness_seeds=_ROBUST_SEEDS.value)
    except RuntimeError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
  results = ablation.load_results(sweep, _WORKDIR.value)
  if not results:
    _fail(f'no finished runs in {_WORKDIR.value}.')
  agg = ablation.aggregate(results)
  rob = ablation.aggregate_robustness(results)
  plot = None
  if rob:
    plot_path = os.path.join(_PLOTS.value or _WORKDIR.value, 'robustness.png')
    ablation.plot_robustness(rob, plot_path, order)
    if _REPORT.value:
      plot = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(_REPORT.value)))
    print(f'Wrote {plot_path}')
  # The command that makes these runs: a --report_only re-render names the sweep that produced them.
  command = 'python launch/ablate.py ' + ' '.join(a for a in sys.argv[1:] if not a.startswith('--report_only'))
  with open(os.path.join(_WORKDIR.value, 'ablation.json'), 'w') as f:
    json.dump(dict(command=command, base=sweep['base'], aggregate=agg, robustness=rob,
                   runs={k: v for k, v in results.items()}), f, indent=2, default=float)
  section = ablation.render(sweep, results, agg, rob, command=command, order=order, plot=plot,
                            n_eval=_NUM.value, n_robust=_ROBUST.value)
  print(section)
  if _REPORT.value:
    ablation.write_section(_REPORT.value, section)
    print(f'Wrote the ablation section of {_REPORT.value}')


if __name__ == '__main__':
  app.run(main)
