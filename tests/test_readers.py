"""Dataset readers: VisDrone txt, SODA-D json, generic COCO json, the dispatcher, and their problem reports."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from input_pipeline import coco
from input_pipeline import readers
from input_pipeline import records as records_lib
from input_pipeline import soda_d
from input_pipeline import synthetic
from input_pipeline import visdrone

W, H = 40, 30   # tiny images: header reads only


def _write_image(path, width=W, height=H):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', (width, height), (90, 120, 30)).save(path, quality=90)


def _visdrone_folder(root, annotations: dict[str, str], images=None):
  """ROOT/images/NAME.jpg for `images` (default: every annotation name) and ROOT/annotations/NAME.txt."""
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  for name, text in annotations.items():
    with open(os.path.join(root, 'annotations', f'{name}.txt'), 'w', newline='') as f:
      f.write(text)
  for name in (annotations if images is None else images):
    _write_image(os.path.join(root, 'images', f'{name}.jpg'))
  return str(root)


def _reference_parse(path):
  """Independent parse of a clean VisDrone file with numpy: (targets xyxy, labels, ignore xyxy, ignore labels)."""
  rows = np.loadtxt([l.strip().rstrip(',') for l in open(path) if l.strip()], delimiter=',', ndmin=2)
  if rows.size == 0:
    rows = np.zeros((0, 8))
  xyxy = np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1)
  target = (rows[:, 4] != 0) & (rows[:, 5] >= 1) & (rows[:, 5] <= 10)
  ignore = ~target & (rows[:, 5] != 11)  # 'others' rows are not kept
  return xyxy[target], rows[target, 5].astype(int) - 1, xyxy[ignore], rows[ignore, 5].astype(int) - 1


# ------------------------------------------------------------------ real VisDrone data

@pytest.mark.parametrize('fixture, num_images, num_boxes', [('visdrone_val_dev', 142, 9508),
                                                            ('visdrone_train_sample', 34, 2012)])
def test_real_visdrone_counts_match_the_data_readme(request, fixture, num_images, num_boxes):
  root = request.getfixturevalue(fixture)
  records, report = visdrone.read_split(str(root))
  assert len(records) == num_images == report.num_images
  assert sum(len(r.boxes) for r in records) == num_boxes == report.target_rows
  assert report.num_problems == 0, report.summary()
  names = [r.name for r in records]
  assert names == sorted(names)
  assert [r.image_id for r in records] == list(range(num_images))
  for record in records:
    with Image.open(record.file_name) as image:
      assert (record.width, record.height) == image.size
    assert np.all(record.boxes[:, 2:] <= [record.width, record.height])
    assert np.all(record.boxes[:, :2] >= 0)
    assert record.labels.min() >= 0 and record.labels.max() <= 9


def test_real_val_dev_boxes_equal_an_independent_parse(visdrone_val_dev):
  records, report = visdrone.read_split(str(visdrone_val_dev))
  for record in records:
    boxes, labels, ignore, ignore_labels = _reference_parse(
        os.path.join(visdrone_val_dev, 'annotations', f'{record.name}.txt'))
    np.testing.assert_array_equal(record.boxes, boxes.astype(np.float32))
    np.testing.assert_array_equal(record.labels, labels)
    np.testing.assert_array_equal(record.ignore, ignore.astype(np.float32))
    np.testing.assert_array_equal(record.ignore_labels, ignore_labels)
  # val_dev's 4 'others' rows are counted and noted, not kept.
  assert any("4 'others' (category 11) rows not kept" in note for note in report.notes)


def test_split_folder_resolution(visdrone_train_sample, tmp_path):
  """ROOT/VisDrone2019-DET-<split> and ROOT/<split> are found; a missing split names every place looked at."""
  os.symlink(visdrone_train_sample, tmp_path / 'VisDrone2019-DET-train')
  os.symlink(visdrone_train_sample, tmp_path / 'val')
  assert len(visdrone.read_split(str(tmp_path), 'train')[0]) == 34
  assert len(visdrone.read_split(str(tmp_path), 'val')[0]) == 34
  with pytest.raises(FileNotFoundError, match='test-dev') as error:
    visdrone.read_split(str(tmp_path), 'test-dev')
  assert 'VisDrone2019-DET-test-dev' in str(error.value)


# ------------------------------------------------------------------ VisDrone parsing rules

def test_crlf_trailing_comma_categories_and_score_zero(tmp_path):
  text = ('1,2,10,8,1,4,0,0\r\n'        # car -> label 3
          '3,4,5,6,1,1,0,1,\r\n'        # pedestrian with a trailing comma -> label 0
          '0,0,7,7,0,0,0,0\r\n'         # ignored region
          '5,5,4,4,1,11,0,0\r\n'        # 'others' -> not kept (the toolkit never scores it; no ignored region)
          '6,6,3,3,0,4,0,0\r\n'         # score 0 on a target class -> ignored object of that class (label 3)
          '8,1,2,2,1,0,0,0\r\n'         # ignored region with score 1 -> still an ignored region
          '\r\n')
  root = _visdrone_folder(tmp_path, {'a': text})
  (record,), report = visdrone.read_split(root)
  np.testing.assert_array_equal(record.boxes, [[1, 2, 11, 10], [3, 4, 8, 10]])
  np.testing.assert_array_equal(record.labels, [3, 0])
  np.testing.assert_array_equal(record.ignore, [[0, 0, 7, 7], [6, 6, 9, 9], [8, 1, 10, 3]])
  np.testing.assert_array_equal(record.ignore_labels, [-1, 3, -1])
  assert (report.target_rows, report.ignore_rows, report.num_problems) == (2, 4, 0)
  assert any("1 'others' (category 11) rows not kept" in note for note in report.notes)


BAD_LINES = [
    # (line, problem kind, what stays)
    ('1,2,3,4,1,4', 'bad_field_count', 'nothing'),
    ('1,2,x,4,1,4,0,0', 'non_numeric', 'nothing'),
    ('1,2,nan,4,1,4,0,0', 'non_numeric', 'nothing'),
    ('1,2,-3,4,1,4,0,0', 'negative_size', 'nothing'),
    ('1,2,3,4,1,12,0,0', 'unknown_category', 'nothing'),
    ('35,2,10,4,1,4,0,0', 'clipped', 'box'),         # x1 = 45 > W = 40: clipped to 40
    ('50,2,10,4,1,4,0,0', 'zero_area', 'nothing'),   # entirely right of the image
    ('1,2,0,4,1,4,0,0', 'zero_area', 'nothing'),     # zero width
]


@pytest.mark.parametrize('line, kind, kept', BAD_LINES)
def test_each_bad_line_is_counted_and_located(tmp_path, line, kind, kept):
  text = f'1,1,5,5,1,1,0,0\r\n{line}\r\n2,2,6,6,1,2,0,0\r\n'
  root = _visdrone_folder(tmp_path, {'img': text})
  (record,), report = visdrone.read_split(root)
  assert report.counts == {kind: 1}
  path = os.path.join(root, 'annotations', 'img.txt')
  assert report.messages[0].startswith(f'{path}:2: {kind}:')
  assert f'{kind}: 1' in report.summary()
  expected = [[1, 1, 6, 6]] + ([[35, 2, 40, 6]] if kept == 'box' else []) + [[2, 2, 8, 8]]
  np.testing.assert_array_equal(record.boxes, expected)
  assert report.dropped_targets == (0 if kept == 'box' or kind in ('bad_field_count', 'non_numeric',
                                                                    'unknown_category') else 1)


def test_clipped_and_zero_area_ignore_regions(tmp_path):
  root = _visdrone_folder(tmp_path, {'img': '-5,-5,10,10,0,0,0,0\r\n100,100,5,5,0,0,0,0\r\n'})
  (record,), report = visdrone.read_split(root)
  np.testing.assert_array_equal(record.ignore, [[0, 0, 5, 5]])
  assert report.counts == {'clipped': 1, 'zero_area': 1}
  assert report.dropped_targets == 0 and report.ignore_rows == 2


def test_missing_and_corrupt_images_are_skipped_and_reported(tmp_path):
  root = _visdrone_folder(tmp_path, {'good': '1,1,5,5,1,1,0,0\r\n', 'no_image': '1,1,5,5,1,1,0,0\r\n',
                                     'garbage': '1,1,5,5,1,1,0,0\r\n', 'truncated': '1,1,5,5,1,1,0,0\r\n'},
                          images=['good', 'garbage', 'truncated'])
  with open(os.path.join(root, 'images', 'garbage.jpg'), 'wb') as f:
    f.write(b'not an image at all')
  truncated = os.path.join(root, 'images', 'truncated.jpg')
  _write_image(truncated, 64, 48)
  with open(truncated, 'rb') as f:
    data = f.read()
  with open(truncated, 'wb') as f:
    f.write(data[:len(data) // 2])   # header intact, end marker gone
  _write_image(os.path.join(root, 'images', 'padded.jpg'))
  with open(os.path.join(root, 'images', 'padded.jpg'), 'ab') as f:
    f.write(b'\0' * 10000)   # data after the end marker, as some cameras write: still a valid image
  records, report = visdrone.read_split(root)
  assert [r.name for r in records] == ['good', 'padded']
  assert report.counts == {'missing_image': 1, 'corrupt_image': 2, 'missing_annotation': 1}
  text = '\n'.join(report.messages)
  assert os.path.join(root, 'annotations', 'no_image.txt') in text
  assert os.path.join(root, 'images', 'garbage.jpg') in text and truncated in text


def test_images_without_or_with_empty_annotations_are_kept(tmp_path):
  root = _visdrone_folder(tmp_path, {'empty': '', 'one': '1,1,5,5,1,1,0,0\r\n'}, images=['empty', 'one', 'none'])
  records, report = visdrone.read_split(root)
  assert [r.name for r in records] == ['empty', 'none', 'one']
  for record in records[:2]:
    assert record.boxes.shape == (0, 4) and record.labels.shape == (0,) and record.ignore.shape == (0, 4)
  assert report.counts == {'missing_annotation': 1}
  assert os.path.join(root, 'images', 'none.jpg') in report.messages[0]


def test_messages_are_capped_but_every_problem_is_counted(tmp_path):
  root = _visdrone_folder(tmp_path, {'img': 'bad\r\n' * 30})
  _, report = visdrone.read_split(root, max_messages=5)
  assert report.counts['bad_field_count'] == 30 and len(report.messages) == 5
  assert 'first 5 of 30' in report.summary()


def test_annotations_only(tmp_path):
  os.makedirs(tmp_path / 'annotations')
  (tmp_path / 'annotations' / 'a.txt').write_text('500,400,30,20,1,4,0,0\r\n')
  with pytest.raises(FileNotFoundError, match='images'):
    visdrone.read_split(str(tmp_path))
  (record,), report = visdrone.read_split(str(tmp_path), annotations_only=None)
  assert (record.width, record.height, record.file_name) == (0, 0, '')
  np.testing.assert_array_equal(record.boxes, [[500, 400, 530, 420]])   # not clipped: size unknown
  assert any('annotations only' in n for n in report.notes)


# ------------------------------------------------------------------ SODA-D and COCO json

def _coco_dict(annotations, categories=None):
  return {'images': [{'id': 7, 'file_name': 'b.jpg', 'width': W, 'height': H},
                     {'id': 3, 'file_name': 'a.jpg', 'width': W, 'height': H}],
          'annotations': annotations,
          'categories': categories if categories is not None else
          [{'id': k + 1, 'name': n} for k, n in enumerate(records_lib.SODA_D_CLASSES)] + [{'id': 10, 'name': 'ignore'}]}


def _soda_folder(root, data):
  _write_image(os.path.join(root, 'Images', 'a.jpg'))
  _write_image(os.path.join(root, 'Images', 'b.jpg'))
  os.makedirs(os.path.join(root, 'Annotations'), exist_ok=True)
  path = os.path.join(root, 'Annotations', 'train.json')
  with open(path, 'w') as f:
    json.dump(data, f, indent=1)
  return str(root), path


def test_soda_d_targets_ignore_and_ids(tmp_path):
  anns = [{'id': 1, 'image_id': 3, 'bbox': [1, 2, 10, 5], 'area': 50, 'category_id': 9, 'ignore': 0, 'iscrowd': 0},
          {'id': 2, 'image_id': 3, 'bbox': [0, 0, 4, 4], 'area': 16, 'category_id': 10, 'ignore': 0, 'iscrowd': 0},
          {'id': 3, 'image_id': 7, 'bbox': [5, 5, 3, 3], 'area': 9, 'category_id': 1, 'ignore': 1, 'iscrowd': 0},
          {'id': 4, 'image_id': 7, 'bbox': [6, 6, 2, 2], 'area': 4, 'category_id': 2, 'iscrowd': 1},
          {'id': 5, 'image_id': 7, 'bbox': [2.5, 3.5, 4, 6], 'area': 24, 'category_id': 1, 'ignore': 0}]
  root, _ = _soda_folder(tmp_path, _coco_dict(anns))
  records, report = soda_d.read_split(root, 'train')
  assert [(r.name, r.image_id, r.source_id) for r in records] == [('a', 0, 3), ('b', 1, 7)]
  a, b = records
  np.testing.assert_array_equal(a.boxes, [[1, 2, 11, 7]])
  np.testing.assert_array_equal(a.labels, [8])
  np.testing.assert_array_equal(a.ignore, [[0, 0, 4, 4]])
  np.testing.assert_array_equal(b.boxes, [[2.5, 3.5, 6.5, 9.5]])
  np.testing.assert_array_equal(b.labels, [0])
  np.testing.assert_array_equal(b.ignore, [[5, 5, 8, 8], [6, 6, 8, 8]])
  assert (report.target_rows, report.ignore_rows, report.num_problems) == (2, 3, 0)


JSON_PROBLEMS = [
    ({'image_id': 3, 'bbox': [1, 2, 3], 'category_id': 1}, 'bad_field_count'),
    ({'image_id': 3, 'bbox': [1, 2, 'x', 4], 'category_id': 1}, 'non_numeric'),
    ({'image_id': 3, 'bbox': [1, 2, -3, 4], 'category_id': 1}, 'negative_size'),
    ({'image_id': 3, 'bbox': [1, 2, 3, 4], 'category_id': 42}, 'unknown_category'),
    ({'image_id': 99, 'bbox': [1, 2, 3, 4], 'category_id': 1}, 'unknown_image'),
    ({'image_id': 3, 'bbox': [1, 2, 3, 4]}, 'malformed_entry'),
    ({'image_id': 3, 'bbox': [35, 2, 10, 4], 'category_id': 1}, 'clipped'),
    ({'image_id': 3, 'bbox': [45, 2, 10, 4], 'category_id': 1}, 'zero_area'),
]


@pytest.mark.parametrize('bad, kind', JSON_PROBLEMS)
def test_each_bad_json_annotation_is_counted_and_located(tmp_path, bad, kind):
  anns = [{'id': 11, 'image_id': 3, 'bbox': [1, 1, 5, 5], 'category_id': 2}, dict(bad, id=12)]
  root, path = _soda_folder(tmp_path, _coco_dict(anns))
  records, report = soda_d.read_split(root, 'train')
  assert report.counts == {kind: 1}
  assert report.messages[0].startswith(f'{path} annotations[1] (id 12): {kind}:')
  assert len(records[0].boxes) == (2 if kind == 'clipped' else 1)


def test_json_image_problems(tmp_path):
  data = _coco_dict([{'id': 1, 'image_id': 5, 'bbox': [1, 1, 5, 5], 'category_id': 2}])
  data['images'] += [{'id': 5, 'file_name': 'missing.jpg', 'width': W, 'height': H},
                     {'id': 6, 'file_name': 'c.jpg', 'width': 10, 'height': H},   # wrong width in json
                     {'file_name': 'a.jpg'}]
  root, path = _soda_folder(tmp_path, data)
  _write_image(os.path.join(root, 'Images', 'c.jpg'))
  records, report = soda_d.read_split(root, 'train')
  assert report.counts == {'missing_image': 1, 'size_mismatch': 1, 'malformed_entry': 1}
  assert any(m.startswith(f'{path} images[3]: size_mismatch') for m in report.messages)
  assert any(m.startswith(f'{path} images[4]: malformed_entry') for m in report.messages)
  assert all(r.width == W for r in records)
  assert report.target_rows == 0   # the missing image's annotation went with it, not counted as unknown


@pytest.mark.parametrize('second', [{'id': 8, 'file_name': 'a.jpg'},    # another id, the same file
                                    {'id': 8, 'file_name': 'a.png'}])   # another file, the same stem
def test_two_json_images_of_one_name_are_an_error_naming_both(tmp_path, second):
  """Names key the metrics and the result files: a clash used to pass the reader and fail the final eval."""
  data = _coco_dict([{'id': 1, 'image_id': 3, 'bbox': [1, 1, 5, 5], 'category_id': 2}])
  data['images'].append(dict(second, width=W, height=H))
  root, path = _soda_folder(tmp_path, data)
  _write_image(os.path.join(root, 'Images', 'a.png'))
  with pytest.raises(records_lib.DuplicateNameError,
                     match=rf"{path}: two images share the name 'a' \(images\[1\] 'a.jpg' and images\[2\] "
                           rf"'{second['file_name']}'\)"):
    soda_d.read_split(root, 'train')


def test_a_repeated_json_image_id_stays_a_counted_skip(tmp_path):
  data = _coco_dict([])
  data['images'].append({'id': 3, 'file_name': 'a.jpg', 'width': W, 'height': H})
  root, _ = _soda_folder(tmp_path, data)
  records, report = soda_d.read_split(root, 'train')
  assert len(records) == 2 and report.counts == {'malformed_entry': 1}


def test_visdrone_images_of_one_stem_are_an_error_naming_both(tmp_path):
  root = _visdrone_folder(tmp_path, {'x': '1,1,5,5,1,4,0,0\n', 'y': ''})
  _write_image(os.path.join(root, 'images', 'x.png'))
  with pytest.raises(records_lib.DuplicateNameError, match=r"two images share the name 'x' \(.*x.jpg and .*x.png\)"):
    visdrone.read_split(root)


@pytest.mark.parametrize('value, crowd', [('0', False), ('1', True), (0, False), (1, True), (True, True),
                                          ('false', False)])
def test_iscrowd_as_a_string_is_read_as_its_value(tmp_path, value, crowd):
  anns = [{'id': 1, 'image_id': 3, 'bbox': [1, 1, 5, 5], 'category_id': 2, 'iscrowd': value}]
  root, _ = _soda_folder(tmp_path, _coco_dict(anns))
  records, report = soda_d.read_split(root, 'train')
  assert (len(records[0].boxes), len(records[0].ignore)) == ((0, 1) if crowd else (1, 0))
  assert report.num_problems == 0


def test_an_unreadable_iscrowd_is_a_counted_skip(tmp_path):
  anns = [{'id': 1, 'image_id': 3, 'bbox': [1, 1, 5, 5], 'category_id': 2, 'iscrowd': 'maybe'}]
  root, _ = _soda_folder(tmp_path, _coco_dict(anns))
  records, report = soda_d.read_split(root, 'train')
  assert report.counts == {'malformed_entry': 1} and len(records[0].boxes) == len(records[0].ignore) == 0


@pytest.mark.parametrize('ids, match', [((1, '2'), "categories\\[1\\] id '2' is not of the type"),
                                        ((1, [2]), r'categories\[1\] id \[2\] is not an integer or a string'),
                                        ((1, 2.5), 'is not an integer or a string')])
def test_coco_category_ids_of_mixed_or_unhashable_types_are_one_value_error(tmp_path, ids, match):
  data = _coco_dict([], [{'id': i, 'name': f'c{k}'} for k, i in enumerate(ids)])
  with pytest.raises(ValueError, match=match):
    coco.category_mapping(data, 'x.json')


def test_soda_d_rejects_foreign_categories_and_names_missing_files(tmp_path):
  root, path = _soda_folder(tmp_path, _coco_dict([], [{'id': 1, 'name': 'car'}]))
  with pytest.raises(ValueError, match='category id 1 is named .car.'):
    soda_d.read_split(root, 'train')
  with pytest.raises(FileNotFoundError, match='Annotations/val.json'):
    soda_d.read_split(root, 'val')
  with open(path, 'w') as f:
    f.write('{"images": [\n  {"id": 1,,}\n]}')
  with pytest.raises(ValueError, match=f'{path}:2:'):
    soda_d.read_split(root, 'train')


def test_soda_d_layout_of_the_synthetic_generator(tmp_path):
  summary = synthetic.generate(str(tmp_path), 3, seed=5, layout='soda_d', split='val')
  records, report = soda_d.read_split(str(tmp_path), 'val')
  assert len(records) == 3 and report.num_problems == 0
  assert sum(len(r.boxes) for r in records) == summary['boxes']
  assert sum(len(r.ignore) for r in records) == summary['ignored']


def test_coco_maps_sparse_category_ids_in_sorted_order(tmp_path):
  _write_image(os.path.join(tmp_path, 'val', 'a.jpg'))
  _write_image(os.path.join(tmp_path, 'val', 'b.jpg'))
  os.makedirs(tmp_path / 'annotations')
  data = _coco_dict([{'id': 1, 'image_id': 3, 'bbox': [1, 1, 5, 5], 'category_id': 42},
                     {'id': 2, 'image_id': 3, 'bbox': [2, 2, 5, 5], 'category_id': 3},
                     {'id': 3, 'image_id': 7, 'bbox': [3, 3, 5, 5], 'category_id': 17},
                     {'id': 4, 'image_id': 7, 'bbox': [0, 0, 9, 9], 'category_id': 17, 'iscrowd': 1}],
                    [{'id': 42, 'name': 'kite'}, {'id': 3, 'name': 'car'}, {'id': 17, 'name': 'cat'}])
  (tmp_path / 'annotations' / 'instances_val.json').write_text(json.dumps(data))
  records, report, names, mapping = coco.read_split(str(tmp_path), 'val')
  assert mapping == {3: 0, 17: 1, 42: 2} and names == ['car', 'cat', 'kite']
  np.testing.assert_array_equal(records[0].labels, [2, 0])
  np.testing.assert_array_equal(records[1].labels, [1])
  np.testing.assert_array_equal(records[1].ignore, [[0, 0, 9, 9]])
  assert records[0].file_name == os.path.join(tmp_path, 'val', 'a.jpg')
  assert report.num_problems == 0


# ------------------------------------------------------------------ dispatcher

def _dataset_config(**overrides):
  config = ml_collections.ConfigDict({'format': 'visdrone', 'root': '', 'num_classes': 10})
  config.update(overrides)
  return config


def test_read_dataset_dispatches_and_checks(tmp_path):
  synthetic.generate(str(tmp_path / 'train'), 2, seed=0)
  records, report, names = readers.read_dataset(_dataset_config(root=str(tmp_path)), 'train')
  assert len(records) == 2 and names == records_lib.VISDRONE_CLASSES and report.num_problems == 0
  synthetic.generate(str(tmp_path / 'soda'), 2, seed=0, layout='soda_d', split='train')
  records, _, names = readers.read_dataset(_dataset_config(format='soda_d', root=str(tmp_path / 'soda'),
                                                           num_classes=9), 'train')
  assert len(records) == 2 and names == records_lib.SODA_D_CLASSES
  with pytest.raises(FileNotFoundError, match='no_such_folder'):
    readers.read_dataset(_dataset_config(root=str(tmp_path / 'no_such_folder')), 'train')
  with pytest.raises(FileNotFoundError, match='VisDrone2019-DET-val'):
    readers.read_dataset(_dataset_config(root=str(tmp_path)), 'val')
  with pytest.raises(FileNotFoundError, match='root is empty'):
    readers.read_dataset(_dataset_config(), 'train')
  with pytest.raises(ValueError, match='num_classes=9'):
    readers.read_dataset(_dataset_config(root=str(tmp_path), num_classes=9), 'train')
  with pytest.raises(ValueError, match="'yolo'"):
    readers.read_dataset(_dataset_config(root=str(tmp_path), format='yolo'), 'train')
