"""Pieces of the training loop that need no model: NaN stop, schedule length, a_s resolution."""

import numpy as np
import pytest

from configs import smoke
from input_pipeline import records as records_lib
from mrqm_jax import datasets, errors, train


def test_non_finite_loss_names_step_terms_and_last_checkpoint():
  with pytest.raises(train.TrainingError, match=r'step 17 \(dn\.cls, loss\).*step 10 in /w/checkpoints'):
    train.check_finite({'loss': float('nan'), 'dn.cls': float('inf'), 'bbox': 1.0}, 17, 10, '/w/checkpoints')
  train.check_finite({'loss': 1.0}, 3, None, '/w')  # finite: no error


def test_total_steps_epochs_or_override():
  config = smoke.get_config()
  config.train.num_steps = -1
  config.train.num_epochs = 12
  assert train.total_steps(config, train.steps_per_epoch(101, 2)) == 12 * 50
  config.train.num_steps = 7
  assert train.total_steps(config, 50) == 7


def _record(i, boxes):
  return records_lib.ImageRecord(image_id=i, name=f'im{i}', file_name=f'/x/im{i}.jpg', width=100, height=100,
                                 boxes=np.asarray(boxes, np.float32), labels=np.zeros(len(boxes)),
                                 ignore=np.zeros((0, 4)))


def test_a_s_auto_is_smallest_training_area_and_numbers_pass():
  config = smoke.get_config()
  config.iah.a_s = -1.0   # auto
  datasets.resolve_a_s(config, [_record(0, [[0, 0, 10, 10], [5, 5, 8, 7]]), _record(1, [[0, 0, 4, 2.5]])])
  assert isinstance(config.iah.a_s, float) and config.iah.a_s == pytest.approx(6.0)   # 3 x 2 px
  config.iah.a_s = 12.5
  datasets.resolve_a_s(config, [])
  assert config.iah.a_s == 12.5
  config.iah.a_s = -1.0
  with pytest.raises(errors.UsageError):   # auto needs a box
    datasets.resolve_a_s(config, [_record(0, np.zeros((0, 4)))])


class _Writer:
  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows += [(step, k, float(v)) for k, v in scalars.items()]


def test_report_progress_images_per_sec_is_steps_per_sec_times_batch():
  writer = _Writer()
  report = train.ReportProgress(images_per_step=8, num_train_steps=30, writer=writer, every_steps=10,
                                every_secs=None)
  for step, t in [(1, 100.0)] + [(s, 100.0 + 0.5 * (s - 1)) for s in range(2, 21)]:
    report(step, t)                         # 2 steps/s after the first step (whose time holds the compile)
  assert report.images_per_sec == pytest.approx(16.0)
  got = {(s, k): v for s, k, v in writer.rows}
  assert got[(10, 'steps_per_sec')] == pytest.approx(2.0) and got[(10, 'images_per_sec')] == pytest.approx(16.0)
  assert got[(20, 'images_per_sec')] == pytest.approx(16.0)
  assert {s for s, _, _ in writer.rows} == {10, 20}     # only every_steps
  with pytest.raises(ValueError):
    report(22, 200.0)                       # a skipped step is a bug in the loop
