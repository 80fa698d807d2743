"""`read_dataset`, which picks the reader (visdrone.py, soda_d.py, coco.py) named by the config.

The readers share only records.py (ImageRecord, ReadReport, clip_box, image_size), so this dispatcher imports
them and none of them imports it back.
"""

import os
from typing import Any, Sequence

from absl import logging

from input_pipeline import coco
from input_pipeline import records as records_lib
from input_pipeline import soda_d
from input_pipeline import visdrone

def read_dataset(config_dataset: Any, split: str
                 ) -> tuple[list[records_lib.ImageRecord], records_lib.ReadReport, Sequence[str]]:
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
    records, report = visdrone.read_split(root, split)
    class_names = records_lib.VISDRONE_CLASSES
  elif fmt == 'soda_d':
    records, report = soda_d.read_split(root, split)
    class_names = records_lib.SODA_D_CLASSES
  elif fmt == 'coco':
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
      return os.path.realpath(visdrone.resolve_split_dir(root, split))
    if config_dataset.format in ('coco', 'soda_d'):
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
