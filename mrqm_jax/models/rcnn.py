"""Co-DINO's collaborative Faster R-CNN branch (training only): RPN -> proposals -> sampled RoIs -> RoIAlign ->
Shared2FC box head; its positive RoIs become a query group for the shared decoder.

Static version of mmdet 2.x `RPNHead` + `CoStandardRoIHead` as `co_dino_5scale_r50_1x_coco.py` configures them:
  RPN        anchors octave_base_scale x 2^(i / scales_per_octave) x stride, ratios (0.5, 1, 2), per aux level;
             targets: `max_iou_assign` (0.7 / 0.3, min_pos_iou 0.3, low-quality matches), `random_sample` 256 at
             0.5 positive; deltas with stds 1.
  proposals  per level the `nms_pre` best anchors by objectness, decoded (no gradient), clipped to the canvas,
             NMS at `nms_iou` per level (mmdet's batched_nms with level ids), the best `num_proposals` overall; a
             static count with a validity mask (mmdet keeps a variable number up to max_per_img).
  RoIs       the valid gts and the proposals (add_gt_as_proposals) -> `max_iou_assign` (0.5 / 0.5 / 0.5, no
             low-quality) -> `random_sample` 512 at 0.25 positive (step RNG stream 'aux').
  RoIAlign   7 x 7, aligned, level by `map_roi_levels` (finest_scale 56) over the first `num_roi_levels` aux
             levels, `sampling_ratio` samples per bin side; 0 (Co-DINO's, the recipes') is mmcv's adaptive
             ceil(RoI side / 7) per RoI on a static grid of at most `adaptive_max_samples` per side
             (`roi_align` module doc); 2 is torchvision / Detectron2's fixed count (mrqm_jax <= 0.3).
  box head   Shared2FC (1024), softmax over C + 1, class-specific deltas (stds 0.1, 0.1, 0.2, 0.2) decoded
             for the GIoU loss (reg_decoded_bbox).
Query group: the positive sampled RoIs (proposals or gts), in sample order (random), at most
`min(max_pos, num_rois * pos_fraction)` per image; reference box = the RoI, target = its assigned gt. With
`query_padding='negatives'` (Co-DETR, which feeds the RoI head's sampled RoIs with their labels to the group) the
group is padded with random negative sampled RoIs, labelled background (`aux_heads.query_group`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrqm_jax.models import aux_heads
from mrqm_jax.models import iou_aware_head
from mrqm_jax.models import layers
from mrqm_jax.ops import assigners
from mrqm_jax.ops import box_coder
from mrqm_jax.ops import boxes as box_ops
from mrqm_jax.ops import nms as nms_lib
from mrqm_jax.ops import roi_align

def rpn_anchor_sizes(strides, octave_base_scale: float, scales_per_octave: int):
  """(base sizes per level, octave scales) of mmdet's AnchorGenerator(octave_base_scale, scales_per_octave)."""
  return (tuple(float(octave_base_scale * s) for s in strides),
          tuple(2.0 ** (i / scales_per_octave) for i in range(scales_per_octave)))


def select_proposals(logits, deltas, anchors, anchor_valid, level_sizes, canvas_hw, *, nms_pre: int,
                     nms_iou: float, num_proposals: int, clip_wh=None):
  """RPN outputs of one image -> (proposals [P, 4] canvas-px xyxy, valid [P]), P = num_proposals (no gradient).

  logits [A], deltas [A, 4], anchors [A, 4] normalized cxcywh, anchor_valid [A], level_sizes: anchors per
  level (static), clip_wh: optional [2] (W, H) in canvas px that boxes are clipped to (the image's own size, as
  mmdet's img_shape; default the canvas). Per level: top min(nms_pre, A_l) by logit among valid anchors, decode,
  clip, drop empty boxes, NMS; then the num_proposals best survivors of all levels.
  """
  logits, deltas = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas)
  h, w = canvas_hw
  boxes_all, scores_all = [], []
  start = 0
  for size in level_sizes:
    lg = jnp.where(anchor_valid[start:start + size], logits[start:start + size], -jnp.inf)
    score, idx = jax.lax.top_k(lg, min(nms_pre, size))
    idx = idx + start
    boxes = box_ops.cxcywh_to_pixel_xyxy(
        box_coder.decode_deltas(anchors[idx], deltas[idx], box_coder.UNIT_STDS), canvas_hw)
    bound = jnp.asarray([w, h], jnp.float32) if clip_wh is None else jnp.asarray(clip_wh, jnp.float32)
    boxes = jnp.clip(boxes, 0.0, jnp.concatenate([bound, bound]))
    ok = jnp.isfinite(score) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = nms_lib.nms(boxes, score, nms_iou, valid=ok)
    boxes_all.append(boxes)
    scores_all.append(jnp.where(keep, score, -jnp.inf))
    start += size
  boxes, scores = jnp.concatenate(boxes_all), jnp.concatenate(scores_all)
  count = min(num_proposals, scores.shape[0])
  best, idx = jax.lax.top_k(scores, count)
  proposals, valid = boxes[idx], jnp.isfinite(best)
  if count < num_proposals:
    proposals = jnp.pad(proposals, ((0, num_proposals - count), (0, 0)))
    valid = jnp.pad(valid, (0, num_proposals - count))
  return proposals, valid


def pinned_sample(targets: dict, key: str, num_samples: int):
  """A sample given in targets instead of drawn (e.g. a reference implementation's draw, for parity checks):
  targets[key + '_index'] [B, S] int (candidate of each sample slot, -1 = empty slot) and targets[key + '_gt']
  [B, S] int (its gt, -1 = negative) -> (index [B, S] in range, is_pos [B, S], valid [B, S], gt [B, S] >= 0), the
  outputs of `assigners.random_sample` plus each slot's gt; None when targets has no key + '_index'."""
  if f'{key}_index' not in targets:
    return None
  index = jnp.asarray(targets[f'{key}_index'], jnp.int32)
  gt = jnp.asarray(targets[f'{key}_gt'], jnp.int32)
  if index.shape[1:] != (num_samples,) or gt.shape != index.shape:
    raise ValueError(f'RCNNBranch: pinned {key}_index / _gt must both be [B, {num_samples}], got {index.shape} '
                     f'and {gt.shape}')
  valid = index >= 0
  return jnp.maximum(index, 0), valid & (gt >= 0), valid, jnp.maximum(gt, 0)


class RCNNBranch(nn.Module):
  """Attributes: num_classes, canvas_hw, strides (nominal px stride of each aux level), the RPN settings
  (rpn_octave_base_scale, rpn_scales_per_octave, rpn_ratios, rpn_pos_iou, rpn_neg_iou, rpn_min_pos_iou,
  rpn_num_samples, rpn_pos_fraction, nms_pre, nms_iou, num_proposals), the RoI settings (roi_pos_iou,
  roi_num_samples, roi_pos_fraction, num_roi_levels, roi_size, sampling_ratio, finest_scale, fc_dim), max_pos,
  conv_impl, dtype, query_padding ('negatives' | 'masked', `aux_heads.query_group`). RNG stream 'aux'
  (sampling, and the query group's negatives).

  Call: (maps: L aux maps [B, H_l, W_l, D], level_pad: L masks [B, H_l, W_l], targets {'boxes' [B, M, 4],
  'labels' [B, M], 'box_valid' [B, M]}, norm_region: None or [B | 1, H, W] bool, the batch's extent at the
  image's resolution — no GroupNorm here (mmdet's RPNHead and Shared2FCBBoxHead have none), but the RPN conv
  reads zeros outside it and only the anchors inside it propose RoIs, as on mmdet's batch tensor) -> dict (S = rpn_num_samples, N = roi_num_samples, P = num_proposals,
  K = min(max_pos, int(N * roi_pos_fraction))):
    rpn_logits [B, S]  rpn_deltas [B, S, 4]  rpn_delta_targets [B, S, 4]  rpn_pos [B, S]  rpn_valid [B, S]
    roi_logits [B, N, C + 1]  roi_boxes [B, N, 4] (decoded with the target class's deltas, normalized cxcywh)
    roi_gt [B, N] (-1 background)  roi_valid [B, N]
    proposals [B, P, 4] normalized cxcywh  proposal_valid [B, P]
    pos_ref_boxes [B, K, 4]  pos_gt [B, K]  pos_valid [B, K]   (the positive RoIs: sample slots 0..K-1)
    query_index [B, G] (sample slot of each group slot, into roi_*)  query_live [B, G]  query_ref_boxes [B, G, 4]
    query_gt [B, G] (-1: background or dead)   the query group, G = query_group_slots(K);
    targets['rcnn_query_index'] [B, G] (-1 = dead slot), when given, pins its sample slots (nothing is drawn)
  Pinned draws (parity with a reference implementation; each used only when its key is in targets, `{name}_`
  prefixed, name = 'rcnn'): 'rcnn_rpn_sample_index' / 'rcnn_rpn_sample_gt' [B, S] the RPN sample (anchor of each
  slot, -1 empty; its gt, -1 negative; `pinned_sample`), 'rcnn_proposals' [B, P, 4] canvas-px xyxy with
  'rcnn_proposal_valid' [B, P] the proposals, 'rcnn_roi_sample_index' / 'rcnn_roi_sample_gt' [B, N] the RoI
  sample (candidate index: gt m < M, proposal p at M + p).
  """
  num_classes: int
  canvas_hw: tuple[int, int]
  strides: tuple[int, ...]
  rpn_octave_base_scale: float = 4.0
  rpn_scales_per_octave: int = 3
  rpn_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  rpn_pos_iou: float = 0.7
  rpn_neg_iou: float = 0.3
  rpn_min_pos_iou: float = 0.3
  rpn_num_samples: int = 256
  rpn_pos_fraction: float = 0.5
  nms_pre: int = 4000
  nms_iou: float = 0.7
  num_proposals: int = 1000
  roi_pos_iou: float = 0.5
  roi_num_samples: int = 512
  roi_pos_fraction: float = 0.25
  num_roi_levels: int = 5
  roi_size: int = 7
  sampling_ratio: int = 2
  finest_scale: float = 56.0
  fc_dim: int = 1024
  max_pos: int = 300
  conv_impl: str = 'auto'
  dtype: Any = None
  anchor_grid: str = 'cell_centers'   # config.model.anchor_grid (`iou_aware_head.generate_anchors`)
  adaptive_max_samples: int = 6       # RoIAlign's per-side cap when sampling_ratio = 0 (mmcv's adaptive rule)
  query_padding: str = 'negatives'

  @nn.compact
  def __call__(self, maps, level_pad, targets: dict, norm_region=None) -> dict:
    shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in maps)
    sizes, scales = rpn_anchor_sizes(self.strides, self.rpn_octave_base_scale, self.rpn_scales_per_octave)
    per_location = len(scales) * len(self.rpn_ratios)
    anchor_args = (shapes, self.canvas_hw, sizes, self.rpn_ratios, scales)
    anchors = jnp.asarray(iou_aware_head.generate_anchors(*anchor_args, grid=self.anchor_grid, strides=self.strides))
    anchors_px = jnp.asarray(iou_aware_head.generate_anchors(*anchor_args, grid=self.anchor_grid,
                                                             strides=self.strides, pixel_xyxy=True))
    anchor_valid = aux_heads.anchor_valid_mask(level_pad, per_location)
    rpn = aux_heads.RPNHead(per_location, maps[0].shape[-1], self.conv_impl, self.dtype, name='rpn')(maps,
                                                                                                  norm_region)

    if self.is_initializing():   # parameters only: skip compiling assignment, proposals and sampling
      batch, dim = maps[0].shape[0], maps[0].shape[-1]
      aux_heads.Shared2FCHead(self.num_classes, self.fc_dim, self.dtype, name='bbox_head')(
          jnp.zeros((batch, self.roi_num_samples, self.roi_size, self.roi_size, dim), maps[0].dtype))
      k = min(self.max_pos, int(self.roi_num_samples * self.roi_pos_fraction))
      g = aux_heads.query_group_slots(k, self.query_padding)
      return {'pos_ref_boxes': jnp.full((batch, k, 4), 0.5), 'pos_gt': jnp.zeros((batch, k), jnp.int32),
              'pos_valid': jnp.zeros((batch, k), bool), 'query_index': jnp.zeros((batch, g), jnp.int32),
              'query_live': jnp.zeros((batch, g), bool), 'query_ref_boxes': jnp.full((batch, g, 4), 0.5),
              'query_gt': jnp.full((batch, g), -1, jnp.int32)}

    gt_valid = jnp.asarray(targets['box_valid'], bool)
    gt_boxes = jnp.where(gt_valid[..., None], jnp.asarray(targets['boxes'], jnp.float32), 0.0)
    gt_labels = jnp.where(gt_valid, jnp.asarray(targets['labels'], jnp.int32), 0)
    gt_px = box_ops.cxcywh_to_pixel_xyxy(gt_boxes, self.canvas_hw)
    batch = gt_boxes.shape[0]
    rpn_rng, roi_rng = jax.random.split(self.make_rng('aux'))

    # RPN targets: assign every anchor, sample S (or the pinned sample, `pinned_sample`).
    pinned_rpn = pinned_sample(targets, f'{self.name}_rpn_sample', self.rpn_num_samples)
    if pinned_rpn is None:
      assigned = jax.vmap(lambda g, v, av: assigners.max_iou_assign(
          anchors_px, g, v, pos_iou_thr=self.rpn_pos_iou, neg_iou_thr=self.rpn_neg_iou,
          min_pos_iou=self.rpn_min_pos_iou, match_low_quality=True, anchor_valid=av)[0])(
              gt_px, gt_valid, anchor_valid)
      index, is_pos, sample_valid = jax.vmap(lambda r, a, av: assigners.random_sample(
          r, a, self.rpn_num_samples, self.rpn_pos_fraction, valid=av))(
              jax.random.split(rpn_rng, batch), assigned, anchor_valid)
      sampled_gt = jnp.maximum(jnp.take_along_axis(assigned, index, axis=1), 0)
    else:
      index, is_pos, sample_valid, sampled_gt = pinned_rpn
    take = lambda x: jnp.take_along_axis(x, index if x.ndim == 2 else index[..., None], axis=1)  # noqa: E731
    sampled_pos = is_pos & sample_valid
    # Negatives and empty slots get their anchor as target (zero deltas, never read by the loss) so that no
    # padded gt (zero size -> log 0) reaches the output.
    target_boxes = jnp.where(sampled_pos[..., None], jnp.take_along_axis(gt_boxes, sampled_gt[..., None], axis=1),
                             anchors[index])
    rpn_delta_targets = box_coder.encode_deltas(anchors[index], target_boxes, box_coder.UNIT_STDS)

    # Proposals (no gradient), then the RoIs: gts first (add_gt_as_proposals), assigned and sampled.
    level_sizes = tuple(h * w * per_location for h, w in shapes)
    # mmdet's RPN proposes from every anchor of the batch's maps (padding too: no valid flags at test time) and
    # clips to each image (img_shape); without targets['image_wh'] (v0.3 callers) the canvas and the valid anchors.
    image_wh = targets.get('image_wh')
    # With the batch's extent (norm_region): the anchors inside it, the batch tensor's (none exist past it there).
    if image_wh is None:
      proposal_anchor_valid = anchor_valid
    elif norm_region is None:
      proposal_anchor_valid = jnp.ones_like(anchor_valid)
    else:
      proposal_anchor_valid = aux_heads.extent_anchor_valid(norm_region, shapes, per_location, batch)
    clip_wh = (jnp.tile(jnp.asarray([self.canvas_hw[1], self.canvas_hw[0]], jnp.float32), (batch, 1))
               if image_wh is None else jnp.asarray(image_wh, jnp.float32))
    if f'{self.name}_proposals' in targets:   # pinned (e.g. a reference implementation's): nothing selected
      proposals = jnp.asarray(targets[f'{self.name}_proposals'], jnp.float32)
      proposal_valid = jnp.asarray(targets[f'{self.name}_proposal_valid'], bool)
      if proposals.shape != (batch, self.num_proposals, 4) or proposal_valid.shape != proposals.shape[:2]:
        raise ValueError(f'RCNNBranch: pinned proposals must be [B, P, 4] and [B, P] with P = num_proposals = '
                         f'{self.num_proposals}, got {proposals.shape} and {proposal_valid.shape}')
    else:
      proposals, proposal_valid = jax.vmap(lambda lg, d, av, cw: select_proposals(
          lg, d, anchors, av, level_sizes, self.canvas_hw, nms_pre=self.nms_pre, nms_iou=self.nms_iou,
          num_proposals=self.num_proposals, clip_wh=cw))(rpn['logits'], rpn['deltas'], proposal_anchor_valid,
                                                         clip_wh)
    candidates = jnp.concatenate([gt_px, proposals], axis=1)
    candidate_valid = jnp.concatenate([gt_valid, proposal_valid], axis=1)
    pinned_roi = pinned_sample(targets, f'{self.name}_roi_sample', self.roi_num_samples)
    if pinned_roi is None:
      roi_assigned = jax.vmap(lambda c, g, v, cv: assigners.max_iou_assign(
          c, g, v, pos_iou_thr=self.roi_pos_iou, neg_iou_thr=self.roi_pos_iou, min_pos_iou=self.roi_pos_iou,
          match_low_quality=False, anchor_valid=cv)[0])(candidates, gt_px, gt_valid, candidate_valid)
      roi_index, roi_is_pos, roi_valid = jax.vmap(lambda r, a, cv: assigners.random_sample(
          r, a, self.roi_num_samples, self.roi_pos_fraction, valid=cv))(
              jax.random.split(roi_rng, batch), roi_assigned, candidate_valid)
      roi_sampled_gt = jnp.take_along_axis(roi_assigned, roi_index, axis=1)
    else:
      roi_index, roi_is_pos, roi_valid, roi_sampled_gt = pinned_roi
    rois_px = jax.lax.stop_gradient(jnp.take_along_axis(candidates, roi_index[..., None], axis=1))
    roi_gt = jnp.where(roi_is_pos & roi_valid, roi_sampled_gt, -1)

    levels = min(self.num_roi_levels, len(maps))
    extent_hw = None if norm_region is None else jnp.stack(
        [layers.region_extent_hw(norm_region, hw) for hw in shapes[:levels]])
    feats = roi_align.multilevel_roi_align(list(maps[:levels]), rois_px, tuple(self.strides[:levels]),
                                           output_size=self.roi_size, sampling_ratio=self.sampling_ratio,
                                           max_samples=self.adaptive_max_samples,
                                           finest_scale=self.finest_scale, extent_hw=extent_hw)
    head = aux_heads.Shared2FCHead(self.num_classes, self.fc_dim, self.dtype, name='bbox_head')(feats)
    target_class = jnp.take_along_axis(gt_labels, jnp.maximum(roi_gt, 0), axis=1)
    deltas = jnp.take_along_axis(head['deltas'], target_class[..., None, None], axis=2)[:, :, 0]
    rois = box_ops.pixel_xyxy_to_cxcywh(rois_px, self.canvas_hw)
    roi_boxes = box_coder.decode_deltas(rois, deltas, box_coder.DELTA_STDS)

    k = min(self.max_pos, int(self.roi_num_samples * self.roi_pos_fraction))
    pos_valid = roi_is_pos[:, :k] & roi_valid[:, :k]
    settings = aux_heads.query_group_settings(self, k, targets)
    # Dead slots hold their own sample slot (as 'masked' did before the switch existed); nothing reads them.
    dead = jnp.broadcast_to(jnp.minimum(jnp.arange(settings['num_slots'], dtype=jnp.int32),
                                        self.roi_num_samples - 1), (batch, settings['num_slots']))
    query_index, query_live = aux_heads.query_group(
        pos_index=jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, k)), pos_valid=pos_valid,
        negative=roi_valid & ~roi_is_pos, dead_index=dead, **settings)
    return {
        'rpn_logits': take(rpn['logits']), 'rpn_deltas': take(rpn['deltas']),
        'rpn_delta_targets': jax.lax.stop_gradient(rpn_delta_targets),
        'rpn_pos': sampled_pos, 'rpn_valid': sample_valid,
        'roi_logits': head['cls_logits'], 'roi_boxes': roi_boxes, 'roi_gt': roi_gt.astype(jnp.int32),
        'roi_valid': roi_valid,
        'proposals': box_ops.pixel_xyxy_to_cxcywh(proposals, self.canvas_hw),
        'proposal_valid': proposal_valid,
        'pos_ref_boxes': rois[:, :k], 'pos_gt': jnp.where(pos_valid, roi_gt[:, :k], 0).astype(jnp.int32),
        'pos_valid': pos_valid,
        'query_index': query_index, 'query_live': query_live,
        'query_ref_boxes': jnp.take_along_axis(rois, query_index[..., None], axis=1),
        'query_gt': jnp.where(query_live, jnp.take_along_axis(roi_gt, query_index, axis=1), -1).astype(jnp.int32),
    }
