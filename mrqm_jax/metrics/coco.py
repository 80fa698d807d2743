"""Metrics of record: COCO, the VisDrone-DET toolkit and SODA-D's evaluator, on top of pycocotools.

`evaluate_detections(protocol, records, detections, num_classes=...)` scores per-image detections (pixel xyxy,
0-based labels) against `input_pipeline.records.ImageRecord`s and returns {metric: percent}. Every protocol
runs pycocotools' COCOeval for the IoU computation and greedy matching (highest score first, each detection
takes the unmatched ground truth of its class with the highest IoU >= threshold; IoU thresholds .50:.05:.95).
A metric that is undefined (no ground truth in its class/size band) is -1.0, as in pycocotools.

Protocols
---------
'coco': standard COCO bbox metrics. maxDets (1, 10, 100) per image and class; areas (all, small [0, 32^2],
  medium [32^2, 96^2], large [96^2, inf)); 101-point interpolated AP, averaged over classes with ground truth.
  Records' ignore regions become crowd regions (a detection inside one, by intersection over the detection's
  area >= the IoU threshold, is neither a true nor a false positive) for EVERY class, because records do not
  keep the class of a crowd annotation; COCO's own crowd regions only excuse detections of their class.
  (Records' ignored objects of one class, `ignore_labels` c >= 0, are crowd boxes of class c only.)
  Keys: AP, AP50, AP75, AP_S, AP_M, AP_L, AR1, AR10, AR100, AR_S, AR_M, AR_L.

'visdrone': what the paper reports for VisDrone (its Table 2) as the headline, plus the official toolkit's numbers.
  Headline, COCO-style, as Co-DETR's mmdet `CocoDataset.evaluate` computes it on a COCO-json conversion of
  VisDrone (classes 1..10): pycocotools with params.maxDets = [100, 300, 1000] and its summarize() stats[0..5],
  so AP is at 100 detections per image and class while AP50, AP75, AP_S, AP_M, AP_L are at 1000 (summarize()
  asks for maxDets=100 only in stats[0] and for maxDets[2] elsewhere); every detection is scored (Co-DINO's
  head keeps at most 300 per image). Ignore regions (category 0) are crowd regions of every class, as in
  'coco'. Keys: AP, AP50, AP75, AP_S, AP_M, AP_L.
  Toolkit (evalDET.m / calcAccuracy.m; see `visdrone.py` for its four differences from COCO: >= 50%-in-ignored-
  region drop of ground truths AND detections, maxDets counted per image over all classes, VOC all-point AP,
  class mean weighted by the number of images containing the class), under prefixed keys: toolkit_AP,
  toolkit_AP50, toolkit_AP75 (maxDets 500), toolkit_AR1, toolkit_AR10, toolkit_AR100, toolkit_AR500.
  Records' ignore regions with ignore_labels -1 play the toolkit's 'ignored region' (category 0) role; those
  with a class c (VisDrone score-0 rows of classes 1..10, none in val_dev or the 6,471 train files) are its
  ignore-flagged ground truth of class c (evalRes.m: a detection of class c matched to one by intersection
  over the detection's area is neither true nor false positive; it still counts in the recall denominator and
  in the class's image count), and crowd boxes of class c in the headline. The VisDrone reader keeps
  'others' (11) rows out of the records, which is what the toolkit's result amounts to: it keeps them as
  class-11 ground truth but scores classes 1..10 one at a time, so they are never matched and a detection on
  one is a false positive of its class (in the headline too: a COCO conversion has no class 11).

'soda': SODA-D's SODADeval (see `soda.py`). AP means: the mean over the 9 classes (those with ground truth in
  the band) and over IoU thresholds .50:.05:.95 of 101-point interpolated precision on the 'Small' band:
  ground truths with area > 32^2 = 1024 px^2 are ignored (matches to them count for nothing) and so are
  unmatched detections with area > 1024; at most 100 detections per image and class. AP50/AP75 are the same at
  one threshold; AP_eS, AP_rS, AP_gS, AP_N use the bands [0, 144], [144, 400], [400, 1024], [1024, 2000].
  Ignore regions are NOT used: the official evaluation scores against `*_wo_ignore.json` (SODA-mmdetection
  configs/_base_/datasets/sodad.py, `ori_ann_file`), so detections in ignore regions are false positives.
  Official areas are the annotations' `area` field; here box width x height.
  Keys: AP, AP50, AP75, AP_eS, AP_rS, AP_gS, AP_N, AR100, AR300, AR1000 (Small band), AR_eS, AR_rS, AR_gS,
  AR_N (at 1000).

`max_dets` replaces the cap used for AP (coco 100, visdrone's toolkit part 500, soda 100); recall is reported at
every default cap not above it and at `max_dets` itself (key AR{n}, toolkit_AR{n}); 'soda' always adds
SODADeval's 100, 300, 1000. The 'visdrone' headline's caps are fixed (Co-DETR's 100, 300, 1000).
"""

import contextlib
import io
from typing import Mapping, Sequence

from absl import logging
import numpy as np
from pycocotools import coco as pycoco
from pycocotools import cocoeval

from mrqm_jax.metrics import detections as detections_lib
from mrqm_jax.metrics import soda
from mrqm_jax.metrics import visdrone
from mrqm_jax.metrics.detections import Detections

PROTOCOLS = ('coco', 'visdrone', 'soda')
# Co-DETR's mmdet CocoDataset.evaluate(proposal_nums=(100, 300, 1000)) sets COCOeval's params.maxDets to these.
VISDRONE_HEADLINE_CAPS = (100, 300, 1000)
TOOLKIT_PREFIX = 'toolkit_'  # the VisDrone toolkit's numbers in the 'visdrone' protocol
DEFAULT_MAX_DETS = {'coco': 100, 'visdrone': visdrone.MAX_DETS[-1], 'soda': soda.AP_MAX_DETS}
_RECALL_CAPS = {'coco': (1, 10, 100), 'visdrone': visdrone.MAX_DETS, 'soda': soda.RECALL_MAX_DETS}
# (key suffix, pycocotools label, lo, hi) in px^2; pycocotools' 'all' upper bound.
COCO_AREA_RANGES = (('', 'all', 0.0, 1e5 ** 2), ('_S', 'small', 0.0, 32.0 ** 2),
                    ('_M', 'medium', 32.0 ** 2, 96.0 ** 2), ('_L', 'large', 96.0 ** 2, 1e5 ** 2))

__all__ = ['Detections', 'PROTOCOLS', 'evaluate_detections']


def evaluate_detections(protocol: str, records: Sequence, detections: Mapping[str, Detections], *,
                        num_classes: int, max_dets: int | None = None) -> dict[str, float]:
  """Scores detections against ground truth with one of the protocols above.

  Args:
    protocol: 'coco' | 'visdrone' | 'soda'.
    records: `input_pipeline.records.ImageRecord`s (pixel xyxy boxes, 0-based labels, ignore regions); every
      record is an evaluated image.
    detections: image name (record.name) -> Detections (pixel xyxy boxes [K, 4], scores [K], 0-based labels
      [K]). A record without an entry has no detections. Names that are no record, and detections whose label
      is outside [0, num_classes), are counted, logged and not scored (in the toolkit's numbers the latter still
      take their place in the per-image maxDets cut, as in the toolkit).
    num_classes: number of target classes (VisDrone 10, SODA-D 9).
    max_dets: cap per image for AP (see module docstring; in 'visdrone' the toolkit's cap, the headline's caps
      are fixed); None = the protocol's default.

  Returns:
    {metric key: value in percent (0..100), or -1.0 when undefined}.

  Raises:
    ValueError for an unknown protocol, bad num_classes/max_dets, duplicate record names or malformed
    detections (naming the image).
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol {protocol!r} is not one of {", ".join(PROTOCOLS)}')
  if int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
  if max_dets is None:
    max_dets = DEFAULT_MAX_DETS[protocol]
  if int(max_dets) != max_dets or max_dets < 1:
    raise ValueError(f'max_dets must be a positive integer, got {max_dets!r}')
  max_dets = int(max_dets)
  caps = tuple(sorted({c for c in _RECALL_CAPS[protocol] if c <= max_dets} | {max_dets}))
  if protocol == 'soda':  # SODADeval always evaluates up to 1000 per image and class for its recall numbers.
    caps = tuple(sorted(set(soda.RECALL_MAX_DETS) | {max_dets}))

  names = [r.name for r in records]
  if len(set(names)) != len(names):
    duplicates = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f'duplicate record names: {", ".join(duplicates[:5])}')
  unknown = set(detections) - set(names)
  if unknown:
    logging.warning('%d detection entries name no record and are not scored (e.g. %s)', len(unknown),
                    ', '.join(sorted(unknown)[:3]))

  per_image, num_out_of_range = [], 0
  for record in records:
    dets = detections.get(record.name)
    dets = (detections_lib.empty_detections() if dets is None
            else detections_lib.as_checked_arrays(dets, f'detections for {record.name}'))
    gt_labels = np.asarray(record.labels, np.int64).reshape(-1)
    if len(gt_labels) and (gt_labels.min() < 0 or gt_labels.max() >= num_classes):
      raise ValueError(f'record {record.name}: ground-truth labels must be in [0, {num_classes}), got '
                       f'{sorted(set(gt_labels.tolist()))}')
    num_out_of_range += int(((dets.labels < 0) | (dets.labels >= num_classes)).sum())
    per_image.append((record, dets))
  if num_out_of_range:
    logging.warning('%d detections have a label outside [0, %d) and are not scored', num_out_of_range,
                    num_classes)

  if protocol == 'visdrone':
    metrics = _coco_style(per_image, num_classes, VISDRONE_HEADLINE_CAPS, ap_cap=VISDRONE_HEADLINE_CAPS[0],
                          other_cap=VISDRONE_HEADLINE_CAPS[-1], with_recall=False)
    toolkit = _toolkit(per_image, num_classes, caps)
    metrics.update({f'{TOOLKIT_PREFIX}{k}': v for k, v in toolkit.items()})
    return metrics
  if protocol == 'soda':
    return _coco_style(per_image, num_classes, caps, ap_cap=max_dets, other_cap=max_dets, crowd=False,
                       area_ranges=soda.AREA_RANGES)
  return _coco_style(per_image, num_classes, caps, ap_cap=max_dets, other_cap=max_dets)


def _coco_style(per_image, num_classes, caps, *, ap_cap, other_cap, crowd=True, area_ranges=COCO_AREA_RANGES,
                with_recall=True) -> dict[str, float]:
  """COCOeval metrics: AP at `ap_cap`; AP50, AP75 and the bands' AP at `other_cap`; AR at every cap.

  per_image: [(record, checked Detections)]; crowd: records' ignore regions are crowd regions of every class.
  """
  gts, dts = [], []
  for record, dets in per_image:
    gt_boxes = np.asarray(record.boxes, np.float64).reshape(-1, 4)
    gt_labels = np.asarray(record.labels, np.int64).reshape(-1)
    regions, flagged, flagged_labels = _ignore_parts(record, num_classes)
    if not crowd:
      regions, flagged, flagged_labels = np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0,), np.int64)
    in_range = (dets.labels >= 0) & (dets.labels < num_classes)
    gts.append((gt_boxes, gt_labels, regions, flagged, flagged_labels))
    dts.append((dets.boxes[in_range], dets.scores[in_range], dets.labels[in_range],
                np.flatnonzero(in_range)))
  evaluator, _ = _run_cocoeval(gts, dts, num_classes, area_ranges, caps)
  ap_index, other_index = caps.index(ap_cap), caps.index(other_cap)
  metrics = {'AP': _mean_precision(evaluator, 0, ap_index),
             'AP50': _mean_precision(evaluator, 0, other_index, iou=0.5),
             'AP75': _mean_precision(evaluator, 0, other_index, iou=0.75)}
  for a in range(1, len(area_ranges)):
    metrics[f'AP{area_ranges[a][0]}'] = _mean_precision(evaluator, a, other_index)
  if with_recall:
    for m, cap in enumerate(caps):
      metrics[f'AR{cap}'] = _mean_recall(evaluator, 0, m)
    for a in range(1, len(area_ranges)):
      metrics[f'AR{area_ranges[a][0]}'] = _mean_recall(evaluator, a, len(caps) - 1)
  return metrics


def _toolkit(per_image, num_classes, caps) -> dict[str, float]:
  """The VisDrone toolkit's AP/AR (`visdrone.toolkit_scores`) with its ignored-region drop and per-image cut."""
  gts, dts = [], []
  for record, dets in per_image:
    gt_boxes = np.asarray(record.boxes, np.float64).reshape(-1, 4)
    gt_labels = np.asarray(record.labels, np.int64).reshape(-1)
    regions, flagged, flagged_labels = _ignore_parts(record, num_classes)
    keep_gt = visdrone.outside_ignored(gt_boxes, regions, record.width, record.height)
    keep_flagged = visdrone.outside_ignored(flagged, regions, record.width, record.height)
    keep = visdrone.outside_ignored(dets.boxes, regions, record.width, record.height)
    order = np.argsort(-dets.scores[keep], kind='mergesort')[:caps[-1]]
    dets = Detections(*(a[keep][order] for a in dets))
    in_range = (dets.labels >= 0) & (dets.labels < num_classes)
    rank = np.arange(len(dets.scores))[in_range]  # position in the image's (cut) list, over all labels
    gts.append((gt_boxes[keep_gt], gt_labels[keep_gt], np.zeros((0, 4)), flagged[keep_flagged],
                flagged_labels[keep_flagged]))
    dts.append((dets.boxes[in_range], dets.scores[in_range], dets.labels[in_range], rank))
  evaluator, dt_rank = _run_cocoeval(gts, dts, num_classes, COCO_AREA_RANGES[:1], caps)
  return visdrone.toolkit_scores(_toolkit_inputs(evaluator, dt_rank), caps)


def _ignore_parts(record, num_classes):
  """A record's ignore list split by `ignore_labels`: (regions of every class [R, 4], ignored objects [G, 4] of
  one class each, their labels [G]); ignored objects of a class outside [0, num_classes) are dropped."""
  ignore = np.asarray(record.ignore, np.float64).reshape(-1, 4)
  labels = getattr(record, 'ignore_labels', None)
  labels = np.full((len(ignore),), -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
  flagged = (labels >= 0) & (labels < num_classes)
  return ignore[labels < 0], ignore[flagged], labels[flagged]


def _run_cocoeval(gts, dts, num_classes, area_ranges, caps):
  """Runs COCOeval.evaluate() and accumulate() on in-memory ground truth and detections, silently.

  Args:
    gts: per image (boxes [G, 4] xyxy, labels [G] 0-based, crowd regions [R, 4] xyxy for every class, crowd
      boxes [F, 4] of one class each, their labels [F]); pycocotools matches a detection to a crowd box by
      intersection over the detection's area and ignores it then.
    dts: per image (boxes [D, 4] xyxy, scores [D], labels [D] 0-based, rank [D] int).
    num_classes: categories 1..num_classes (pycocotools ids = label + 1).
    area_ranges: ((suffix, label, lo, hi), ...), the first one the 'all' band.
    caps: sorted maxDets.

  Returns:
    (the COCOeval, dt_rank [num detections + 1]: rank of each detection annotation id).
  """
  images = [{'id': i + 1} for i in range(len(gts))]
  categories = [{'id': c + 1, 'name': str(c)} for c in range(num_classes)]
  gt_anns = []
  for image_id, (boxes, labels, crowd, crowd_boxes, crowd_labels) in enumerate(gts, start=1):
    for box, label in zip(_xywh(boxes), labels):
      gt_anns.append({'image_id': image_id, 'category_id': int(label) + 1, 'bbox': box,
                      'area': box[2] * box[3], 'iscrowd': 0, 'ignore': 0})
    for box in _xywh(crowd):
      for c in range(num_classes):
        gt_anns.append({'image_id': image_id, 'category_id': c + 1, 'bbox': box, 'area': box[2] * box[3],
                        'iscrowd': 1, 'ignore': 1})
    for box, label in zip(_xywh(crowd_boxes), crowd_labels):
      gt_anns.append({'image_id': image_id, 'category_id': int(label) + 1, 'bbox': box, 'area': box[2] * box[3],
                      'iscrowd': 1, 'ignore': 1})
  dt_anns, ranks = [], [-1]
  for image_id, (boxes, scores, labels, rank) in enumerate(dts, start=1):
    for box, score, label in zip(_xywh(boxes), scores.tolist(), labels):
      dt_anns.append({'image_id': image_id, 'category_id': int(label) + 1, 'bbox': box, 'score': score,
                      'area': box[2] * box[3], 'iscrowd': 0})
    ranks.extend(rank.tolist())
  for ann_id, ann in enumerate(gt_anns, start=1):  # ids start at 1: COCOeval uses 0 for 'unmatched'
    ann['id'] = ann_id
  for ann_id, ann in enumerate(dt_anns, start=1):
    ann['id'] = ann_id

  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    ground_truth = _coco_from(images, categories, gt_anns)
    results = _coco_from(images, categories, dt_anns)
    evaluator = cocoeval.COCOeval(ground_truth, results, iouType='bbox')
    params = evaluator.params
    params.imgIds = [image['id'] for image in images]
    params.catIds = [category['id'] for category in categories]
    params.areaRng = [[lo, hi] for _, _, lo, hi in area_ranges]
    params.areaRngLbl = [label for _, label, _, _ in area_ranges]
    params.maxDets = list(caps)
    evaluator.evaluate()
    evaluator.accumulate()
  logging.debug('pycocotools: %s', log.getvalue().strip())
  return evaluator, np.asarray(ranks, np.int64)


def _coco_from(images, categories, annotations) -> pycoco.COCO:
  dataset = pycoco.COCO()
  dataset.dataset = {'images': images, 'categories': categories, 'annotations': annotations}
  dataset.createIndex()
  return dataset


def _xywh(boxes: np.ndarray) -> list[list[float]]:
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()


def _mean_precision(evaluator, area_index: int, cap_index: int, iou: float | None = None) -> float:
  """Mean of COCOeval's precision [T, R, K, A, M] over valid entries, percent; -1.0 if none."""
  precision = evaluator.eval['precision'][:, :, :, area_index, cap_index]
  if iou is not None:
    precision = precision[np.flatnonzero(np.isclose(evaluator.params.iouThrs, iou))]
  valid = precision[precision > -1]
  return float(100.0 * valid.mean()) if valid.size else -1.0


def _mean_recall(evaluator, area_index: int, cap_index: int) -> float:
  """Mean of COCOeval's recall [T, K, A, M] over valid entries, percent; -1.0 if none."""
  recall = evaluator.eval['recall'][:, :, area_index, cap_index]
  valid = recall[recall > -1]
  return float(100.0 * valid.mean()) if valid.size else -1.0


def _toolkit_inputs(evaluator, dt_rank: np.ndarray) -> list[dict]:
  """Per-class inputs of `visdrone.toolkit_scores` from COCOeval's per-image matches on the 'all' band."""
  params = evaluator.params
  num_images, num_areas = len(params.imgIds), len(params.areaRng)
  num_thresholds = len(params.iouThrs)
  per_class = []
  for k in range(len(params.catIds)):
    scores, tps, ranks, ignored = [], [], [], []
    num_gt = num_images_with_gt = 0
    for i in range(num_images):
      image_eval = evaluator.evalImgs[(k * num_areas) * num_images + i]  # area index 0 = 'all'
      if image_eval is None:
        continue
      # The toolkit counts ignore-flagged ground truths (here: the crowd boxes of this class; no area band
      # applies) in the recall denominator and in the class's image count (calcAccuracy.m: numel(gtMatch),
      # evalClass).
      all_gt = len(image_eval['gtIgnore'])
      num_gt += all_gt
      num_images_with_gt += all_gt > 0
      dt_ignore = np.asarray(image_eval['dtIgnore'], bool).reshape(num_thresholds, -1)
      scores.append(np.asarray(image_eval['dtScores'], np.float64))
      tps.append((np.asarray(image_eval['dtMatches']) > 0) & ~dt_ignore)
      ignored.append(dt_ignore)
      ranks.append(dt_rank[np.asarray(image_eval['dtIds'], np.int64)])
    per_class.append({
        'scores': np.concatenate(scores) if scores else np.zeros((0,)),
        'tp': np.concatenate(tps, axis=1) if tps else np.zeros((num_thresholds, 0), bool),
        'ignored': np.concatenate(ignored, axis=1) if ignored else np.zeros((num_thresholds, 0), bool),
        'rank': np.concatenate(ranks) if ranks else np.zeros((0,), np.int64),
        'num_gt': num_gt,
        'num_images': num_images_with_gt,
    })
  return per_class
