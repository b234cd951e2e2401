"""The ablation study (configs/ablations.py, launch/ablate.py, mmgan_jax/ablation.py) and the robustness curves.

The aggregation and report are checked on hand-made result files (known means and spreads); the sweep itself
runs end to end on the smoke model (1 variant x 1 seed x 2 steps, tiny N), with a rerun that must skip every
finished run. The corruptions are checked for their defining property (SNR, dropped words, noise level).
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import ablations
from mmgan_jax import ablation
from mmgan_jax.evaluation import robustness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_switches_one_component_per_variant_and_seeds_every_run():
  sweep = ablations.get_sweep('seeds=2,steps=50')
  names = [r['name'] for r in sweep['runs']]
  assert names[:2] == ['full', 'full'] and len(names) == 2 * len(ablations.VARIANTS)
  assert {r['seed'] for r in sweep['runs']} == {0, 1}
  assert all(r['overrides']['total_steps'] == 50 for r in sweep['runs'])
  full = next(r for r in sweep['runs'] if r['name'] == 'full')
  assert set(full['overrides']) == {'seed', 'total_steps'}
  from helpers import override, smoke_config  # every override names a real config field (locked: no new keys)
  for r in sweep['runs']:
    config = smoke_config()
    config.lock()
    override(config, **r['overrides'])
  with pytest.raises(ValueError):
    ablations.get_sweep('seeds=0')
  assert ablation.flag_value(('semantic', 'fid')) == "('semantic','fid')"
  assert ablation.flag_value(('bleu',)) == "('bleu',)" and ablation.flag_value(False) == 'False'


def _write_run(root, name, seed, t2i, fid=None, robust=None):
  d = os.path.join(root, name, f'seed_{seed}')
  os.makedirs(os.path.join(d, 'eval'), exist_ok=True)
  metrics = {'text_to_image/refined/mean': t2i, 'steps': 10, 'steps_per_sec': 2.0}
  if fid is not None:
    metrics['text_to_image/refined/fid'] = fid
  with open(os.path.join(d, 'eval_results.json'), 'w') as f:
    json.dump(metrics, f)
  if robust is not None:
    with open(os.path.join(d, 'eval', 'robustness.json'), 'w') as f:
      json.dump({'curves': {'word_dropout': {'levels': [0.0, 0.5], 'text_to_image/semantic': robust}}}, f)


def test_aggregate_table_and_report_section(tmp_path):
  root = str(tmp_path)
  sweep = {'base': 'x', 'runs': [dict(name=n, seed=s, overrides={}) for n in ('full', 'no_refinement')
                                 for s in (0, 1, 2)]}
  for s, v in enumerate((0.40, 0.50, 0.60)):
    _write_run(root, 'full', s, v, fid=100.0 + s, robust=[v, v / 2])
  for s, v in enumerate((0.10, 0.12)):  # seed 2 of this variant has not finished
    _write_run(root, 'no_refinement', s, v, robust=[v, 0.0])
  results = ablation.load_results(sweep, root)
  assert [r['seed'] for r in results['no_refinement']] == [0, 1]
  agg = ablation.aggregate(results)
  full = agg['full']['text_to_image/refined/mean']
  assert math.isclose(full['mean'], 0.5) and math.isclose(full['std'], 0.1) and full['n'] == 3
  assert agg['no_refinement']['text_to_image/refined/fid']['n'] == 0  # missing metric: not averaged as 0
  rob = ablation.aggregate_robustness(results)
  means, stds = rob['word_dropout']['text_to_image/semantic']['full']
  np.testing.assert_allclose(means, [0.5, 0.25]) and np.testing.assert_allclose(stds, [0.1, 0.05])
  lines = ablation.table(agg, ['full', 'no_refinement'])
  text = '\n'.join(lines)
  assert '| full | 3 | 50.0 ± 10.0 |' in text and '| no_refinement | 2 | 11.0 ± 1.4 |' in text
  assert '**-39.0**' in text  # 39 points lower, far outside the spreads: bold
  report = tmp_path / 'results.md'
  report.write_text('# Results\n\nkept\n')
  section = ablation.render(sweep, results, agg, rob, command='cmd', order=['full', 'no_refinement'],
                            plot='robustness.png', n_eval=64, n_robust=32)
  ablation.write_section(str(report), section)
  ablation.write_section(str(report), section)  # idempotent: replaced, not appended twice
  body = report.read_text()
  assert body.startswith('# Results\n\nkept') and body.count(ablation.BEGIN) == 1
  assert 'N = 64' in body and '![robustness curves](robustness.png)' in body
  png = ablation.plot_robustness(rob, str(tmp_path / 'plots' / 'robustness.png'), ['full', 'no_refinement'])
  assert os.path.getsize(png) > 1000


def test_corruptions_have_their_defining_property():
  rng = np.random.default_rng(0)
  audio = np.sin(np.linspace(0, 200, 16000))[None].repeat(4, 0).astype(np.float32)
  noisy = robustness.add_noise_at_snr(audio, 10.0, rng)
  snr = 10 * np.log10(np.mean(audio ** 2) / np.mean((noisy - audio) ** 2))
  assert abs(snr - 10.0) < 0.2
  np.testing.assert_array_equal(robustness.add_noise_at_snr(audio, math.inf, rng), audio)
  ids = np.array([[1, 5, 6, 7, 8, 2, 0, 0]] * 200)
  mask = ids != 0
  out, m = robustness.drop_words(ids, mask, 0.5, rng, bos_id=1, eos_id=2, pad_id=0)
  kept = m.sum(1) - 2
  assert abs(kept.mean() - 2.0) < 0.3  # half of the 4 words on average
  for row, n in zip(out, m.sum(1)):  # BOS, surviving words in order, EOS, then padding
    assert row[0] == 1 and row[n - 1] == 2 and np.all(row[n:] == 0)
    words = list(row[1:n - 1])
    assert words == sorted(words) and set(words) <= {5, 6, 7, 8}
  same, _ = robustness.drop_words(ids, mask, 0.0, rng, bos_id=1, eos_id=2, pad_id=0)
  np.testing.assert_array_equal(same, ids)
  images = np.zeros((8, 16, 16, 3), np.float32)
  assert abs(robustness.add_image_noise(images, 0.2, rng).std() - 0.2) < 0.01
  b = dict(image=images, audio=audio[:1].repeat(8, 0), text_ids=ids[:8], text_mask=mask[:8])
  c1 = list(robustness.corrupted_chunks([(b, [])], 'image_noise', 0.2, seed=3, bos_id=1, eos_id=2, pad_id=0))
  c2 = list(robustness.corrupted_chunks([(b, [])], 'image_noise', 0.2, seed=3, bos_id=1, eos_id=2, pad_id=0))
  np.testing.assert_array_equal(c1[0][0]['image'], c2[0][0]['image'])  # the same corrupted inputs every time
  np.testing.assert_array_equal(c1[0][0]['audio'], b['audio'])  # only the named input changes
  for level in robustness.CURVES['audio_snr_db'].levels:  # every level, negative SNRs included, has its stream
    out = list(robustness.corrupted_chunks([(b, [])], 'audio_snr_db', level, seed=3, bos_id=1, eos_id=2, pad_id=0))
    assert np.all(np.isfinite(out[0][0]['audio']))


def test_sweep_runs_end_to_end_and_resumes(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir or ''
  workdir, report = tmp_path / 'abl', tmp_path / 'results.md'
  args = [sys.executable, 'launch/ablate.py', '--sweep=configs/ablations.py:seeds=1,steps=2',
          '--base=configs/shapes.py:smoke', '--only=no_refinement', f'--workdir={workdir}',
          '--num_examples=16', '--robustness_examples=8', '--nometeor', f'--report={report}',
          f'--plots_dir={tmp_path}']
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = json.loads((workdir / 'ablation.json').read_text())
  assert set(data['aggregate']) == {'no_refinement'}
  assert data['aggregate']['no_refinement']['text_to_image/refined/mean']['n'] == 1
  curves = data['robustness']
  assert set(curves) == set(robustness.CURVES)
  assert len(curves['audio_snr_db']['audio_to_image/semantic']['no_refinement'][0]) == len(
      robustness.CURVES['audio_snr_db'].levels)
  text = report.read_text()
  assert '| no_refinement | 1 |' in text and 'N = 16' in text
  assert (tmp_path / 'robustness.png').stat().st_size > 1000
  again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert again.returncode == 0 and 'training in' not in again.stdout  # every finished run is skipped
