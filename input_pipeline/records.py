"""The in-memory form every dataset reader produces, and the datasets' class lists.

Boxes here are in pixels of the original image, `xyxy`; labels are contiguous 0-based class indices. The
tf.data pipeline turns records into static-shape batches; metrics compare detections against records.
"""

import dataclasses

import numpy as np

# VisDrone-DET object_category 1..10 are targets (label = category - 1); 0 = ignored region, 11 = others.
VISDRONE_CLASSES = ('pedestrian', 'people', 'bicycle', 'car', 'van', 'truck', 'tricycle', 'awning-tricycle',
                    'bus', 'motor')
# SODA-D category_id 1..9 are targets (label = category_id - 1); 10 = ignore.
SODA_D_CLASSES = ('people', 'rider', 'bicycle', 'motor', 'vehicle', 'traffic-sign', 'traffic-light',
                  'traffic-camera', 'warning-cone')


@dataclasses.dataclass
class ImageRecord:
  """One image and its annotations.

  Attributes:
    image_id: position of the image in its split (stable: readers sort by file name).
    name: file stem, e.g. '0000001_02999_d_0000005' (VisDrone result files are named NAME.txt).
    file_name: absolute path of the image file.
    width, height: original image size in pixels.
    boxes: [N, 4] float32 target boxes, xyxy pixels.
    labels: [N] int32 contiguous 0-based class index.
    ignore: [R, 4] float32 ignore regions, xyxy pixels.
    source_id: the image's id in its source annotation file (COCO / SODA-D json `images[].id`), so results
      can be written against the user's own ground truth; -1 when the source has no ids (VisDrone txt).
    ignore_labels: [R] int32, one per ignore region: -1 = a region of every class (the default; VisDrone
      category 0, COCO crowd), c >= 0 = an ignored object of class c only (VisDrone score-0 rows of classes
      1..10, which the toolkit keeps as ignore-flagged ground truth of their class). Only the metrics read it.
  """
  image_id: int
  name: str
  file_name: str
  width: int
  height: int
  boxes: np.ndarray
  labels: np.ndarray
  ignore: np.ndarray
  source_id: int = -1
  ignore_labels: np.ndarray | None = None

  def __post_init__(self):
    self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
    self.labels = np.asarray(self.labels, np.int32).reshape(-1)
    self.ignore = np.asarray(self.ignore, np.float32).reshape(-1, 4)
    if len(self.boxes) != len(self.labels):
      raise ValueError(f'{self.name}: {len(self.boxes)} boxes but {len(self.labels)} labels')
    if self.ignore_labels is None:
      self.ignore_labels = np.full((len(self.ignore),), -1, np.int32)
    self.ignore_labels = np.asarray(self.ignore_labels, np.int32).reshape(-1)
    if len(self.ignore_labels) != len(self.ignore):
      raise ValueError(f'{self.name}: {len(self.ignore)} ignore regions but {len(self.ignore_labels)} ignore_labels')
