"""SODA-D reader: the benchmark's COCO-style json per split -> ImageRecords.

Official layout (as distributed and as SODA-mmdetection expects it): ROOT/Annotations/{train,val,test}.json and
ROOT/Images/*.jpg. Category ids 1..9 are the targets (people, rider, bicycle, motor, vehicle, traffic-sign,
traffic-light, traffic-camera, warning-cone; label = id - 1); category 10 'ignore' and annotations flagged
`ignore` or `iscrowd` are ignore regions. Patch slicing (the benchmark's 800x800 protocol) is in slicing.py.
"""

import re

from input_pipeline import coco
from input_pipeline import records as records_lib

CATEGORY_TO_LABEL = {category_id: category_id - 1 for category_id in range(1, 10)}
IGNORE_CATEGORY_ID = 10


def _normalized(name: str) -> str:
  return re.sub(r'[^a-z]', '', str(name).lower())


def check_categories(data: dict, json_path: str) -> None:
  """Raises ValueError if the json's `categories` give a target id another class name than SODA-D's.

  Labels are fixed by id (id - 1); a file whose ids mean other classes would train silently wrong labels.
  Names are compared ignoring case and punctuation ('traffic_sign' == 'traffic-sign').
  """
  for category in data.get('categories') or []:
    if not isinstance(category, dict) or category.get('id') not in CATEGORY_TO_LABEL or 'name' not in category:
      continue
    expected = records_lib.SODA_D_CLASSES[CATEGORY_TO_LABEL[category['id']]]
    if _normalized(category['name']) != _normalized(expected):
      raise ValueError(f'{json_path}: category id {category["id"]} is named {category["name"]!r}, but SODA-D '
                       f'id {category["id"]} is {expected!r}; is this a SODA-D file? (use format=coco otherwise)')


def read_split(root: str, split: str, *, check_images: bool = True, max_messages: int = 20
               ) -> tuple[list[records_lib.ImageRecord], records_lib.ReadReport]:
  """Reads one SODA-D split.

  Args:
    root: the SODA-D folder: Annotations/<split>.json (or annotations/<split>.json, <split>.json) and
      Images/ (or images/, images/<split>/, <split>/).
    split: 'train', 'val' or 'test' (any name with a json).
    check_images: read each image header (skip missing/corrupt images, check json sizes).

  Returns:
    (records sorted by name, image_id = position, source_id = json image id; the report).
  """
  json_path = coco.first_existing_file(root, split, [f'Annotations/{split}.json', f'annotations/{split}.json',
                                                     f'{split}.json'])
  data = coco.load_json(json_path)
  check_categories(data, json_path)
  image_dir = coco.pick_image_dir(root, data, ['Images', 'images', f'images/{split}', split, ''])
  records, report = coco.records_from_coco(data, json_path, image_dir, CATEGORY_TO_LABEL, (IGNORE_CATEGORY_ID,),
                                           check_images=check_images, max_messages=max_messages)
  report.note(f'images from {image_dir}')
  return records, report
