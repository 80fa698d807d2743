"""The parts of the official VisDrone-DET toolkit that pycocotools does not have, and its result-file format.

Official toolkit: github.com/VisDrone/VisDrone2018-DET-toolkit (MATLAB: evalDET.m, utils/dropObjectsInIgr.m,
utils/evalRes.m, utils/calcAccuracy.m, utils/VOCap.m) and its Python port tjiiv-cprg/visdrone-det-toolkit-python.
What it does differently from COCO, all reproduced here (see `toolkit_scores`):
  1. ground truths and detections whose box is >= 50% covered by ignored regions are removed first;
  2. `maxDets` keeps the first N detections of an image over ALL classes (COCO: N per class);
  3. AP is the area under the monotone precision envelope at every recall step (VOC 2010 all-point),
     not COCO's 101-point sampling; AR@N is the recall reached with N detections per image;
  4. the class average is weighted by the number of images that contain the class: `evalClass` gets one entry
     per (class, image containing it), and `mean2(AP(evalClass, :))` repeats rows accordingly. Classes without
     ground truth are left out.
The matching itself (greedy by score, best IoU >= threshold among unmatched ground truths) is COCO's, which
`coco.py` runs with pycocotools.

Result files (one NAME.txt per image): `x,y,w,h,score,category,truncation,occlusion` with 1-based category
(1..10 targets); detectors write -1 for the last two fields.
"""

import math
import os

import numpy as np

from mrqm_jax.metrics import detections as detections_lib

# The toolkit's recall caps; AP uses the last.
MAX_DETS = (1, 10, 100, 500)
IGNORE_COVERAGE_DROP = 0.5
# Relative slack on the coverage test, so a box exactly half inside an ignored region is dropped despite
# float rounding in the interpolated integral (the toolkit compares integer pixel counts).
_COVERAGE_RTOL = 1e-9


class ResultFileError(ValueError):
  """A malformed line in a VisDrone result file; the message is 'FILE:LINE: problem: line'."""


def covered_fraction(boxes: np.ndarray, regions: np.ndarray, width: int = 0, height: int = 0) -> np.ndarray:
  """Fraction of each box's area covered by the union of `regions` (overlapping regions count once).

  Exact for any real coordinates: the union is rasterized on the grid of the regions' own edges, and the
  integral of the coverage over a box is interpolated bilinearly inside a grid cell, which is exact because
  coverage is constant there. (The toolkit rasterizes on the pixel grid after rounding boxes, with regions one
  pixel wider at their top-left; both agree up to that pixel.)

  Args:
    boxes: [N, 4] xyxy.
    regions: [R, 4] xyxy ignored regions.
    width, height: image size; regions are clipped to it when both are > 0 (as the toolkit's ignore map is).

  Returns:
    [N] float64 in [0, 1]; 0 for boxes with no area.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  regions = np.asarray(regions, np.float64).reshape(-1, 4)
  if width > 0 and height > 0:
    regions = np.clip(regions, 0.0, [width, height, width, height])
  regions = regions[(regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1])]
  fraction = np.zeros(len(boxes))
  if not len(boxes) or not len(regions):
    return fraction
  xs = np.unique(regions[:, [0, 2]])
  ys = np.unique(regions[:, [1, 3]])
  covered = np.zeros((len(ys) - 1, len(xs) - 1), bool)
  for x0, y0, x1, y1 in regions:
    covered[np.searchsorted(ys, y0):np.searchsorted(ys, y1), np.searchsorted(xs, x0):np.searchsorted(xs, x1)] = True
  dx, dy = np.diff(xs), np.diff(ys)
  # integral[j, i] = covered area of [xs[0], xs[i]] x [ys[0], ys[j]].
  integral = np.zeros((len(ys), len(xs)))
  integral[1:, 1:] = np.cumsum(np.cumsum(covered * dy[:, None] * dx[None, :], axis=0), axis=1)

  def integral_at(x, y):
    x = np.clip(x, xs[0], xs[-1])
    y = np.clip(y, ys[0], ys[-1])
    i = np.clip(np.searchsorted(xs, x, side='right') - 1, 0, len(xs) - 2)
    j = np.clip(np.searchsorted(ys, y, side='right') - 1, 0, len(ys) - 2)
    tx = (x - xs[i]) / dx[i]
    ty = (y - ys[j]) / dy[j]
    return ((1 - tx) * (1 - ty) * integral[j, i] + tx * (1 - ty) * integral[j, i + 1]
            + (1 - tx) * ty * integral[j + 1, i] + tx * ty * integral[j + 1, i + 1])

  x0, y0, x1, y1 = boxes.T
  inside = integral_at(x1, y1) - integral_at(x0, y1) - integral_at(x1, y0) + integral_at(x0, y0)
  area = np.maximum(x1 - x0, 0.0) * np.maximum(y1 - y0, 0.0)
  np.divide(inside, area, out=fraction, where=area > 0)
  return np.clip(fraction, 0.0, 1.0)


def outside_ignored(boxes: np.ndarray, regions: np.ndarray, width: int = 0, height: int = 0) -> np.ndarray:
  """[N] bool: True for boxes the toolkit keeps (less than 50% of their area inside ignored regions)."""
  fraction = covered_fraction(boxes, regions, width, height)
  return fraction < IGNORE_COVERAGE_DROP * (1.0 - _COVERAGE_RTOL)


def voc_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
  """Area under the monotone precision envelope (the toolkit's VOCap.m, VOC 2010 all-point).

  Args:
    recall: [D] non-decreasing recall after each detection (score order).
    precision: [D] precision after each detection.

  Returns:
    AP in [0, 1]; 0 when D = 0.
  """
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
  return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def toolkit_scores(per_class: list[dict], max_dets: tuple[int, ...]) -> dict[str, float]:
  """The toolkit's AP/AR (calcAccuracy.m) from per-class matching results.

  Args:
    per_class: one dict per class with
      'scores' [D] float: every scored detection of the class (all images, at most max_dets[-1] per image),
      'tp' [T, D] bool: matched to a ground truth at IoU threshold t (T = 10: .50:.05:.95),
      'ignored' [T, D] bool (optional): matched to an ignore-flagged ground truth at t, so neither a true nor a
        false positive (evalRes.m match -1),
      'rank' [D] int: the detection's position in its image's score order over all classes (0 = best),
      'num_gt' int: ground truths of the class (after the ignored-region drop), ignore-flagged ones included,
      'num_images' int: images with at least one such ground truth (the class's weight).
    max_dets: recall caps; AP uses detections of every rank (callers cut at max_dets[-1]).

  Returns:
    'AP', 'AP50', 'AP75', 'AR{n}' for n in max_dets, in percent; -1.0 each when no class has ground truth.
  """
  weights = np.array([c['num_images'] for c in per_class], np.float64)
  num_thresholds = 10
  ap = np.zeros((len(per_class), num_thresholds))
  ar = np.zeros((len(per_class), num_thresholds, len(max_dets)))
  for k, c in enumerate(per_class):
    order = np.argsort(-c['scores'], kind='mergesort')  # MATLAB's sort is stable too
    tp = c['tp'][:, order]
    ignored = c.get('ignored', np.zeros_like(c['tp']))[:, order]
    in_cap = c['rank'][order][None, :] < np.asarray(max_dets)[:, None]      # [M, D]
    gt_count = max(1, c['num_gt'])
    for t in range(num_thresholds):
      tp_cum = np.cumsum(tp[t])
      fp_cum = np.cumsum(~tp[t] & ~ignored[t])
      recall = tp_cum / gt_count
      precision = tp_cum / np.maximum(1, tp_cum + fp_cum)
      ap[k, t] = voc_average_precision(recall, precision)
      ar[k, t] = (tp[t][None, :] & in_cap).sum(axis=1) / gt_count
  if weights.sum() == 0:
    return {**{k: -1.0 for k in ('AP', 'AP50', 'AP75')}, **{f'AR{n}': -1.0 for n in max_dets}}

  def weighted(values):  # values [K] -> percent, weighted by images per class
    return float(100.0 * np.sum(weights * values) / weights.sum())

  scores = {'AP': weighted(ap.mean(axis=1)), 'AP50': weighted(ap[:, 0]), 'AP75': weighted(ap[:, 5])}
  for m, n in enumerate(max_dets):
    scores[f'AR{n}'] = weighted(ar[:, :, m].mean(axis=1))
  return scores


# ----------------------------------------------------------------------------------------------- result files


def parse_result_text(text: str, path: str) -> detections_lib.Detections:
  """Parses one result file's text (`x,y,w,h,score,category[,truncation,occlusion]` per line).

  Blank lines are skipped; a trailing comma is allowed. Labels are category - 1 (so the toolkit's 'ignored
  region' 0 and 'others' 11 become -1 and 10, which the metrics count but never score).

  Raises:
    ResultFileError 'PATH:LINE: ...' for a wrong field count, a non-numeric or non-finite field, a negative
    width/height or a non-integer category.
  """
  boxes, scores, labels = [], [], []
  for line_no, raw in enumerate(text.splitlines(), start=1):
    line = raw.strip()
    if not line:
      continue
    fields = [f.strip() for f in line.split(',')]
    if fields[-1] == '':
      fields.pop()
    if not 6 <= len(fields) <= 8:
      raise ResultFileError(f'{path}:{line_no}: {len(fields)} fields, expected 8 '
                            f'(x,y,w,h,score,category,-1,-1): {line!r}')
    try:
      values = [float(f) for f in fields]
    except ValueError:
      bad = next(f for f in fields if not _is_number(f))
      raise ResultFileError(f'{path}:{line_no}: field {fields.index(bad) + 1} {bad!r} is not a number: '
                            f'{line!r}') from None
    if not all(math.isfinite(v) for v in values):
      raise ResultFileError(f'{path}:{line_no}: a field is NaN or infinite: {line!r}')
    x, y, w, h, score, category = values[:6]
    if w < 0 or h < 0:
      raise ResultFileError(f'{path}:{line_no}: negative width/height {fields[2]},{fields[3]}: {line!r}')
    if category != int(category):
      raise ResultFileError(f'{path}:{line_no}: category {fields[5]!r} is not an integer: {line!r}')
    if abs(category) >= 2 ** 31:   # the labels are int64 arrays; such a category can be no class
      raise ResultFileError(f'{path}:{line_no}: category {fields[5]!r} is out of range: {line!r}')
    if not (math.isfinite(x + w) and math.isfinite(y + h)):
      raise ResultFileError(f'{path}:{line_no}: x + w or y + h is too large to represent: {line!r}')
    boxes.append((x, y, x + w, y + h))
    scores.append(score)
    labels.append(int(category) - 1)
  return detections_lib.Detections(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64),
                                   np.asarray(labels, np.int64))


def _is_number(field: str) -> bool:
  try:
    float(field)
  except ValueError:
    return False
  return True


def read_result_file(path: str) -> detections_lib.Detections:
  """Reads one NAME.txt result file; raises ResultFileError (malformed line) or OSError (unreadable)."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ResultFileError(f'{path}: not a text file ({e})') from None
  return parse_result_text(text, path)


def read_result_dir(folder: str) -> dict[str, detections_lib.Detections]:
  """Reads every *.txt in `folder`: {file stem: Detections}.

  Raises:
    FileNotFoundError if `folder` is not a directory; ResultFileError / OSError for a bad file.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'results folder not found: {folder}')
  results = {}
  for entry in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(entry)
    path = os.path.join(folder, entry)
    if ext.lower() == '.txt' and os.path.isfile(path):
      results[stem] = read_result_file(path)
  return results


def format_result_lines(detections: detections_lib.Detections) -> list[str]:
  """Result-file lines, highest score first (the toolkit's maxDets keeps the FIRST lines of a file)."""
  boxes, scores, labels = detections_lib.as_checked_arrays(detections, 'detections')
  lines = []
  for i in np.argsort(-scores, kind='mergesort'):
    x0, y0, x1, y1 = boxes[i]
    lines.append(f'{x0:.3f},{y0:.3f},{x1 - x0:.3f},{y1 - y0:.3f},{scores[i]:.6f},{labels[i] + 1},-1,-1')
  return lines


def write_result_file(path: str, detections: detections_lib.Detections) -> None:
  """Writes one image's detections as a toolkit result file (see `format_result_lines`)."""
  lines = format_result_lines(detections)
  with open(path, 'w') as f:
    f.write(''.join(line + '\n' for line in lines))
