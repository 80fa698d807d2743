"""The run's data as training, eval and the notebooks read it, and what the data decides in the config.

`prepare_data` reads both configured splits (with `dataset.root` unset, as in the smoke config, it first writes
a synthetic VisDrone-layout set into WORKDIR/data); `resolve_a_s` turns `iah.a_s = -1` (auto) into the smallest
training instance area. Shared by train.py, evaluate.py, model_lib.py and notebook_utils.py, so none of them
imports another for it.
"""

import dataclasses
import os

from absl import logging
import ml_collections
import numpy as np

from input_pipeline import readers
from input_pipeline import records as records_lib
from input_pipeline import stats
from input_pipeline import synthetic
from mrqm_jax import config_validation, errors

SYNTHETIC_TRAIN_IMAGES = 256
SYNTHETIC_EVAL_IMAGES = 48


@dataclasses.dataclass
class Data:
  train_records: list
  eval_records: list
  class_names: tuple
  report: str


def prepare_data(config: ml_collections.ConfigDict, workdir: str, *, train_split: bool = True) -> Data:
  """Reads both splits; with `dataset.root` unset (smoke), writes synthetic VisDrone-layout data first.

  train_split=False (`--mode=eval`) reads the eval split alone (train_records is then []), so a dataset root that
  holds only the val split can be evaluated. Two images of one name in a split are a DataError (one line).
  """
  if not config.dataset.root:
    root = os.path.join(workdir, 'data')
    h, w = config.input.image_size
    for split, count, seed in (('train', SYNTHETIC_TRAIN_IMAGES, config.train.seed),
                               ('val', SYNTHETIC_EVAL_IMAGES, config.train.seed + 10_000)):
      out = os.path.join(root, split)
      if not os.path.isdir(os.path.join(out, 'annotations')):
        logging.info('dataset.root is unset: writing %d synthetic images to %s', count, out)
        synthetic.generate(out, count, seed=seed, size=(w, h))
    with config.unlocked():
      config.dataset.root = root
      config.dataset.train_split, config.dataset.eval_split = 'train', 'val'
  train_records, summaries = [], []
  try:
    readers.check_distinct_splits(config.dataset)
    if train_split:
      train_records, train_report, class_names = readers.read_dataset(config.dataset, config.dataset.train_split)
      summaries.append(train_report.summary())
    eval_records, eval_report, class_names = readers.read_dataset(config.dataset, config.dataset.eval_split)
    summaries.append(eval_report.summary())
  except records_lib.DuplicateNameError as e:
    raise errors.DataError(str(e)) from None
  except ValueError as e:  # a config value that disagrees with the data (format, num_classes, splits)
    raise errors.ConfigError(str(e)) from None
  if train_split and not train_records:
    raise errors.UsageError(f'no training images in {config.dataset.root} (split {config.dataset.train_split!r})')
  return Data(train_records, eval_records, class_names, '\n'.join(summaries))


def resolve_a_s(config: ml_collections.ConfigDict, train_records: list) -> None:
  """`iah.a_s = -1` (auto) -> the smallest training instance area (px^2, original resolution); the one place
  that resolves it. A positive value is kept."""
  if config.iah.a_s != config_validation.A_S_AUTO:
    return
  if not any(len(r.boxes) for r in train_records):
    raise errors.UsageError('no box in the training set (config.iah.a_s=-1, auto, needs at least one; check the '
                            'annotations)')
  config.iah.a_s = float(stats.dataset_stats(train_records)['min_area'])
  logging.info('iah.a_s = -1 (auto) -> smallest training instance area %g px^2', config.iah.a_s)


def dn_cap_report(config: ml_collections.ConfigDict, train_records: list) -> str | None:
  """A warning line when training images hold more boxes than the denoising cap (None when none does, or
  without denoising): such an image denoises a random `dn.max_gt` of its boxes each step (models/detector.py)."""
  if not config.dn.enabled:
    return None
  cap = min(config.dn.max_gt, config.dataset.max_boxes)
  counts = np.asarray([min(len(r.boxes), config.dataset.max_boxes) for r in train_records], np.int64)
  over = counts > cap
  if not over.any():
    return None
  sliced = ' (whole images; their patches hold fewer)' if config.dataset.slicing.enabled else ''
  return (f'dn.max_gt={config.dn.max_gt}: {int(over.sum())} of {len(counts)} training images{sliced} hold more '
          f'boxes ({int((counts[over] - cap).sum())} of their {int(counts[over].sum())} boxes are left out of '
          f'denoising in an epoch); each step denoises a random {cap} of such an image\'s boxes (Co-DINO denoises '
          f'all: dn.max_gt={int(counts.max())} would)')
