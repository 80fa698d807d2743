"""`Detections`: what a detector reports for one image, in the form every metric consumes."""

from typing import NamedTuple

import numpy as np


class Detections(NamedTuple):
  """One image's detections, in pixels of the original image.

  Attributes:
    boxes: [K, 4] xyxy pixels.
    scores: [K] confidence (higher = more confident).
    labels: [K] int, contiguous 0-based class index (VisDrone category - 1). Labels outside
      [0, num_classes) are allowed (e.g. VisDrone's 'ignored region' 0 / 'others' 11 read from result files):
      the metrics count them, log them and never score them.
  """
  boxes: np.ndarray
  scores: np.ndarray
  labels: np.ndarray


def empty_detections() -> Detections:
  """A `Detections` with K = 0."""
  return Detections(np.zeros((0, 4), np.float64), np.zeros((0,), np.float64), np.zeros((0,), np.int64))


def as_checked_arrays(detections: Detections, where: str) -> Detections:
  """`detections` as float64 / int64 NumPy arrays with checked shapes.

  Args:
    detections: any array-likes (NumPy, JAX, lists) in the `Detections` layout.
    where: what they belong to (e.g. the image name), for error messages.

  Raises:
    ValueError naming `where` for wrong shapes, mismatched lengths, non-finite values or non-integer labels.
  """
  boxes = np.asarray(detections.boxes, np.float64)
  scores = np.asarray(detections.scores, np.float64).reshape(-1)
  raw_labels = np.asarray(detections.labels).reshape(-1)
  if boxes.size == 0:
    boxes = boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f'{where}: detection boxes must be [K, 4] xyxy, got shape {boxes.shape}')
  if not len(boxes) == len(scores) == len(raw_labels):
    raise ValueError(f'{where}: {len(boxes)} boxes, {len(scores)} scores and {len(raw_labels)} labels differ in '
                     'length')
  if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
    raise ValueError(f'{where}: detection boxes/scores contain NaN or inf')
  labels = raw_labels.astype(np.int64)
  if raw_labels.dtype.kind == 'f' and not np.array_equal(labels, raw_labels):
    raise ValueError(f'{where}: detection labels must be integers, got {raw_labels[labels != raw_labels][:3]}')
  return Detections(boxes, scores, labels)
