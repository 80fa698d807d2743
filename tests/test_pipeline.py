"""tf.data pipeline: the batch contract, determinism and resume-at-step, per-host shards, eval coverage with
padding, flip, the max_boxes overflow counter, undecodable images, slicing, and real VisDrone val_dev images."""

import os

import numpy as np
from PIL import Image
import pytest

from configs import smoke
from configs import visdrone as visdrone_config
from input_pipeline import pipeline
from input_pipeline import records as records_lib
from input_pipeline import slicing

CANVAS = (32, 48)
SIZES = [(40, 30), (64, 48), (30, 60), (48, 32), (50, 50), (96, 64), (20, 20), (64, 40), (33, 47), (70, 40)]


def _config(**overrides):
  c = smoke.get_config()
  c.input.image_size = CANVAS
  c.dataset.max_boxes = 4
  c.dataset.max_ignore = 2
  c.input.num_parallel_calls = 2
  c.input.prefetch = 1
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """10 small images (PNG and JPEG, several sizes) with 1-3 boxes each, and their records."""
  folder = tmp_path_factory.mktemp('pipeline_data')
  rng = np.random.default_rng(0)
  records = []
  for i, (w, h) in enumerate(SIZES):
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    ext = 'png' if i % 2 else 'jpg'
    path = os.path.join(folder, f'img{i:02d}.{ext}')
    Image.fromarray(image).save(path)
    n = 1 + i % 3
    x0 = rng.uniform(0, w / 2, n)
    y0 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x0, y0, x0 + rng.uniform(2, w / 2, n), y0 + rng.uniform(2, h / 2, n)], 1)
    ignore = [[0, 0, 3, 3]] if i % 4 == 0 else []
    records.append(records_lib.ImageRecord(image_id=i, name=f'img{i:02d}', file_name=path, width=w, height=h,
                                           boxes=boxes, labels=rng.integers(0, 10, n), ignore=ignore))
  return records


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _canvas_xyxy(boxes_cxcywh):
  cx, cy, w, h = np.moveaxis(boxes_cxcywh, -1, 0)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * np.array(CANVAS[::-1] * 2)


def test_batch_contract(dataset):
  batch = next(pipeline.train_iterator(_config(), dataset, global_batch_size=4))
  b, (h, w) = 4, CANVAS
  expected = {'image': ((b, h, w, 3), np.float32), 'pad_mask': ((b, h, w), bool), 'boxes': ((b, 4, 4), np.float32),
              'labels': ((b, 4), np.int32), 'box_valid': ((b, 4), bool), 'ignore': ((b, 2, 4), np.float32),
              'ignore_valid': ((b, 2), bool), 'image_id': ((b,), np.int32), 'orig_size': ((b, 2), np.int32),
              'scale': ((b,), np.float32), 'patch_origin': ((b, 2), np.float32), 'valid': ((b,), bool)}
  assert set(batch) == set(expected) == set(pipeline.BATCH_KEYS)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert batch['valid'].all()
  np.testing.assert_array_equal(batch['patch_origin'], 0)


def _assert_batches_equal(a, b):
  for x, y in zip(a, b):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_deterministic_for_a_seed_and_resumable_at_any_step(dataset):
  config = _config()
  first = _take(pipeline.train_iterator(config, dataset, global_batch_size=4, seed=5), 6)
  serial = _config(**{'input.num_parallel_calls': 1})  # tf.data parallelism must not change a value
  again = _take(pipeline.train_iterator(serial, dataset, global_batch_size=4, seed=5), 6)
  _assert_batches_equal(first, again)
  resumed = _take(pipeline.train_iterator(config, dataset, global_batch_size=4, seed=5, start_step=3), 3)
  _assert_batches_equal(first[3:], resumed)
  other = _take(pipeline.train_iterator(config, dataset, global_batch_size=4, seed=6), 6)
  assert any((a['image_id'] != b['image_id']).any() for a, b in zip(first, other))
  # Epochs are permutations of the 10 examples, back to back: 6 steps x 4 = 24 positions = 2.4 epochs.
  ids = np.concatenate([b['image_id'] for b in first])
  assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:20]) == list(range(10))
  assert ids[:10].tolist() != ids[10:20].tolist()


def test_hosts_are_disjoint_and_cover_the_global_batch(dataset):
  config = _config()
  single = _take(pipeline.train_iterator(config, dataset, global_batch_size=4, seed=1, start_step=2), 3)
  hosts = [_take(pipeline.train_iterator(config, dataset, global_batch_size=4, seed=1, start_step=2,
                                         process_index=p, process_count=2), 3) for p in range(2)]
  for step in range(3):
    assert hosts[0][step]['image'].shape[0] == 2
    combined = {k: np.concatenate([hosts[0][step][k], hosts[1][step][k]]) for k in pipeline.BATCH_KEYS}
    _assert_batches_equal([single[step]], [combined])
  with pytest.raises(ValueError, match='divisible'):
    pipeline.train_iterator(config, dataset, global_batch_size=3, process_count=2)


def test_train_flips_boxes_and_pixels_together(dataset):
  by_id = {r.image_id: r for r in dataset}
  # Image 3 is 48x32 = the canvas (scale 1), so its flipped pixels are exactly the mirrored eval pixels.
  assert SIZES[3] == CANVAS[::-1]
  unflipped = next(pipeline.eval_iterator(_config(), [dataset[3]], global_batch_size=1))['image'][0]
  seen, compared = set(), 0
  for batch in _take(pipeline.train_iterator(_config(), dataset, global_batch_size=4, seed=0), 5):
    for i in range(4):
      r = by_id[int(batch['image_id'][i])]
      scale = batch['scale'][i]
      n = len(r.boxes)
      got = _canvas_xyxy(batch['boxes'][i, :n]) / scale
      mirrored = np.stack([r.width - r.boxes[:, 2], r.boxes[:, 1], r.width - r.boxes[:, 0], r.boxes[:, 3]], 1)
      flipped = np.allclose(got, mirrored, atol=1e-3)
      assert flipped or np.allclose(got, r.boxes, atol=1e-3)
      assert batch['box_valid'][i].sum() == n
      if r.image_id == 3:
        np.testing.assert_array_equal(batch['image'][i], unflipped[:, ::-1] if flipped else unflipped)
        compared += 1
      seen.add(flipped)
  assert seen == {True, False} and compared == 2  # 20 positions = 2 epochs


def test_eval_covers_every_image_once_with_padding(dataset):
  config = _config()
  hosts = [list(pipeline.eval_iterator(config, dataset, global_batch_size=4, process_index=p, process_count=2))
           for p in range(2)]
  assert [len(h) for h in hosts] == [3, 3]  # ceil(10 / 4) batches on every host
  ids = np.concatenate([np.concatenate([hosts[0][k]['image_id'], hosts[1][k]['image_id']]) for k in range(3)])
  valid = np.concatenate([np.concatenate([hosts[0][k]['valid'], hosts[1][k]['valid']]) for k in range(3)])
  assert ids[valid].tolist() == list(range(10))  # in record order, each once
  assert ids[~valid].tolist() == [-1, -1]
  assert pipeline.num_eval_examples(config, dataset) == 10
  # No flip in eval: boxes map straight back to the records.
  batch = hosts[0][0]
  for i in range(2):
    r = dataset[int(batch['image_id'][i])]
    np.testing.assert_allclose(_canvas_xyxy(batch['boxes'][i, :len(r.boxes)]) / batch['scale'][i], r.boxes,
                               atol=1e-3)
    np.testing.assert_array_equal(batch['orig_size'][i], [r.height, r.width])


def test_over_max_boxes_is_counted_and_capped_or_refused(dataset, tmp_path):
  dense = records_lib.ImageRecord(image_id=0, name='dense', file_name=dataset[0].file_name, width=40, height=30,
                                  boxes=[[i, i, i + 5, i + 5] for i in range(6)], labels=np.arange(6),
                                  ignore=[[0, 0, 1, 1]] * 3)
  iterator = pipeline.eval_iterator(_config(), [dense], global_batch_size=1)
  overflow = iterator.report.overflow
  assert (overflow.images_over_max_boxes, overflow.dropped_boxes, overflow.images_over_max_ignore,
          overflow.dropped_ignore, overflow.names) == (1, 2, 1, 1, ['dense'])
  batch = next(iterator)
  assert batch['box_valid'][0].tolist() == [True] * 4
  assert batch['labels'][0].tolist() == [0, 1, 2, 3]  # the first max_boxes in reader order
  with pytest.raises(ValueError, match='dense: 6 targets > config.dataset.max_boxes=4'):
    pipeline.eval_iterator(_config(**{'dataset.strict_max_boxes': True}), [dense], global_batch_size=1)


def test_undecodable_images_become_counted_blanks(dataset, tmp_path):
  garbage = tmp_path / 'garbage.jpg'
  garbage.write_bytes(b'not an image at all' * 20)
  truncated = tmp_path / 'truncated.jpg'
  data = open(dataset[0].file_name, 'rb').read()
  truncated.write_bytes(data[:len(data) // 2])
  wrong_size = records_lib.ImageRecord(image_id=12, name='wrong', file_name=dataset[1].file_name, width=10,
                                       height=10, boxes=[[1, 1, 2, 2]], labels=[0], ignore=[])
  bad = [records_lib.ImageRecord(image_id=10, name='garbage', file_name=str(garbage), width=40, height=30,
                                 boxes=[[1, 1, 5, 5]], labels=[1], ignore=[]),
         records_lib.ImageRecord(image_id=11, name='truncated', file_name=str(truncated), width=40, height=30,
                                 boxes=[[1, 1, 5, 5]], labels=[1], ignore=[]),
         wrong_size,
         records_lib.ImageRecord(image_id=13, name='gone', file_name=str(tmp_path / 'gone.png'), width=40,
                                 height=30, boxes=[[1, 1, 5, 5]], labels=[1], ignore=[])]
  iterator = pipeline.eval_iterator(_config(), dataset[:2] + bad, global_batch_size=6)
  (batch,) = list(iterator)
  assert batch['image_id'].tolist() == [0, 1, 10, 11, 12, 13]
  assert batch['valid'].tolist() == [True, True, False, False, False, False]
  assert not batch['box_valid'][2:].any() and not batch['image'][2:].any() and not batch['pad_mask'][2:].any()
  assert iterator.report.decode_failures == 4
  assert iterator.report.failed_files == [str(garbage), str(truncated), dataset[1].file_name,
                                          str(tmp_path / 'gone.png')]


def test_sliced_examples_carry_patch_origin_and_pixels(tmp_path):
  rng = np.random.default_rng(4)
  big = rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)
  small = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
  Image.fromarray(big).save(tmp_path / 'big.png')
  Image.fromarray(small).save(tmp_path / 'small.png')
  records = [records_lib.ImageRecord(0, 'big', str(tmp_path / 'big.png'), 100, 70, [[45, 30, 50, 40]], [2], []),
             records_lib.ImageRecord(1, 'small', str(tmp_path / 'small.png'), 30, 20, [[1, 2, 3, 4]], [1], [])]
  config = _config(**{'dataset.slicing.enabled': True, 'dataset.slicing.patch_size': 48,
                      'dataset.slicing.overlap': 8, 'input.image_size': (48, 48)})
  # x starts: 0, 40, 52; y starts: 0, 22 -> 6 windows for the big image, 1 padded window for the small one.
  assert pipeline.num_eval_examples(config, records) == 7
  batches = list(pipeline.eval_iterator(config, records, global_batch_size=7))
  batch = batches[0]
  assert batch['image_id'].tolist() == [0] * 6 + [1]
  np.testing.assert_array_equal(batch['patch_origin'],
                                [[0, 0], [0, 22], [40, 0], [40, 22], [52, 0], [52, 22], [0, 0]])
  np.testing.assert_array_equal(batch['orig_size'], [[70, 100]] * 6 + [[20, 30]])
  np.testing.assert_array_equal(batch['scale'], 1.0)
  mean, std = np.array(config.input.mean), np.array(config.input.std)
  for i, (x, y) in enumerate(batch['patch_origin'][:6].astype(int)):
    np.testing.assert_allclose(batch['image'][i], (big[y:y + 48, x:x + 48] - mean) / std, atol=1e-4)
    assert not batch['pad_mask'][i].any()
  assert (~batch['pad_mask'][6]).sum() == 20 * 30 and not batch['pad_mask'][6, :20, :30].any()
  # The box [45, 30, 50, 40]: whole in the windows at x = 40; 60 % inside those at x = 0 (a clipped target).
  expected = {(0, 0): [45, 30, 48, 40], (0, 22): [45, 30, 48, 40], (40, 0): [45, 30, 50, 40],
              (40, 22): [45, 30, 50, 40]}
  got = {}
  for i in np.flatnonzero(batch['box_valid'][:6, 0]):  # the big image's windows
    x, y = batch['patch_origin'][i]
    cx, cy, bw, bh = batch['boxes'][i, 0] * 48
    got[(int(x), int(y))] = [cx - bw / 2 + x, cy - bh / 2 + y, cx + bw / 2 + x, cy + bh / 2 + y]
  assert set(got) == set(expected)
  for origin, box in expected.items():
    np.testing.assert_allclose(got[origin], box, atol=1e-4)
  assert pipeline.num_train_examples(config, records) == len(slicing.slice_records_for_config(
      config, records, train=True))


def test_real_val_dev_images(visdrone_val_dev):
  from input_pipeline import visdrone  # pylint: disable=g-import-not-at-top
  records, _ = visdrone.read_split(str(visdrone_val_dev))
  picked, sizes = [], set()
  for r in records:  # one image of each size in val_dev
    if (r.width, r.height) not in sizes:
      sizes.add((r.width, r.height))
      picked.append(r)
  config = visdrone_config.get_config()
  config.input.num_parallel_calls = 2
  (batch,) = list(pipeline.eval_iterator(config, picked, global_batch_size=len(picked)))
  h, w = config.input.image_size
  for i, r in enumerate(picked):
    # The recipe's resize: mmdet keep-ratio (1333, 800); every val_dev image is landscape and fits the canvas.
    scale = min(1333 / max(r.height, r.width), 800 / min(r.height, r.width))
    assert r.height * scale <= h and r.width * scale <= w
    assert batch['scale'][i] == pytest.approx(scale)
    np.testing.assert_array_equal(batch['orig_size'][i], [r.height, r.width])
    content = (~batch['pad_mask'][i]).sum(0).max(), (~batch['pad_mask'][i]).sum(1).max()
    assert content == (int(np.ceil(r.height * scale - 0.5)), int(np.ceil(r.width * scale - 0.5)))
    n = min(len(r.boxes), config.dataset.max_boxes)
    assert batch['box_valid'][i].sum() == n
    cx, cy, bw, bh = np.moveaxis(batch['boxes'][i, :n], -1, 0)
    back = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * [w, h, w, h] / scale
    np.testing.assert_allclose(back, r.boxes[:n], atol=2e-3 * max(r.width, r.height) / 1000)
    # The pixels: the mean colour of the content equals the image's (resampling preserves it closely).
    with Image.open(r.file_name) as im:
      original = np.asarray(im.convert('RGB'), np.float64)
    pixels = batch['image'][i][~batch['pad_mask'][i]] * np.array(config.input.std) + np.array(config.input.mean)
    np.testing.assert_allclose(pixels.mean(0), original.mean((0, 1)), atol=1.5)
  assert batch['valid'].all()


def test_mmdet_resize_rule_in_the_pipeline_caps_and_counts_what_does_not_fit(dataset):
  """input.resize_rule='mmdet' scales every example by min(long bound / long side, short bound / short side);
  one too tall for the canvas is scaled to fit it instead, and the report counts it."""
  config = _config(**{'input.resize_rule': 'mmdet', 'input.resize_scale': (45, 32)})
  table, report = pipeline.prepare_examples(config, dataset, train=False)
  batches = list(pipeline.eval_iterator(config, dataset, global_batch_size=len(dataset)))
  capped = 0
  for i, r in enumerate(dataset):
    mmdet = min(45 / max(r.width, r.height), 32 / min(r.width, r.height))
    fit = min(CANVAS[0] / r.height, CANVAS[1] / r.width)
    too_big = r.height * mmdet > CANVAS[0] + 1e-6 or r.width * mmdet > CANVAS[1] + 1e-6
    capped += too_big
    assert batches[0]['scale'][i] == pytest.approx(fit if too_big else mmdet, rel=1e-6)
  assert 0 < capped < len(dataset)
  assert any(min(45 / max(r.width, r.height), 32 / min(r.width, r.height)) < min(CANVAS[0] / r.height,
             CANVAS[1] / r.width) - 1e-6 for r in dataset)   # some example differs from fit_canvas
  assert f'{capped} of {len(dataset)} examples' in report.summary() and 'resized to fit it instead' in report.summary()
  assert len(table) == len(dataset)


def test_create_datasets(dataset):
  config = _config(**{'eval.batch_size': 3})
  train, evaluation = pipeline.create_datasets(config, dataset, dataset[:5], global_batch_size=4, seed=5,
                                               start_step=1)
  expected = next(pipeline.train_iterator(config, dataset, global_batch_size=4, seed=5, start_step=1))
  _assert_batches_equal([next(train.as_numpy_iterator())], [expected])
  eval_batches = list(evaluation.as_numpy_iterator())
  assert [b['valid'].tolist() for b in eval_batches] == [[True] * 3, [True, True, False]]
