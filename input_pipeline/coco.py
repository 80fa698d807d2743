"""COCO-json reader: a user's own dataset (and, through `records_from_coco`, SODA-D) -> ImageRecords.

The json holds `images` (id, file_name, width, height), `annotations` (image_id, bbox [x, y, w, h] in pixels,
category_id, optional iscrowd / ignore) and `categories` (id, name). Category ids map to contiguous labels in
sorted id order. Crowd / ignore annotations become ignore regions. Problems are located as
`FILE annotations[i] (id N)` (json has no meaningful line numbers once minified).
"""

import json
import math
import os
from typing import Iterable, Mapping

import numpy as np

from input_pipeline import records as records_lib


def load_json(path: str) -> dict:
  """Parses a json file; a syntax error is a ValueError naming the file, line and column."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'annotation file not found: {path}')
  with open(path, 'rb') as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{e.lineno}:{e.colno}: invalid json: {e.msg}') from None
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise ValueError(f'{path}: not a COCO-style annotation file (needs a top-level "images" list)')
  if not isinstance(data.get('annotations', []), list):
    raise ValueError(f'{path}: "annotations" must be a list')
  return data


def _number(value) -> float | None:
  """float(value) for a real finite number (bools excluded), else None."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return None
  return float(value)


def _flag(value) -> bool | None:
  """A 0/1 json flag (iscrowd, ignore) as a bool: numbers, booleans and their strings ("0", "1", "true");
  None for anything else. bool("0") would be True and make every box an ignore region."""
  if isinstance(value, (bool, int, float)):
    return bool(value)
  if isinstance(value, str):
    text = value.strip().lower()
    if text in ('0', '0.0', 'false', ''):
      return False
    if text in ('1', '1.0', 'true'):
      return True
  return None


def records_from_coco(data: dict, json_path: str, image_dir: str, category_to_label: Mapping[int, int],
                      ignore_category_ids: Iterable[int] = (), *, check_images: bool = True,
                      max_messages: int = 20) -> tuple[list[records_lib.ImageRecord], records_lib.ReadReport]:
  """Turns a loaded COCO-style dict into records.

  Args:
    data: the json contents (see load_json).
    json_path: its path, for messages.
    image_dir: folder that `images[].file_name` is relative to.
    category_to_label: category_id -> 0-based label for target categories.
    ignore_category_ids: category ids that mark ignore regions (e.g. SODA-D's 10 'ignore').
    check_images: read each image header: missing/corrupt images are skipped, json sizes checked.
    max_messages: problems kept verbatim in the report.

  Returns:
    (records sorted by name = file_name without extension, image_id = position, source_id = json id; report).
  """
  report = records_lib.ReadReport(source=json_path, max_messages=max_messages)
  ignore_category_ids = set(ignore_category_ids)

  # Two entries (other ids) of one file, or one stem with two extensions: an error before anything compiles. A
  # repeated id is a counted skip below.
  named, ids = [], set()
  for index, entry in enumerate(data['images']):
    if (isinstance(entry, dict) and isinstance(entry.get('file_name'), str)
        and isinstance(entry.get('id'), (int, str)) and entry['id'] not in ids):
      ids.add(entry['id'])
      named.append((os.path.splitext(entry['file_name'])[0], f'images[{index}] {entry["file_name"]!r}'))
  records_lib.check_unique_names(named, json_path)
  images = {}
  for index, entry in enumerate(data['images']):
    where = f'{json_path} images[{index}]'
    if (not isinstance(entry, dict) or not isinstance(entry.get('file_name'), str)
        or not isinstance(entry.get('id'), (int, str))):
      report.add('malformed_entry', where, None, 'needs an integer/string "id" and a string "file_name"')
      continue
    width, height = _number(entry.get('width')), _number(entry.get('height'))
    if entry['id'] in images:
      report.add('malformed_entry', where, None, f'duplicate image id {entry["id"]!r}')
      continue
    file_name = os.path.join(image_dir, entry['file_name'])
    if check_images:
      size = records_lib.image_size(file_name, report)
      if size is None:
        images[entry['id']] = None  # known id, skipped image: its annotations go with it
        continue
      if (width, height) != (float(size[0]), float(size[1])):
        if width is not None or height is not None:
          report.add('size_mismatch', where, None,
                     f'json says {entry.get("width")}x{entry.get("height")}, file is {size[0]}x{size[1]}')
        width, height = size
    elif width is None or height is None or width <= 0 or height <= 0:
      report.add('malformed_entry', where, None, 'width/height missing or not positive (and images not read)')
      continue
    images[entry['id']] = {'name': os.path.splitext(entry['file_name'])[0], 'file_name': file_name,
                           'width': int(width), 'height': int(height), 'source_id': entry['id'],
                           'boxes': [], 'labels': [], 'ignore': []}

  for index, ann in enumerate(data.get('annotations', [])):
    where = f'{json_path} annotations[{index}]'
    if isinstance(ann, dict) and 'id' in ann:
      where += f' (id {ann["id"]})'
    if not isinstance(ann, dict) or 'image_id' not in ann or 'bbox' not in ann or 'category_id' not in ann:
      report.add('malformed_entry', where, None, 'needs "image_id", "bbox" and "category_id"')
      continue
    if not all(isinstance(ann[k], (int, str)) for k in ('image_id', 'category_id')):
      report.add('malformed_entry', where, None, '"image_id" and "category_id" must be integers or strings')
      continue
    if ann['image_id'] not in images:
      report.add('unknown_image', where, None, f'image_id {ann["image_id"]!r} is not in "images"')
      continue
    image = images[ann['image_id']]
    if image is None:
      continue  # the image itself was reported (missing or corrupt)
    bbox = ann['bbox']
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
      report.add('bad_field_count', where, None, f'bbox {bbox!r} does not have 4 numbers')
      continue
    values = [_number(v) for v in bbox]
    if any(v is None for v in values) or not all(math.isfinite(values[i] + values[i + 2]) for i in (0, 1)):
      report.add('non_numeric', where, None, f'bbox {bbox!r} has a value (or x + w, y + h) that is not a finite '
                 'number')
      continue
    category = ann['category_id']
    flags = [_flag(ann.get(key, 0)) for key in ('iscrowd', 'ignore')]
    if None in flags:
      report.add('malformed_entry', where, None,
                 f'"iscrowd" {ann.get("iscrowd")!r} / "ignore" {ann.get("ignore")!r}: expected 0 or 1')
      continue
    is_ignore = category in ignore_category_ids or any(flags)
    if not is_ignore and category not in category_to_label:
      report.add('unknown_category', where, None, f'category_id {category!r} is not in the category list')
      continue
    if is_ignore:
      report.ignore_rows += 1
    else:
      report.target_rows += 1
    what = 'ignore region' if is_ignore else 'box'
    x, y, w, h = values
    if w < 0 or h < 0:
      report.add('negative_size', where, None, f'{what} width/height {w:g},{h:g} < 0', target=not is_ignore)
      continue
    box, changed = records_lib.clip_box(x, y, x + w, y + h, image['width'], image['height'])
    if box[2] <= box[0] or box[3] <= box[1]:
      detail = 'outside the image' if changed else f'width/height {w:g},{h:g}'
      report.add('zero_area', where, None, f'{what} has no area ({detail}), dropped', target=not is_ignore)
      continue
    if changed:
      report.add('clipped', where, None,
                 f'{what} {x:g},{y:g},{w:g},{h:g} exceeds the {image["width"]}x{image["height"]} image')
    if is_ignore:
      image['ignore'].append(box)
    else:
      image['boxes'].append(box)
      image['labels'].append(category_to_label[category])

  kept = sorted((image for image in images.values() if image is not None), key=lambda im: im['name'])
  records = [records_lib.ImageRecord(image_id=position, **image) for position, image in enumerate(kept)]
  report.num_images = len(records)
  return records, report


def category_mapping(data: dict, json_path: str) -> tuple[dict[int, int], list[str]]:
  """category_id -> contiguous label in sorted id order, and the class names in label order."""
  categories = data.get('categories')
  if not isinstance(categories, list) or not categories:
    raise ValueError(f'{json_path}: needs a non-empty "categories" list to map category ids to classes')
  by_id = {}
  for index, category in enumerate(categories):
    if not isinstance(category, dict) or 'id' not in category:
      raise ValueError(f'{json_path}: categories[{index}] needs an "id"')
    if isinstance(category['id'], bool) or not isinstance(category['id'], (int, str)):
      raise ValueError(f'{json_path}: categories[{index}] id {category["id"]!r} is not an integer or a string')
    if type(category['id']) is not type(categories[0]['id']):  # sorted() cannot order 3 and '3'
      raise ValueError(f'{json_path}: categories[{index}] id {category["id"]!r} is not of the type of '
                       f'categories[0] id {categories[0]["id"]!r}: use integer ids (or strings) throughout')
    if category['id'] in by_id:
      raise ValueError(f'{json_path}: categories[{index}] repeats id {category["id"]!r}')
    by_id[category['id']] = str(category.get('name', category['id']))
  ids = sorted(by_id)
  return {cid: label for label, cid in enumerate(ids)}, [by_id[cid] for cid in ids]


def pick_image_dir(root: str, data: dict, image_dir_candidates: list[str]) -> str:
  """The candidate folder (under root) that holds the json's first image; else the first existing one."""
  folders = [os.path.join(root, c) if c else root for c in image_dir_candidates]
  first = next((im.get('file_name') for im in data['images']
                if isinstance(im, dict) and isinstance(im.get('file_name'), str)), None)
  if first is not None:
    for folder in folders:
      if os.path.isfile(os.path.join(folder, first)):
        return folder
  return next((f for f in folders if os.path.isdir(f)), root)


def read_split(root: str, split: str, *, check_images: bool = True, max_messages: int = 20
               ) -> tuple[list[records_lib.ImageRecord], records_lib.ReadReport, list[str], dict[int, int]]:
  """Reads split `split` of a COCO-layout folder.

  Json: ROOT/annotations/instances_<split>.json, ROOT/annotations/<split>.json or ROOT/<split>.json.
  Images: ROOT/<split>/, ROOT/images/<split>/, ROOT/images/ or ROOT/ (whichever holds the first image).

  Returns:
    (records, report, class names in label order, category_id -> label).
  """
  json_path = first_existing_file(root, split, [f'annotations/instances_{split}.json', f'annotations/{split}.json',
                                        f'{split}.json'])
  data = load_json(json_path)
  category_to_label, class_names = category_mapping(data, json_path)
  image_dir = pick_image_dir(root, data, [split, f'images/{split}', 'images', ''])
  records, report = records_from_coco(data, json_path, image_dir, category_to_label, check_images=check_images,
                                      max_messages=max_messages)
  report.note(f'categories {sorted(category_to_label)} -> labels 0..{len(class_names) - 1}; images from {image_dir}')
  return records, report, class_names, category_to_label


def first_existing_file(root: str, split: str, candidates: list[str]) -> str:
  """ROOT/candidate for the first candidate that exists; FileNotFoundError listing them all otherwise."""
  paths = [os.path.join(root, c) for c in candidates]
  for path in paths:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'annotation json for split {split!r} not found: looked for {", ".join(paths)}')
