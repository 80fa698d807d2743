"""TFDS builders: prepared from small manual folders, the stored boxes give back the reader's boxes."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline import soda_d
from input_pipeline import synthetic
from input_pipeline import tfds_builders
from input_pipeline import visdrone


def _prepare(builder_cls, manual_dir, data_dir):
  builder = builder_cls(data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _check_round_trip(builder, split, records):
  """Every example's pixels-back boxes, labels and ignore regions equal the reader's record of that name."""
  by_name = {r.name: r for r in records}
  seen = set()
  for example in tfds.as_numpy(builder.as_dataset(split=split)):
    record = by_name[example['name'].decode()]
    seen.add(record.name)
    height, width = example['image'].shape[:2]
    assert (width, height) == (record.width, record.height)
    assert example['image/id'] == record.image_id and example['image/source_id'] == record.source_id
    scale = np.array([height, width, height, width], np.float32)
    boxes = (example['objects']['bbox'] * scale)[:, [1, 0, 3, 2]]
    np.testing.assert_allclose(boxes, record.boxes, atol=1e-3)
    np.testing.assert_array_equal(example['objects']['label'], record.labels)
    ignore = (example['ignore']['bbox'].reshape(-1, 4) * scale)[:, [1, 0, 3, 2]]
    np.testing.assert_allclose(ignore, record.ignore, atol=1e-3)
  assert seen == set(by_name)


def test_visdrone_builder_round_trip(tmp_path):
  manual = tmp_path / 'manual'
  synthetic.generate(str(manual / 'VisDrone2019-DET-train'), 4, seed=0)
  synthetic.generate(str(manual / 'val'), 3, seed=1)
  builder = _prepare(tfds_builders.VisdroneDet, manual, tmp_path / 'tfds')
  assert set(builder.info.splits) == {'train', 'val'}
  assert builder.info.features['objects']['label'].names == list(visdrone.records_lib.VISDRONE_CLASSES)
  _check_round_trip(builder, 'train', visdrone.read_split(str(manual), 'train')[0])
  _check_round_trip(builder, 'val', visdrone.read_split(str(manual), 'val')[0])


def test_soda_d_builder_round_trip(tmp_path):
  manual = tmp_path / 'manual'
  synthetic.generate(str(manual), 3, seed=4, layout='soda_d', split='train')
  builder = _prepare(tfds_builders.SodaD, manual, tmp_path / 'tfds')
  assert set(builder.info.splits) == {'train'}
  records, _ = soda_d.read_split(str(manual), 'train')
  assert any(len(r.ignore) for r in records)
  _check_round_trip(builder, 'train', records)


def test_missing_manual_data_names_the_folder(tmp_path):
  os.makedirs(tmp_path / 'wrong' / 'VisDrone2019-DET-train-zipped')   # TFDS itself rejects an empty folder
  with pytest.raises(FileNotFoundError, match='no VisDrone2019-DET-<split>/ folder in .*wrong'):
    _prepare(tfds_builders.VisdroneDet, tmp_path / 'wrong', tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError, match='no SODA-D Annotations/<split>.json in .*wrong'):
    _prepare(tfds_builders.SodaD, tmp_path / 'wrong', tmp_path / 'tfds')
