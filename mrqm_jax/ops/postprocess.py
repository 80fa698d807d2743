"""Detector outputs -> fixed-size detections in original-image pixels; pure jnp, jittable.

DETR-family decoding as Co-DINO / DINO do it (mmdet `DINOHead._get_bboxes_single` without NMS): every
(query, class) pair is a candidate scored by sigmoid(logit); the top `num_detections` candidates over all
queries x classes are kept, so one query may yield several classes. Boxes go from the model's box frame
(cxcywh normalized by each image's own size or by the padded static canvas, `model.box_frame`, see DESIGN.md)
to pixel xyxy of the original image:

  canvas-normalized:  b_canvas = b_frame * box_frame  (the detector's `box_frame` [B, 4]; ones for 'canvas')
  canvas pixels:   x_c = x_norm * W_canvas,  y_c = y_norm * H_canvas
  original pixels: x_o = x_c / scale + patch_origin_x,  y_o = y_c / scale + patch_origin_y

(`scale` = canvas px per original px; `patch_origin` = top-left of the slice in the original image, zeros
without slicing), then clipped to [0, W_orig] x [0, H_orig] as mmdet clips to the image shape.

The last section is host-side NumPy, not jitted: merging the detections of overlapping patches (SODA-D's sliced
protocol) back onto their source images by class-wise NMS.
"""

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrqm_jax.metrics.detections import Detections
from mrqm_jax.ops import boxes as box_ops


def canvas_to_original_xyxy(boxes_cxcywh: jax.Array, canvas_hw: tuple[int, int], scale: jax.Array,
                            patch_origin: jax.Array, orig_size: jax.Array) -> jax.Array:
  """Canvas-normalized cxcywh -> original-image pixel xyxy, clipped to the image.

  boxes_cxcywh [B, K, 4]; canvas_hw static (H, W); scale [B] f32; patch_origin [B, 2] (x, y);
  orig_size [B, 2] (H, W) -> [B, K, 4] f32 xyxy.
  """
  h, w = canvas_hw
  xyxy = box_ops.cxcywh_to_xyxy(boxes_cxcywh.astype(jnp.float32))
  xyxy = xyxy * jnp.asarray([w, h, w, h], jnp.float32)
  origin = jnp.tile(patch_origin.astype(jnp.float32), 2)  # [B, 4]: (x, y, x, y)
  xyxy = xyxy / scale.astype(jnp.float32)[:, None, None] + origin[:, None, :]
  orig_h = orig_size[:, 0].astype(jnp.float32)
  orig_w = orig_size[:, 1].astype(jnp.float32)
  upper = jnp.stack([orig_w, orig_h, orig_w, orig_h], axis=-1)[:, None, :]  # [B, 1, 4]
  return jnp.clip(xyxy, 0.0, upper)


def topk_queries_classes(pred_logits: jax.Array, num_detections: int
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k over queries x classes of sigmoid scores.

  pred_logits [B, Q, C] -> (scores [B, K] f32 descending, query_index [B, K] i32, labels [B, K] i32) with
  K = num_detections. Raises if K > Q * C (the static shape could not be filled).
  """
  b, q, c = pred_logits.shape
  if not 0 < num_detections <= q * c:
    raise ValueError(f'num_detections (config.eval.max_detections) must be in [1, queries x classes = '
                     f'{q} x {c} = {q * c}], got {num_detections}')
  scores = jax.nn.sigmoid(pred_logits.astype(jnp.float32)).reshape(b, q * c)
  top_scores, flat_index = jax.lax.top_k(scores, num_detections)
  return top_scores, (flat_index // c).astype(jnp.int32), (flat_index % c).astype(jnp.int32)


def frame_to_canvas(boxes: jax.Array, box_frame: jax.Array | None) -> jax.Array:
  """cxcywh [B, K, 4] in the detector's box frame -> canvas-normalized: x box_frame [B, 4] (`outputs['box_frame']`;
  None = already canvas-normalized)."""
  if box_frame is None:
    return boxes
  return boxes * jnp.asarray(box_frame, boxes.dtype)[:, None, :]


def detections_from_outputs(pred_logits: jax.Array, pred_boxes: jax.Array, *, canvas_hw: tuple[int, int],
                            scale: jax.Array, patch_origin: jax.Array, orig_size: jax.Array,
                            num_detections: int, box_frame: jax.Array | None = None) -> dict[str, jax.Array]:
  """The detector's last-layer predictions -> fixed-size detections per image.

  pred_logits [B, Q, C] sigmoid logits; pred_boxes [B, Q, 4] cxcywh in the detector's box frame, box_frame
  [B, 4] (`outputs['box_frame']`; None = pred_boxes are canvas-normalized); canvas_hw static
  (H, W) = config.input.image_size; scale [B]; patch_origin [B, 2]; orig_size [B, 2] i32 (H, W).
  Returns {'boxes': [B, K, 4] f32 original-pixel xyxy, 'scores': [B, K] f32 (descending),
  'labels': [B, K] i32 0-based}, K = num_detections.
  """
  scores, query_index, labels = topk_queries_classes(pred_logits, num_detections)
  boxes = frame_to_canvas(jnp.take_along_axis(pred_boxes, query_index[..., None], axis=1), box_frame)  # [B, K, 4]
  boxes = canvas_to_original_xyxy(boxes, canvas_hw, scale, patch_origin, orig_size)
  return {'boxes': boxes, 'scores': scores, 'labels': labels}


SOFT_NMS_METHODS = ('linear', 'gaussian', 'naive')


def soft_nms(boxes: jax.Array, scores: jax.Array, labels: jax.Array, *, max_detections: int,
             iou_threshold: float = 0.8, method: str = 'linear', sigma: float = 0.5, min_score: float = 1e-3,
             score_threshold: float = 0.0) -> dict[str, jax.Array]:
  """Co-DINO's test-time soft-NMS on fixed-size detections (jittable; vmapped over the batch).

  Co-DINO's query head with `test_cfg.nms` (co_dino_5scale_r50_1x_coco.py: max_per_img=300,
  nms=dict(type='soft_nms', iou_threshold=0.8)) takes the top num_query (query, class) candidates, keeps scores
  > score_thr (0), maps boxes to the original image, runs mmcv's `batched_nms` with mmcv's `soft_nms` and keeps
  the first max_per_img (`CoDeformDETRHead._get_bboxes_single`). mmcv's soft_nms defaults: method 'linear',
  sigma 0.5, min_score 1e-3, offset 0. Its CPU kernel, reproduced here: repeatedly select the highest current
  score; every remaining box gets score *= weight with ovr = IoU to the selected box and weight = 1 - ovr if
  ovr >= iou_threshold (linear), exp(-ovr^2 / sigma) (gaussian) or 0 if ovr >= iou_threshold (naive); a box
  whose score drops below min_score is discarded. Output order is selection order, with the decayed scores
  (mmcv 1.x batched_nms returns dets[:, -1]). Class-aware as batched_nms: boxes are shifted by
  label * (max coordinate + 1) so that different classes never overlap (IoUs are computed on the shifted
  float32 coordinates, as there). Only the first `max_detections` selections are computed: later ones cannot
  change them. Exact ties in score are broken by lowest input index (the kernel's swap order may differ).

  Args:
    boxes [B, K, 4] xyxy (original-image pixels), scores [B, K], labels [B, K] int: candidates.
    max_detections: M, kept per image (Co-DINO max_per_img).

  Returns:
    {'boxes': [B, M, 4], 'scores': [B, M] (selection order, non-increasing), 'labels': [B, M] i32}; slots past
    the number kept have score 0, box 0 and label 0 (dropped by eval.score_threshold >= 0).
  """
  if method not in SOFT_NMS_METHODS:
    raise ValueError(f'soft-NMS method must be one of {", ".join(SOFT_NMS_METHODS)}, got {method!r}')
  num_candidates = boxes.shape[1]
  if not 0 < max_detections:
    raise ValueError(f'max_detections must be >= 1, got {max_detections}')
  steps = min(max_detections, num_candidates)

  def single(boxes, scores, labels):
    boxes = boxes.astype(jnp.float32)
    scores = scores.astype(jnp.float32)
    alive = scores > score_threshold
    max_coordinate = jnp.max(jnp.where(alive[:, None], boxes, -jnp.inf))
    shifted = boxes + (labels.astype(jnp.float32) * (max_coordinate + 1.0))[:, None]
    x1, y1, x2, y2 = (shifted[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)

    def overlaps(m):  # IoU of box m with every box, written as the kernel computes it
      w = jnp.maximum(0.0, jnp.minimum(x2[m], x2) - jnp.maximum(x1[m], x1))
      h = jnp.maximum(0.0, jnp.minimum(y2[m], y2) - jnp.maximum(y1[m], y1))
      inter = w * h
      return inter / (areas[m] + areas - inter)

    def step(i, carry):
      current, alive, picked, picked_score, picked_valid = carry
      m = jnp.argmax(jnp.where(alive, current, -jnp.inf))
      valid = alive[m]
      picked = picked.at[i].set(m)
      picked_score = picked_score.at[i].set(current[m])
      picked_valid = picked_valid.at[i].set(valid)
      alive = alive.at[m].set(False) & valid
      ovr = overlaps(m)
      if method == 'linear':
        weight = jnp.where(ovr >= iou_threshold, 1.0 - ovr, 1.0)
      elif method == 'gaussian':
        weight = jnp.exp(-(ovr * ovr) / sigma)
      else:
        weight = jnp.where(ovr >= iou_threshold, 0.0, 1.0)
      current = jnp.where(alive, current * weight, current)
      alive = alive & ~(current < min_score)
      return current, alive, picked, picked_score, picked_valid

    init = (scores, alive, jnp.zeros((steps,), jnp.int32), jnp.zeros((steps,), jnp.float32),
            jnp.zeros((steps,), bool))
    _, _, picked, picked_score, picked_valid = jax.lax.fori_loop(0, steps, step, init)
    out_boxes = jnp.where(picked_valid[:, None], boxes[picked], 0.0)
    out_scores = jnp.where(picked_valid, picked_score, 0.0)
    out_labels = jnp.where(picked_valid, labels[picked], 0).astype(jnp.int32)
    if steps < max_detections:  # fewer candidates than slots
      pad = max_detections - steps
      out_boxes = jnp.pad(out_boxes, ((0, pad), (0, 0)))
      out_scores = jnp.pad(out_scores, (0, pad))
      out_labels = jnp.pad(out_labels, (0, pad))
    return out_boxes, out_scores, out_labels

  out_boxes, out_scores, out_labels = jax.vmap(single)(boxes, scores, labels)
  return {'boxes': out_boxes, 'scores': out_scores, 'labels': out_labels}


# ------------------------------------------------------------------ host side: merging patch detections
# NumPy, run once per evaluated image after the jitted model (SODA-D sliced protocol, see input_pipeline/slicing.py).
def shift_detections(detections: Detections, origin_xy: Sequence[float]) -> Detections:
  """Patch-pixel detections -> source-image pixels (adds the patch origin (x, y) to the boxes)."""
  x, y = origin_xy
  boxes = np.asarray(detections.boxes, np.float64).reshape(-1, 4) + np.array([x, y, x, y], np.float64)
  return Detections(boxes, np.asarray(detections.scores), np.asarray(detections.labels))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Greedy NMS of one class: indices [K] of the kept boxes, highest score first.

  boxes [N, 4] xyxy; scores [N]. A box is suppressed when its IoU with an already kept box is strictly greater
  than `iou_threshold` (mmcv). Ties in score keep input order. Each step compares the kept box with all
  remaining ones at once, so the loop runs once per kept box.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  order = np.argsort(-np.asarray(scores, np.float64), kind='stable')
  areas = (np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
  keep = []
  while order.size:
    best, rest = order[0], order[1:]
    keep.append(best)
    lo = np.maximum(boxes[best, :2], boxes[rest, :2])
    hi = np.minimum(boxes[best, 2:], boxes[rest, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    union = areas[best] + areas[rest] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    order = rest[iou <= iou_threshold]
  return np.asarray(keep, np.int64)


def classwise_nms(detections: Detections, iou_threshold: float) -> Detections:
  """`nms` within each label; the result is sorted by descending score (stable)."""
  boxes = np.asarray(detections.boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(detections.scores, np.float64).reshape(-1)
  labels = np.asarray(detections.labels).reshape(-1)
  keep = [np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou_threshold)]
          for c in np.unique(labels)]
  keep = np.concatenate(keep) if keep else np.zeros([0], np.int64)
  keep = keep[np.argsort(-scores[keep], kind='stable')]
  return Detections(boxes[keep], scores[keep], labels[keep])


def merge_patch_detections(per_image: Mapping[int, Sequence[Detections]],
                           records: Sequence[Any], *, iou_threshold: float = 0.5,
                           max_detections: int | None = None) -> dict[int, Detections]:
  """Pools each image's patch detections and removes the duplicates that overlapping patches produce.

  Args:
    per_image: source image_id -> the Detections of its patches, ALREADY in source-image pixels (the model's
      postprocess adds `patch_origin`; use `shift_detections` for patch-pixel results).
    records: the source images (input_pipeline.records.ImageRecord, not the patches); every one gets an entry
      in the result.
    iou_threshold: class-wise NMS threshold (config.dataset.slicing.merge_nms_iou; the benchmark's 0.5).
    max_detections: keep at most this many per image, highest scores first, after NMS; None = all (the
      benchmark does not cap merged results; its evaluator caps per class).

  Returns:
    {image_id: Detections (boxes [K, 4] f64 xyxy, scores [K] descending, labels [K])} for every record.

  Raises:
    ValueError if `per_image` names an image_id that is no record.
  """
  known = {r.image_id for r in records}
  unknown = set(per_image) - known
  if unknown:
    raise ValueError(f'patch detections for image ids that are no record: {sorted(unknown)[:5]}')
  merged = {}
  for record in records:
    parts = per_image.get(record.image_id, ())
    pooled = Detections(
        np.concatenate([np.asarray(p.boxes, np.float64).reshape(-1, 4) for p in parts] + [np.zeros((0, 4))]),
        np.concatenate([np.asarray(p.scores, np.float64).reshape(-1) for p in parts] + [np.zeros(0)]),
        np.concatenate([np.asarray(p.labels, np.int64).reshape(-1) for p in parts] + [np.zeros(0, np.int64)]))
    kept = classwise_nms(pooled, iou_threshold)
    if max_detections is not None:
      kept = Detections(*(a[:max_detections] for a in kept))
    merged[record.image_id] = kept
  return merged
