"""Training objective of MRQM (Co-DINO's, with the IoU-aware head's dense and auxiliary-query terms).

  compute_losses(outputs, targets, config, *, num_boxes=None, axis_name=None) -> (total [], terms {name: []})

Terms (each already multiplied by its weight, so `total == sum(terms.values())`; names follow Co-DETR's logs):
  cls / bbox / giou              last decoder layer, Hungarian-matched to the ground truth (one-to-one)
  d{l}.cls / ...                 earlier decoder layers l = 0..L-2 (`aux_outputs`), each matched separately
                                 (all sets' matchings solved together: `match_query_sets`)
  enc.cls / ...                  the selected encoder proposals (`enc_outputs`), matched         x loss.enc_weight
  dn.cls / d{l}.dn.cls / ...     denoising queries (`dn_outputs`), every layer: positives reconstruct their gt,
                                 every other query in use (negatives, a group's padding) is background, no
                                 matching (mmdet DINOHead dn targets: label weight 1 on every DN query)
                                                                                                x loss.dn_weight
  iah.cls / iah.giou             dense IoU-aware head (`iah_outputs`): sigmoid focal loss on every valid anchor
                                 (positives: their gt's class), GIoU on positive anchors
                                                                 x iah.loss_weight * decoder.num_layers
  aux_{head}.cls / d{l}.aux_{head}.cls / ...   each head's auxiliary query group (`{head}_outputs['query_*']`),
                                 every layer, supervised directly by `query_gt` (paper eq. 10, no matching): a
                                 live slot with a gt is a positive, every other live slot (Co-DETR's negatives)
                                 is background (label weight 1 on every live slot)    x loss.aux_query_weight
Within each group: cls x loss.cls_weight, L1 x loss.bbox_weight, GIoU x loss.giou_weight.

Choices, with the Co-DINO reference (projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py):
- Decoder / encoder / DN / aux-query classification: QualityFocalLoss with beta = 2 (`loss.cls_type='qfl'`): the
  target of a positive at its class is the IoU of its (detached) predicted box with the gt, 0 elsewhere;
  'focal' uses the sigmoid focal loss with a one-hot target instead. Box losses: L1 on normalized cxcywh (5) and
  GIoU (2). Matching cost: 2 * FocalLossCost + 5 * L1 + 2 * (-GIoU) (`config.matcher`).
- The dense head follows Co-DINO's auxiliary ATSS head: focal loss (alpha 0.25, gamma 2) and GIoU (weight 2),
  both x lambda_2 * num_decoder_layers = 12, because Co-DETR's objective sums lambda_2 * L_enc inside the sum
  over decoder layers. Co-DETR's ATSS head also has a centerness branch that weights its GIoU; our head has
  none, so positives weigh equally. Anchors on padding tokens (`anchor_valid`) are left out, like anchors
  outside the image in mmdet.
- The auxiliary-query decoder losses use the same per-layer loss as the main branch, x lambda_1 = 1.
- Normalization (Co-DETR's avg_factor): the matched losses by the number of valid gt boxes, the DN losses by
  the number of positive DN queries, the dense losses by the number of positive anchors, the aux-query
  losses by the number of positive aux queries (also their QFL); each summed over the batch, clamped at 1. Under a
  plain `jax.jit` over a sharded global batch (this project's train step) the sums are global by construction.
  Inside `shard_map`/`pmap`, pass `axis_name`: every count is `psum`-ed over it, so each device's loss is its
  share of the global loss (sum, not mean, the per-device gradients). `num_boxes` overrides the gt count.
- Padding contributes exactly zero: invalid gts, invalid DN / aux queries and invalid anchors are replaced by
  finite dummies before any arithmetic (so NaN garbage cannot leak into values or gradients) and masked out.
- Ignore regions are not used by the losses (Co-DINO passes gt_bboxes_ignore=None to its DETR losses).
- Box frame: the query losses (matched, encoder, DN, aux query groups) and the Hungarian cost compare boxes in
  the detector's box frame (`outputs['box_frame']` [B, 4]: canvas-normalized box / box_frame; all ones in the
  'canvas' frame), as Co-DINO divides its gts by img_shape: the targets, canvas-normalized in the batch, are
  converted once here (`targets_in_frame`). So L1 loss and L1 cost weigh each axis by the image's own size;
  GIoU does not change under a per-axis scaling. The aux heads' own dense losses stay in canvas units (their
  anchors are canvas pixels).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mrqm_jax.ops import boxes as box_ops
from mrqm_jax.ops import matching

# Replaces padded boxes before any arithmetic: finite, non-degenerate, inside the canvas.
_DUMMY_BOX = (0.5, 0.5, 0.1, 0.1)
# FocalLossCost's eps (mmdet): keeps log(p) finite for saturated sigmoids.
_COST_EPS = 1e-12
CLS_TYPES = ('focal', 'qfl')


# --------------------------------------------------------------------------------------------- elementwise
def sigmoid_bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Binary cross-entropy on logits, stable for any |logits|: [...], [...] (targets in [0, 1]) -> [...]."""
  return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """Focal loss (RetinaNet), elementwise: logits [...], binary targets [...] -> [...].

  alpha weighs positives (targets = 1) and 1 - alpha negatives; (1 - p_t)^gamma down-weights easy examples.
  A negative alpha disables the weighting.
  """
  prob = jax.nn.sigmoid(logits)
  ce = sigmoid_bce_with_logits(logits, targets)
  p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
  loss = ce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
  return loss


def quality_focal_loss(logits: jax.Array, targets: jax.Array, beta: float = 2.0) -> jax.Array:
  """Quality focal loss (GFL, as Co-DINO), elementwise: logits [...], soft targets [...] in [0, 1] -> [...].

  BCE(logit, target) * |target - sigmoid(logit)|^beta: negatives have target 0 (the factor is p^beta), a
  positive has its IoU at its class. The same expression covers both, as in mmdet's implementation.
  """
  prob = jax.nn.sigmoid(logits)
  return sigmoid_bce_with_logits(logits, targets) * jnp.abs(targets - prob) ** beta


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """L1 over the last axis: [..., 4], [..., 4] -> [...]."""
  return jnp.sum(jnp.abs(pred - target), axis=-1)


def giou_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """1 - GIoU of corresponding cxcywh boxes: [..., 4], [..., 4] -> [...] in [0, 2]."""
  return 1.0 - box_ops.elementwise_giou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(target))


# --------------------------------------------------------------------------------------------- matching
def matching_cost(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array, gt_labels: jax.Array,
                  config: ml_collections.ConfigDict) -> jax.Array:
  """Co-DINO's Hungarian cost for one image: logits [Q, C], boxes [Q, 4], gt [M, 4] / [M] -> cost [Q, M].

  cost = matcher.cost_class * FocalLossCost + matcher.cost_bbox * L1(cxcywh) + matcher.cost_giou * (-GIoU),
  FocalLossCost = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)) at the gt's class.
  """
  alpha, gamma = config.loss.focal_alpha, config.loss.focal_gamma
  prob = jax.nn.sigmoid(logits)
  neg = -jnp.log(1.0 - prob + _COST_EPS) * (1.0 - alpha) * prob ** gamma
  pos = -jnp.log(prob + _COST_EPS) * alpha * (1.0 - prob) ** gamma
  cost_class = jnp.take(pos - neg, gt_labels, axis=1)                                       # [Q, M]
  cost_bbox = jnp.sum(jnp.abs(boxes[:, None, :] - gt_boxes[None, :, :]), axis=-1)           # [Q, M]
  cost_giou = -box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(gt_boxes))
  m = config.matcher
  return m.cost_class * cost_class + m.cost_bbox * cost_bbox + m.cost_giou * cost_giou


def match_query_sets(sets, gt_boxes: jax.Array, gt_labels: jax.Array, gt_valid: jax.Array,
                     config: ml_collections.ConfigDict) -> list:
  """Hungarian matching of several query sets against one batch of gts, all solved in one `hungarian_match_many`
  call (with the SciPy solver: one host callback for the whole list).

  Args:
    sets: [(logits [..., B, Q_k, C], boxes [..., B, Q_k, 4])], any leading axes (e.g. decoder layers).
    gt_boxes, gt_labels, gt_valid: [B, M, 4], [B, M], [B, M], shared by every set.

  Returns:
    [query_gt [..., B, Q_k] int32]: the gt matched to each query, -1 for unmatched queries. No gradient.
  """
  cost_fn = lambda lg, bx, gb, gl: matching_cost(lg, bx, gb, gl, config)
  problems = []
  for logits, boxes in sets:
    logits, boxes = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(boxes)
    batch_fn = jax.vmap(cost_fn)                                    # over images, each with its own gts
    for _ in range(logits.ndim - 3):
      batch_fn = jax.vmap(batch_fn, in_axes=(0, 0, None, None))     # leading axes share the gts
    cost = batch_fn(logits, boxes, gt_boxes, gt_labels)            # [..., B, Q, M]
    problems.append((cost, jnp.broadcast_to(gt_valid, cost.shape[:-2] + cost.shape[-1:])))
  results = matching.hungarian_match_many(problems, backend=config.matcher.backend)
  num_gt = gt_boxes.shape[1]

  def scatter(rows, ok, num_queries):
    rows = jnp.where(ok, rows, num_queries)                         # out of range -> dropped
    return jnp.full((num_queries,), -1, jnp.int32).at[rows].set(jnp.arange(num_gt, dtype=jnp.int32),
                                                                 mode='drop')
  query_gts = []
  for (logits, _), (row_idx, matched) in zip(sets, results):
    num_queries = logits.shape[-2]
    query_gts.append(jnp.vectorize(functools.partial(scatter, num_queries=num_queries),
                                   signature='(m),(m)->(q)')(row_idx, matched))
  return query_gts


def match_queries(logits: jax.Array, boxes: jax.Array, gt_boxes: jax.Array, gt_labels: jax.Array,
                  gt_valid: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Hungarian matching of a batch: logits [B, Q, C], boxes [B, Q, 4], gts [B, M, ...] -> query_gt [B, Q] int32.

  query_gt[b, q] is the gt matched to query q, -1 for unmatched queries. No gradient.
  """
  return match_query_sets([(logits, boxes)], gt_boxes, gt_labels, gt_valid, config)[0]


# --------------------------------------------------------------------------------------------- per-query loss
def _count(mask: jax.Array, axis_name: str | None) -> jax.Array:
  """Number of True in `mask` (over the whole batch and, with axis_name, over devices), at least 1."""
  return _weight_sum(jnp.asarray(mask, jnp.float32), axis_name)


def _sanitize_targets(targets: dict, num_classes: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch targets -> (boxes [B, M, 4] with dummies in padding rows, labels [B, M] in range, valid [B, M])."""
  valid = jnp.asarray(targets['box_valid'], bool)
  boxes = jnp.where(valid[..., None], jnp.asarray(targets['boxes'], jnp.float32),
                    jnp.asarray(_DUMMY_BOX, jnp.float32))
  labels = jnp.where(valid, jnp.clip(jnp.asarray(targets['labels'], jnp.int32), 0, num_classes - 1), 0)
  return boxes, labels, valid


def supervised_query_loss(logits: jax.Array, boxes: jax.Array, query_gt: jax.Array, query_valid: jax.Array,
                          gt_boxes: jax.Array, gt_labels: jax.Array, gt_valid: jax.Array,
                          normalizer: jax.Array, config: ml_collections.ConfigDict) -> dict:
  """Loss of queries with known targets (after matching, DN, aux queries); one decoder layer.

  Args:
    logits: [B, N, C]; boxes: [B, N, 4] normalized cxcywh.
    query_gt: [B, N] int32 target gt of each query, -1 = background.
    query_valid: [B, N] bool; invalid queries contribute nothing (their values may be garbage).
    gt_boxes, gt_labels, gt_valid: sanitized batch targets [B, M, 4], [B, M], [B, M].
    normalizer: [] the avg_factor (positives over the whole batch).

  Returns:
    {'cls', 'bbox', 'giou'} unweighted scalars.
  """
  num_classes = logits.shape[-1]
  valid = jnp.asarray(query_valid, bool)
  logits = jnp.where(valid[..., None], logits, 0.0)
  boxes = jnp.where(valid[..., None], boxes, jnp.asarray(_DUMMY_BOX, boxes.dtype))
  gt_index = jnp.clip(query_gt, 0, gt_boxes.shape[1] - 1)
  positive = valid & (query_gt >= 0) & jnp.take_along_axis(gt_valid, gt_index, axis=1)
  target_boxes = jnp.take_along_axis(gt_boxes, gt_index[..., None], axis=1)                 # [B, N, 4]
  target_labels = jnp.take_along_axis(gt_labels, gt_index, axis=1)                          # [B, N]
  onehot = jax.nn.one_hot(target_labels, num_classes, dtype=logits.dtype) * positive[..., None]
  loss_cfg = config.loss
  if loss_cfg.cls_type == 'qfl':
    quality = box_ops.elementwise_iou(box_ops.cxcywh_to_xyxy(jax.lax.stop_gradient(boxes)),
                                      box_ops.cxcywh_to_xyxy(target_boxes))
    cls = quality_focal_loss(logits, onehot * quality[..., None], loss_cfg.qfl_beta)
  elif loss_cfg.cls_type == 'focal':
    cls = sigmoid_focal_loss(logits, onehot, loss_cfg.focal_alpha, loss_cfg.focal_gamma)
  else:
    raise ValueError(f'config.loss.cls_type must be one of {CLS_TYPES}, got {loss_cfg.cls_type!r}')
  pos_weight = positive.astype(logits.dtype)
  return {
      'cls': jnp.sum(jnp.sum(cls, axis=-1) * valid) / normalizer,
      'bbox': jnp.sum(l1_loss(boxes, target_boxes) * pos_weight) / normalizer,
      'giou': jnp.sum(giou_loss(boxes, target_boxes) * pos_weight) / normalizer,
  }


def targets_in_frame(gt: tuple, box_frame: jax.Array | None) -> tuple:
  """Sanitized targets (boxes [B, M, 4] canvas-normalized, labels, valid) -> the same with boxes in the box frame
  box_frame [B, 4] (the detector's `outputs['box_frame']`; None = the canvas frame, unchanged)."""
  if box_frame is None:
    return gt
  boxes, labels, valid = gt
  return box_ops.to_box_frame(boxes, box_frame), labels, valid


def _weighted(terms: dict, prefix: str, scale: float, config: ml_collections.ConfigDict) -> dict:
  weights = {'cls': config.loss.cls_weight, 'bbox': config.loss.bbox_weight, 'giou': config.loss.giou_weight}
  return {f'{prefix}{name}': value * weights[name] * scale for name, value in terms.items()}


def _layer_prefix(layer: int, num_layers: int, group: str) -> str:
  """Co-DETR naming: the last layer unprefixed ('dn.cls'), earlier ones 'd{l}.' ('d0.dn.cls')."""
  base = f'{group}.' if group else ''
  return base if layer == num_layers - 1 else f'd{layer}.{base}'


def _per_layer(stack_logits, stack_boxes, fn) -> dict:
  """Runs fn(logits [B, N, C], boxes [B, N, 4]) -> {name: []} over a leading layer axis -> {name: [L]}."""
  return jax.vmap(fn)(stack_logits, stack_boxes)


# --------------------------------------------------------------------------------------------- groups
def matched_losses(outputs: dict, gt: tuple, gt_count: jax.Array, config) -> dict:
  """Decoder layers (last + aux_outputs) and encoder proposals, each Hungarian-matched. Weighted terms."""
  gt_boxes, gt_labels, gt_valid = gt
  logits = outputs['pred_logits'][None]
  boxes = outputs['pred_boxes'][None]
  aux = outputs.get('aux_outputs')
  if aux is not None and aux.get('pred_logits') is not None and aux['pred_logits'].shape[0] > 0:
    logits = jnp.concatenate([aux['pred_logits'], logits], axis=0)
    boxes = jnp.concatenate([aux['pred_boxes'], boxes], axis=0)

  enc = outputs.get('enc_outputs')
  sets = [(logits, boxes)] + ([(enc['pred_logits'], enc['pred_boxes'])] if enc is not None else [])
  # Every matching of the step at once: one host callback with the SciPy solver, not one per layer.
  query_gts = match_query_sets(sets, gt_boxes, gt_labels, gt_valid, config)

  def one_set(lg, bx, query_gt):
    return supervised_query_loss(lg, bx, query_gt, jnp.ones(query_gt.shape, bool), gt_boxes, gt_labels,
                                 gt_valid, gt_count, config)
  terms = _layer_terms(jax.vmap(one_set)(logits, boxes, query_gts[0]), '', 1.0, config)
  if enc is not None:
    terms.update(_weighted(one_set(enc['pred_logits'], enc['pred_boxes'], query_gts[1]), 'enc.',
                           config.loss.enc_weight, config))
  return terms


def denoising_losses(dn: dict, gt: tuple, config, axis_name) -> dict:
  """DN queries of every layer: dn['pred_logits'] [L, B, D, C] ... Weighted terms."""
  gt_boxes, gt_labels, gt_valid = gt
  valid = jnp.asarray(dn['valid'], bool)
  gt_index = jnp.asarray(dn['gt_index'], jnp.int32)
  positive = valid & jnp.asarray(dn['positive'], bool) & jnp.take_along_axis(
      gt_valid, jnp.clip(gt_index, 0, gt_valid.shape[1] - 1), axis=1)
  query_gt = jnp.where(positive, gt_index, -1)
  normalizer = _count(positive, axis_name)
  per_layer = _per_layer(dn['pred_logits'], dn['pred_boxes'], lambda lg, bx: supervised_query_loss(
      lg, bx, query_gt, valid, gt_boxes, gt_labels, gt_valid, normalizer, config))
  return _layer_terms(per_layer, 'dn', config.loss.dn_weight, config)


def _aux_scale(config) -> float:
  """Co-DETR's lambda_2 * decoder layers: the factor of every auxiliary head's own losses."""
  return config.loss.aux_dense_weight * config.decoder.num_layers


def _assigned_targets(assigned, gt):
  """assigned [B, A] gt index (-1 negative) -> (positive [B, A], target boxes [B, A, 4], labels [B, A])."""
  gt_boxes, gt_labels, gt_valid = gt
  gt_index = jnp.clip(assigned, 0, gt_boxes.shape[1] - 1)
  positive = (assigned >= 0) & jnp.take_along_axis(gt_valid, gt_index, axis=1)
  return (positive, jnp.take_along_axis(gt_boxes, gt_index[..., None], axis=1),
          jnp.take_along_axis(gt_labels, gt_index, axis=1))


def _dense_focal_giou(head_out: dict, gt: tuple, config, axis_name, giou_weights=None):
  """Focal loss on every valid anchor and GIoU on positives of a dense head. Unweighted, with the positives."""
  logits = head_out['cls_logits']                                                  # [B, A, C]
  assigned = jnp.asarray(head_out['assigned_gt'], jnp.int32)
  anchor_valid = jnp.asarray(head_out['anchor_valid'], bool)
  positive, target_boxes, target_labels = _assigned_targets(assigned, gt)
  positive &= anchor_valid
  num_pos = _count(positive, axis_name)
  logits = jnp.where(anchor_valid[..., None], logits, 0.0)
  boxes = jnp.where(positive[..., None], head_out['pred_boxes'], jnp.asarray(_DUMMY_BOX, jnp.float32))
  onehot = jax.nn.one_hot(target_labels, logits.shape[-1], dtype=logits.dtype) * positive[..., None]
  cls = sigmoid_focal_loss(logits, onehot, config.loss.focal_alpha, config.loss.focal_gamma)
  cls = jnp.sum(jnp.sum(cls, axis=-1) * anchor_valid) / num_pos
  if giou_weights is None:
    giou = jnp.sum(giou_loss(boxes, target_boxes) * positive) / num_pos
  else:
    weights = jnp.where(positive, giou_weights, 0.0)
    giou = jnp.sum(giou_loss(boxes, target_boxes) * weights) / _weight_sum(weights, axis_name)
  return cls, giou, positive, num_pos


def _weight_sum(weights: jax.Array, axis_name: str | None) -> jax.Array:
  """Sum of `weights` (over the whole batch and, with axis_name, over devices), at least 1."""
  total = jnp.sum(weights).astype(jnp.float32)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return jnp.maximum(total, 1.0)


def iah_dense_losses(iah_out: dict, gt: tuple, config, axis_name) -> dict:
  """Dense IoU-aware head: focal cls on valid anchors + GIoU on positives. Weighted terms."""
  cls, giou, _, _ = _dense_focal_giou(iah_out, gt, config, axis_name)
  scale = _aux_scale(config)
  return {'iah.cls': cls * config.loss.cls_weight * scale, 'iah.giou': giou * config.loss.giou_weight * scale}


def atss_losses(atss_out: dict, gt: tuple, config, axis_name) -> dict:
  """Co-DINO's ATSS head (mmdet ATSSHead.loss): focal on valid anchors / #positives, GIoU on positives weighted by
  their centerness target / the sum of those targets, centerness BCE on positives / #positives. Weighted terms."""
  target = jnp.asarray(atss_out['centerness_target'], jnp.float32)
  cls, giou, positive, num_pos = _dense_focal_giou(atss_out, gt, config, axis_name, giou_weights=target)
  centerness = sigmoid_bce_with_logits(jnp.where(positive, atss_out['centerness'], 0.0), target)
  centerness = jnp.sum(centerness * positive) / num_pos
  a, scale = config.atss, _aux_scale(config)
  return {'atss.cls': cls * a.cls_weight * scale, 'atss.giou': giou * a.giou_weight * scale,
          'atss.centerness': centerness * a.centerness_weight * scale}


def rcnn_losses(out: dict, gt: tuple, config, axis_name) -> dict:
  """Faster R-CNN branch (mmdet RPNHead.loss + BBoxHead.loss with reg_decoded_bbox). Weighted terms.

  RPN: sigmoid CE over the sampled anchors and L1 on the positives' deltas, both / #sampled (mmdet's
  num_total_samples). RoI: softmax CE over the sampled RoIs / #sampled, GIoU of the decoded boxes of the
  positives / #sampled (mmdet's avg_factor = bbox_targets.size(0)).
  """
  gt_boxes, gt_labels, gt_valid = gt
  num_classes = out['roi_logits'].shape[-1] - 1
  rpn_valid, rpn_pos = jnp.asarray(out['rpn_valid'], bool), jnp.asarray(out['rpn_pos'], bool)
  rpn_count = _count(rpn_valid, axis_name)
  rpn_logits = jnp.where(rpn_valid, out['rpn_logits'], 0.0)
  rpn_cls = jnp.sum(sigmoid_bce_with_logits(rpn_logits, rpn_pos.astype(jnp.float32)) * rpn_valid) / rpn_count
  rpn_deltas = jnp.where(rpn_pos[..., None], out['rpn_deltas'], 0.0)
  rpn_targets = jnp.where(rpn_pos[..., None], out['rpn_delta_targets'], 0.0)
  rpn_bbox = jnp.sum(l1_loss(rpn_deltas, rpn_targets) * rpn_pos) / rpn_count

  roi_valid = jnp.asarray(out['roi_valid'], bool)
  positive, target_boxes, target_labels = _assigned_targets(jnp.asarray(out['roi_gt'], jnp.int32), gt)
  positive &= roi_valid
  roi_count = _count(roi_valid, axis_name)
  labels = jnp.where(positive, target_labels, num_classes)
  logits = jnp.where(roi_valid[..., None], out['roi_logits'], 0.0)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]
  roi_cls = jnp.sum(ce * roi_valid) / roi_count
  boxes = jnp.where(positive[..., None], out['roi_boxes'], jnp.asarray(_DUMMY_BOX, jnp.float32))
  roi_giou = jnp.sum(giou_loss(boxes, target_boxes) * positive) / roi_count
  r, scale = config.rcnn, _aux_scale(config)
  return {'rpn.cls': rpn_cls * r.rpn_cls_weight * scale, 'rpn.bbox': rpn_bbox * r.rpn_bbox_weight * scale,
          'roi.cls': roi_cls * r.roi_cls_weight * scale, 'roi.giou': roi_giou * r.roi_giou_weight * scale}


def aux_query_losses(head_out: dict, gt: tuple, config, axis_name, group: str) -> dict:
  """An auxiliary query group of every layer (paper eq. 10): query_logits [L, B, K, C] ..., supervised directly
  by `query_gt` (no matching). Terms named '{group}.cls' (last layer), 'd{l}.{group}.cls'. Weighted terms."""
  gt_boxes, gt_labels, gt_valid = gt
  valid = jnp.asarray(head_out['query_valid'], bool)
  query_gt = jnp.asarray(head_out['query_gt'], jnp.int32)
  positive = valid & (query_gt >= 0) & jnp.take_along_axis(
      gt_valid, jnp.clip(query_gt, 0, gt_valid.shape[1] - 1), axis=1)
  normalizer = _count(positive, axis_name)
  per_layer = _per_layer(head_out['query_logits'], head_out['query_boxes'], lambda lg, bx: supervised_query_loss(
      lg, bx, query_gt, valid, gt_boxes, gt_labels, gt_valid, normalizer, config))
  return _layer_terms(per_layer, group, config.loss.aux_query_weight, config)


def _layer_terms(per_layer: dict, group: str, scale: float, config) -> dict:
  """{name: [L]} per-layer losses -> weighted terms with Co-DETR's layer prefixes."""
  num_layers = next(iter(per_layer.values())).shape[0]
  terms = {}
  for layer in range(num_layers):
    terms.update(_weighted({k: v[layer] for k, v in per_layer.items()}, _layer_prefix(layer, num_layers, group),
                           scale, config))
  return terms


# Own losses of each auxiliary head (`config.model.aux_heads` names -> loss function).
AUX_HEAD_LOSSES = {'iah': iah_dense_losses, 'atss': atss_losses, 'rcnn': rcnn_losses}


def compute_losses(outputs: dict, targets: dict, config: ml_collections.ConfigDict, *,
                   num_boxes: Any = None, axis_name: str | None = None) -> tuple[jax.Array, dict]:
  """The full objective (see module docstring).

  Args:
    outputs: the detector's output dict (`pred_logits` [B, Q, C], `pred_boxes` [B, Q, 4], optional
      `box_frame` [B, 4] (the frame of every query box; absent = canvas), `aux_outputs`, `enc_outputs`,
      `dn_outputs`, `iah_outputs`; shapes in helper contracts / DESIGN.md).
    targets: {'boxes' [B, M, 4] normalized cxcywh, 'labels' [B, M] int, 'box_valid' [B, M] bool}.
    config: full config (`loss`, `matcher`, `iah`, `decoder.num_layers`).
    num_boxes: optional normalizer of the matched losses (default: valid gt boxes in the batch, psum-ed over
      `axis_name` if given, at least 1).
    axis_name: mapped axis to sum every normalizer over (shard_map/pmap); None under plain jit.

  Returns:
    (total [] float32, terms {name: [] float32}) with total == sum of terms.
  """
  if config.loss.cls_type not in CLS_TYPES:
    raise ValueError(f'config.loss.cls_type must be one of {CLS_TYPES}, got {config.loss.cls_type!r}')
  gt = _sanitize_targets(targets, outputs['pred_logits'].shape[-1])
  query_gt = targets_in_frame(gt, outputs.get('box_frame'))   # every query group's targets; dense heads: gt
  gt_count = _count(gt[2], axis_name) if num_boxes is None else jnp.maximum(
      jnp.asarray(num_boxes, jnp.float32), 1.0)
  terms = matched_losses(outputs, query_gt, gt_count, config)
  dn = outputs.get('dn_outputs')
  if dn is not None:
    terms.update(denoising_losses(dn, query_gt, config, axis_name))
  for head_name in config.model.aux_heads:
    head_loss = AUX_HEAD_LOSSES[head_name]
    head_out = outputs.get(f'{head_name}_outputs')
    if head_out is None:
      continue
    terms.update(head_loss(head_out, gt, config, axis_name))
    if head_out.get('query_logits') is not None:
      terms.update(aux_query_losses(head_out, query_gt, config, axis_name, f'aux_{head_name}'))
  terms = {k: v.astype(jnp.float32) for k, v in terms.items()}
  total = sum(terms.values())
  return total, terms
