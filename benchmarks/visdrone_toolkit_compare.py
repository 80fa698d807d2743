r"""Our 'visdrone' metrics vs the VisDrone-DET toolkit's Python port, on real annotations and synthetic detections.

  python benchmarks/visdrone_toolkit_compare.py --toolkit=/tmp/visdrone-det-toolkit-python \
      [--dataset=../shared/data/visdrone/val_dev] [--seed=0]

`--toolkit` is a checkout of github.com/tjiiv-cprg/visdrone-det-toolkit-python (not part of this project; it is
imported from there, never copied). Detections are jittered ground truth, made with a fixed seed: boxes
jittered, some dropped, some relabelled, duplicates and random false positives (some inside ignored regions,
some on 'others' objects, which are false positives on both sides), written as toolkit result files. Both sides
read the same files; the table prints our toolkit_* numbers next to the port's and their difference, then our
COCO-style headline (the paper's columns; the port has no equivalent).
Known, intended differences (see mrqm_jax/metrics/visdrone.py): the ignored-region test is exact geometry here
and pixel-rounded there; the VisDrone reader clips boxes to the image. (The port also matches ignore-flagged
score-0 ground truth against the wrong boxes, eval_res's iof_dtig; val_dev has no such rows.)
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline import visdrone as visdrone_reader  # noqa: E402
from mrqm_jax.metrics import coco as metrics  # noqa: E402
from mrqm_jax.metrics import visdrone  # noqa: E402
from mrqm_jax.metrics.detections import Detections  # noqa: E402

TOOLKIT_KEYS = ('AP', 'AP50', 'AP75', 'AR1', 'AR10', 'AR100', 'AR500')
HEADLINE_KEYS = ('AP', 'AP50', 'AP75', 'AP_S', 'AP_M', 'AP_L')


def others_boxes(dataset: str, name: str) -> np.ndarray:
  """[K, 4] xyxy of the image's 'others' (category 11) rows, read from the raw annotation file."""
  rows = np.loadtxt(os.path.join(dataset, 'annotations', name + '.txt'), delimiter=',', ndmin=2, usecols=range(8))
  rows = rows.reshape(-1, 8)
  rows = rows[rows[:, 5] == visdrone_reader.OTHERS]
  return np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1)


def synthetic_detections(record, rng: np.random.Generator, num_classes: int, others=()) -> Detections:
  """Detections for one image made from its ground truth: a plausible, imperfect detector."""
  boxes, scores, labels = [], [], []
  for box in others:  # an 'others' object detected as some class: a false positive for the toolkit
    boxes.append(np.asarray(box) + rng.normal(0.0, 0.5, 4))
    scores.append(float(rng.random()))
    labels.append(rng.integers(num_classes))
  wh = record.boxes[:, 2:] - record.boxes[:, :2]
  for box, size, label in zip(record.boxes, wh, record.labels):
    if rng.random() < 0.15:  # missed
      continue
    noise = rng.normal(0.0, 0.06, 4) * np.concatenate([size, size])
    quality = np.exp(-np.abs(noise / np.maximum(np.concatenate([size, size]), 1.0)).sum())
    boxes.append(box + noise)
    scores.append(float(np.clip(0.6 * quality + 0.4 * rng.random(), 0.0, 1.0)))
    labels.append(label if rng.random() > 0.07 else rng.integers(num_classes))
    if rng.random() < 0.05:  # duplicate, lower score
      boxes.append(box + rng.normal(0.0, 0.2, 4) * np.concatenate([size, size]))
      scores.append(scores[-1] * 0.5)
      labels.append(label)
  width, height = max(record.width, 100), max(record.height, 100)
  for _ in range(rng.integers(20, 120)):  # background false positives
    w, h = rng.uniform(4, 80, 2)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    boxes.append((x, y, x + w, y + h))
    scores.append(float(rng.random() * 0.6))
    labels.append(rng.integers(num_classes))
  for region in record.ignore:  # false positives inside ignored regions (dropped by both sides)
    x0, y0, x1, y1 = region
    if x1 - x0 > 4 and y1 - y0 > 4:
      boxes.append((x0 + 1, y0 + 1, x1 - 1, y1 - 1))
      scores.append(float(rng.random()))
      labels.append(rng.integers(num_classes))
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)
  return Detections(boxes, np.asarray(scores), np.asarray(labels, np.int64))


def toolkit_numbers(toolkit_dir: str, dataset: str, results: str, names: list[str]) -> dict[str, float]:
  """Runs the port's eval_det on raw annotation files and our result files, like its evaluate.py."""
  sys.path.insert(0, toolkit_dir)
  if not hasattr(np, 'int'):  # the port uses np.int, removed in NumPy 1.24
    np.int = int
  from viseval.eval_det import eval_det  # pylint: disable=g-import-not-at-top

  def load(path, dtype):
    label = np.loadtxt(path, delimiter=',', dtype=dtype, ndmin=2, usecols=range(8))
    return label if len(label) else label.reshape(0, 8)

  all_gt, all_det, heights, widths = [], [], [], []
  for name in names:
    with Image.open(os.path.join(dataset, 'images', name + '.jpg')) as image:
      width, height = image.size
    heights.append(height)
    widths.append(width)
    all_gt.append(load(os.path.join(dataset, 'annotations', name + '.txt'), np.int32))
    all_det.append(load(os.path.join(results, name + '.txt'), np.float32))
  with contextlib.redirect_stdout(io.StringIO()):
    values = eval_det(all_gt, all_det, heights, widths)
  return dict(zip(TOOLKIT_KEYS, (float(v) for v in values)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--toolkit', required=True, help='checkout of tjiiv-cprg/visdrone-det-toolkit-python')
  parser.add_argument('--dataset', default=os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                                                        'visdrone', 'val_dev'))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  if not os.path.isdir(os.path.join(args.toolkit, 'viseval')):
    sys.exit(f'error: --toolkit={args.toolkit!r} has no viseval/ package')
  if not os.path.isdir(os.path.join(args.dataset, 'annotations')):
    sys.exit(f'error: --dataset={args.dataset!r} has no annotations/ folder')

  records, _ = visdrone_reader.read_split(args.dataset)
  rng = np.random.default_rng(args.seed)
  detections = {r.name: synthetic_detections(r, rng, 10, others_boxes(args.dataset, r.name)) for r in records}
  with tempfile.TemporaryDirectory() as results:
    for name, dets in detections.items():
      visdrone.write_result_file(os.path.join(results, name + '.txt'), dets)
    start = time.perf_counter()
    ours = metrics.evaluate_detections('visdrone', records, visdrone.read_result_dir(results), num_classes=10)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = toolkit_numbers(args.toolkit, args.dataset, results, [r.name for r in records])
    theirs_seconds = time.perf_counter() - start

  num_dets = sum(len(d.scores) for d in detections.values())
  num_others = sum(len(others_boxes(args.dataset, r.name)) for r in records)
  print(f'{len(records)} images, {sum(len(r.labels) for r in records)} boxes, {num_others} others, '
        f'{num_dets} detections (jittered ground truth, seed {args.seed})')
  print(f'{"metric":<14} {"ours":>8} {"toolkit":>8} {"diff":>7}')
  for key in TOOLKIT_KEYS:
    ours_value = ours[metrics.TOOLKIT_PREFIX + key]
    print(f'{metrics.TOOLKIT_PREFIX + key:<14} {ours_value:8.3f} {theirs[key]:8.3f} {ours_value - theirs[key]:+7.3f}')
  for key in HEADLINE_KEYS:
    print(f'{key:<14} {ours[key]:8.3f} {"-":>8} {"":>7}  (COCO-style headline)')
  print(f'{"seconds":<14} {ours_seconds:8.2f} {theirs_seconds:8.2f}')
  worst = max(abs(ours[metrics.TOOLKIT_PREFIX + k] - theirs[k]) for k in TOOLKIT_KEYS)
  print(f'largest toolkit difference: {worst:.3f} points')

if __name__ == '__main__':
  main()
