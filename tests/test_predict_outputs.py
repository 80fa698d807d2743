"""predict's file handling (no model): never over its input, no two inputs sharing an output name, and a
failure on one image does not lose the others or detections.json."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from input_pipeline import records as records_lib
from mrqm_jax import errors, predict
from mrqm_jax.metrics import coco as metrics_lib


def _image(path, size=(40, 30), color=(200, 10, 10)):
  Image.new('RGB', size, color).save(path)
  return str(path)


@pytest.mark.parametrize('output', ['.', 'sub', 'sub/deeper'])
def test_output_inside_the_input_folder_is_refused(tmp_path, output):
  _image(tmp_path / 'a.png')
  with pytest.raises(errors.UsageError, match='input folder'):
    errors.check_output_folder(str(tmp_path), str(tmp_path / output))


def test_output_next_to_a_single_input_file_is_refused_and_elsewhere_allowed(tmp_path):
  f = _image(tmp_path / 'a.png')
  with pytest.raises(errors.UsageError):
    errors.check_output_folder(f, str(tmp_path))
  errors.check_output_folder(str(tmp_path), str(tmp_path.parent / 'elsewhere'))   # no error
  errors.check_output_folder(str(tmp_path), str(tmp_path) + '_out')   # a sibling with the same prefix


def test_output_names_keep_unique_stems_and_add_the_extension_where_stems_collide(tmp_path):
  paths = [str(tmp_path / n) for n in ('x.jpg', 'x.png', 'y.jpg', 'Z.jpg', 'z.png', 'w.png')]
  names = predict.output_names(paths)
  assert names == ['x.jpg', 'x.png', 'y', 'Z.jpg', 'z.png', 'w']
  assert len({n.lower() for n in names}) == len(names)


def test_output_names_keep_heatmaps_apart_from_drawings(tmp_path):
  names = predict.output_names([str(tmp_path / 'a.jpg'), str(tmp_path / 'a_heatmap.jpg')])
  assert names == ['a', 'a_heatmap.jpg']


def _record(image_id, path, name):
  return records_lib.ImageRecord(image_id=image_id, name=name, file_name=path, width=40, height=30,
                                 boxes=np.zeros((0, 4)), labels=np.zeros((0,)), ignore=np.zeros((0, 4)))


def test_images_sharing_a_stem_keep_both_results_and_a_truncated_jpeg_loses_nothing_else(tmp_path):
  src = tmp_path / 'in'
  src.mkdir()
  paths = [_image(src / 'x.jpg'), _image(src / 'x.png', color=(0, 0, 255)), str(src / 'bad.jpg')]
  noise = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
  Image.fromarray(noise).save(paths[2], quality=95)
  data = open(paths[2], 'rb').read()
  with open(paths[2], 'wb') as f:   # truncated: header intact (it is listed and verified), pixels missing
    f.write(data[:len(data) // 2])
  records, skipped = predict.image_records(paths)
  # The truncated JPEG is a counted skip up front (its header is fine; its end marker is missing) ...
  assert skipped == [paths[2]] and [r.name for r in records] == ['x.jpg', 'x.png']
  # ... and should an image still fail while drawing, the others and the json are written.
  records.append(_record(2, paths[2], 'bad'))
  detections = {r.image_id: metrics_lib.Detections(np.array([[1.0, 2.0, 11.0, 12.0]]), np.array([0.9 - r.image_id / 10]),
                                                   np.array([r.image_id])) for r in records}
  out = tmp_path / 'out'
  summary = predict.write_outputs(str(out), records, detections, [f'c{i}' for i in range(10)], 0.3)
  assert [os.path.basename(f) for f, _ in summary['failed']] == ['bad.jpg']
  assert summary['images'] == 3 and summary['detections'] == 3
  # Both x images kept their own results: different txt files with their own scores.
  assert open(out / 'x.jpg.txt').read().split(',')[4] == '0.9000'
  assert open(out / 'x.png.txt').read().split(',')[4] == '0.8000'
  assert (out / 'x.jpg.png').exists() and (out / 'x.png.png').exists()
  assert (out / 'bad.txt').exists() and not (out / 'bad.png').exists()
  results = json.load(open(out / 'detections.json'))
  assert sorted(r['file_name'] for r in results) == ['bad.jpg', 'x.jpg', 'x.png']
  # The input images are untouched.
  assert Image.open(paths[1]).getpixel((0, 0)) == (0, 0, 255)


def test_a_single_image_may_write_below_its_own_folder_but_not_into_it(tmp_path):
  f = _image(tmp_path / 'a.png')
  errors.check_output_folder(f, str(tmp_path / 'out'))             # used to be refused
  errors.check_output_folder(f, str(tmp_path / 'out' / 'deeper'))
  with pytest.raises(errors.UsageError, match='folder of the input image'):
    errors.check_output_folder(f, str(tmp_path))                   # out/a.png would be a.png itself


def test_a_file_predict_would_write_that_already_exists_is_named_and_nothing_is_replaced(tmp_path):
  images = tmp_path / 'val' / 'images'
  images.mkdir(parents=True)
  annotations = tmp_path / 'val' / 'annotations'   # the case: --output=DATASET/val/annotations
  annotations.mkdir()
  for name in ('a', 'b'):
    _image(images / f'{name}.jpg')
    (annotations / f'{name}.txt').write_text('1,2,3,4,1,4,0,0\n')
  with pytest.raises(errors.OutputExistsError,
                     match=rf'--output={annotations} already holds {annotations / "a.txt"} \(and 1 more'):
    predict.check_output_files(str(images), str(annotations))
  predict.check_output_files(str(images), str(annotations), overwrite=True)   # the user's explicit choice
  predict.check_output_files(str(images), str(tmp_path / 'new'))             # a folder not there yet
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'b_heatmap.png').write_bytes(b'')
  predict.check_output_files(str(images), str(tmp_path / 'out'))
  with pytest.raises(errors.OutputExistsError, match='b_heatmap.png'):
    predict.check_output_files(str(images), str(tmp_path / 'out'), heatmaps=True)
  assert all(open(annotations / f'{n}.txt').read() == '1,2,3,4,1,4,0,0\n' for n in 'ab')


def test_predict_refuses_existing_outputs_before_restoring_a_model(tmp_path, monkeypatch):
  from mrqm_jax import model_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(model_lib, 'restore_for_inference', lambda *a, **k: pytest.fail('restored a model'))
  src = tmp_path / 'in'
  src.mkdir()
  _image(src / 'x.png')
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'detections.json').write_text('[]')
  with pytest.raises(errors.OutputExistsError, match='detections.json'):
    predict.predict_files(None, str(tmp_path / 'w'), str(src), str(out))


def test_a_truncated_png_is_skipped_up_front(tmp_path):
  good = _image(tmp_path / 'good.png')
  bad = str(tmp_path / 'bad.png')
  noise = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
  Image.fromarray(noise).save(bad)
  data = open(bad, 'rb').read()
  with open(bad, 'wb') as f:   # header intact, pixel data and IEND missing
    f.write(data[:len(data) // 2])
  records, skipped = predict.image_records([good, bad])
  assert skipped == [bad] and [r.name for r in records] == ['good']
