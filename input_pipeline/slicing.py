"""SODA-D's sliced protocol: images -> overlapping square patches for training and inference, and patch
detections -> detections on the original images.

Follows the benchmark's tools/img_split/sodad_split.py (SODA-mmdetection) and its merge in
mmdet/datasets/sodad.py (`merge_dets`), re-implemented here:

  * Windows are `patch_size` square (800) and overlap by `overlap` px (150; the script calls it `stepSz`), so
    the stride is 650. Along each axis the starts are 0, 650, 1300, ... while the window ends before the image
    edge, then one last window aligned to the edge (start = length - 800). Images smaller than a patch are
    padded: their single window reaches past the image (the pipeline marks those pixels as padding).
    Windows are listed column by column (x outer, y inner), as the script does.
  * A target box is intersected with each window. If the part inside has no area, the box is not in the patch;
    if it is at most `ignore_inside_fraction` (0.4) of the box's area, the part becomes an ignore region of the
    patch; otherwise the part (clipped to the window) is a target of the patch. Ignore regions of the image are
    clipped to each window they touch.
  * Training (`train=True`): a patch is kept only if some target box touches it with positive area (including
    the <= 40 % parts that become ignore regions, as the script keeps any patch with annotations), and the image
    is first cut to its annotations' extent + 5 px (`min(W, x_max + 5)`, then at least one patch), which moves
    the last window away from empty image borders. Evaluation (`train=False`): every window of every image.
  * Merge (mrqm_jax/ops/postprocess.py `merge_patch_detections`, with the other detection post-processing):
    patch detections, shifted by the patch origin into image pixels, are pooled per image and reduced by
    class-wise greedy NMS at IoU 0.5 (a box is suppressed when its IoU with a kept box of its class is strictly
    greater than the threshold, as mmcv's nms).

Differences from the script, on purpose: the script paints the image's ignore regions (category 10) black in the
training patches and drops them; here they stay ignore regions of the patch (pixels untouched; the losses do not
use ignore regions, the metrics use the original images). The script skips images without any annotation
entirely, even at test time; here evaluation slices every image so each one is scored.

A patch is a `PatchRecord`: an `ImageRecord` whose `width`/`height` are the window's, whose boxes are in window
pixels, and which carries the window's origin in the source image. `image_id` and `file_name` stay those of the
source image (the pipeline decodes only the window; merging groups detections by `image_id`). The batch field
`patch_origin` is (origin_x, origin_y).
"""

import dataclasses
from typing import Sequence

from absl import logging
import numpy as np

from input_pipeline import records as records_lib


@dataclasses.dataclass
class PatchRecord(records_lib.ImageRecord):
  """One window of a source image (see the module docstring).

  Attributes (besides ImageRecord's):
    name: '<source name>_<k>', k = index among the image's kept patches (the script's file naming).
    width, height: the window size (patch_size); it may reach past the source image.
    boxes, ignore: window-pixel xyxy.
    origin_x, origin_y: top-left of the window in the source image.
    image_width, image_height: the source image's size.
  """
  origin_x: int = 0
  origin_y: int = 0
  image_width: int = 0
  image_height: int = 0


def window_starts(length: int, patch_size: int, overlap: int) -> np.ndarray:
  """Start coordinates [K] int of the windows covering [0, length) along one axis (see module docstring)."""
  if not 0 <= overlap < patch_size:
    raise ValueError(f'slicing overlap must be in [0, patch_size={patch_size}), got {overlap}')
  if length <= patch_size:
    return np.zeros([1], np.int64)
  starts = np.arange(0, length - patch_size, patch_size - overlap, dtype=np.int64)
  return np.append(starts, length - patch_size)


def _intersections(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
  """boxes [N, 4], windows [K, 4] xyxy -> clipped parts [K, N, 4] (empty parts have x1 <= x0 or y1 <= y0)."""
  lo = np.maximum(boxes[None, :, :2], windows[:, None, :2])
  hi = np.minimum(boxes[None, :, 2:], windows[:, None, 2:])
  return np.concatenate([lo, hi], axis=-1)


def _area(xyxy: np.ndarray) -> np.ndarray:
  return np.clip(xyxy[..., 2] - xyxy[..., 0], 0, None) * np.clip(xyxy[..., 3] - xyxy[..., 1], 0, None)


def annotation_extent(record: records_lib.ImageRecord) -> tuple[int, int] | None:
  """(x_max, y_max) over targets and ignore regions as the script computes it (int(x) + int(w)); None if none."""
  rows = np.concatenate([record.boxes, record.ignore]).astype(np.float64)
  if not len(rows):
    return None
  x = rows[:, 0].astype(np.int64) + (rows[:, 2] - rows[:, 0]).astype(np.int64)
  y = rows[:, 1].astype(np.int64) + (rows[:, 3] - rows[:, 1]).astype(np.int64)
  return int(x.max()), int(y.max())


def slice_record(record: records_lib.ImageRecord, patch_size: int = 800, overlap: int = 150, *,
                 ignore_inside_fraction: float = 0.4, train: bool) -> list[PatchRecord]:
  """One image -> its patches (see the module docstring for the rules)."""
  if record.width <= 0 or record.height <= 0:
    raise ValueError(f'{record.name}: image size unknown ({record.width}x{record.height}); slicing needs the '
                     'image (annotations-only records cannot be sliced)')
  width, height = record.width, record.height
  if train:
    extent = annotation_extent(record)
    if extent is None or not len(record.boxes):
      return []  # no target can touch any patch: every patch would be dropped
    width, height = min(width, extent[0] + 5), min(height, extent[1] + 5)
  xs = window_starts(max(width, patch_size), patch_size, overlap)
  ys = window_starts(max(height, patch_size), patch_size, overlap)
  origins = np.stack(np.meshgrid(xs, ys, indexing='ij'), axis=-1).reshape(-1, 2)  # x outer, y inner
  windows = np.concatenate([origins, origins + patch_size], axis=1).astype(np.float64)  # [K, 4]

  boxes = record.boxes.astype(np.float64)
  parts = _intersections(boxes, windows)  # [K, N, 4]
  inside = _area(parts)  # [K, N]
  touches = inside > 0
  fraction = inside / np.maximum(_area(boxes), 1e-12)[None, :]
  is_target = touches & (fraction > ignore_inside_fraction)
  becomes_ignore = touches & ~is_target
  region_parts = _intersections(record.ignore.astype(np.float64), windows)  # [K, R, 4]
  region_touches = _area(region_parts) > 0

  patches = []
  for k, (x0, y0) in enumerate(origins):
    if train and not touches[k].any():
      continue
    shift = np.array([x0, y0, x0, y0], np.float64)
    ignore = np.concatenate([region_parts[k][region_touches[k]], parts[k][becomes_ignore[k]]]) - shift
    patches.append(PatchRecord(
        image_id=record.image_id, name=f'{record.name}_{len(patches)}', file_name=record.file_name,
        width=patch_size, height=patch_size, boxes=parts[k][is_target[k]] - shift,
        labels=record.labels[is_target[k]], ignore=ignore, source_id=record.source_id,
        origin_x=int(x0), origin_y=int(y0), image_width=record.width, image_height=record.height))
  return patches


def slice_records(records: Sequence[records_lib.ImageRecord], patch_size: int = 800, overlap: int = 150, *,
                  ignore_inside_fraction: float = 0.4, train: bool) -> list[PatchRecord]:
  """Every record's patches, in record order (see `slice_record`); logs how many images/patches/drops."""
  patches, images_without_patches = [], 0
  for record in records:
    image_patches = slice_record(record, patch_size, overlap, ignore_inside_fraction=ignore_inside_fraction,
                                 train=train)
    images_without_patches += not image_patches
    patches.extend(image_patches)
  logging.info('slicing (%s): %d images -> %d patches of %d px (overlap %d)%s', 'train' if train else 'eval',
               len(records), len(patches), patch_size, overlap,
               f'; {images_without_patches} images without any target give no training patch'
               if train and images_without_patches else '')
  return patches


def slice_records_for_config(config, records: Sequence[records_lib.ImageRecord], *, train: bool
                             ) -> list[PatchRecord]:
  """`slice_records` with `config.dataset.slicing`'s patch_size, overlap and ignore_inside_fraction."""
  s = config.dataset.slicing
  return slice_records(records, s.patch_size, s.overlap, ignore_inside_fraction=s.ignore_inside_fraction,
                       train=train)
