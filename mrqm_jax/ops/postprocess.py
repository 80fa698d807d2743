"""Detector outputs -> fixed-size detections in original-image pixels; pure jnp, jittable.

DETR-family decoding as Co-DINO / DINO do it (mmdet `DINOHead._get_bboxes_single` without NMS): every
(query, class) pair is a candidate scored by sigmoid(logit); the top `num_detections` candidates over all
queries x classes are kept, so one query may yield several classes. Boxes go from the model's contract
(cxcywh normalized by the padded static canvas, see DESIGN.md) to pixel xyxy of the original image:

  canvas pixels:   x_c = x_norm * W_canvas,  y_c = y_norm * H_canvas
  original pixels: x_o = x_c / scale + patch_origin_x,  y_o = y_c / scale + patch_origin_y

(`scale` = canvas px per original px; `patch_origin` = top-left of the slice in the original image, zeros
without slicing), then clipped to [0, W_orig] x [0, H_orig] as mmdet clips to the image shape.
"""

import jax
import jax.numpy as jnp

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


def detections_from_outputs(pred_logits: jax.Array, pred_boxes: jax.Array, *, canvas_hw: tuple[int, int],
                            scale: jax.Array, patch_origin: jax.Array, orig_size: jax.Array,
                            num_detections: int) -> dict[str, jax.Array]:
  """The detector's last-layer predictions -> fixed-size detections per image.

  pred_logits [B, Q, C] sigmoid logits; pred_boxes [B, Q, 4] canvas-normalized cxcywh; canvas_hw static
  (H, W) = config.input.image_size; scale [B]; patch_origin [B, 2]; orig_size [B, 2] i32 (H, W).
  Returns {'boxes': [B, K, 4] f32 original-pixel xyxy, 'scores': [B, K] f32 (descending),
  'labels': [B, K] i32 0-based}, K = num_detections.
  """
  scores, query_index, labels = topk_queries_classes(pred_logits, num_detections)
  boxes = jnp.take_along_axis(pred_boxes, query_index[..., None], axis=1)  # [B, K, 4]
  boxes = canvas_to_original_xyxy(boxes, canvas_hw, scale, patch_origin, orig_size)
  return {'boxes': boxes, 'scores': scores, 'labels': labels}
