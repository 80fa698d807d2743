"""Synthetic VisDrone-layout generator: valid for the real reader, deterministic, objects drawn where annotated."""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from input_pipeline import synthetic
from input_pipeline import visdrone


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('synthetic') / 'train')
  return out, synthetic.generate(out, 12, seed=7)


def test_reader_accepts_it_and_counts_match(dataset):
  out, summary = dataset
  records, report = visdrone.read_split(out)
  assert report.num_problems == 0, report.summary()
  assert len(records) == 12 == len(summary['names'])
  assert sum(len(r.boxes) for r in records) == summary['boxes'] == sum(summary['per_class'].values())
  assert sum(len(r.ignore) for r in records) == summary['ignored'] > 0
  assert all((r.width, r.height) == (160, 128) for r in records)
  labels = np.concatenate([r.labels for r in records])
  assert set(labels.tolist()) == {0, 1, 2, 3}   # the default 4 classes all occur in 12 images
  sides = np.concatenate([np.concatenate([r.boxes[:, 2:] - r.boxes[:, :2]]) for r in records])
  assert sides.min() >= synthetic.MIN_SIDE and sides.max() <= synthetic.MAX_SIDE
  with open(os.path.join(out, 'annotations', f'{summary["names"][0]}.txt'), 'rb') as f:
    assert f.read().endswith(b',0,0\r\n')   # CRLF like the released files


def test_same_seed_same_bytes_and_prefix_property(dataset, tmp_path):
  out, summary = dataset
  again = synthetic.generate(str(tmp_path / 'again'), 5, seed=7)
  other = synthetic.generate(str(tmp_path / 'other'), 2, seed=8)
  for name in again['names']:
    for sub, ext in (('images', 'jpg'), ('annotations', 'txt')):
      with open(os.path.join(out, sub, f'{name}.{ext}'), 'rb') as a, \
           open(os.path.join(tmp_path, 'again', sub, f'{name}.{ext}'), 'rb') as b:
        assert a.read() == b.read()
  with open(os.path.join(tmp_path, 'other', 'annotations', f'{other["names"][0]}.txt')) as f:
    other_text = f.read()
  with open(os.path.join(out, 'annotations', f'{summary["names"][0]}.txt')) as f:
    assert f.read() != other_text


def test_objects_have_their_class_colour_where_annotated(dataset):
  """The centre pixel of every target is nearest (in RGB) to its own class colour among the classes used."""
  out, _ = dataset
  records, _ = visdrone.read_split(out)
  palette = np.array([color for _, color in synthetic.CLASS_STYLES[:4]], np.float32)
  hits = total = 0
  for record in records:
    pixels = np.asarray(Image.open(record.file_name).convert('RGB'), np.float32)
    for (x0, y0, x1, y1), label in zip(record.boxes, record.labels):
      centre = pixels[int((y0 + y1 - 1) / 2), int((x0 + x1 - 1) / 2)]
      hits += int(np.argmin(((palette - centre) ** 2).sum(-1)) == label)
      total += 1
  assert hits == total


@pytest.mark.parametrize('shape', [shape for shape, _ in synthetic.CLASS_STYLES])
def test_shapes_fill_their_box_exactly(shape):
  """Annotations are tight: the drawn pixels' bounding box is the annotated box, for every size and aspect."""
  for w, h in [(4, 4), (5, 7), (9, 6), (13, 13), (24, 31), (48, 36), (47, 48)]:
    image = Image.new('RGB', (64, 64))
    box = (3, 5, 3 + w - 1, 5 + h - 1)
    synthetic._draw_shape(ImageDraw.Draw(image), shape, box, (255, 255, 255))
    ys, xs = np.nonzero(np.asarray(image).max(-1))
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == box, (shape, w, h)


def test_rerun_is_idempotent_and_other_content_is_refused(dataset, tmp_path):
  out, summary = dataset
  image = os.path.join(out, 'images', f'{summary["names"][0]}.jpg')
  before = os.stat(image).st_mtime_ns
  assert synthetic.generate(out, 12, seed=7) == summary
  assert os.stat(image).st_mtime_ns == before
  with pytest.raises(FileExistsError, match='not empty'):
    synthetic.generate(out, 12, seed=8)


def test_cli(tmp_path, capsys):
  out = str(tmp_path / 'cli')
  assert synthetic.main(['--out', out, '--num-images', '3', '--seed', '1', '--size', '100x96']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-2] == '3/3 images'
  summary = json.loads(lines[-1])
  assert summary['params'] == {'num_images': 3, 'seed': 1, 'size': [100, 96], 'num_classes': 4,
                               'layout': 'visdrone'}
  with Image.open(os.path.join(out, 'images', 'synthetic_0001_0000002.jpg')) as image:
    assert image.size == (100, 96)
  assert synthetic.main(['--out', out, '--num-images', '3', '--size', 'big']) == 2
  assert '--size must look like' in capsys.readouterr().err
