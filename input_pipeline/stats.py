r"""Dataset statistics: boxes per class and size band, boxes per image, smallest box, ignore rows.

  python -m input_pipeline.stats --format=visdrone --root=DIR [--split=val] [--annotations_only=auto|yes|no]
  python -m input_pipeline.stats --format=soda_d --root=DIR --split=train

Prints a table, then, as the LAST line, one JSON object (see `dataset_stats`). A VisDrone folder with no
`images/` (e.g. only the annotation .txt files) is read annotations-only: image sizes are unknown, so boxes are
not clipped to the image; the output says so. `dataset_stats` is also what training uses for `iah.a_s='auto'`
(the smallest training instance area, paper eq. 8).
"""

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from input_pipeline import coco
from input_pipeline import records as records_lib
from input_pipeline import soda_d
from input_pipeline import visdrone

# Area bands in px^2 of the original image, upper bounds inclusive, as the two benchmarks' evaluators use them.
VISDRONE_BANDS = (('S', 0, 32 ** 2), ('M', 32 ** 2, 96 ** 2), ('L', 96 ** 2, np.inf))
SODA_BANDS = (('eS', 0, 12 ** 2), ('rS', 12 ** 2, 20 ** 2), ('gS', 20 ** 2, 32 ** 2), ('N', 32 ** 2, 40 * 50),
              ('over_N', 40 * 50, np.inf))   # SODA-D evaluates no band above 2000 px^2
BANDS = VISDRONE_BANDS + SODA_BANDS


def _band_counts(areas: np.ndarray) -> dict[str, int]:
  return {name: int(np.count_nonzero((areas > low) & (areas <= high))) for name, low, high in BANDS}


def dataset_stats(records: Sequence[records_lib.ImageRecord], class_names: Sequence[str] | None = None,
                  report: records_lib.ReadReport | None = None) -> dict:
  """Statistics of a list of records (what a reader returned).

  Args:
    records: images with their kept boxes (xyxy pixels) and ignore regions.
    class_names: names for labels 0..K-1 (labels beyond get 'label_K'); default: 'label_K' for each.
    report: the reader's report. With it, `boxes` and `ignored` count annotation rows as the dataset defines
      them (targets, and every other row), including rows the reader then dropped (e.g. zero-area); without it
      they count what the records hold.

  Returns:
    dict with
      images, images_without_boxes,
      boxes (target rows), valid_boxes (kept in records), dropped_boxes (boxes - valid_boxes),
      ignored (non-target rows), ignore_regions (kept),
      max_boxes_per_image, densest_image, mean_boxes_per_image, median_boxes_per_image, p95_boxes_per_image,
      min_area (px^2 over valid boxes; None if no box), min_area_image, median_area, min_side,
      per_class {name: valid boxes}, size_bands {band: valid boxes} for VisDrone S/M/L and SODA eS/rS/gS/N/over_N,
      per_class_size_bands {name: {band: count}}, image_sizes_known (False for annotations-only reads).
  """
  counts = np.array([len(r.boxes) for r in records], np.int64)
  boxes = np.concatenate([r.boxes for r in records]) if records else np.zeros((0, 4), np.float32)
  labels = np.concatenate([r.labels for r in records]) if records else np.zeros((0,), np.int32)
  owner = np.repeat(np.arange(len(records)), counts)
  boxes = boxes.astype(np.float64)
  widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  areas = widths * heights
  valid = int(len(boxes))
  num_ignore = int(sum(len(r.ignore) for r in records))

  num_classes = max(len(class_names or ()), int(labels.max()) + 1 if valid else 0)
  names = [class_names[k] if class_names is not None and k < len(class_names) else f'label_{k}'
           for k in range(num_classes)]
  per_class = {names[k]: int(np.count_nonzero(labels == k)) for k in range(num_classes)}
  per_class_bands = {names[k]: _band_counts(areas[labels == k]) for k in range(num_classes)}

  target_rows = report.target_rows if report is not None else valid
  densest = int(np.argmax(counts)) if len(records) else -1
  smallest = int(np.argmin(areas)) if valid else -1
  return {
      'images': len(records),
      'images_without_boxes': int(np.count_nonzero(counts == 0)),
      'boxes': int(target_rows),
      'valid_boxes': valid,
      'dropped_boxes': int(target_rows - valid),
      'ignored': int(report.ignore_rows if report is not None else num_ignore),
      'ignore_regions': num_ignore,
      'max_boxes_per_image': int(counts.max()) if len(records) else 0,
      'densest_image': records[densest].name if len(records) else None,
      'mean_boxes_per_image': float(counts.mean()) if len(records) else 0.0,
      'median_boxes_per_image': float(np.median(counts)) if len(records) else 0.0,
      'p95_boxes_per_image': float(np.percentile(counts, 95)) if len(records) else 0.0,
      'min_area': float(areas[smallest]) if valid else None,
      'min_area_image': records[owner[smallest]].name if valid else None,
      'median_area': float(np.median(areas)) if valid else None,
      'min_side': float(np.minimum(widths, heights).min()) if valid else None,
      'per_class': per_class,
      'size_bands': _band_counts(areas),
      'per_class_size_bands': per_class_bands,
      'image_sizes_known': bool(all(r.width > 0 and r.height > 0 for r in records)),
  }


def format_table(stats: dict) -> str:
  """The human-readable part of the CLI output."""
  band_names = [name for name, _, _ in BANDS]
  lines = [f'{"class":<18}{"boxes":>9}{"%":>7}' + ''.join(f'{b:>8}' for b in band_names)]
  total = max(stats['valid_boxes'], 1)
  for name, count in stats['per_class'].items():
    bands = stats['per_class_size_bands'][name]
    lines.append(f'{name:<18}{count:>9}{100 * count / total:>7.1f}' + ''.join(f'{bands[b]:>8}' for b in band_names))
  lines.append(f'{"all":<18}{stats["valid_boxes"]:>9}{100.0 if stats["valid_boxes"] else 0.0:>7.1f}'
               + ''.join(f'{stats["size_bands"][b]:>8}' for b in band_names))
  lines.append('bands (area px^2): VisDrone S (0,32^2] M (32^2,96^2] L >96^2; '
               'SODA-D eS (0,144] rS (144,400] gS (400,1024] N (1024,2000] over_N >2000')
  lines.append(f'images {stats["images"]} ({stats["images_without_boxes"]} without boxes); target rows '
               f'{stats["boxes"]} ({stats["valid_boxes"]} valid, {stats["dropped_boxes"]} dropped); '
               f'ignore rows {stats["ignored"]} ({stats["ignore_regions"]} regions kept)')
  lines.append(f'boxes per image: max {stats["max_boxes_per_image"]} ({stats["densest_image"]}), mean '
               f'{stats["mean_boxes_per_image"]:.1f}, median {stats["median_boxes_per_image"]:g}, '
               f'p95 {stats["p95_boxes_per_image"]:g}')
  if stats['min_area'] is not None:
    lines.append(f'smallest box: area {stats["min_area"]:g} px^2 ({stats["min_area_image"]}); min side '
                 f'{stats["min_side"]:g} px; median area {stats["median_area"]:g} px^2')
  if not stats['image_sizes_known']:
    lines.append('image sizes unknown (annotations only): boxes were not clipped to their images')
  return '\n'.join(lines)


def read_for_stats(fmt: str, root: str, split: str | None, annotations_only: bool | None):
  """(records, report, class names) for the CLI; annotations_only None = automatic (VisDrone: no images/)."""
  if fmt == 'visdrone':
    records, report = visdrone.read_split(root, split or None, annotations_only=annotations_only)
    return records, report, records_lib.VISDRONE_CLASSES
  if not split:
    raise ValueError(f'--split is required for --format={fmt} (one json per split)')
  check_images = not annotations_only
  if fmt == 'soda_d':
    records, report = soda_d.read_split(root, split, check_images=check_images)
    return records, report, records_lib.SODA_D_CLASSES
  if fmt == 'coco':
    records, report, class_names, _ = coco.read_split(root, split, check_images=check_images)
    return records, report, class_names
  raise ValueError(f"--format={fmt!r} is not one of visdrone, soda_d, coco")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m input_pipeline.stats', description=__doc__.split('\n\n')[0])
  parser.add_argument('--format', required=True, choices=('visdrone', 'soda_d', 'coco'))
  parser.add_argument('--root', required=True, help='dataset folder')
  parser.add_argument('--split', default='', help='split name (required for soda_d/coco)')
  parser.add_argument('--annotations_only', default='auto', choices=('auto', 'yes', 'no'),
                      help='do not read images (sizes unknown, no clipping); auto: when VisDrone images/ is absent')
  args = parser.parse_args(argv)
  annotations_only = {'auto': None, 'yes': True, 'no': False}[args.annotations_only]
  try:
    records, report, class_names = read_for_stats(args.format, args.root, args.split, annotations_only)
  except (FileNotFoundError, ValueError) as e:
    print(f'stats: error: {e}', file=sys.stderr)
    return 2
  stats = dataset_stats(records, class_names, report)
  print(report.summary())
  print(format_table(stats))
  print(json_line(stats))
  return 0


def json_line(stats: dict) -> str:
  """`stats` as one strict JSON object: a non-finite number (which json.dumps would print as NaN / Infinity,
  which JSON parsers reject) becomes null."""
  def clean(value):
    if isinstance(value, dict):
      return {k: clean(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
      return None
    return value
  return json.dumps(clean(stats), allow_nan=False)


if __name__ == '__main__':
  sys.exit(main())
