r"""Writes docs/performance.md from launch/benchmark.py results, keeping its hand-written interpretation.

  python launch/performance_report.py --json=shapes.json,coco.json --out=docs/performance.md

Every table, the machines and the exact commands come from the JSON files (one per benchmark run, any order);
the text between the `<!-- interpretation -->` and `<!-- /interpretation -->` markers of an existing --out is
kept as it is, so the explanation survives a regeneration. Accelerators with no result file are listed as
"not measured here". A missing or unreadable JSON file prints one `error: ...` line and exits with status 2.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_JSON = flags.DEFINE_list('json', None, 'launch/benchmark.py result files.')
_OUT = flags.DEFINE_string('out', 'docs/performance.md', 'Markdown file to write.')
flags.mark_flags_as_required(['json'])

BEGIN, END = '<!-- interpretation -->', '<!-- /interpretation -->'
PLACEHOLDER = '(Write the interpretation of the figures here; it is kept when the file is regenerated.)'
GOAL_SAMPLING = 15.0  # DDIM-50 / (G + K) for K <= 4 (issue 6)
GOAL_CPU_FRACTION = 0.30  # train step vs the measured CPU matmul rate
GOAL_H100_MFU = 0.40  # coco config on an H100


def _s(x) -> str:
  if x is None:
    return '—'
  return f'{x * 1e3:.1f} ms' if x < 1 else f'{x:.2f} s'


def _mib(n) -> str:
  return '—' if n is None else f'{n / 2 ** 20:,.0f} MiB'


def _pct(x) -> str:
  return '—' if x is None else f'{100 * x:.1f} %'


def _title(r: dict) -> str:
  m = r['machine']
  return f"`{m['config']}` at batch {m['batch']} ({m['dtype']}) on {m['device_kind']}"


def machine_section(results: list[dict]) -> list[str]:
  out = ['## Machines and commands', '']
  for r in results:
    m = r['machine']
    out += [f"**{_title(r)}**, {m['date']}: {m['devices_used']} of {m['device_count']} {m['platform']} device(s); "
            f"host {m['cpu_model']}, {m['cpus_available']} cores available (load average at the end "
            f"{', '.join(f'{x:.1f}' for x in m['load_average'] or [])}); jax {m['jax']}, jaxlib {m['jaxlib']}, "
            f"flax {m['flax']}, Python {m['python']}; image {m['image_size']} px, latents "
            f"{'×'.join(str(v) for v in m['latent_shape'])}.", '', '    ' + m['command'], '']
  return out


def train_section(results: list[dict]) -> list[str]:
  from mmgan_jax.benchmarking import step_rows  # pylint: disable=g-import-not-at-top
  out = _table('Train step',
               'Median after the warm-up, each step synchronised. FLOPs: XLA\'s cost analysis of the lowered '
               '(pre-optimisation) HLO of the whole program; MFU divides the achieved FLOP/s by the peak named in '
               'the last column. Memory: arguments + outputs − donated aliases + temporaries of the compiled '
               'executable.',
               ['config', 'step', 'median', 'examples/s', 'GFLOP', 'achieved GFLOP/s', 'MFU', 'vs', 'compile',
                'memory'])
  for r in results:
    tr, peak = r['train'], r['peak']
    for name, x in step_rows(tr):
      mem = _mib(x['memory'].get('peak_estimate')) if x.get('memory') else '—'
      vs = (f"{peak['flops_per_s'] / 1e9:,.0f} GFLOP/s: {peak['source'].split(' (')[0]}" if peak['flops_per_s']
            else '—')
      out.append(f"| {_title(r)} | {name.replace('_', ' ')} | {_s(x['median_s'])} | {x['examples_per_s']:.2f} | "
                 f"{x['flops'] / 1e9:,.1f} | {x['achieved_flops_per_s'] / 1e9:,.1f} | {_pct(x['mfu'])} | {vs} | "
                 f"{_s(x.get('compile_s'))} | {mem} |")
    a = tr.get('iteration_with_r1_amortised')
    if a:
      out.append(f"| {_title(r)} | iteration, R1 every {a['r1_interval']} (amortised) | {_s(a['median_s'])} | "
                 f"{a['examples_per_s']:.2f} | | | | | | |")
  out.append('')
  for r in results:
    if r.get('device_memory_peak_bytes') is not None:
      out.append(f"{_title(r)}: device allocator peak {_mib(r['device_memory_peak_bytes'])}.")
    if 'cpu_matmul_bf16_flops_per_s' in r['peak']:
      f32 = r['peak']['cpu_matmul_f32_flops_per_s']
      out.append(f"{_title(r)}: CPU matmul in the same process {f32 / 1e9:.0f} "
                 f"GFLOP/s (f32), {r['peak']['cpu_matmul_bf16_flops_per_s'] / 1e9:.0f} GFLOP/s (bf16).")
  return out + ['']


def accelerator_section(results: list[dict]) -> list[str]:
  from mmgan_jax.benchmarking import PEAK_BF16_FLOPS, peak_flops  # pylint: disable=g-import-not-at-top
  measured = {}
  for r in results:
    found = peak_flops(r['machine']['device_kind'])
    if found:
      measured.setdefault(found[0], []).append(r)
  out = ['## Accelerators', '', 'Dense bf16 peaks the MFU is computed against (vendor datasheets; sources in '
         '`mmgan_jax/benchmarking.py`).', '', '| device | peak | measured here |', '| --- | --- | --- |']
  for row, flops in PEAK_BF16_FLOPS.items():
    runs = measured.get(row)
    got = ('; '.join(f"{r['machine']['config']}: MFU {_pct(r['train']['iteration']['mfu'])}" for r in runs)
           if runs else 'not measured here')
    out.append(f'| {row} | {flops / 1e12:,.0f} TFLOP/s | {got} |')
  return out + ['']


def _table(title: str, intro: str, columns: list[str]) -> list[str]:
  """A section's heading, its paragraph and the head of its table."""
  return [f'## {title}', '', intro, '', '| ' + ' | '.join(columns) + ' |', '| --- ' * len(columns) + '|']


def _rows(results: list[dict], key: str, columns: int, out: list[str]):
  """(result, its `key` section) for the results that measured it; a 'not measured' row for skipped ones."""
  for r in results:
    section = r.get(key)
    if not section:
      continue
    if 'skipped' in section:
      out.append(f"| {_title(r)} | not measured: {section['skipped']} |" + ' |' * (columns - 2))
      continue
    yield r, section


def pipeline_section(results: list[dict]) -> list[str]:
  out = _table('Input-pipeline headroom',
               'Sustained records/s of the config\'s own pipeline (its `num_threads`; all records read after the '
               'warm-up / their wall time) divided by the examples/s the train iteration consumes on the same '
               'machine; CPU time per record alongside.',
               ['config', 'records/s', 'CPU per record', 'source', 'train consumes', 'headroom'])
  for r, p in _rows(results, 'pipeline', 6, out):
    eats = r['train']['iteration']['examples_per_s']
    src = f"synthetic fixture of {p['synthetic_records']} records" if p.get('synthetic_records') else 'the dataset'
    out.append(f"| {_title(r)} | {p['records_per_s_mean']:,.0f} ({p['threads']} threads, batch "
               f"{p['global_batch']}) | {p['cpu_ms_per_record']:.1f} ms | {src} | "
               f"{eats:.2f} /s | {r['pipeline_headroom']:,.0f}× |")
  return out + ['']


def sampling_section(results: list[dict]) -> list[str]:
  out = _table('Sampling latency: refinement vs a 50-step DDIM',
               'One batch, median of the timed calls; conditions encoded once (all modalities present), EMA '
               "weights, the config's t_start and guidance. The ratio is DDIM / (G + K) in latent space; *end to "
               'end* adds the encoders and the codec decoder to both sides. '
               f'Goal: ≥ {GOAL_SAMPLING:.0f}× for K ≤ 4.',
               ['config', 'encode', 'G', 'G + 1', 'G + 2', 'G + 4', 'DDIM', 'decode', 'DDIM / (G+1, G+2, G+4)',
                'end to end'])
  for r, s in _rows(results, 'sampling', 11, out):
    lat = s['latency_s']
    gk = [_s(lat.get(f'g_plus_{k}')) for k in (1, 2, 4)]
    ratios = ', '.join(f"{s['ratio_ddim_over_g_plus_k'][str(k)]:.1f}×" for k in s['ks'])
    e2e = ', '.join(f"{s['ratio_ddim_over_g_plus_k_end_to_end'][str(k)]:.1f}×" for k in s['ks'])
    out.append(f"| {_title(r)} | {_s(lat['encode'])} | {_s(lat['generator'])} | {' | '.join(gk)} | "
               f"{_s(lat['ddim_' + str(s['ddim_steps'])])} ({s['ddim_steps']} steps) | {_s(lat['decode'])} | "
               f'{ratios} | {e2e} |')
  return out + ['']


def sharding_section(results: list[dict]) -> list[str]:
  out = _table('Sharding overhead on CPU',
               'The same D + G iteration and global batch on a 1-device mesh and on a data-parallel mesh of virtual '
               'CPU devices (`--xla_force_host_platform_device_count`, same cores), timed alternately in one process.',
               ['config', 'batch', '1 device', 'N devices', 'ratio', 'overhead per example'])
  for r, s in _rows(results, 'sharding', 6, out):
    out.append(f"| {_title(r)} | {s['batch']} ({s['per_device_batch']} per device) | {_s(s['one_device_s'])} | "
               f"{_s(s['n_devices_s'])} ({s['devices']} devices) | {s['ratio']:.2f} | "
               f"{1e3 * (s['n_devices_s'] - s['one_device_s']) / s['batch']:+.1f} ms |")
  return out + ['']


def breakdown_section(results: list[dict]) -> list[str]:
  out = ['## Profile: where the iteration\'s time goes', '',
         'Each component compiled and timed alone, as the steps use it (forward; forward + backward = the '
         'gradient of its summed output). Rows overlap the steps\' work; they show how efficiently each part '
         'runs.', '']
  for r in results:
    bd = r.get('breakdown')
    if not bd:
      continue
    out += [f'**{_title(r)}**', '', '| sub-computation | median | GFLOP | GFLOP/s |', '| --- | --- | --- | --- |']
    for name, x in bd.items():
      out.append(f"| {name} | {_s(x['median_s'])} | {x['flops'] / 1e9:,.2f} | {x['gflops_per_s']:,.1f} |")
    probe = r.get('conv_probe')
    if probe:
      out += ['', 'One 3×3 conv alone at the model\'s sizes (same process; forward + backward = both gradients, '
              '3× the forward FLOPs):', '',
              '| batch × side² × C_in → C_out | dtype | forward GFLOP/s | forward + backward GFLOP/s |',
              '| --- | --- | --- | --- |']
      for p in probe:
        out.append(f"| {p['batch']} × {p['side']}² × {p['cin']} → {p['cout']} | {p['dtype']} | "
                   f"{p['gflops_per_s_fwd']:,.1f} | {p['gflops_per_s_fwd_bwd']:,.1f} |")
    op = r.get('op_profile')
    if op and 'skipped' not in op:
      out += ['', f"Per-op trace of the compiled D + G iteration (`jax.profiler`, {op['iterations']} iterations): "
              f"{op['op_executions_per_iteration']:,.0f} op executions per iteration, "
              f"{_s(op['wall_s_per_iteration'])} wall; summed op time / wall = {op['op_time_over_wall']:.2f}.", '',
              '| op kind | time per iteration | share |', '| --- | --- | --- |']
      for k, v in op['categories'].items():
        out.append(f"| {k} | {_s(v['s_per_iteration'])} | {_pct(v['fraction'])} |")
      out += ['', '| component and pass | time per iteration | share |', '| --- | --- | --- |']
      for k, v in op['components'].items():
        out.append(f"| {k} | {_s(v['s_per_iteration'])} | {_pct(v['fraction'])} |")
      if op.get('update_sources'):
        out += ['', 'The `update & losses` ops (outside every module: losses, optimiser, EMA, non-finite '
                'guard) by the function that traced them:', '',
                '| source | time per iteration | share of all op time |', '| --- | --- | --- |']
        for k, v in op['update_sources'].items():
          out.append(f"| `{k}` | {_s(v['s_per_iteration'])} | {_pct(v['fraction'])} |")
      if op.get('sources'):
        out += ['', 'All ops by the function that traced them (`?`: ops XLA made without a source):', '',
                '| source | time per iteration | share |', '| --- | --- | --- |']
        for k, v in op['sources'].items():
          out.append(f"| `{k}` | {_s(v['s_per_iteration'])} | {_pct(v['fraction'])} |")
      out += ['', '| op duration | executions per iteration | share of op time |', '| --- | --- | --- |']
      for k, v in op['by_duration'].items():
        out.append(f"| {k} | {v['executions_per_iteration']:,.0f} | {_pct(v['fraction'])} |")
      out += ['', 'Longest ops: ' + ', '.join(f"`{x['name']}` ({x['category']}, {x['component']}) "
                                             f"{_s(x['s_per_iteration'])}" for x in op['top_ops'][:6]) + '.']
    out.append('')
  return out


def goals_section(results: list[dict]) -> list[str]:
  out = ['## Goals (issue 6)', '']
  for r in results:
    s = r.get('sampling') or {}
    if 'ratio_ddim_over_g_plus_k' in s:
      n = s['ddim_steps']
      parts = []
      for k in (k for k in s['ks'] if k <= 4):
        ratio = s['ratio_ddim_over_g_plus_k'][str(k)]
        parts.append(f"K = {k}: {ratio:.1f}× ({'met' if ratio >= GOAL_SAMPLING else 'not met'}; at most "
                     f"{n / k:.1f}× by construction)")
      out.append(f"- {_title(r)}: DDIM-{n} / (G + K refinement steps), goal ≥ {GOAL_SAMPLING:.0f}×: "
                 + '; '.join(parts) + f". The config refines with K = {s.get('config_k', '?')}.")
    it = r['train']['iteration']
    if r['machine']['platform'] == 'cpu' and it.get('mfu') is not None:
      out.append(f"- {_title(r)}: the train iteration runs at {_pct(it['mfu'])} of the measured CPU matmul rate "
                 f"(goal {100 * GOAL_CPU_FRACTION:.0f} %: "
                 f"{'met' if it['mfu'] >= GOAL_CPU_FRACTION else 'not met'}).")
  if not any('H100' in r['machine']['device_kind'] and 'coco' in r['machine']['config'] for r in results):
    out.append(f'- coco on an H100 at {100 * GOAL_H100_MFU:.0f} % MFU: not measured here (no GPU).')
  return out + ['']


def render(results: list[dict], interpretation: str, sources: list[str]) -> str:
  head = ['# Performance', '',
          f'Generated by `python launch/performance_report.py --json={",".join(sources)}` from '
          '`launch/benchmark.py` results; edit only the interpretation section (kept on regeneration).', '']
  body = (goals_section(results) + machine_section(results) + train_section(results) + accelerator_section(results)
          + pipeline_section(results) + sampling_section(results) + sharding_section(results)
          + breakdown_section(results))
  tail = ['## Interpretation', '', BEGIN, interpretation.strip('\n') or PLACEHOLDER, END, '']
  return '\n'.join(head + body + tail)


def kept_interpretation(path: str) -> str:
  """The hand-written text between the markers of an existing file ('' if none)."""
  if not os.path.isfile(path):
    return ''
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    return ''
  return text.split(BEGIN, 1)[1].split(END, 1)[0].strip('\n')


def main(argv):
  del argv
  results = []
  for path in _JSON.value:
    try:
      with open(path) as f:
        results.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      print(f'error: cannot read benchmark result {path}: {e}', file=sys.stderr)
      sys.exit(2)
    if 'machine' not in results[-1] or 'train' not in results[-1]:
      print(f'error: {path} is not a launch/benchmark.py result (no machine/train sections).', file=sys.stderr)
      sys.exit(2)
  text = render(results, kept_interpretation(_OUT.value), _JSON.value)
  with open(_OUT.value, 'w') as f:
    f.write(text)
  print(f'Wrote {_OUT.value} from {len(results)} result(s).')


if __name__ == '__main__':
  app.run(main)
