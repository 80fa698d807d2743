"""Metrics of record: hand-built cases with known values, an independent re-statement of the VisDrone toolkit's
rules, ignored-region geometry against rasterization, result-file I/O, the CLI, and the real val_dev labels."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from input_pipeline.records import ImageRecord
from mrqm_jax.metrics import coco as metrics
from mrqm_jax.metrics import visdrone
from mrqm_jax.metrics.detections import Detections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolation grid


def _record(name, boxes, labels, ignore=(), width=400, height=300):
  return ImageRecord(image_id=0, name=name, file_name='', width=width, height=height, boxes=boxes,
                     labels=labels, ignore=ignore)


def _dets(boxes, scores, labels):
  return Detections(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64),
                    np.asarray(labels, np.int64))


def _evaluate(protocol, records, detections, num_classes=3, **kwargs):
  return metrics.evaluate_detections(protocol, records, detections, num_classes=num_classes, **kwargs)


# Three classes, sizes spread over COCO's S/M/L and SODA's bands (areas 100, 300, 600, 1500, 2500, 12000).
GT_BOXES = [[10, 10, 20, 20], [50, 50, 65, 70], [100, 20, 130, 40], [200, 200, 250, 230], [300, 100, 350, 150],
            [10, 150, 130, 250]]
GT_LABELS = [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize('protocol', metrics.PROTOCOLS)
def test_perfect_detections_score_100_and_none_score_0(protocol):
  records = [_record('a', GT_BOXES[:3], GT_LABELS[:3]), _record('b', GT_BOXES[3:], GT_LABELS[3:])]
  perfect = {r.name: _dets(r.boxes, np.linspace(0.9, 0.5, len(r.labels)), r.labels) for r in records}
  best = _evaluate(protocol, records, perfect)
  worst = _evaluate(protocol, records, {})
  ap_keys = [k for k in best if k.startswith('AP')]
  assert ap_keys and set(best) == set(worst)
  for key in ap_keys:
    if best[key] == -1.0:  # undefined: no ground truth in that band
      assert worst[key] == -1.0, key
      continue
    assert best[key] == pytest.approx(100.0), key
    assert worst[key] == 0.0, key
  assert all(worst[k] in (0.0, -1.0) for k in worst if k.startswith('AR'))


def test_metric_keys_per_protocol():
  records = [_record('a', GT_BOXES, GT_LABELS)]
  assert set(_evaluate('visdrone', records, {})) == {
      'AP', 'AP50', 'AP75', 'AP_S', 'AP_M', 'AP_L', 'toolkit_AP', 'toolkit_AP50', 'toolkit_AP75', 'toolkit_AR1',
      'toolkit_AR10', 'toolkit_AR100', 'toolkit_AR500'}
  assert {'AP', 'AP50', 'AP75', 'AP_S', 'AP_M', 'AP_L', 'AR1', 'AR10', 'AR100'} <= set(
      _evaluate('coco', records, {}))
  assert {'AP', 'AP50', 'AP75', 'AP_eS', 'AP_rS', 'AP_gS', 'AP_N', 'AR100', 'AR1000'} <= set(
      _evaluate('soda', records, {}))


@pytest.mark.parametrize('protocol', ['coco', 'soda'])
def test_half_recall_with_perfect_precision_under_101_point_interpolation(protocol):
  # One class, two small ground truths, one found exactly: precision 1 up to recall 0.5, nothing beyond.
  # COCO samples the precision envelope at recall 0, .01, ..., 1: the samples at r <= 0.5 are 1, the rest 0.
  records = [_record('a', [[10, 10, 30, 30], [60, 60, 80, 80]], [0, 0])]
  values = _evaluate(protocol, records, {'a': _dets([[10, 10, 30, 30]], [0.9], [0])})
  expected = 100.0 * np.mean(RECALL_THRESHOLDS <= 0.5)  # 51/101
  assert values['AP'] == pytest.approx(expected)
  assert values['AP50'] == pytest.approx(expected)


def test_visdrone_half_recall_is_50_under_all_point_interpolation():
  # The toolkit's VOCap integrates the precision envelope over recall: 0.5 recall at precision 1 -> 50.
  records = [_record('a', [[10, 10, 30, 30], [60, 60, 80, 80]], [0, 0])]
  values = _evaluate('visdrone', records, {'a': _dets([[10, 10, 30, 30]], [0.9], [0])})
  assert values['toolkit_AP'] == pytest.approx(50.0)
  assert values['toolkit_AR500'] == pytest.approx(50.0)
  # The headline is COCO's 101-point interpolation (the paper's numbers).
  assert values['AP'] == values['AP_S'] == pytest.approx(100.0 * np.mean(RECALL_THRESHOLDS <= 0.5))


def test_visdrone_class_mean_is_weighted_by_images_containing_the_class():
  # Class 0 is in two images and found (AP 100); class 1 is in one image and missed (AP 0).
  # The toolkit repeats a class's AP once per image containing it: (2 * 100 + 1 * 0) / 3.
  records = [_record('a', [[10, 10, 30, 30], [50, 50, 70, 70]], [0, 1]), _record('b', [[10, 10, 30, 30]], [0])]
  detections = {'a': _dets([[10, 10, 30, 30]], [0.9], [0]), 'b': _dets([[10, 10, 30, 30]], [0.8], [0])}
  values = _evaluate('visdrone', records, detections)
  assert values['toolkit_AP'] == pytest.approx(200.0 / 3.0)
  # COCO's class mean (the visdrone headline) is unweighted: (100 + 0) / 2.
  assert values['AP'] == _evaluate('coco', records, detections)['AP'] == pytest.approx(50.0)


def test_visdrone_headline_ap_is_at_100_per_image_and_the_rest_at_1000():
  # pycocotools' summarize() with Co-DETR's maxDets [100, 300, 1000]: stats[0] (AP) asks for maxDets=100, while
  # stats[1..5] (AP50, AP75, AP_S/M/L) use maxDets[2] = 1000. The only true positive is ranked 101st of its class.
  gt = [[10, 10, 30, 30]]
  records = [_record('a', gt, [0], width=2000, height=2000)]
  false = [[40 + 15 * (i % 100), 40 + 15 * (i // 100), 50 + 15 * (i % 100), 50 + 15 * (i // 100)]
           for i in range(100)]
  detections = {'a': _dets(false + gt, np.linspace(0.9, 0.5, 101), [0] * 101)}
  values = _evaluate('visdrone', records, detections)
  assert values['AP'] == 0.0
  expected = 100.0 * np.mean(RECALL_THRESHOLDS <= 1.0) / 101.0  # precision 1/101 at every recall level
  assert values['AP50'] == pytest.approx(expected) and values['AP_S'] == pytest.approx(expected)


def _pycocotools_summarize(records, detections, num_classes, tmp_path):
  """Co-DETR's mmdet CocoDataset.evaluate path: json files, COCO.loadRes, COCOeval, maxDets [100, 300, 1000],
  summarize(); ignore regions written as iscrowd annotations of every class. Returns stats[0..5]."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  images, annotations, results = [], [], []
  for image_id, r in enumerate(records, start=1):
    images.append({'id': image_id, 'width': r.width, 'height': r.height, 'file_name': r.name})
    for (x0, y0, x1, y1), label in zip(r.boxes.tolist(), r.labels.tolist()):
      annotations.append({'image_id': image_id, 'category_id': label + 1, 'bbox': [x0, y0, x1 - x0, y1 - y0],
                          'area': (x1 - x0) * (y1 - y0), 'iscrowd': 0})
    for x0, y0, x1, y1 in r.ignore.tolist():
      for c in range(num_classes):
        annotations.append({'image_id': image_id, 'category_id': c + 1, 'bbox': [x0, y0, x1 - x0, y1 - y0],
                            'area': (x1 - x0) * (y1 - y0), 'iscrowd': 1})
    d = detections[r.name]
    for (x0, y0, x1, y1), score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist()):
      results.append({'image_id': image_id, 'category_id': label + 1, 'bbox': [x0, y0, x1 - x0, y1 - y0],
                      'score': score})
  for i, a in enumerate(annotations, start=1):
    a['id'] = i
  gt_file = tmp_path / 'gt.json'
  gt_file.write_text(json.dumps({'images': images, 'annotations': annotations,
                                 'categories': [{'id': c + 1, 'name': str(c)} for c in range(num_classes)]}))
  ground_truth = COCO(str(gt_file))
  evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), 'bbox')
  evaluator.params.catIds = list(range(1, num_classes + 1))
  evaluator.params.imgIds = list(range(1, len(records) + 1))
  evaluator.params.maxDets = [100, 300, 1000]
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  return dict(zip(('AP', 'AP50', 'AP75', 'AP_S', 'AP_M', 'AP_L'), 100.0 * evaluator.stats[:6]))


@pytest.mark.parametrize('seed', [0, 1])
def test_visdrone_headline_equals_pycocotools_summarize_as_mmdet_calls_it(seed, tmp_path):
  rng = np.random.default_rng(seed)
  records, detections = [], {}
  for i in range(5):
    n = rng.integers(1, 40)
    xy = rng.uniform(0, 400, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 150, (n, 2))], axis=1)  # S, M and L objects
    labels = rng.integers(0, 3, n)
    ignore = [[0, 0, 60, 60]] if i % 2 else []
    records.append(_record(f'img{i}', boxes, labels, ignore=ignore, width=600, height=600))
    # Many detections per class, so the 100-per-image-and-class cut of AP matters.
    k = 250
    idx = rng.integers(0, n, k)
    jittered = boxes[idx] + rng.normal(0, 6, (k, 4))
    jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 1)
    det_labels = np.where(rng.random(k) < 0.8, labels[idx], rng.integers(0, 3, k))
    detections[f'img{i}'] = _dets(jittered, rng.random(k), det_labels)
  ours = _evaluate('visdrone', records, detections)
  reference = _pycocotools_summarize(records, detections, 3, tmp_path)
  assert reference['AP'] < reference['AP50']  # a non-trivial case
  for key, value in reference.items():
    assert ours[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize('inside, counted', [(0.50, False), (0.49, True)])
def test_visdrone_ground_truth_half_inside_ignore_is_dropped(inside, counted):
  # A found box plus a missed box [0, 200, 100, 210] with `inside` of its area under an ignored region.
  region = [0, 190, 100 * inside, 220]
  records = [_record('a', [[200, 10, 220, 30], [0, 200, 100, 210]], [0, 0], ignore=[region])]
  values = _evaluate('visdrone', records, {'a': _dets([[200, 10, 220, 30]], [0.9], [0])})
  assert values['toolkit_AP'] == pytest.approx(50.0 if counted else 100.0)


@pytest.mark.parametrize('inside, counted', [(0.50, False), (0.49, True)])
def test_visdrone_detection_half_inside_ignore_is_dropped(inside, counted):
  # A false positive scored above the true positive halves precision at full recall when it counts.
  region = [0, 190, 100 * inside, 220]
  records = [_record('a', [[200, 10, 220, 30]], [0], ignore=[region])]
  detections = {'a': _dets([[200, 10, 220, 30], [0, 200, 100, 210]], [0.5, 0.9], [0, 0])}
  assert _evaluate('visdrone', records, detections)['toolkit_AP'] == pytest.approx(50.0 if counted else 100.0)


def test_visdrone_score_zero_objects_are_ignore_flagged_ground_truth_of_their_class():
  # 'a': a found class-0 object; an ignored class-0 object (VisDrone score-0 row, ignore_labels 0) with a class-0
  # detection on it (excused) and a class-1 detection on it (a false positive: the flag is class 0's only); a
  # class-1 object found below that false positive. 'b': only an ignored class-2 object.
  flagged = [100, 100, 130, 130]
  records = [ImageRecord(0, 'a', '', 400, 300, [[10, 10, 30, 30], [200, 10, 230, 40]], [0, 1], [flagged],
                         ignore_labels=[0]),
             ImageRecord(1, 'b', '', 400, 300, np.zeros((0, 4)), [], [flagged], ignore_labels=[2])]
  detections = {'a': _dets([flagged, flagged, [10, 10, 30, 30], [200, 10, 230, 40]], [0.9, 0.8, 0.5, 0.3],
                           [0, 1, 0, 1])}
  values = _evaluate('visdrone', records, detections)
  # Toolkit (evalRes.m / calcAccuracy.m): ignore-flagged ground truth counts in the recall denominator and in
  # the class's images: class 0 recall 1/2 at precision 1 -> 50; class 1 precision 1/2 at recall 1 -> 50;
  # class 2 (only an ignored object, never found) -> 0; one image each.
  assert values['toolkit_AP'] == pytest.approx((50.0 + 50.0 + 0.0) / 3.0)
  assert values['toolkit_AR500'] == pytest.approx((50.0 + 100.0 + 0.0) / 3.0)
  # COCO-style: crowd boxes of their class; class 2 has no real ground truth and is left out.
  assert values['AP'] == pytest.approx((100.0 + 50.0) / 2.0)
  # As regions of every class (ignore_labels -1) the class-1 detection would be excused too.
  for r in records:
    r.ignore_labels = np.full((len(r.ignore),), -1, np.int32)
  assert _evaluate('visdrone', records, detections)['AP'] == pytest.approx(100.0)


def test_visdrone_detection_on_an_others_object_is_a_false_positive(tmp_path):
  from input_pipeline import visdrone as visdrone_reader  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / 'images')
  os.makedirs(tmp_path / 'annotations')
  Image.new('RGB', (120, 80)).save(tmp_path / 'images' / 'a.jpg')
  (tmp_path / 'annotations' / 'a.txt').write_text('10,10,20,20,1,1,0,0\r\n60,30,20,20,1,11,0,0\r\n')
  records, _ = visdrone_reader.read_split(str(tmp_path))
  # A pedestrian detection on the 'others' object, scored above the true positive.
  detections = {'a': _dets([[60, 30, 80, 50], [10, 10, 30, 30]], [0.9, 0.5], [0, 0])}
  values = metrics.evaluate_detections('visdrone', records, detections, num_classes=10)
  assert values['toolkit_AP'] == pytest.approx(50.0)  # VOC all-point: precision 1/2 at recall 1
  assert values['AP'] == pytest.approx(50.0)  # 101-point: precision 1/2 at every recall level


def test_coco_ignore_regions_excuse_detections_inside_them():
  records = [_record('a', [[200, 10, 220, 30]], [0], ignore=[[0, 190, 120, 220]])]
  detections = {'a': _dets([[200, 10, 220, 30], [0, 200, 100, 210]], [0.5, 0.9], [0, 1])}
  assert _evaluate('coco', records, detections)['AP'] == pytest.approx(100.0)
  assert _evaluate('soda', records, detections)['AP'] < 100.0  # SODA-D scores without its ignore regions


def test_soda_gs_object_does_not_affect_ap_es():
  tiny = [[10, 10, 20, 20]]  # area 100: eS
  records = [_record('a', tiny, [0])]
  detections = {'a': _dets(tiny, [0.9], [0])}
  alone = _evaluate('soda', records, detections)
  # Add a missed gS ground truth (20 x 25 = 500) and a high-scoring gS-sized false positive.
  records_gs = [_record('a', tiny + [[100, 100, 120, 125]], [0, 0])]
  detections_gs = {'a': _dets(tiny + [[200, 200, 220, 225]], [0.9, 0.95], [0, 0])}
  with_gs = _evaluate('soda', records_gs, detections_gs)
  assert alone['AP_eS'] == with_gs['AP_eS'] == pytest.approx(100.0)
  assert alone['AP_gS'] == -1.0 and with_gs['AP_gS'] == 0.0
  assert with_gs['AP'] < alone['AP']  # 'Small' (area <= 1024) holds both


def test_soda_bands_are_closed_intervals():
  box = [[10, 10, 22, 22]]  # area exactly 144 = 12^2: in eS [0, 144] and rS [144, 400]
  values = _evaluate('soda', [_record('a', box, [0])], {'a': _dets(box, [0.9], [0])})
  assert values['AP_eS'] == values['AP_rS'] == pytest.approx(100.0)
  big = [[10, 10, 60, 60]]  # area 2500 > 2000: outside every band, so nothing is defined
  values = _evaluate('soda', [_record('a', big, [0])], {'a': _dets(big, [0.9], [0])})
  assert all(values[k] == -1.0 for k in ('AP', 'AP_eS', 'AP_rS', 'AP_gS', 'AP_N'))


def test_max_dets_counts_all_classes_in_visdrone_and_each_class_in_coco():
  # Three class-0 objects found with scores 0.5..0.3, below two class-1 false positives (0.9, 0.8).
  gt = [[10, 10, 30, 30], [50, 50, 70, 70], [90, 90, 110, 110]]
  records = [_record('a', gt, [0, 0, 0])]
  detections = {'a': _dets([[200, 200, 220, 220], [250, 250, 270, 270]] + gt, [0.9, 0.8, 0.5, 0.4, 0.3],
                           [1, 1, 0, 0, 0])}
  toolkit = _evaluate('visdrone', records, detections, max_dets=3)
  assert toolkit['toolkit_AP'] == pytest.approx(100.0 / 3.0)  # only one true positive survives the 3-per-image cut
  assert toolkit['toolkit_AR1'] == 0.0 and toolkit['toolkit_AR3'] == pytest.approx(100.0 / 3.0)
  assert toolkit['AP'] == pytest.approx(100.0)  # the headline's caps (per class) do not follow max_dets
  assert _evaluate('visdrone', records, detections)['toolkit_AP'] == pytest.approx(100.0)  # default 500
  assert _evaluate('coco', records, detections, max_dets=3)['AP'] == pytest.approx(100.0)  # 3 per class
  assert _evaluate('coco', records, detections, max_dets=2)['AR2'] == pytest.approx(200.0 / 3.0)


def test_out_of_range_labels_take_a_visdrone_slot_and_are_logged(caplog):
  gt = [[10, 10, 30, 30]]
  records = [_record('a', gt, [0])]
  # An 'others' (label 3 with num_classes=3) detection ranked first, then the true positive.
  detections = {'a': _dets([[200, 200, 220, 220]] + gt, [0.9, 0.5], [3, 0])}
  with caplog.at_level(logging.WARNING):
    values = _evaluate('visdrone', records, detections, max_dets=1)
  assert values['toolkit_AP'] == 0.0  # the unscored detection used the only slot
  assert values['AP'] == pytest.approx(100.0)  # COCO-style: never scored, takes no slot
  assert any('label outside [0, 3)' in r.getMessage() for r in caplog.records)
  assert _evaluate('visdrone', records, detections, max_dets=2)['toolkit_AP'] == pytest.approx(100.0)


def test_bad_inputs_raise_naming_the_problem(caplog):
  records = [_record('a', GT_BOXES[:1], GT_LABELS[:1])]
  with pytest.raises(ValueError, match='protocol'):
    _evaluate('voc', records, {})
  with pytest.raises(ValueError, match='detections for a'):
    _evaluate('coco', records, {'a': _dets([[1, 1, 2, 2]], [0.5, 0.4], [0, 0])})
  with pytest.raises(ValueError, match='detections for a.*NaN'):
    _evaluate('coco', records, {'a': _dets([[1, 1, np.nan, 2]], [0.5], [0])})
  with pytest.raises(ValueError, match='duplicate record names'):
    _evaluate('coco', records + records, {})
  with pytest.raises(ValueError, match='max_dets'):
    _evaluate('coco', records, {}, max_dets=0)
  with caplog.at_level(logging.WARNING):
    _evaluate('coco', records, {'nope': _dets([[1, 1, 2, 2]], [0.5], [0])})
  assert any('name no record' in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------ independent re-statement of the toolkit's rules


def _iou(a, b):
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  if w <= 0 or h <= 0:
    return 0.0
  inter = w * h
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _reference_visdrone(records, detections, num_classes, max_dets):
  """calcAccuracy.m's definitions, written with plain loops (no ignored regions in the inputs)."""
  caps = sorted({c for c in (1, 10, 100, 500) if c <= max_dets} | {max_dets})
  thresholds = np.linspace(0.5, 0.95, 10)
  cut = {}
  for r in records:
    d = detections[r.name]
    order = sorted(range(len(d.scores)), key=lambda i: -d.scores[i])[:max_dets]
    cut[r.name] = [(rank, d.boxes[i], d.scores[i], d.labels[i]) for rank, i in enumerate(order)]
  ap_rows, ar_rows = [], []  # one row per (class, image containing it), as evalClass repeats classes
  for c in range(num_classes):
    images_with_c = sum(int((r.labels == c).any()) for r in records)
    if not images_with_c:
      continue
    num_gt = sum(int((r.labels == c).sum()) for r in records)
    ap_c, ar_c = [], []
    for t in thresholds:
      outcomes = []  # (score, true positive, rank in image)
      for r in records:
        gts = [b for b, l in zip(r.boxes, r.labels) if l == c]
        taken = [False] * len(gts)
        for rank, box, score, label in cut[r.name]:
          if label != c:
            continue
          best, best_iou = -1, t
          for g, gt in enumerate(gts):
            if not taken[g] and _iou(box, gt) >= best_iou:
              best, best_iou = g, _iou(box, gt)
          if best >= 0:
            taken[best] = True
          outcomes.append((score, best >= 0, rank))
      outcomes.sort(key=lambda o: -o[0])
      tp = np.cumsum([o[1] for o in outcomes])
      precision = tp / np.arange(1, len(outcomes) + 1)
      recall = tp / num_gt
      # AP = sum over detections k of (recall_k - recall_{k-1}) * max precision at ranks >= k.
      ap = sum((recall[k] - (recall[k - 1] if k else 0.0)) * precision[k:].max() for k in range(len(outcomes)))
      ap_c.append(ap)
      ar_c.append([sum(o[1] for o in outcomes if o[2] < cap) / num_gt for cap in caps])
    ap_rows += [ap_c] * images_with_c
    ar_rows += [ar_c] * images_with_c
  ap_rows, ar_rows = np.array(ap_rows), np.array(ar_rows)  # [rows, T], [rows, T, caps]
  values = {'AP': ap_rows.mean(), 'AP50': ap_rows[:, 0].mean(), 'AP75': ap_rows[:, 5].mean()}
  for m, cap in enumerate(caps):
    values[f'AR{cap}'] = ar_rows[:, :, m].mean()
  return {k: 100.0 * v for k, v in values.items()}


@pytest.mark.parametrize('seed, max_dets', [(0, 500), (1, 8), (2, 3)])
def test_visdrone_matches_an_independent_restatement_of_the_toolkit(seed, max_dets):
  rng = np.random.default_rng(seed)
  records, detections = [], {}
  for i in range(6):
    n = rng.integers(0, 7)
    xy = rng.uniform(0, 150, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 50, (n, 2))], axis=1)
    labels = rng.integers(0, 3, n)
    records.append(_record(f'img{i}', boxes, labels, width=200, height=200))
    found = rng.random(n) < 0.8
    jittered = boxes[found] + rng.normal(0, 3, (found.sum(), 4))
    jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 1)
    m = rng.integers(0, 6)
    xy = rng.uniform(0, 150, (m, 2))
    false = np.concatenate([xy, xy + rng.uniform(4, 50, (m, 2))], axis=1)
    det_labels = np.where(rng.random(found.sum()) < 0.1, rng.integers(0, 3, found.sum()), labels[found])
    detections[f'img{i}'] = _dets(np.concatenate([jittered, false]), rng.random(found.sum() + m),
                                  np.concatenate([det_labels, rng.integers(0, 3, m)]))
  ours = _evaluate('visdrone', records, detections, max_dets=max_dets)
  reference = _reference_visdrone(records, detections, 3, max_dets)
  assert 0 < reference['AP'] < reference['AP50'] < 100  # a non-trivial case
  for key, value in reference.items():
    assert ours[f'toolkit_{key}'] == pytest.approx(value, abs=1e-9), key


# --------------------------------------------------------------------------------- ignored-region geometry


@pytest.mark.parametrize('scale', [1, 4])
def test_covered_fraction_matches_rasterization(scale):
  # Coordinates on a 1/scale grid, so rasterizing at `scale` samples per unit is exact.
  rng = np.random.default_rng(scale)
  size = 40
  regions = np.sort(rng.integers(0, size * scale, (6, 2, 2)), axis=1).transpose(0, 2, 1).reshape(-1, 4) / scale
  boxes = np.sort(rng.integers(-4 * scale, (size + 4) * scale, (50, 2, 2)), axis=1)
  boxes = boxes.transpose(0, 2, 1).reshape(-1, 4) / scale
  width, height = 36, 30  # regions are clipped to the image
  grid = np.zeros(((size + 8) * scale, (size + 8) * scale), bool)  # offset by 4 units: boxes start at -4
  for x0, y0, x1, y1 in np.clip(regions, 0, [width, height, width, height]):
    grid[int((y0 + 4) * scale):int((y1 + 4) * scale), int((x0 + 4) * scale):int((x1 + 4) * scale)] = True
  expected = []
  for x0, y0, x1, y1 in boxes:
    cells = grid[int((y0 + 4) * scale):int((y1 + 4) * scale), int((x0 + 4) * scale):int((x1 + 4) * scale)]
    expected.append(cells.mean() if cells.size else 0.0)
  got = visdrone.covered_fraction(boxes, regions, width, height)
  np.testing.assert_allclose(got, expected, atol=1e-12)


def test_covered_fraction_edge_cases():
  assert visdrone.covered_fraction(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0,)
  np.testing.assert_array_equal(visdrone.covered_fraction([[0, 0, 2, 2]], np.zeros((0, 4))), [0.0])
  # Overlapping regions count once; a zero-area box is never 'inside'.
  np.testing.assert_allclose(
      visdrone.covered_fraction([[0, 0, 10, 10], [5, 5, 5, 9]], [[0, 0, 6, 10], [4, 0, 8, 10]]), [0.8, 0.0])


def test_voc_average_precision_closed_forms():
  assert visdrone.voc_average_precision(np.zeros(0), np.zeros(0)) == 0.0
  # TP, FP, TP over 2 ground truths: recall .5, .5, 1; precision 1, .5, 2/3 -> .5 * 1 + .5 * 2/3.
  assert visdrone.voc_average_precision(np.array([.5, .5, 1.]), np.array([1., .5, 2 / 3])) == pytest.approx(
      0.5 + 1 / 3)


# ------------------------------------------------------------------------------------------- result files


def test_result_file_round_trip_sorted_by_score(tmp_path):
  dets = _dets([[1.5, 2.25, 11.5, 22.25], [0, 0, 5, 5]], [0.25, 0.75], [0, 9])
  path = tmp_path / 'x.txt'
  visdrone.write_result_file(str(path), dets)
  lines = path.read_text().splitlines()
  assert lines[0] == '0.000,0.000,5.000,5.000,0.750000,10,-1,-1'
  back = visdrone.read_result_file(str(path))
  np.testing.assert_allclose(back.boxes, dets.boxes[::-1])
  np.testing.assert_allclose(back.scores, [0.75, 0.25])
  np.testing.assert_array_equal(back.labels, [9, 0])


def test_result_reader_accepts_crlf_trailing_comma_and_six_fields():
  dets = visdrone.parse_result_text('1,2,3,4,0.5,1,-1,-1,\r\n\r\n5,6,7,8,0.25,11\r\n', 'r.txt')
  np.testing.assert_allclose(dets.boxes, [[1, 2, 4, 6], [5, 6, 12, 14]])
  np.testing.assert_array_equal(dets.labels, [0, 10])
  assert visdrone.parse_result_text('', 'empty.txt').boxes.shape == (0, 4)


@pytest.mark.parametrize('line, problem', [
    ('1,2,3,4,0.5', '5 fields'),
    ('1,2,3,4,0.5,1,-1,-1,7', '9 fields'),
    ('1,2,x,4,0.5,1,-1,-1', "field 3 'x' is not a number"),
    ('1,2,3,4,nan,1,-1,-1', 'NaN or infinite'),
    ('1,2,-3,4,0.5,1,-1,-1', 'negative width/height'),
    ('1,2,3,4,0.5,1.5,-1,-1', 'not an integer'),
])
def test_result_reader_names_file_and_line(line, problem):
  with pytest.raises(visdrone.ResultFileError, match=f'^r.txt:2: .*{problem}'):
    visdrone.parse_result_text('1,2,3,4,0.5,1,-1,-1\n' + line + '\n', 'r.txt')


# ------------------------------------------------------------------------------------------------- CLI


def _write_dataset(root):
  """Two 120x80 images in the VisDrone layout; returns their annotation rows (x, y, w, h, category)."""
  rows = {'img_a': [(10, 10, 20, 20, 1), (50, 30, 30, 30, 4), (0, 0, 8, 8, 0)],
          'img_b': [(60, 40, 20, 10, 10)]}
  os.makedirs(root / 'images')
  os.makedirs(root / 'annotations')
  for name, objects in rows.items():
    Image.new('RGB', (120, 80)).save(root / 'images' / f'{name}.jpg')
    with open(root / 'annotations' / f'{name}.txt', 'w') as f:
      f.writelines(f'{x},{y},{w},{h},{int(c != 0)},{c},0,0\r\n' for x, y, w, h, c in objects)
  return rows


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'mrqm_jax.evaluate_files', *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=120)


def test_cli_end_to_end(tmp_path):
  rows = _write_dataset(tmp_path / 'data')
  results = tmp_path / 'results'
  results.mkdir()
  # img_a: both objects found, plus a false positive inside the ignored region (dropped); img_b: missed.
  with open(results / 'img_a.txt', 'w') as f:
    f.write('10,10,20,20,0.9,1,-1,-1\n50,30,30,30,0.8,4,-1,-1\n0,0,8,8,0.95,2,-1,-1\n')
  (results / 'img_b.txt').write_text('')
  done = _run_cli('--protocol=visdrone', f'--dataset={tmp_path / "data"}', f'--results={results}')
  assert done.returncode == 0, done.stderr
  values = json.loads(done.stdout.strip().splitlines()[-1])
  # Classes 1 and 4 are found (AP 100), class 10 missed (AP 0); each is in one image: mean 200/3.
  assert values['toolkit_AP'] == pytest.approx(200.0 / 3.0, abs=1e-3)
  assert values['AP'] == pytest.approx(200.0 / 3.0, abs=1e-3)  # COCO-style: also one image per class
  assert len(rows) == 2 and set(values) == {'AP', 'AP50', 'AP75', 'AP_S', 'AP_M', 'AP_L', 'toolkit_AP',
                                            'toolkit_AP50', 'toolkit_AP75', 'toolkit_AR1', 'toolkit_AR10',
                                            'toolkit_AR100', 'toolkit_AR500'}

  done = _run_cli('--protocol=coco', f'--dataset={tmp_path / "data"}', f'--results={results}')
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout.strip().splitlines()[-1])['AP'] == pytest.approx(200.0 / 3.0, abs=1e-3)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
  _write_dataset(tmp_path / 'data')
  results = tmp_path / 'results'
  results.mkdir()
  (results / 'img_a.txt').write_text('10,10,20,20,0.9,1,-1,-1\n10,10,20,oops,0.9,1,-1,-1\n')
  for args, message in [
      ((f'--dataset={tmp_path / "missing"}', f'--results={results}'), 'dataset folder not found'),
      ((f'--dataset={tmp_path / "data"}', f'--results={results}'), f'{results / "img_a.txt"}:2: field 4'),
  ]:
    done = _run_cli(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and 'Traceback' not in done.stderr
    assert len([l for l in done.stderr.splitlines() if 'error' in l]) == 1


# --------------------------------------------------------------------------------------------- real data


def test_real_val_dev_ground_truth_as_detections_scores_100(visdrone_val_dev):
  from input_pipeline import visdrone as visdrone_reader  # pylint: disable=g-import-not-at-top
  records, _ = visdrone_reader.read_split(str(visdrone_val_dev))
  assert len(records) == 142
  detections = {r.name: Detections(r.boxes, np.linspace(1.0, 0.5, len(r.labels)), r.labels) for r in records}
  values = metrics.evaluate_detections('visdrone', records, detections, num_classes=10)
  for key in ('AP50', 'AP75', 'AP_S', 'AP_M', 'AP_L', 'toolkit_AP', 'toolkit_AP50', 'toolkit_AP75',
              'toolkit_AR500'):
    assert values[key] == pytest.approx(100.0), key
  # The headline AP keeps 100 detections per image and class; some val_dev images hold more than 100 objects
  # of one class, so even the ground truth itself cannot reach 100 there.
  most = max(int(np.bincount(r.labels).max()) for r in records if len(r.labels))
  assert most > 100 and 99.0 < values['AP'] < 100.0
  assert values['toolkit_AR1'] < values['toolkit_AR10'] < values['toolkit_AR100'] <= 100.0
