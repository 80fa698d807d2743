"""Patch slicing (SODA-D protocol) and merge-back: window geometry against a transcription of the benchmark's
loop, the 40 % rule at its boundary, training-patch selection, NMS against a brute-force reference, and the
round trip ground truth -> patches -> merged detections on the real VisDrone val_dev images."""

import numpy as np
import pytest

from input_pipeline import records as records_lib
from input_pipeline import slicing
from mrqm_jax.metrics.detections import Detections
from mrqm_jax.ops import postprocess


def _record(boxes, labels=None, ignore=(), width=2000, height=1500, name='img', image_id=0):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  labels = np.zeros(len(boxes), np.int32) if labels is None else labels
  return records_lib.ImageRecord(image_id=image_id, name=name, file_name=f'/nowhere/{name}.jpg', width=width,
                                 height=height, boxes=boxes, labels=labels, ignore=np.asarray(ignore, np.float32))


def _script_starts(length, patch, step):
  """The window loop of SODA-mmdetection tools/img_split/sodad_split.py (`_divImg`), one axis, as a reference."""
  length = max(length, patch)  # the script pads images smaller than a patch
  starts, left = [], 0
  while left < length:
    if left + patch >= length:
      left = max(length - patch, 0)
    starts.append(left)
    if left + patch >= length:
      break
    left = left + patch - step
  return starts


@pytest.mark.parametrize('length', [1, 500, 799, 800, 801, 1300, 1449, 1450, 1451, 2000, 2100, 4000, 5472])
def test_window_starts_match_the_benchmark_loop_and_cover(length):
  starts = slicing.window_starts(max(length, 800), 800, 150)
  assert starts.tolist() == _script_starts(length, 800, 150)
  covered = np.zeros(max(length, 800), bool)
  for s in starts:
    covered[s:s + 800] = True
  assert covered.all()
  assert starts[-1] + 800 == max(length, 800)  # last window aligned to the (padded) edge
  assert np.all(np.diff(starts) <= 650) and np.all(np.diff(starts) > 0)


def test_window_starts_rejects_bad_overlap():
  with pytest.raises(ValueError, match='overlap'):
    slicing.window_starts(1000, 800, 800)


def test_patch_origins_cover_image_column_major():
  record = _record([[10, 10, 20, 20]], width=1500, height=900)
  patches = slicing.slice_record(record, 800, 150, train=False)
  origins = [(p.origin_x, p.origin_y) for p in patches]
  assert origins == [(0, 0), (0, 100), (650, 0), (650, 100), (700, 0), (700, 100)]
  assert all((p.width, p.height, p.image_width, p.image_height) == (800, 800, 1500, 900) for p in patches)
  assert [p.name for p in patches] == [f'img_{k}' for k in range(6)]
  assert all(p.image_id == record.image_id and p.file_name == record.file_name for p in patches)


def test_small_image_is_one_padded_patch():
  record = _record([[10, 20, 30, 40]], width=500, height=300)
  (patch,) = slicing.slice_record(record, 800, 150, train=False)
  assert (patch.origin_x, patch.origin_y, patch.width, patch.height) == (0, 0, 800, 800)
  np.testing.assert_array_equal(patch.boxes, record.boxes)


@pytest.mark.parametrize('inside_px, expected', [(40, 'ignore'), (41, 'target'), (0, 'absent'), (39, 'ignore')])
def test_forty_percent_rule_at_the_patch_edge(inside_px, expected):
  # Image 1500 wide: windows start at x = 0, 650, 700. A 100x10 box crossing x = 800 (right edge of window 0)
  # with `inside_px` columns inside window 0: fraction inside = inside_px / 100.
  x0 = 800 - inside_px
  record = _record([[x0, 100, x0 + 100, 110]], labels=np.array([3], np.int32), width=1500, height=700)
  first = slicing.slice_record(record, 800, 150, train=False)[0]
  assert (first.origin_x, first.origin_y) == (0, 0)
  clipped = [[x0, 100, 800, 110]]
  if expected == 'target':
    np.testing.assert_array_equal(first.boxes, clipped)
    assert first.labels.tolist() == [3] and len(first.ignore) == 0
  elif expected == 'ignore':
    assert len(first.boxes) == 0
    np.testing.assert_array_equal(first.ignore, clipped)
  else:
    assert len(first.boxes) == 0 and len(first.ignore) == 0


def test_boxes_and_ignore_regions_in_patch_pixels():
  record = _record([[700, 50, 760, 90], [1300, 600, 1340, 650]], labels=np.array([1, 2], np.int32),
                   ignore=[[600, 0, 900, 30]], width=1500, height=700)
  patches = {(p.origin_x, p.origin_y): p for p in slicing.slice_record(record, 800, 150, train=False)}
  np.testing.assert_array_equal(patches[(650, 0)].boxes, [[50, 50, 110, 90], [650, 600, 690, 650]])
  np.testing.assert_array_equal(patches[(650, 0)].ignore, [[0, 0, 250, 30]])
  np.testing.assert_array_equal(patches[(0, 0)].boxes, [[700, 50, 760, 90]])
  np.testing.assert_array_equal(patches[(0, 0)].ignore, [[600, 0, 800, 30]])


def test_training_drops_patches_without_targets_and_cuts_to_annotation_extent():
  # Targets only in the top-left corner of a 2000x1500 image; an ignore region far right extends the extent.
  record = _record([[10, 10, 30, 30]], ignore=[[1000, 10, 1100, 40]], width=2000, height=1500)
  eval_patches = slicing.slice_record(record, 800, 150, train=False)
  assert len(eval_patches) == 9
  train_patches = slicing.slice_record(record, 800, 150, train=True)
  # Script: width -> min(2000, 1100 + 5) = 1105, height -> max(min(1500, 30 + 5), 800) = 800:
  # x starts [0, 305], y starts [0]; only the window at x = 0 holds the target.
  assert [(p.origin_x, p.origin_y) for p in train_patches] == [(0, 0)]
  assert slicing.slice_record(_record([], ignore=[[0, 0, 10, 10]]), train=True) == []


def test_training_keeps_patch_whose_only_target_part_becomes_ignore():
  # Training width = min(900, 880 + 5) = 885: windows at x = 0 (box 20 % inside) and x = 85 (box inside).
  record = _record([[780, 100, 880, 110]], width=900, height=700)
  patches = slicing.slice_record(record, 800, 150, train=True)
  assert [(p.origin_x, len(p.boxes), len(p.ignore)) for p in patches] == [(0, 0, 1), (85, 1, 0)]


def test_annotations_only_record_is_refused():
  with pytest.raises(ValueError, match='size unknown'):
    slicing.slice_record(_record([[0, 0, 1, 1]], width=0, height=0), train=False)


# ---------------------------------------------------------------------------------------------- real data
def _iou_matrix(a, b):
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _same_class_pairs(record, thr=0.5):
  """Index pairs (i < j) of same-class ground truths with IoU > thr (NMS at thr would merge them)."""
  boxes = record.boxes.astype(np.float64)
  iou = _iou_matrix(boxes, boxes)
  same = record.labels[:, None] == record.labels[None, :]
  return np.argwhere(np.triu((iou > thr) & same, 1))


@pytest.fixture(scope='module')
def val_dev_records(visdrone_val_dev):
  from input_pipeline import visdrone  # pylint: disable=g-import-not-at-top
  records, _ = visdrone.read_split(str(visdrone_val_dev))
  return records


def test_count_same_class_pairs_nms_would_merge(val_dev_records):
  pairs = sum(len(_same_class_pairs(r)) for r in val_dev_records)
  print(f'val_dev: {pairs} same-class ground-truth pairs with IoU > 0.5 in '
        f'{sum(len(_same_class_pairs(r)) > 0 for r in val_dev_records)} of {len(val_dev_records)} images')
  assert pairs > 0  # the real data has them: the round trip below must remove them to be exact


def _round_trip_data(records, patch=800, overlap=150):
  """Records without same-class pairs NMS would merge and without boxes no window fully contains."""
  clean = []
  for r in records:
    drop = set(_same_class_pairs(r)[:, 1].tolist())
    keep = np.array([i for i in range(len(r.boxes)) if i not in drop], np.int64)
    boxes = r.boxes[keep]
    fits = np.zeros(len(boxes), bool)
    for x in slicing.window_starts(max(r.width, patch), patch, overlap):
      for y in slicing.window_starts(max(r.height, patch), patch, overlap):
        fits |= ((boxes[:, 0] >= x) & (boxes[:, 2] <= x + patch) & (boxes[:, 1] >= y) & (boxes[:, 3] <= y + patch))
    keep = keep[fits]
    clean.append(records_lib.ImageRecord(r.image_id, r.name, r.file_name, r.width, r.height, r.boxes[keep],
                                         r.labels[keep], r.ignore))
  # Pairs can chain (a~b, b~c with a, c apart): re-check that none are left.
  assert all(len(_same_class_pairs(r)) == 0 for r in clean)
  return clean


def _oracle_patch_detections(patches, records):
  """Each patch's targets as detections in image pixels, scored by the visible fraction of their source box."""
  by_id = {r.image_id: r for r in records}
  per_image = {}
  for p in patches:
    source = by_id[p.image_id].boxes.astype(np.float64)
    boxes = p.boxes.astype(np.float64) + [p.origin_x, p.origin_y, p.origin_x, p.origin_y]
    window = np.array([p.origin_x, p.origin_y, p.origin_x + p.width, p.origin_y + p.height], np.float64)
    clipped = np.concatenate([np.maximum(source[:, :2], window[:2]), np.minimum(source[:, 2:], window[2:])], 1)
    scores = []
    for b in boxes:  # find the source box this part was cut from
      match = np.flatnonzero(np.all(np.abs(clipped - b) < 1e-3, axis=1))
      assert len(match) >= 1
      src = source[match[0]]
      scores.append(np.prod(b[2:] - b[:2]) / np.prod(src[2:] - src[:2]))
    per_image.setdefault(p.image_id, []).append(Detections(boxes, np.array(scores), p.labels.astype(np.int64)))
  return per_image


def test_round_trip_ground_truth_through_patches(val_dev_records):
  records = _round_trip_data(val_dev_records)
  num_boxes = sum(len(r.boxes) for r in records)
  assert num_boxes > 0.9 * sum(len(r.boxes) for r in val_dev_records)
  patches = slicing.slice_records(records, 800, 150, train=False)
  per_image = _oracle_patch_detections(patches, records)

  # Exact: only parts that are whole boxes (score 1) -> NMS removes the copies from overlapping windows.
  whole = {i: [Detections(d.boxes[d.scores == 1], d.scores[d.scores == 1], d.labels[d.scores == 1]) for d in ds]
           for i, ds in per_image.items()}
  merged = postprocess.merge_patch_detections(whole, records, iou_threshold=0.5)
  for r in records:
    got = np.concatenate([merged[r.image_id].boxes, merged[r.image_id].labels[:, None]], 1)
    want = np.concatenate([r.boxes, r.labels[:, None]], 1).astype(np.float64)
    np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], atol=1e-4)

  # With the cut parts too (lower scores): every box still comes back whole, and AP is 100.
  merged = postprocess.merge_patch_detections(per_image, records, iou_threshold=0.5)
  for r in records:
    top = merged[r.image_id].scores == 1
    assert top.sum() == len(r.boxes)
  try:
    from mrqm_jax.metrics import coco as metrics  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  by_name = {r.name: merged[r.image_id] for r in records}
  result = metrics.evaluate_detections('coco', records, by_name, num_classes=10, max_dets=2000)
  assert result['AP'] == pytest.approx(100.0)
