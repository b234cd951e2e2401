"""The learning-curve reader gets back what the trainer's CLU writer wrote, per step."""

import pytest
from clu import metric_writers

from mmgan_jax.evaluation import learning_curve


def test_reads_evaluations_written_by_the_trainers_writer(tmp_path):
  writer = metric_writers.create_default_writer(str(tmp_path))
  writer.write_scalars(10, {'d/loss': 1.0})  # a training scalar: not an evaluation
  writer.write_scalars(20, {'eval/text_to_image/refined/shape': 0.25, 'eval/text_to_image/refined/mean': 0.5})
  writer.write_scalars(40, {'eval/text_to_image/refined/shape': 0.75, 'eval/text_to_image/refined/fid': 12.5})
  writer.flush()
  curve = learning_curve.read_evaluations(str(tmp_path))
  assert list(curve) == [20, 40]
  assert curve[20]['text_to_image/refined/shape'] == pytest.approx(0.25)
  assert curve[40]['text_to_image/refined/shape'] == pytest.approx(0.75)
  assert 0 <= curve[20]['wall_s'] <= curve[40]['wall_s']
  table = learning_curve.markdown_table(curve)
  assert '| 20 |' in table and '75.0' in table and table.splitlines()[0].endswith('| FID |')
  assert table.splitlines()[-1].endswith('| 12.5 |')
  png = learning_curve.plot({'run': curve}, str(tmp_path / 'curve.png'))
  assert (tmp_path / 'curve.png').stat().st_size > 0 and png.endswith('curve.png')


def test_a_directory_without_events_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no TensorBoard event files'):
    learning_curve.read_evaluations(str(tmp_path))
