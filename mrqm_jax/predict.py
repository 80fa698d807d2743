"""`--mode=predict`: images (a file or a folder) -> VisDrone txt, COCO json, and drawn PNGs.

Outputs in OUTPUT (which must not be the input folder or inside it, nor a single input image's own folder:
predict never writes over its input; nor does it replace any existing file there without --overwrite):
  NAME.txt              one line per detection, VisDrone-DET toolkit format `x,y,w,h,score,category,-1,-1`
                        (category 1-based, as the dataset's own ids)
  detections.json       COCO results list [{image_id, file_name, category_id, bbox [x,y,w,h], score}]
  NAME.png              the image with boxes, class names and scores (score >= predict.score_threshold)
  NAME_heatmap.png      with --heatmaps: where the selected encoder proposals (decoder anchors) fall
NAME is the image's file name without its extension when that is unique in the input; images that share a
stem (x.jpg and x.png, or X.jpg and x.jpg on a case-insensitive disk) keep their extension instead: x.jpg.txt,
x.png.txt. An image that cannot be drawn or written (e.g. a truncated JPEG) is reported and counted; the other
images and detections.json are still written.
Large images can be sliced into patches and merged back (`predict.slice_large_images`).
"""

import json
import os

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from PIL import Image

from input_pipeline import pipeline
from input_pipeline import records as records_lib
from mrqm_jax import errors, evaluate, model_lib, parallel, paths, visualize
from mrqm_jax.ops import postprocess

# Input listing and output names live in paths.py (no jax/tf imports), so main.py checks them before anything
# heavy loads; predict uses them from there.
IMAGE_EXTENSIONS = paths.IMAGE_EXTENSIONS
list_images = paths.list_images
output_names = paths.output_names
output_files = paths.predict_output_files
check_output_files = paths.check_predict_output_files


def image_records(paths: list[str]) -> tuple[list[records_lib.ImageRecord], list[str]]:
  """Records without annotations for the images; unreadable files are skipped and returned by name."""
  records, skipped = [], []
  names = dict(zip(paths, output_names(paths)))
  report = records_lib.ReadReport(source='predict input')
  for path in paths:
    # The header, and for a JPEG its end marker: a truncated file is skipped here, not predicted as blank.
    size = records_lib.image_size(path, report)
    if size is None:
      logging.warning('skipping unreadable image %s', path)
      skipped.append(path)
      continue
    width, height = size
    records.append(records_lib.ImageRecord(
        image_id=len(records), name=names[path], file_name=os.path.abspath(path),
        width=width, height=height, boxes=np.zeros((0, 4)), labels=np.zeros((0,)), ignore=np.zeros((0, 4))))
  return records, skipped


def class_names_for(config) -> tuple[str, ...]:
  if config.dataset.format == 'visdrone':
    return records_lib.VISDRONE_CLASSES
  if config.dataset.format == 'soda_d':
    return records_lib.SODA_D_CLASSES
  return tuple(f'class{i + 1}' for i in range(config.dataset.num_classes))


def write_outputs(output: str, records, detections: dict, class_names, score_threshold: float,
                  draw: bool = True) -> dict:
  """Writes txt/json/PNG for each record; returns a summary {images, detections, failed: [(file, reason)]}.

  A failure on one image (drawing a truncated JPEG, a full disk) is logged and listed; the other images and
  detections.json are still written.
  """
  out = epath.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  coco_results = []
  total = 0
  failed = []
  for r in records:
    d = detections.get(r.image_id)
    boxes = np.zeros((0, 4)) if d is None else np.asarray(d.boxes)
    scores = np.zeros((0,)) if d is None else np.asarray(d.scores)
    labels = np.zeros((0,), int) if d is None else np.asarray(d.labels)
    order = np.argsort(-scores, kind='stable')
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    total += len(scores)
    lines = []
    for (x0, y0, x1, y1), s, c in zip(boxes, scores, labels):
      lines.append(f'{x0:.1f},{y0:.1f},{x1 - x0:.1f},{y1 - y0:.1f},{s:.4f},{int(c) + 1},-1,-1\n')
      coco_results.append({'image_id': r.image_id, 'file_name': os.path.basename(r.file_name),
                           'category_id': int(c) + 1,
                           'bbox': [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
                                    round(float(y1 - y0), 2)], 'score': round(float(s), 5)})
    try:
      (out / f'{r.name}.txt').write_text(''.join(lines))
      if draw:
        with Image.open(r.file_name) as im:
          picture = visualize.draw_detections(im.convert('RGB'), boxes, labels, scores, class_names,
                                              score_threshold=score_threshold)
        with (out / f'{r.name}.png').open('wb') as f:
          picture.save(f, format='PNG')
    except Exception as e:  # pylint: disable=broad-except  (PIL and file systems raise many types)
      logging.warning('could not write the outputs of %s: %s', r.file_name, e)
      failed.append((r.file_name, errors.one_line(e, 120)))
  (out / 'detections.json').write_text(json.dumps(coco_results))
  return {'images': len(records), 'detections': total, 'failed': failed}


def predict_files(config: ml_collections.ConfigDict, workdir: str, input_path: str, output: str,
                  checkpoint: str | None = None, heatmaps: bool = False, overrides=(), overwrite: bool = False
                  ) -> dict:
  """Runs the model on every image under `input_path` and writes the outputs described above.

  A file of those names already in `output` is an OutputExistsError before anything runs, unless `overwrite`.
  """
  errors.check_output_folder(input_path, output)
  check_output_files(input_path, output, heatmaps, overwrite)
  mesh = parallel.create_mesh()
  config = ml_collections.ConfigDict(config.to_dict())
  if config.predict.slice_large_images:
    config.dataset.slicing.enabled = True
  records, skipped = image_records(list_images(input_path))
  if not records:
    raise errors.UsageError(f'no readable image in {input_path} ({len(skipped)} unreadable: {", ".join(skipped[:3])})')
  model, config, variables = model_lib.restore_for_inference(config, workdir, checkpoint, mesh, overrides)
  predict_fn = evaluate.make_predict_fn(model, config, mesh)
  detections = evaluate.predict_records(predict_fn, variables, config, records, mesh, desc='predict')
  summary = write_outputs(output, records, detections, class_names_for(config), config.predict.score_threshold)
  if heatmaps:
    write_heatmaps(model, config, variables, records, mesh, output)
  summary['skipped_unreadable'] = len(skipped)
  failed = summary['failed']
  print(f'mrqm_jax: {summary["detections"]} detections on {summary["images"]} images written to {output}'
        + (f'; skipped {len(skipped)} unreadable: {", ".join(skipped[:5])}' if skipped else '')
        + (f'; {len(failed)} image(s) could not be drawn or written: '
           + ', '.join(f'{f} ({why})' for f, why in failed[:5]) if failed else ''))
  return summary


def write_heatmaps(model, config, variables, records, mesh, output: str) -> None:
  """NAME_heatmap.png: the encoder proposals selected as decoder anchors (paper Fig. 2), score-weighted."""
  batch_size = evaluate.eval_batch_size(config)

  @jax.jit
  def proposals(variables, image, pad_mask):
    out = model.apply(variables, image, pad_mask, train=False)
    boxes = postprocess.frame_to_canvas(out['enc_outputs']['pred_boxes'], out.get('box_frame'))   # canvas-normalized
    return boxes, jax.nn.sigmoid(out['enc_outputs']['pred_logits']).max(-1)

  h, w = config.input.image_size
  by_id = {r.image_id: r for r in records}
  for host_batch in pipeline.eval_iterator(config, records, global_batch_size=batch_size, process_index=0,
                                           process_count=1):
    batch = parallel.host_to_global({k: host_batch[k] for k in ('image', 'pad_mask')}, mesh)
    boxes, scores = jax.device_get(proposals(variables, batch['image'], batch['pad_mask']))
    for i in np.flatnonzero(host_batch['valid']):
      r = by_id[int(host_batch['image_id'][i])]
      scale = float(host_batch['scale'][i])
      origin = np.asarray(host_batch['patch_origin'][i], np.float64)
      centers = boxes[i, :, :2] * np.array([w, h]) / scale + origin
      try:
        with Image.open(r.file_name) as im:
          overlay = visualize.heatmap_overlay(im.convert('RGB'), centers, scores[i])
        with (epath.Path(output) / f'{r.name}_heatmap.png').open('wb') as f:
          overlay.save(f, format='PNG')
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('could not write the heatmap of %s: %s', r.file_name, e)
        print(f'mrqm_jax: warning: no heatmap for {r.file_name}: {errors.one_line(e, 120)}')
