"""VisDrone2019-DET reader: official `images/NAME.jpg` + `annotations/NAME.txt` folders -> ImageRecords.

Annotation lines are `bbox_left,bbox_top,bbox_width,bbox_height,score,object_category,truncation,occlusion`
(the released files use CRLF line endings and a few lines end with a trailing comma). As the official toolkit
reads them (evalDET.m: saveAnnoRes.m, dropObjectsInIgr.m, calcAccuracy.m):
  * categories 1..10 with a non-zero score are targets (label = category - 1);
  * category 0 rows (any score) are ignored regions of every class (ignore_labels -1): the toolkit drops ground
    truths and detections >= 50% inside them;
  * score-0 rows of categories 1..10 are ignored objects of their class (ignore_labels = category - 1): the
    toolkit keeps them as ignore-flagged ground truth of that class (saveAnnoRes.m flips the score column into
    evalRes.m's ignore flag);
  * category 11 ('others') rows are not kept: the toolkit keeps them as class-11 ground truth but scores only
    classes 1..10, one at a time, so they never match anything and are no ignored region (a detection on an
    'others' object is a false positive of its class). They are counted in the report's ignore rows and noted.
The losses do not use ignore regions (see mrqm_jax/ops/losses.py); only the metrics read them.
"""

import math
import os

import numpy as np

from input_pipeline import records as records_lib

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
NUM_FIELDS = 8
NUM_CATEGORIES = 12   # 0 ignored region, 1..10 targets, 11 others
OTHERS = 11


def resolve_split_dir(root: str, split: str | None, annotations_only: bool | None = False) -> str:
  """The folder holding `images/` and `annotations/` for `split`.

  Looks at ROOT/VisDrone2019-DET-<split>, ROOT/<split> (when a split is given), then ROOT itself. With
  `annotations_only` not False, a folder of .txt files without sub-folders is accepted too.

  Raises:
    FileNotFoundError listing every place looked at.
  """
  candidates = []
  if split:
    candidates += [os.path.join(root, f'VisDrone2019-DET-{split}'), os.path.join(root, split)]
  candidates.append(root)
  for folder in candidates:
    if os.path.isdir(os.path.join(folder, 'annotations')) or os.path.isdir(os.path.join(folder, 'images')):
      return folder
  if annotations_only is not False and os.path.isdir(root) and any(
      name.endswith('.txt') for name in os.listdir(root)):
    return root
  looked = ', '.join(f'{c}/{{images,annotations}}' for c in candidates)
  raise FileNotFoundError(f'VisDrone split {split!r} not found: looked for {looked}')


def parse_annotation_text(text: str, path: str, width: int, height: int, report: records_lib.ReadReport):
  """Parses one annotation file's text.

  Args:
    text: file contents (any line endings).
    path: file path, for report messages.
    width, height: image size for clipping; <= 0 = unknown (no clipping).
    report: receives row counts and every problem, with `path:line`.

  Returns:
    boxes [N, 4] float32 xyxy pixels, labels [N] int32, ignore [R, 4] float32 xyxy pixels, ignore_labels [R]
    int32 (-1: ignored region of every class; c: ignored object of class c), and the number of 'others' rows
    (not kept; see the module docstring).
  """
  boxes, labels, ignore, ignore_labels, num_others = [], [], [], [], 0
  for line_no, raw in enumerate(text.splitlines(), start=1):
    line = raw.strip()
    if not line:
      continue
    fields = line.split(',')
    if fields[-1].strip() == '':  # trailing comma, as in some released files
      fields.pop()
    if len(fields) != NUM_FIELDS:
      report.add('bad_field_count', path, line_no, f'{len(fields)} fields, expected {NUM_FIELDS}: {line!r}')
      continue
    try:
      values = [float(f) for f in fields]
    except ValueError:
      report.add('non_numeric', path, line_no, f'a field is not a number: {line!r}')
      continue
    if not all(math.isfinite(v) for v in values) or not all(
        math.isfinite(values[i] + values[i + 2]) for i in (0, 1)):
      report.add('non_numeric', path, line_no, f'a field (or x + w, y + h) is not finite: {line!r}')
      continue
    x, y, w, h, score, category = values[:6]
    if category != int(category) or not 0 <= category < NUM_CATEGORIES:
      report.add('unknown_category', path, line_no, f'object_category {fields[5]!r} is not one of 0..11')
      continue
    category = int(category)
    is_target = score != 0 and 1 <= category <= 10
    if is_target:
      report.target_rows += 1
    else:
      report.ignore_rows += 1
    if category == OTHERS:
      num_others += 1
      continue
    what = 'box' if is_target else 'ignore region'
    if w < 0 or h < 0:
      report.add('negative_size', path, line_no, f'{what} width/height {fields[2]},{fields[3]} < 0',
                 target=is_target)
      continue
    box, changed = records_lib.clip_box(x, y, x + w, y + h, width, height)
    if box[2] <= box[0] or box[3] <= box[1]:
      detail = 'outside the image' if changed else f'width/height {fields[2]},{fields[3]}'
      report.add('zero_area', path, line_no, f'{what} has no area ({detail}), dropped', target=is_target)
      continue
    if changed:
      report.add('clipped', path, line_no, f'{what} {x:g},{y:g},{w:g},{h:g} exceeds the {width}x{height} image')
    if is_target:
      boxes.append(box)
      labels.append(category - 1)
    else:
      ignore.append(box)
      ignore_labels.append(category - 1)  # category 0 -> -1: every class
  return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32),
          np.asarray(ignore, np.float32).reshape(-1, 4), np.asarray(ignore_labels, np.int32), num_others)


def _files_by_stem(folder: str, extensions: tuple[str, ...]) -> dict[str, str]:
  """{stem: path}; DuplicateNameError when two files share a stem (x.jpg + x.png: which one is meant?)."""
  if not os.path.isdir(folder):
    return {}
  with os.scandir(folder) as entries:
    found = sorted((os.path.splitext(entry.name)[0], entry.path) for entry in entries
                   if os.path.splitext(entry.name)[1].lower() in extensions and entry.is_file())
  records_lib.check_unique_names(found, folder)
  return dict(found)


def read_split(root: str, split: str | None = None, *, annotations_only: bool | None = False,
               max_messages: int = 20) -> tuple[list[records_lib.ImageRecord], records_lib.ReadReport]:
  """Reads a VisDrone-DET folder.

  Args:
    root: folder with `images/` and `annotations/`, or (with `split`) their parent holding
      `VisDrone2019-DET-<split>/` or `<split>/`.
    split: e.g. 'train', 'val', 'test-dev'; None reads `root` itself.
    annotations_only: False: images are required (sizes from their headers, boxes clipped to them).
      True: images are not read at all: sizes are unknown (width = height = 0, file_name = ''), boxes are not
      clipped. None: True when the folder has no `images/`.
    max_messages: problems kept verbatim in the report (all are counted).

  Returns:
    (records sorted by name, image_id = position; the report).

  Raises:
    FileNotFoundError if neither folder exists (or `images/` is missing while annotations_only is False).
  """
  folder = resolve_split_dir(root, split, annotations_only)
  image_dir = os.path.join(folder, 'images')
  annotation_dir = os.path.join(folder, 'annotations')
  if not os.path.isdir(annotation_dir) and not os.path.isdir(image_dir):
    annotation_dir = folder  # a bare folder of .txt files (annotations-only)
  if annotations_only is None:
    annotations_only = not os.path.isdir(image_dir)
  report = records_lib.ReadReport(source=folder, max_messages=max_messages)
  if not annotations_only and not os.path.isdir(image_dir):
    raise FileNotFoundError(f'VisDrone images folder not found: {image_dir} (pass annotations_only=True to '
                            'read annotations alone)')
  annotations = _files_by_stem(annotation_dir, ('.txt',))
  if annotations_only:
    images = {}
    report.note('annotations only: image sizes unknown, boxes not clipped to the image')
    names = sorted(annotations)
  else:
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    if not os.path.isdir(annotation_dir):
      report.note(f'no annotations folder {annotation_dir}: every image has no boxes')
    names = sorted(set(images) | set(annotations))

  records = []
  num_others = 0
  for name in names:
    if annotations_only:
      width = height = 0
      file_name = ''
    else:
      if name not in images:
        report.add('missing_image', annotations[name], None,
                   f'no image {name}{{{",".join(IMAGE_EXTENSIONS)}}} in {image_dir}')
        continue
      file_name = images[name]
      size = records_lib.image_size(file_name, report)
      if size is None:
        continue
      width, height = size
    if name in annotations:
      with open(annotations[name], 'rb') as f:
        text = f.read().decode('utf-8', errors='replace')
      boxes, labels, ignore, ignore_labels, others = parse_annotation_text(text, annotations[name], width, height,
                                                                           report)
      num_others += others
    else:
      if os.path.isdir(annotation_dir):
        report.add('missing_annotation', file_name, None,
                   f'no {name}.txt in {annotation_dir}: kept with no boxes')
      boxes, labels, ignore = np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), np.zeros((0, 4), np.float32)
      ignore_labels = np.zeros((0,), np.int32)
    records.append(records_lib.ImageRecord(
        image_id=len(records), name=name, file_name=file_name, width=width, height=height,
        boxes=boxes, labels=labels, ignore=ignore, ignore_labels=ignore_labels))
  report.num_images = len(records)
  if num_others:
    report.note(f"{num_others} 'others' (category 11) rows not kept: the VisDrone toolkit never scores them and "
                'they are no ignored region')
  return records, report
