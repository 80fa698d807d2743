r"""Scores a folder of VisDrone-DET result files against a dataset folder.

  python -m mrqm_jax.evaluate_files --protocol=visdrone --dataset=DIR --results=DIR [--max_dets=N]

--dataset: VisDrone layout, DIR/images/NAME.jpg and DIR/annotations/NAME.txt (read by input_pipeline.visdrone).
--results: one NAME.txt per image, lines `x,y,w,h,score,category,-1,-1` (category 1..10), as the official
toolkit reads them (NAME.jpg.txt, as `--mode=predict` names results of images sharing a stem, is read as
NAME.txt). An image without a result file has no detections (counted and logged); result files that match no
image are counted and logged; when NO result file matches an image, that is an error (exit 2), not AP 0.
--protocol: 'visdrone' (the paper's COCO-style AP, AP50, AP75, AP_S, AP_M, AP_L, plus the official toolkit's
numbers as toolkit_AP, toolkit_AP50, toolkit_AP75, toolkit_AR1..toolkit_AR500), 'coco' or 'soda' (size bands of
SODA-D); see mrqm_jax/metrics/coco.py. --max_dets sets the toolkit's cap in 'visdrone'.

Logs go to stderr; stdout's LAST line is the metrics as one JSON object, e.g. {"AP": 31.2, "AP50": ...,
"toolkit_AP": 27.0, ...} (percent; -1.0 = undefined). Missing folders and unreadable or malformed files print
one line naming the problem (file and line) and exit with code 2 (every such error is an `errors.UsageError`).
"""

import json
import os

from absl import app
from absl import flags
from absl import logging

# None of these imports jax or tensorflow, so `--help` and usage errors stay fast.
from input_pipeline import records as records_lib
from input_pipeline import visdrone as visdrone_reader
from mrqm_jax import errors
from mrqm_jax.metrics import coco as metrics
from mrqm_jax.metrics import visdrone

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')

_PROTOCOL = flags.DEFINE_enum('protocol', 'visdrone', ['visdrone', 'coco', 'soda'], 'Metric protocol.')
_DATASET = flags.DEFINE_string('dataset', None, 'Dataset folder with images/ and annotations/.')
_RESULTS = flags.DEFINE_string('results', None, 'Folder of NAME.txt result files.')
_MAX_DETS = flags.DEFINE_integer('max_dets', None, 'Detections per image for AP (default: the protocol\'s).')


UsageError = errors.UsageError


def _fail(message: str, exit_code: int = 2) -> None:
  errors.fail('evaluate_files', message, exit_code)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).strip().splitlines()[0])


def evaluate_folder(protocol: str, dataset: str, results: str, max_dets: int | None = None) -> dict[str, float]:
  """Reads the dataset and the result files and returns `evaluate_detections`' metrics.

  Raises:
    UsageError for missing folders, an empty dataset, or an unreadable/malformed file (message names it).
  """
  if not dataset:
    raise UsageError('--dataset=DIR is required')
  if not results:
    raise UsageError('--results=DIR is required')
  if not os.path.isdir(dataset):
    raise UsageError(f'dataset folder not found: {dataset}')
  if not os.path.isdir(results):
    raise UsageError(f'results folder not found: {results}')
  if max_dets is not None and max_dets < 1:
    raise UsageError(f'--max_dets must be >= 1, got {max_dets}')
  try:
    records, report = visdrone_reader.read_split(dataset)
  except (OSError, ValueError) as e:
    raise UsageError(f'cannot read the dataset: {e}') from None
  if report.num_problems:
    logging.warning('dataset problems:\n%s', report.summary())
  if not records:
    raise UsageError(f'no images found in {dataset} (expected images/NAME.jpg and annotations/NAME.txt)')
  try:
    detections = visdrone.read_result_dir(results)
  except visdrone.ResultFileError as e:
    raise UsageError(str(e)) from None
  except OSError as e:
    raise UsageError(f'cannot read a result file: {e}') from None
  names = {r.name for r in records}
  detections = match_result_names(detections, names)
  unmatched = sorted(set(detections) - names)
  if len(unmatched) == len(detections):
    raise UsageError(f'none of the {len(detections)} result files in {results} matches an image of {dataset} '
                     f'(expected NAME.txt for images/NAME.jpg; e.g. '
                     f'{", ".join(unmatched[:2]) or "no .txt file at all"})')
  if unmatched:
    logging.warning('%d result files match no image in %s and are ignored (e.g. %s)', len(unmatched), dataset,
                    ', '.join(unmatched[:3]))
    detections = {k: v for k, v in detections.items() if k in names}
  missing = sorted(names - set(detections))
  if missing:
    logging.warning('%d of %d images have no result file in %s and are scored as having no detections '
                    '(e.g. %s)', len(missing), len(records), results, ', '.join(missing[:3]))
  logging.info('%d images, %d result files, protocol %s', len(records), len(detections), protocol)
  return metrics.evaluate_detections(protocol, records, detections,
                                     num_classes=len(records_lib.VISDRONE_CLASSES), max_dets=max_dets)


def match_result_names(detections: dict, names: set[str]) -> dict:
  """Result keys 'NAME.jpg' (file NAME.jpg.txt) renamed to 'NAME' when NAME is an image and has no NAME.txt."""
  out = dict(detections)
  for key in list(detections):
    stem, ext = os.path.splitext(key)
    if key not in names and ext.lower() in IMAGE_EXTENSIONS and stem in names and stem not in out:
      out[stem] = out.pop(key)
  return out


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    values = evaluate_folder(_PROTOCOL.value, _DATASET.value, _RESULTS.value, _MAX_DETS.value)
  except UsageError as e:
    _fail(str(e), e.exit_code)
  print(json.dumps({k: round(v, 4) for k, v in values.items()}))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
