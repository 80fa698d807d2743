"""The in-memory form every dataset reader produces, and the datasets' class lists.

Boxes here are in pixels of the original image, `xyxy`; labels are contiguous 0-based class indices. The
tf.data pipeline turns records into static-shape batches; metrics compare detections against records.

Also what every dataset reader reports: readers never crash on bad annotations and never drop anything silently:
each problem (corrupt image, malformed line, box clipped to the image, zero-area box...) is counted per kind in a
`ReadReport`, the first messages are kept with their file and line, and `summary()` is printed when training
starts. The readers (visdrone.py, soda_d.py, coco.py) import only this module; readers.py dispatches to them.
"""

import collections
import dataclasses
import os

from absl import logging
import numpy as np
from PIL import Image

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


# Problem kinds and whether the row/image they concern is dropped ('skip') or kept after fixing ('fix').
PROBLEM_KINDS = {
    'missing_image': 'skip',          # annotation file without an image (or a json entry whose file is absent)
    'corrupt_image': 'skip',          # unreadable header, or a JPEG/PNG cut short (truncated)
    'missing_annotation': 'fix',      # image without annotation file: kept with no boxes
    'bad_field_count': 'skip',        # line with the wrong number of comma-separated fields
    'non_numeric': 'skip',            # a field that is not a number
    'negative_size': 'skip',          # width or height < 0
    'unknown_category': 'skip',       # category outside the dataset's list
    'unknown_image': 'skip',          # json annotation whose image_id is not in `images`
    'malformed_entry': 'skip',        # json entry missing a key or with a value of the wrong type
    'size_mismatch': 'fix',           # json width/height differ from the file's header; the header wins
    'clipped': 'fix',                 # box partly outside the image: clipped to it
    'zero_area': 'skip',              # box with no area (after clipping): dropped
}


@dataclasses.dataclass
class ReadReport:
  """Counts and first messages of everything a reader skipped or fixed.

  Attributes:
    source: what was read (folder or json path), for messages.
    num_images: images kept.
    target_rows: annotation rows that are targets (kept or dropped later for a problem).
    ignore_rows: every other annotation row (ignore regions, 'others', score-0 rows, crowd/ignore flags).
    counts: problem kind -> count (see PROBLEM_KINDS).
    dropped_targets: target rows dropped for a problem (so target_rows - dropped_targets = boxes kept).
    messages: the first `max_messages` problem messages, each 'FILE:LINE: kind: detail'.
    notes: remarks about the read as a whole (e.g. 'annotations only: image sizes unknown').
  """
  source: str
  max_messages: int = 20
  num_images: int = 0
  target_rows: int = 0
  ignore_rows: int = 0
  dropped_targets: int = 0
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)

  def add(self, kind: str, where: str, line: int | None, detail: str, *, target: bool = False) -> None:
    """Counts one problem. `where` is a file path, `line` its 1-based line (None for whole-file problems or
    json entries whose position is in `detail`); `target` marks a dropped target row."""
    if kind not in PROBLEM_KINDS:
      raise ValueError(f'unknown problem kind {kind!r}; add it to PROBLEM_KINDS')
    self.counts[kind] += 1
    if target and PROBLEM_KINDS[kind] == 'skip':
      self.dropped_targets += 1
    if len(self.messages) < self.max_messages:
      location = where if line is None else f'{where}:{line}'
      message = f'{location}: {kind}: {detail}'
      self.messages.append(message)
      logging.warning('%s', message)

  def note(self, text: str) -> None:
    self.notes.append(text)
    logging.info('%s: %s', self.source, text)

  @property
  def num_problems(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    """Several lines for the start of training: sizes, then each problem kind with its count."""
    lines = [f'{self.source}: {self.num_images} images, {self.target_rows} target rows, '
             f'{self.ignore_rows} ignore rows']
    lines += [f'  note: {n}' for n in self.notes]
    if not self.counts:
      lines.append('  no problems found')
    for kind, count in sorted(self.counts.items()):
      lines.append(f'  {kind}: {count} ({"dropped" if PROBLEM_KINDS[kind] == "skip" else "kept, fixed"})')
    if self.num_problems > len(self.messages):
      lines.append(f'  (first {len(self.messages)} of {self.num_problems} messages:)')
    lines += [f'  {m}' for m in self.messages]
    return '\n'.join(lines)


class DuplicateNameError(ValueError):
  """Two images of a split would get one record name (same file, or one stem with two extensions)."""


def check_unique_names(sources: list[tuple[str, str]], where: str) -> None:
  """Raises DuplicateNameError when two `(name, source)` pairs share a name.

  Record names key everything downstream (result files NAME.txt, the metrics' image keys, predictions), so two
  images of one name would make the eval fail at the END of training, or silently keep one of them. Raised by
  the readers, before anything compiles: which of the two is meant (or whether the annotations of one image are
  split over two entries) only the user can tell, so it is an error, not a skip.
  """
  seen: dict[str, str] = {}
  clashes = []
  for name, source in sources:
    if name in seen:
      clashes.append(f'{name!r} ({seen[name]} and {source})')
    else:
      seen[name] = source
  if clashes:
    more = f' and {len(clashes) - 1} more' if len(clashes) > 1 else ''
    raise DuplicateNameError(f'{where}: two images share the name {clashes[0]}{more}; result files and metrics '
                             'key images by file name without extension: rename or remove one of each pair')


def clip_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int):
  """Clips a pixel xyxy box to [0, width] x [0, height]; width/height <= 0 means unknown (no clipping).

  Returns:
    (clipped box tuple, whether it changed).
  """
  if width <= 0 or height <= 0:
    return (x0, y0, x1, y1), False
  clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
             min(max(x1, 0.0), width), min(max(y1, 0.0), height))
  return clipped, clipped != (x0, y0, x1, y1)


# The bytes a complete file of each format ends with (JPEG's end-of-image marker, PNG's IEND chunk type).
END_MARKERS = {'JPEG': b'\xff\xd9', 'PNG': b'IEND'}


def _tail_has(path: str, marker: bytes, tail_bytes: int = 4096) -> bool:
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - tail_bytes))
    return marker in f.read()


def image_size(path: str, report: ReadReport) -> tuple[int, int] | None:
  """(width, height) from the image header; None, counted in `report`, if missing or unreadable.

  A JPEG must also end with its end-of-image marker, a PNG with its IEND chunk: a truncated download has a
  valid header but would fail in tf.io.decode_* mid-training (or give a blank prediction). Only the file's tail
  is read; a file without the marker in its tail (a JPEG with metadata appended after it) is then fully decoded
  once to tell it from a truncated one.
  """
  if not os.path.isfile(path):
    report.add('missing_image', path, None, 'image file not found')
    return None
  try:
    with Image.open(path) as image:
      width, height = image.size
      if image.format in END_MARKERS and not _tail_has(path, END_MARKERS[image.format]):
        image.load()   # raises OSError if the data really is truncated
  except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
    report.add('corrupt_image', path, None, f'cannot read the image ({type(e).__name__}: {e})')
    return None
  return width, height
