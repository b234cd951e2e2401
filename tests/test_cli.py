"""The console a launcher prints: library chatter filtered, the results as one short table."""

import logging

from mmgan_jax import cli


def _record(path: str, level: int = logging.INFO, msg: str = 'x') -> logging.LogRecord:
  return logging.LogRecord('absl', level, path, 1, msg, (), None)


def test_console_keeps_our_lines_and_drops_library_info():
  f = cli._ConsoleFilter()  # pylint: disable=protected-access
  assert f.filter(_record('/x/mmgan_jax/train/trainer.py'))
  assert f.filter(_record('/x/launch/train.py'))
  assert not f.filter(_record('/site-packages/orbax/checkpoint/checkpoint_manager.py'))
  assert not f.filter(_record('/site-packages/jax/_src/xla_bridge.py'))
  assert f.filter(_record('/site-packages/orbax/checkpoint/checkpoint_manager.py', logging.WARNING))
  assert not f.filter(_record('/site-packages/clu/platform/local.py', msg='Setting work unit notes: %s'))
  assert not f.filter(_record('/site-packages/clu/metric_writers/logging_writer.py', msg='[%d]%s %s'))


def test_progress_and_eval_lines_are_one_short_line_each():
  scalars = {'d/loss': 1.23456, 'g/adv_loss': 0.7, 'g/lambda_adv': 0.25, 'diffusion_gan/t_max': 12.4,
             'grad_norm/fusion': 3.0, 'align/text_audio_acc': 0.9}
  line = cli.progress_line(50, 1000, scalars, 1.25)
  assert line == '[  50/1000] 1.25 it/s, ETA 12 min 40 s | D 1.235 | G adv 0.700 | lambda_adv 0.25 | T_max 12'
  assert cli.progress_line(1, 1000, {}, None) == '[   1/1000]'
  mid = {'text_to_image/refined/mean': 0.689, 'text_to_image/refined/shape': 0.285,
         'text_audio_to_image/refined/mean': 0.75, 'image_to_text/BLEU-4': 0.7}
  assert cli.eval_line(500, mid) == ('Evaluation at step 500, semantic accuracy %: text+audio->image 75.0; '
                                     'text->image 68.9 (shape 28.5)')


def test_results_table_rows_columns_and_pointer():
  values = (0.7, 0.977, 0.254, 0.574, 0.996, 0.152)
  results = {f'text_to_image/refined/{a}': v for a, v in zip(cli._ATTRS, values)}  # pylint: disable=protected-access
  results.update({'num_examples': 256.0,
             'text_audio_to_image/pre_refine/colour': 0.977, 'image_to_text/BLEU-4': 0.7184,
             'retrieval/text_to_image/R@1': 0.7188, 'retrieval/text_to_image/R@5': 1.0, 'steps': 1000,
             'train_seconds': 1127.0, 'steps_per_sec': 1.27})
  table = cli.results_table(results, 'W/eval_results.json')
  lines = table.splitlines()
  assert 'N = 256' in lines[0]
  header = lines[1].split()
  row = next(line for line in lines if line.startswith('text->image refined')).split()
  assert row[header.index('shape') + 2] == '25.4' and row[header.index('mean') + 2] == '70.0'
  assert any(line.startswith('text+audio->image before refinement') for line in lines)
  assert 'image->text/BLEU-4 0.7184' in table and 'R@1 0.7188' in table and 'R@5' not in table
  assert '1000 steps in 1127 s, 1.27 steps/s' in table and lines[-1] == 'All 14 numbers: W/eval_results.json'
