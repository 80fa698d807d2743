"""Losses of Co-DINO's collaborative heads (ATSS, Faster R-CNN) and their query groups: NumPy references written
per element, padding invariance (garbage in padded gts / anchors / samples changes neither loss nor gradients)."""

import jax
import jax.numpy as jnp
import numpy as np

from mrqm_jax.ops import losses
from tests.test_losses import (B, C, L, M, K, make_config, np_focal, np_iou_giou, np_qfl, np_query_loss, np_xyxy,
                               random_boxes, split_float)

A, S, N = 30, 10, 12     # dense anchors, RPN samples, RoI samples


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_bce(x, t):
  p = sigmoid(x)
  return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def make_outputs(seed=0):
  rng = np.random.default_rng(seed)
  box_valid = np.arange(M)[None, :] < np.asarray([3, 4])[:, None]
  targets = {'boxes': random_boxes(rng, (B, M)), 'labels': rng.integers(0, C, (B, M)).astype(np.int32),
             'box_valid': box_valid}
  assigned = np.where(rng.random((B, A)) < 0.3, rng.integers(0, 4, (B, A)), -1).astype(np.int32)
  atss = {'cls_logits': rng.normal(size=(B, A, C)).astype(np.float32) - 2,
          'pred_boxes': random_boxes(rng, (B, A)), 'centerness': rng.normal(size=(B, A)).astype(np.float32),
          'anchor_valid': rng.random((B, A)) > 0.1, 'assigned_gt': assigned,
          'centerness_target': rng.uniform(0.1, 1.0, (B, A)).astype(np.float32),
          'query_logits': rng.normal(size=(L, B, K, C)).astype(np.float32),
          'query_boxes': random_boxes(rng, (L, B, K)), 'query_gt': rng.integers(0, 3, (B, K)).astype(np.int32),
          'query_valid': np.arange(K)[None, :] < np.array([[2], [5]])}
  rcnn = {'rpn_logits': rng.normal(size=(B, S)).astype(np.float32),
          'rpn_deltas': rng.normal(size=(B, S, 4)).astype(np.float32),
          'rpn_delta_targets': rng.normal(size=(B, S, 4)).astype(np.float32),
          'rpn_pos': rng.random((B, S)) < 0.4, 'rpn_valid': np.arange(S)[None, :] < np.array([[8], [10]]),
          'roi_logits': rng.normal(size=(B, N, C + 1)).astype(np.float32),
          'roi_boxes': random_boxes(rng, (B, N)),
          'roi_gt': np.where(rng.random((B, N)) < 0.4, rng.integers(0, 4, (B, N)), -1).astype(np.int32),
          'roi_valid': np.arange(N)[None, :] < np.array([[12], [9]])}
  rcnn['rpn_pos'] &= rcnn['rpn_valid']
  return {'atss_outputs': atss, 'rcnn_outputs': rcnn}, targets


def config_for(heads):
  config = make_config()
  with config.unlocked():
    config.model.aux_heads = heads
  return config


def compute(config, aux, targets):
  rng = np.random.default_rng(1)
  outputs = {'pred_logits': rng.normal(size=(B, 5, C)).astype(np.float32), 'pred_boxes': random_boxes(rng, (B, 5)),
             **aux}
  return jax.jit(lambda o, t: losses.compute_losses(o, t, config))(outputs, targets)


def test_atss_terms_against_numpy():
  config = config_for(('atss',))
  aux, targets = make_outputs(seed=2)
  _, terms = compute(config, aux, targets)
  a = aux['atss_outputs']
  gt_valid, gt_boxes, labels = targets['box_valid'], targets['boxes'], targets['labels']
  cls = giou = ctr = weight = 0.0
  num_pos = 0
  for b in range(B):
    for i in range(A):
      if not a['anchor_valid'][b, i]:
        continue
      g = a['assigned_gt'][b, i]
      t = np.zeros(C)
      if g >= 0 and gt_valid[b, g]:
        num_pos += 1
        t[labels[b, g]] = 1.0
        w = a['centerness_target'][b, i]
        giou += w * (1 - np_iou_giou(a['pred_boxes'][b, i], gt_boxes[b, g])[1])
        weight += w
        ctr += np_bce(np.float64(a['centerness'][b, i]), np.float64(w))
      cls += np_focal(a['cls_logits'][b, i].astype(np.float64), t, 0.25, 2.0).sum()
  scale = config.loss.aux_dense_weight * L
  np.testing.assert_allclose(
      [terms['atss.cls'], terms['atss.giou'], terms['atss.centerness']],
      [cls / num_pos * scale, 2.0 * giou / weight * scale, ctr / num_pos * scale], rtol=1e-4)
  # Its query group: the same per-layer loss as the IAH's, under its own names.
  qpos = a['query_valid'] & np.take_along_axis(gt_valid, a['query_gt'], 1)
  expected = sum(np_query_loss(a['query_logits'][L - 1, b], a['query_boxes'][L - 1, b],
                               np.where(qpos[b], a['query_gt'][b], -1), a['query_valid'][b],
                               gt_boxes[b], labels[b], qpos.sum()) for b in range(B))
  np.testing.assert_allclose([terms['aux_atss.cls'], terms['aux_atss.bbox'] / 5, terms['aux_atss.giou'] / 2],
                             expected, rtol=1e-4)
  assert 'd0.aux_atss.cls' in terms and not any(k.startswith(('rpn.', 'roi.', 'iah.')) for k in terms)


def test_rcnn_terms_against_numpy():
  config = config_for(('rcnn',))
  aux, targets = make_outputs(seed=3)
  _, terms = compute(config, aux, targets)
  r = aux['rcnn_outputs']
  gt_valid, gt_boxes, labels = targets['box_valid'], targets['boxes'], targets['labels']
  rpn_count = r['rpn_valid'].sum()
  rpn_cls = sum(np_bce(np.float64(r['rpn_logits'][b, s]), float(r['rpn_pos'][b, s]))
                for b in range(B) for s in range(S) if r['rpn_valid'][b, s])
  rpn_l1 = sum(np.abs(r['rpn_deltas'][b, s] - r['rpn_delta_targets'][b, s]).sum()
               for b in range(B) for s in range(S) if r['rpn_pos'][b, s])
  roi_count = r['roi_valid'].sum()
  roi_cls = roi_giou = 0.0
  for b in range(B):
    for n in range(N):
      if not r['roi_valid'][b, n]:
        continue
      g = r['roi_gt'][b, n]
      positive = g >= 0 and gt_valid[b, g]
      target = labels[b, g] if positive else C
      logits = r['roi_logits'][b, n].astype(np.float64)
      roi_cls += -(logits[target] - np.log(np.exp(logits).sum()))
      if positive:
        roi_giou += 1 - np_iou_giou(r['roi_boxes'][b, n], gt_boxes[b, g])[1]
  scale = config.loss.aux_dense_weight * L
  np.testing.assert_allclose(
      [terms['rpn.cls'], terms['rpn.bbox'], terms['roi.cls'], terms['roi.giou']],
      [rpn_cls / rpn_count * scale, rpn_l1 / rpn_count * scale, roi_cls / roi_count * scale,
       10 * roi_giou / roi_count * scale], rtol=1e-4)


def test_aux_head_padding_contributes_exactly_zero():
  """Padded gts (NaN), padded anchors / RPN samples / RoIs / queries full of garbage: same loss, zero grads."""
  config = config_for(('atss', 'rcnn'))
  aux, targets = make_outputs(seed=4)
  extra = 3

  def pad(x, axis, fill):
    shape = list(x.shape)
    shape[axis] = extra
    return np.concatenate([x, np.full(shape, fill, x.dtype)], axis)
  p_targets = {'boxes': pad(targets['boxes'], 1, np.nan), 'labels': pad(targets['labels'], 1, 999),
               'box_valid': pad(targets['box_valid'], 1, False)}
  a, r = aux['atss_outputs'], aux['rcnn_outputs']
  p_atss = {'cls_logits': pad(a['cls_logits'], 1, np.nan), 'pred_boxes': pad(a['pred_boxes'], 1, np.inf),
            'centerness': pad(a['centerness'], 1, np.nan), 'anchor_valid': pad(a['anchor_valid'], 1, False),
            'assigned_gt': pad(a['assigned_gt'], 1, 0), 'centerness_target': pad(a['centerness_target'], 1, 0.5),
            'query_logits': pad(a['query_logits'], 2, np.nan), 'query_boxes': pad(a['query_boxes'], 2, -1e30),
            'query_gt': pad(a['query_gt'], 1, 1), 'query_valid': pad(a['query_valid'], 1, False)}
  p_rcnn = {'rpn_logits': pad(r['rpn_logits'], 1, np.nan), 'rpn_deltas': pad(r['rpn_deltas'], 1, np.inf),
            'rpn_delta_targets': pad(r['rpn_delta_targets'], 1, np.nan), 'rpn_pos': pad(r['rpn_pos'], 1, False),
            'rpn_valid': pad(r['rpn_valid'], 1, False), 'roi_logits': pad(r['roi_logits'], 1, np.nan),
            'roi_boxes': pad(r['roi_boxes'], 1, np.nan), 'roi_gt': pad(r['roi_gt'], 1, 0),
            'roi_valid': pad(r['roi_valid'], 1, False)}
  # A padded (invalid) gt assigned to a valid anchor / RoI must not count either.
  p_atss['assigned_gt'][0, 0] = M + 1
  p_atss['anchor_valid'][0, 0] = True
  aux_p = {'atss_outputs': p_atss, 'rcnn_outputs': p_rcnn}
  aux_ref = {'atss_outputs': dict(a), 'rcnn_outputs': r}
  aux_ref['atss_outputs']['assigned_gt'] = a['assigned_gt'].copy()
  aux_ref['atss_outputs']['assigned_gt'][0, 0] = -1
  aux_ref['atss_outputs']['anchor_valid'] = a['anchor_valid'].copy()
  aux_ref['atss_outputs']['anchor_valid'][0, 0] = True

  def value_and_grads(outs, tgts):
    floats, rebuild = split_float(outs)
    fn = jax.jit(jax.value_and_grad(lambda f: losses.compute_losses(
        {'pred_logits': jnp.zeros((B, 5, C)), 'pred_boxes': jnp.full((B, 5, 4), 0.3), **rebuild(f)}, tgts,
        config)[0]))
    return fn(floats)
  loss, grads = value_and_grads(aux_ref, targets)
  p_loss, p_grads = value_and_grads(aux_p, p_targets)
  np.testing.assert_allclose(p_loss, loss, rtol=1e-6)
  for g, pg in zip(map(np.asarray, grads), map(np.asarray, p_grads)):
    assert np.all(np.isfinite(pg))
    axis = [i for i, (x, y) in enumerate(zip(g.shape, pg.shape)) if x != y]
    if not axis:
      np.testing.assert_allclose(pg, g, rtol=1e-5, atol=1e-8)
      continue
    axis = axis[0]
    np.testing.assert_allclose(np.take(pg, np.arange(g.shape[axis]), axis), g, rtol=1e-5, atol=1e-8)
    assert np.all(np.take(pg, np.arange(g.shape[axis], pg.shape[axis]), axis) == 0)


def np_codetr_aux_loss(cls_scores, bbox_preds, labels, label_weights, bbox_targets, bbox_weights, num_classes,
                       image_sizes, beta=2.0):
  """Co-DETR's `_loss_aux_by_feat_single` for one decoder layer, restated in NumPy: cls_scores [B, K, C],
  bbox_preds / bbox_targets [B, K, 4] normalized cxcywh, labels [B, K] (num_classes = background), label_weights
  [B, K], bbox_weights [B, K, 4], image_sizes [(h, w)] -> (loss_cls, loss_bbox, loss_iou), each unweighted
  (the configured loss weights apart: QFL 1, L1 5, GIoU 2). bg_cls_weight = 0, so the classification avg factor
  is the number of positives, as the box losses'."""
  n = labels.size
  labels, label_weights = labels.reshape(n), label_weights.reshape(n)
  scores_in, preds = cls_scores.reshape(n, -1), bbox_preds.reshape(n, 4)
  targets, weights = bbox_targets.reshape(n, 4), bbox_weights.reshape(n, 4)
  pos = np.flatnonzero((labels >= 0) & (labels < num_classes))
  num_pos = len(pos)
  cls_avg_factor = max(num_pos * 1.0 + (n - num_pos) * 0.0, 1)
  quality = np.zeros(n)
  quality[pos] = np_iou_giou(preds[pos], targets[pos])[0]
  loss_cls = (np_qfl(scores_in.astype(np.float64), labels, quality, beta).sum(1) * label_weights).sum()
  loss_cls /= cls_avg_factor
  num_pos = max(num_pos, 1)
  factors = np.concatenate([np.tile([w, h, w, h], (bbox_preds.shape[1], 1)) for h, w in image_sizes])
  # GIoU on pixel boxes (Co-DETR scales by the image size): the same value as on normalized ones.
  px_pred = np_xyxy(preds) * factors
  px_target = np_xyxy(targets) * factors
  to_cxcywh = lambda b: np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)  # noqa: E731
  giou = np_iou_giou(to_cxcywh(px_pred), to_cxcywh(px_target))[1]
  loss_iou = ((1 - giou) * weights.mean(1)).sum() / num_pos
  loss_bbox = (np.abs(preds - targets) * weights).sum() / num_pos
  return np.array([loss_cls, loss_bbox, loss_iou])


def test_negatives_group_loss_equals_codetr():
  """A group padded with background negatives (K = 9 live slots of 12; image 0: 3 positives, image 1: 1; dead
  slots full of garbage) against Co-DETR's formula: QFL over every live slot (background = all-zero target), L1 +
  GIoU on positives, every term / the positives of the batch (4)."""
  config = config_for(('atss',))
  aux, targets = make_outputs(seed=5)
  rng = np.random.default_rng(6)
  k_max, k, num_pos = 12, 9, np.array([3, 1])
  query_gt = np.full((B, k_max), -1, np.int32)
  query_gt[0, :3] = [2, 0, 1]
  query_gt[1, :1] = [3]
  live = np.broadcast_to(np.arange(k_max) < k, (B, k_max)).copy()
  logits = rng.normal(size=(L, B, k_max, C)).astype(np.float32)
  boxes = random_boxes(rng, (L, B, k_max))
  logits[:, :, k:] = np.nan                          # dead slots: garbage, never read
  boxes[:, :, k:] = np.inf
  query_gt[:, k:] = 1
  aux['atss_outputs'].update(query_logits=logits, query_boxes=boxes, query_gt=query_gt, query_valid=live)
  _, terms = compute(config, aux, targets)

  # Co-DETR's tensors hold the K live slots only.
  labels = np.where(query_gt[:, :k] >= 0, np.take_along_axis(targets['labels'], np.maximum(query_gt[:, :k], 0), 1),
                    C)
  bbox_targets = np.where((query_gt[:, :k] >= 0)[..., None],
                          np.take_along_axis(targets['boxes'], np.maximum(query_gt[:, :k], 0)[..., None], 1), 0.0)
  bbox_weights = np.broadcast_to((np.arange(k)[None] < num_pos[:, None])[..., None], (B, k, 4)).astype(np.float64)
  assert (labels < C).sum() == 4
  w = config.loss
  for layer in range(L):
    expected = np_codetr_aux_loss(logits[layer, :, :k], boxes[layer, :, :k], labels, np.ones((B, k)),
                                  bbox_targets, bbox_weights, C, [(750, 1333), (800, 1067)])
    prefix = 'aux_atss.' if layer == L - 1 else f'd{layer}.aux_atss.'
    np.testing.assert_allclose(
        [terms[prefix + 'cls'], terms[prefix + 'bbox'], terms[prefix + 'giou']],
        expected * np.array([w.cls_weight, w.bbox_weight, w.giou_weight]) * w.aux_query_weight, rtol=1e-4)
