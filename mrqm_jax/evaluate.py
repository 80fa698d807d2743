"""Evaluation: eval split -> jitted forward -> detections in original-image pixels -> the protocol's metrics.

`evaluate_params` is called by the training loop; `evaluate_checkpoint` is `--mode=eval` (latest checkpoint in
WORKDIR, or `--checkpoint=DIR`). With SODA-D slicing, patch detections are merged back onto the original images
(shift by the patch origin, class-wise NMS) before scoring, as the benchmark does.
"""

import json
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from input_pipeline import pipeline
from mrqm_jax import checkpointing, datasets, model_lib, parallel
from mrqm_jax.metrics import coco as metrics_lib
from mrqm_jax.ops import postprocess


def make_predict_fn(model, config: ml_collections.ConfigDict, mesh):
  """Jitted (variables, batch) -> {'boxes' [B,K,4] original-pixel xyxy, 'scores' [B,K], 'labels' [B,K]}.

  K = config.eval.max_detections. Inputs sharded over 'data', outputs replicated (every host sees all).
  With `eval.soft_nms`, Co-DINO's test path: the top K (query, class) candidates, soft-NMS, the first K.
  """
  num_detections = config.eval.max_detections
  soft_nms = bool(config.eval.soft_nms)

  def predict(variables, batch):
    outputs = model.apply(variables, batch['image'], batch['pad_mask'], train=False)
    # Co-DETR (both codebases): the top max_per_img (query, class) pairs are the soft-NMS candidates, and the
    # first max_per_img survivors are kept: max_per_img is eval.max_detections here.
    candidates = min(num_detections, outputs['pred_logits'].shape[1] * outputs['pred_logits'].shape[2])
    dets = postprocess.detections_from_outputs(
        outputs['pred_logits'], outputs['pred_boxes'], canvas_hw=tuple(config.input.image_size),
        scale=batch['scale'], patch_origin=batch['patch_origin'], orig_size=batch['orig_size'],
        num_detections=candidates if soft_nms else num_detections, box_frame=outputs.get('box_frame'))
    if soft_nms:
      dets = postprocess.soft_nms(
          dets['boxes'], dets['scores'], dets['labels'], max_detections=num_detections,
          iou_threshold=config.eval.soft_nms_iou, method=config.eval.soft_nms_method,
          sigma=config.eval.soft_nms_sigma, min_score=config.eval.soft_nms_min_score)
    return dets

  return jax.jit(predict, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """`eval.batch_size` rounded up to a multiple of the device count (every device gets whole examples)."""
  n = jax.device_count()
  return max(n, -(-config.eval.batch_size // n) * n)


def predict_records(predict_fn, variables, config, records, mesh, desc='eval') -> dict:
  """Runs the model over `records`; returns {image_id: Detections} (patch results merged when slicing)."""
  batch_size = eval_batch_size(config)
  iterator = pipeline.eval_iterator(config, records, global_batch_size=batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())
  per_image: dict[int, list] = {}
  num_batches = -(-pipeline.num_eval_examples(config, records) // batch_size)
  for host_batch in tqdm.tqdm(iterator, total=num_batches, desc=desc, unit='batch', leave=False,
                              disable=jax.process_index() != 0, mininterval=2.0):
    meta = {k: host_batch.pop(k) for k in ('image_id', 'valid') if k in host_batch}
    batch = parallel.host_to_global({k: v for k, v in host_batch.items()
                                     if k in ('image', 'pad_mask', 'scale', 'patch_origin', 'orig_size')}, mesh)
    dets = jax.device_get(predict_fn(variables, batch))
    ids = _global_host_values(meta['image_id'], mesh)
    valid = _global_host_values(meta['valid'], mesh)
    for i in np.flatnonzero(valid):
      keep = dets['scores'][i] > config.eval.score_threshold
      per_image.setdefault(int(ids[i]), []).append(metrics_lib.Detections(
          boxes=dets['boxes'][i][keep], scores=dets['scores'][i][keep], labels=dets['labels'][i][keep]))
  if config.dataset.slicing.enabled:
    # No cap after merging: the SODA-D evaluator caps per class itself (as the benchmark does).
    return postprocess.merge_patch_detections(per_image, records,
                                              iou_threshold=config.dataset.slicing.merge_nms_iou,
                                              max_detections=None)
  return {image_id: parts[0] for image_id, parts in per_image.items()}


def _global_host_values(local: np.ndarray, mesh) -> np.ndarray:
  """All hosts' values of a small per-example array, in global batch order."""
  if jax.process_count() == 1:
    return np.asarray(local)
  return np.asarray(jax.device_get(parallel.host_to_global({'x': local}, mesh)['x']))


def evaluate_params(model, config: ml_collections.ConfigDict, params, model_state, records: list, mesh,
                    class_names, predict_fn=None) -> dict[str, float]:
  """Scores the model on `records` with `config.eval.protocol`; returns {metric: value in percent}."""
  if config.eval.num_images > 0:
    records = records[:config.eval.num_images]
  predict_fn = predict_fn or make_predict_fn(model, config, mesh)
  start = time.time()
  detections = predict_records(predict_fn, {'params': params, **model_state}, config, records, mesh)
  by_name = {}
  for r in records:
    d = detections.get(r.image_id)
    by_name[r.name] = d if d is not None else metrics_lib.Detections(
        np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32))
  # The protocol's own maxDets (e.g. visdrone: Co-DETR's 100/300/1000 and the toolkit's 500), not the model's
  # per-image output count eval.max_detections.
  metrics = metrics_lib.evaluate_detections(config.eval.protocol, records, by_name, num_classes=len(class_names))
  logging.info('eval on %d images in %.1fs: %s', len(records), time.time() - start, metrics)
  return metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None,
                        overrides=()) -> dict[str, float]:
  """`--mode=eval`: restores the latest readable checkpoint of WORKDIR (or `checkpoint`) and prints the metrics."""
  parallel.initialize_distributed()
  mesh = parallel.create_mesh()
  config = model_lib.inference_config(config, workdir, checkpoint, overrides)
  data = datasets.prepare_data(config, workdir, train_split=False)   # a root with only the eval split will do
  model, config, variables = model_lib.restore_for_inference(config, workdir, checkpoint, mesh)
  params, model_state = model_lib.split_variables(variables)
  metrics = evaluate_params(model, config, params, model_state, data.eval_records, mesh, data.class_names)
  if jax.process_index() == 0:
    (checkpointing.to_path(workdir) / 'eval_metrics.json').write_text(json.dumps(metrics, indent=1))
  print(json.dumps(metrics))
  return metrics
