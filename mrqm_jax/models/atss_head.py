"""Co-DINO's auxiliary ATSS head (training only; the Co-DINO baseline's head, Table 3 rows I and II).

mmdet ATSSHead as Co-DINO configures it: `aux_heads.DenseHead` with stacked_convs 1, GroupNorm, class / box /
centerness outputs; one anchor per location of side `octave_base_scale x stride` (8 x stride, ratio 1) on every aux
level; `ops.assigners.atss_assign` with top-9 candidates per level; DeltaXYWH box coding with stds
(0.1, 0.1, 0.2, 0.2). Its positive anchors become a query group (Co-DINO `pos_coords`), at most `max_pos` per
image chosen round-robin over objects as the IoU-aware head does (`select_positives`; Co-DETR picks a random
subset); with `query_padding='negatives'` (Co-DETR) the group is padded with random negative anchors of the image
labelled background (`aux_heads.query_group`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrqm_jax.models import aux_heads
from mrqm_jax.models import iou_aware_head
from mrqm_jax.ops import assigners
from mrqm_jax.ops import box_coder
from mrqm_jax.ops import boxes as box_ops

def centerness_target(anchors, gt_boxes):
  """ATSS centerness of anchor centres inside their gts: anchors [..., 4], gt [..., 4] cxcywh -> [...] in [0, 1].

  sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) with l, t, r, b the distances from the anchor centre to the
  gt's sides (clipped at 0: a centre outside gives 0)."""
  gt = box_ops.cxcywh_to_xyxy(gt_boxes)
  cx, cy = anchors[..., 0], anchors[..., 1]
  left, top = jnp.maximum(cx - gt[..., 0], 0.0), jnp.maximum(cy - gt[..., 1], 0.0)
  right, bottom = jnp.maximum(gt[..., 2] - cx, 0.0), jnp.maximum(gt[..., 3] - cy, 0.0)
  ratio_x = jnp.minimum(left, right) / jnp.maximum(jnp.maximum(left, right), box_ops.EPS)
  ratio_y = jnp.minimum(top, bottom) / jnp.maximum(jnp.maximum(top, bottom), box_ops.EPS)
  return jnp.sqrt(ratio_x * ratio_y)


class ATSSHead(nn.Module):
  """Attributes: num_classes, canvas_hw, strides (nominal stride of each aux level, px), octave_base_scale (anchor
  side / stride), topk, max_pos (K), stacked_convs, norm, conv_impl, dtype.

  Call: (maps: L aux maps [B, H_l, W_l, D], level_pad: L masks [B, H_l, W_l] bool, targets {'boxes' [B, M, 4],
  'box_valid' [B, M]}, norm_region: None or [B | 1, H, W] bool, the GroupNorm statistics region at the image's
  resolution, `aux_heads.DenseHead`) -> dict, A = sum H_l W_l:
    cls_logits [B, A, C]  pred_boxes [B, A, 4]  centerness [B, A] (logits)  anchors [A, 4]  anchor_valid [B, A]
    assigned_gt [B, A] (-1 negative)  centerness_target [B, A]
    pos_ref_boxes [B, P, 4]  pos_gt [B, P]  pos_valid [B, P]   (the chosen positives, P = max_pos)
    query_index [B, K] (anchor of each slot)  query_live [B, K]  query_ref_boxes [B, K, 4] (the anchors; no
    gradient)  query_gt [B, K] (-1: background or dead)   the query group, K = query_group_slots(max_pos);
    targets['atss_query_index'] [B, K] (-1 = dead slot), when given, pins its anchors (nothing is drawn)
  """
  num_classes: int
  canvas_hw: tuple[int, int]
  strides: tuple[int, ...]
  octave_base_scale: float = 8.0
  topk: int = 9
  max_pos: int = 300
  stacked_convs: int = 1
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None
  anchor_grid: str = 'cell_centers'   # config.model.anchor_grid (`iou_aware_head.generate_anchors`)
  query_padding: str = 'negatives'

  @nn.compact
  def __call__(self, maps, level_pad, targets: dict, norm_region=None) -> dict:
    shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in maps)
    if len(self.strides) != len(shapes):
      raise ValueError(f'ATSSHead: {len(self.strides)} strides for {len(shapes)} levels')
    anchor_args = (shapes, self.canvas_hw, [self.octave_base_scale * s for s in self.strides], (1.0,), (1.0,))
    anchors = jnp.asarray(iou_aware_head.generate_anchors(*anchor_args, grid=self.anchor_grid, strides=self.strides))
    dense = aux_heads.DenseHead(1, self.num_classes, self.stacked_convs, True, self.norm, self.conv_impl,
                                self.dtype, name='dense')(maps, norm_region)
    pred_boxes = box_coder.decode_deltas(anchors[None], dense['deltas'], box_coder.DELTA_STDS)
    anchor_valid = aux_heads.anchor_valid_mask(level_pad, 1)
    gt_boxes = jnp.asarray(targets['boxes'], jnp.float32)
    gt_valid = jnp.asarray(targets['box_valid'], bool)
    gt_boxes = jnp.where(gt_valid[..., None], gt_boxes, 0.0)
    per_level = tuple(h * w for h, w in shapes)
    anchors_px = jnp.asarray(iou_aware_head.generate_anchors(*anchor_args, grid=self.anchor_grid,
                                                             strides=self.strides, pixel_xyxy=True))
    if self.is_initializing():   # parameters only: skip compiling the assignment, which holds none
      assigned_gt = jnp.full(anchor_valid.shape, -1, jnp.int32)
      assigned_iou = jnp.zeros(anchor_valid.shape, jnp.float32)
    else:
      assigned_gt, assigned_iou = jax.vmap(lambda g, v, av: assigners.atss_assign(
          anchors_px, per_level, box_ops.cxcywh_to_pixel_xyxy(g, self.canvas_hw), v, topk=self.topk, anchor_valid=av))(
              gt_boxes, gt_valid, anchor_valid)
    target = jnp.take_along_axis(gt_boxes, jnp.maximum(assigned_gt, 0)[..., None], axis=1)
    ctr_target = jnp.where(assigned_gt >= 0, centerness_target(anchors[None], target), 0.0)
    pos_index, pos_valid = jax.vmap(lambda g, i: iou_aware_head.select_positives(g, i, self.max_pos))(
        assigned_gt, assigned_iou)
    pos_gt = jnp.where(pos_valid, jnp.take_along_axis(assigned_gt, pos_index, axis=1), 0)
    group = aux_heads.anchor_query_group(pos_index, pos_valid, assigned_gt, anchor_valid,
                                         **aux_heads.query_group_settings(self, self.max_pos, targets))
    return {
        'cls_logits': dense['cls_logits'],
        'pred_boxes': pred_boxes,
        'centerness': dense['centerness'],
        'anchors': anchors,
        'anchor_valid': anchor_valid,
        'assigned_gt': assigned_gt,
        'centerness_target': jax.lax.stop_gradient(ctr_target),
        'pos_ref_boxes': jax.lax.stop_gradient(anchors[pos_index]),
        'pos_gt': pos_gt.astype(jnp.int32),
        'pos_valid': pos_valid,
        **group,
        'query_ref_boxes': jax.lax.stop_gradient(anchors[group['query_index']]),
    }
