"""Dataset statistics: the data README's facts, size-band edges, and the CLI's last-line JSON."""

import collections
import glob
import json
import os

import numpy as np
import pytest

from input_pipeline import records as records_lib
from input_pipeline import stats
from input_pipeline import synthetic


def _record(name, boxes, labels, ignore=()):
  return records_lib.ImageRecord(image_id=0, name=name, file_name='', width=100, height=100, boxes=boxes,
                                 labels=labels, ignore=ignore)


def test_size_bands_use_inclusive_upper_edges():
  # Areas: 144 (eS edge), 145, 400 (rS edge), 1024 (S and gS edge), 1025, 2000 (N edge), 9216 (M edge), 9217.
  sides = [(12, 12), (5, 29), (20, 20), (32, 32), (25, 41), (40, 50), (96, 96), (1, 9217)]
  boxes = [[0, 0, w, h] for w, h in sides]
  s = stats.dataset_stats([_record('a', boxes, [0, 1, 1, 2, 2, 2, 0, 0]), _record('b', [], [])], ['x', 'y', 'z'])
  assert s['size_bands'] == {'S': 4, 'M': 3, 'L': 1, 'eS': 1, 'rS': 2, 'gS': 1, 'N': 2, 'over_N': 2}
  assert s['per_class'] == {'x': 3, 'y': 2, 'z': 3}
  assert s['per_class_size_bands']['y'] == {'S': 2, 'M': 0, 'L': 0, 'eS': 0, 'rS': 2, 'gS': 0, 'N': 0,
                                            'over_N': 0}
  assert (s['images'], s['images_without_boxes'], s['max_boxes_per_image'], s['densest_image']) == (2, 1, 8, 'a')
  assert (s['boxes'], s['valid_boxes'], s['min_area'], s['min_side']) == (8, 8, 144.0, 1.0)


def test_report_rows_define_boxes_and_ignored():
  report = records_lib.ReadReport(source='x', target_rows=5, ignore_rows=3)
  s = stats.dataset_stats([_record('a', [[0, 0, 2, 3]] * 4, [0] * 4, [[0, 0, 1, 1]])], report=report)
  assert (s['boxes'], s['valid_boxes'], s['dropped_boxes'], s['ignored'], s['ignore_regions']) == (5, 4, 1, 3, 1)
  assert s['per_class'] == {'label_0': 4} and s['min_area'] == 6.0


def _reference_train_counts(folder):
  """Plain-Python count of the annotation rows: per (score != 0, category) and per-file valid targets."""
  rows = collections.Counter()
  per_file, min_area = [], None
  for path in glob.glob(os.path.join(folder, '*.txt')):
    valid = 0
    for line in open(path):
      fields = [int(v) for v in line.strip().rstrip(',').split(',') if v]
      if not fields:
        continue
      target = fields[4] != 0 and 1 <= fields[5] <= 10
      rows[target] += 1
      area = fields[2] * fields[3]
      if target and area > 0:
        valid += 1
        min_area = area if min_area is None else min(min_area, area)
    per_file.append(valid)
  return rows, max(per_file), min_area


def test_train_annotations_match_the_data_readme(visdrone_train_annotations, capsys):
  assert stats.main(['--format=visdrone', f'--root={visdrone_train_annotations}']) == 0
  out = capsys.readouterr().out
  s = json.loads(out.strip().splitlines()[-1])
  # README facts: 6,471 files; 343,205 target rows (score 1, classes 1-10); densest 902 valid; min area 3.
  assert (s['images'], s['boxes'], s['max_boxes_per_image'], s['min_area']) == (6471, 343205, 902, 3.0)
  rows, densest, min_area = _reference_train_counts(visdrone_train_annotations)
  assert (s['boxes'], s['ignored'], s['max_boxes_per_image'], s['min_area']) == (
      rows[True], rows[False], densest, min_area)
  assert s['valid_boxes'] == s['boxes'] - 1   # one released row is 4x0 px: counted as a row, dropped as a box
  assert sum(s['per_class'].values()) == s['valid_boxes']
  assert s['size_bands']['S'] + s['size_bands']['M'] + s['size_bands']['L'] == s['valid_boxes']
  assert s['image_sizes_known'] is False
  assert 'annotations only' in out and 'not clipped' in out


def test_val_dev_cli_matches_the_readme(visdrone_val_dev, capsys):
  assert stats.main(['--format=visdrone', f'--root={visdrone_val_dev}']) == 0
  out = capsys.readouterr().out.strip().splitlines()
  s = json.loads(out[-1])
  assert (s['images'], s['boxes'], s['valid_boxes']) == (142, 9508, 9508)
  assert round(100 * s['size_bands']['S'] / s['boxes']) == 66     # README: 66% under 32x32 px
  assert any(line.startswith('pedestrian') for line in out)


def test_soda_d_and_coco_formats(tmp_path, capsys):
  summary = synthetic.generate(str(tmp_path), 4, seed=2, layout='soda_d', split='val')
  assert stats.main(['--format=soda_d', f'--root={tmp_path}', '--split=val']) == 0
  s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (s['images'], s['boxes'], s['ignored']) == (4, summary['boxes'], summary['ignored'])
  assert list(s['per_class']) == list(records_lib.SODA_D_CLASSES)
  assert sum(s['size_bands'][b] for b in ('eS', 'rS', 'gS', 'N', 'over_N')) == s['boxes']
  os.rename(tmp_path / 'Annotations', tmp_path / 'annotations')
  os.rename(tmp_path / 'Images', tmp_path / 'images')
  assert stats.main(['--format=coco', f'--root={tmp_path}', '--split=val']) == 0
  s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert s['boxes'] == summary['boxes'] and list(s['per_class'])[:2] == ['people', 'rider']
  assert stats.main(['--format=soda_d', f'--root={tmp_path}']) == 2
  assert '--split is required' in capsys.readouterr().err
  assert stats.main(['--format=visdrone', f'--root={tmp_path / "nowhere"}']) == 2


def test_empty_dataset_does_not_crash():
  s = stats.dataset_stats([])
  assert (s['images'], s['boxes'], s['min_area'], s['max_boxes_per_image']) == (0, 0, None, 0)
  assert np.isfinite(s['mean_boxes_per_image'])


def test_the_json_line_is_strict_json_even_for_boxes_beyond_float_range(tmp_path, capsys):
  """x + w overflowing to inf is a counted problem row, and no NaN / Infinity reaches the JSON line."""
  os.makedirs(tmp_path / 'annotations')
  (tmp_path / 'annotations' / 'a.txt').write_text('1e308,2,1e308,4,1,4,0,0\n1,2,3,4,1,4,0,0\n')
  assert stats.main(['--format=visdrone', f'--root={tmp_path}', '--annotations_only=yes']) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  s = json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in the JSON line'))
  assert (s['valid_boxes'], s['min_area']) == (1, 12.0)
  assert (stats.json_line({'a': float('nan'), 'b': {'c': float('inf')}, 'd': 1.5})
          == '{"a": null, "b": {"c": null}, "d": 1.5}')
