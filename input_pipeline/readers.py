"""What every dataset reader reports, and `read_dataset`, which picks the reader named by the config.

Readers never crash on bad annotations and never drop anything silently: each problem (corrupt image, malformed
line, box clipped to the image, zero-area box...) is counted per kind in a `ReadReport`, the first messages are
kept with their file and line, and `summary()` is printed when training starts.
"""

import collections
import dataclasses
import os
from typing import Any, Sequence

from absl import logging
from PIL import Image

from input_pipeline import records as records_lib

# Problem kinds and whether the row/image they concern is dropped ('skip') or kept after fixing ('fix').
PROBLEM_KINDS = {
    'missing_image': 'skip',          # annotation file without an image (or a json entry whose file is absent)
    'corrupt_image': 'skip',          # unreadable header, or a JPEG without its end marker (truncated)
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


def _jpeg_tail_has_end_marker(path: str, tail_bytes: int = 4096) -> bool:
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - tail_bytes))
    return b'\xff\xd9' in f.read()


def image_size(path: str, report: ReadReport) -> tuple[int, int] | None:
  """(width, height) from the image header; None, counted in `report`, if missing or unreadable.

  A JPEG must also end with its end-of-image marker: a truncated download has a valid header but would fail
  in tf.io.decode_jpeg mid-training. Only the file's tail is read; the rare JPEG with extra data after the
  marker (some cameras append metadata) is then fully decoded once to tell it from a truncated one.
  """
  if not os.path.isfile(path):
    report.add('missing_image', path, None, 'image file not found')
    return None
  try:
    with Image.open(path) as image:
      width, height = image.size
      if image.format == 'JPEG' and not _jpeg_tail_has_end_marker(path):
        image.load()   # raises OSError if the data really is truncated
  except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
    report.add('corrupt_image', path, None, f'cannot read the image ({type(e).__name__}: {e})')
    return None
  return width, height


def read_dataset(config_dataset: Any, split: str
                 ) -> tuple[list[records_lib.ImageRecord], ReadReport, Sequence[str]]:
  """Reads `split` of the dataset that `config.dataset` describes.

  Args:
    config_dataset: `config.dataset` (format, root, num_classes).
    split: e.g. config.dataset.train_split.

  Returns:
    (records sorted by name with image_id = position, the report, class names (len == num_classes)).

  Raises:
    FileNotFoundError naming the folder/file that is missing; ValueError for an unknown format or a class
    count that differs from config.dataset.num_classes.
  """
  fmt, root = config_dataset.format, config_dataset.root
  if not root:
    raise FileNotFoundError('config.dataset.root is empty: set it to the dataset folder')
  if not os.path.isdir(root):
    raise FileNotFoundError(f'dataset folder not found: config.dataset.root={root!r}')
  if fmt == 'visdrone':
    from input_pipeline import visdrone  # pylint: disable=g-import-not-at-top
    records, report = visdrone.read_split(root, split)
    class_names = records_lib.VISDRONE_CLASSES
  elif fmt == 'soda_d':
    from input_pipeline import soda_d  # pylint: disable=g-import-not-at-top
    records, report = soda_d.read_split(root, split)
    class_names = records_lib.SODA_D_CLASSES
  elif fmt == 'coco':
    from input_pipeline import coco  # pylint: disable=g-import-not-at-top
    records, report, class_names, _ = coco.read_split(root, split)
  else:
    raise ValueError(f"config.dataset.format={fmt!r} is not one of 'visdrone', 'soda_d', 'coco'")
  if len(class_names) != config_dataset.num_classes:
    raise ValueError(f'config.dataset.num_classes={config_dataset.num_classes} but the {fmt} dataset at '
                     f'{root!r} has {len(class_names)} classes: {", ".join(class_names)}')
  return records, report, tuple(class_names)


def split_source(config_dataset: Any, split: str) -> str | None:
  """The folder or file `split` is read from (None when it cannot be found; read_dataset then names it)."""
  root = config_dataset.root
  try:
    if config_dataset.format == 'visdrone':
      from input_pipeline import visdrone  # pylint: disable=g-import-not-at-top
      return os.path.realpath(visdrone.resolve_split_dir(root, split))
    if config_dataset.format in ('coco', 'soda_d'):
      from input_pipeline import coco  # pylint: disable=g-import-not-at-top
      candidates = ([f'Annotations/{split}.json'] if config_dataset.format == 'soda_d' else
                    [f'annotations/instances_{split}.json']) + [f'annotations/{split}.json', f'{split}.json']
      return os.path.realpath(coco.first_existing_file(root, split, candidates))
  except FileNotFoundError:
    return None
  return None


def check_distinct_splits(config_dataset: Any) -> None:
  """ValueError when train_split and eval_split are different names that resolve to the same data.

  A VisDrone root that directly holds images/ + annotations/ answers every split name, so evaluation would
  silently run on the training images. Setting eval_split equal to train_split says it is meant.
  """
  train, eval_ = config_dataset.train_split, config_dataset.eval_split
  if train == eval_:
    logging.warning('dataset.eval_split == dataset.train_split (%r): evaluating on the training images', train)
    return
  a, b = split_source(config_dataset, train), split_source(config_dataset, eval_)
  if a is not None and a == b:
    raise ValueError(
        f'config.dataset.train_split={train!r} and config.dataset.eval_split={eval_!r} both resolve to {a} '
        f'(config.dataset.root holds a single split): put each split in ROOT/<split>/, or set '
        f'--config.dataset.eval_split={train} to evaluate on the training images on purpose')
