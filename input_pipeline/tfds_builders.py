"""TFDS builders for VisDrone2019-DET and SODA-D, prepared from manually downloaded folders.

  builder = tfds_builders.VisdroneDet(data_dir=DATA_DIR)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=VISDRONE_DIR))
  ds = builder.as_dataset(split='val')

Both read their folders with the project's own readers (same target/ignore rules and problem report), so a
prepared dataset and a folder read give the same boxes. Features:
  image (encoded bytes of the original file), image/id (position in the split sorted by name),
  image/source_id (json image id, -1 for VisDrone), name (file stem),
  objects: {bbox: tfds BBoxFeature (ymin, xmin, ymax, xmax) normalized by the image size, label},
  ignore: {bbox: BBoxFeature} ignore regions.
"""

import os

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from input_pipeline import records as records_lib
from input_pipeline import soda_d
from input_pipeline import visdrone

VISDRONE_SPLITS = {'train': 'train', 'val': 'val', 'test_dev': 'test-dev'}   # tfds name -> folder suffix
SODA_D_SPLITS = ('train', 'val', 'test')


def _normalized_yxyx(boxes_xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
  """[N, 4] pixel xyxy -> [N, 4] float32 (ymin, xmin, ymax, xmax) / image size, clipped to [0, 1]."""
  scale = np.array([height, width, height, width], np.float64)
  yxyx = boxes_xyxy[:, [1, 0, 3, 2]].astype(np.float64) / scale
  return np.clip(yxyx, 0.0, 1.0).astype(np.float32).reshape(-1, 4)


def record_to_example(record: records_lib.ImageRecord) -> dict:
  """An ImageRecord as a feature dict of `_features` (the image is passed by path; TFDS stores its bytes)."""
  return {
      'image': record.file_name,
      'image/id': record.image_id,
      'image/source_id': record.source_id,
      'name': record.name,
      'objects': {'bbox': _normalized_yxyx(record.boxes, record.width, record.height),
                  'label': record.labels.astype(np.int64)},
      'ignore': {'bbox': _normalized_yxyx(record.ignore, record.width, record.height)},
  }


def _features(class_names) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'image/id': np.int64,
      'image/source_id': np.int64,
      'name': tfds.features.Text(),
      'objects': tfds.features.Sequence({
          'bbox': tfds.features.BBoxFeature(),
          'label': tfds.features.ClassLabel(names=list(class_names)),
      }),
      'ignore': tfds.features.Sequence({'bbox': tfds.features.BBoxFeature()}),
  })


def _examples(records, report):
  """Yields (key, example); logs the reader's report so skipped images/rows are visible at build time."""
  logging.info('%s', report.summary())
  for record in records:
    yield record.name, record_to_example(record)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders: the code path is this file.

  TFDS' default `code_path` probes `importlib_resources`, a package tensorflow-datasets 4.9.10 uses without
  declaring it; our builders live in a plain file, so naming it directly avoids that dependency.
  """

  VERSION = tfds.core.Version('1.0.0')   # a builder whose examples change overrides both
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  CLASSES: tuple[str, ...] = ()
  HOMEPAGE = ''

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=_features(self.CLASSES), homepage=self.HOMEPAGE)

  def _generate_examples(self, records, report):  # pylint: disable=arguments-differ
    yield from _examples(records, report)


class VisdroneDet(_LocalBuilder):
  """VisDrone2019-DET (drone images, 10 classes, ignored regions) from the official zip folders."""

  CLASSES = records_lib.VISDRONE_CLASSES
  HOMEPAGE = 'https://github.com/VisDrone/VisDrone-Dataset'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download VisDrone2019-DET-train.zip, VisDrone2019-DET-val.zip (and optionally VisDrone2019-DET-test-dev.zip)
  from https://github.com/VisDrone/VisDrone-Dataset and unzip them into the manual dir, giving
  MANUAL_DIR/VisDrone2019-DET-train/{images,annotations}/, MANUAL_DIR/VisDrone2019-DET-val/... (folders named
  train/, val/, test-dev/ work too). Splits whose folder is absent are not built.
  """

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = {}
    for tfds_name, folder_split in VISDRONE_SPLITS.items():
      folders = [os.path.join(manual_dir, f'VisDrone2019-DET-{folder_split}'), os.path.join(manual_dir, folder_split)]
      if any(os.path.isdir(f) for f in folders):
        splits[tfds_name] = self._generate_examples(*visdrone.read_split(manual_dir, folder_split))
    if not splits:
      raise FileNotFoundError(f'no VisDrone2019-DET-<split>/ folder in {dl_manager.manual_dir}.\n'
                              f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return splits


class SodaD(_LocalBuilder):
  """SODA-D (driving scenes, 9 small-object classes, ignore regions) from the official release."""

  CLASSES = records_lib.SODA_D_CLASSES
  HOMEPAGE = 'https://shaunyuan22.github.io/SODA/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download SODA-D from https://shaunyuan22.github.io/SODA/ and unzip it into the manual dir, giving
  MANUAL_DIR/Images/*.jpg and MANUAL_DIR/Annotations/{train,val,test}.json. Splits whose json is absent are
  not built. (These are whole images; the 800x800 patch protocol is applied at input time.)
  """

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = {}
    for split in SODA_D_SPLITS:
      try:
        records, report = soda_d.read_split(manual_dir, split)
      except FileNotFoundError:
        continue
      splits[split] = self._generate_examples(records, report)
    if not splits:
      raise FileNotFoundError(f'no SODA-D Annotations/<split>.json in {manual_dir}.\n'
                              f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return splits
