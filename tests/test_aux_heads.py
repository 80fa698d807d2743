"""Aux query groups (`aux_heads.query_group`, `detector.aux_query_attention_mask`) against a NumPy restatement of
Co-DETR's `get_aux_targets` (use_zero_padding=False): the group size K from the batch's positive counts (floor 9,
cap max_pos), the slots (positives, then distinct random negatives of the image, then dead), the attention mask,
pinned indices, and 'masked' (positives only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrqm_jax.models import aux_heads
from mrqm_jax.models import detector

NUM_CANDIDATES = 40


def np_codetr_group(pos_lists, neg_lists, max_pos):
  """Co-DETR's group of each image, as lists of (candidate, is_positive): K = max(9, min(max_pos, most
  positives)); the image's positives (here already capped at max_pos), then its negatives in drawn order, K in
  all. Co-DETR assumes enough negatives; short ones are simply fewer slots here."""
  k = max(9, min(max_pos, max(len(p) for p in pos_lists)))
  groups = [[(c, True) for c in pos[:k]] + [(c, False) for c in neg[:k - min(len(pos), k)]]
            for pos, neg in zip(pos_lists, neg_lists)]
  return k, groups


def make_case(rng, pos_counts, max_pos, num_negatives=None):
  """Per image: random distinct positive candidates (chosen order, capped at max_pos) and negatives."""
  batch = len(pos_counts)
  pos_index = np.zeros((batch, max_pos), np.int32)
  pos_valid = np.zeros((batch, max_pos), bool)
  negative = np.zeros((batch, NUM_CANDIDATES), bool)
  pos_lists = []
  for b, count in enumerate(pos_counts):
    perm = rng.permutation(NUM_CANDIDATES)
    chosen = perm[:min(count, max_pos)]
    pos_index[b, :len(chosen)] = chosen
    pos_valid[b, :len(chosen)] = True
    pos_lists.append(list(chosen))
    rest = perm[count:]                       # positives over the cap are neither in the group nor negatives
    if num_negatives is not None:
      rest = rest[:num_negatives[b]]
    negative[b, rest] = True
  return pos_index, pos_valid, negative, pos_lists


@pytest.mark.parametrize('pos_counts,max_pos', [((0, 0), 16), ((3, 12), 16), ((20, 5), 16), ((2, 1), 4),
                                                ((7, 16), 16)])
def test_negatives_group_equals_codetr(pos_counts, max_pos):
  rng = np.random.default_rng(sum(pos_counts) + max_pos)
  pos_index, pos_valid, negative, pos_lists = make_case(rng, pos_counts, max_pos)
  num_slots = aux_heads.query_group_slots(max_pos, 'negatives')
  assert num_slots == max(9, max_pos)
  index, live = jax.jit(lambda r, *a: aux_heads.query_group(r, *a, num_slots=num_slots, padding='negatives'))(
      jax.random.PRNGKey(3), pos_index, pos_valid, negative)
  index, live = np.asarray(index), np.asarray(live)
  assert index.shape == live.shape == (len(pos_counts), num_slots)
  # The draw: the slots after the positives hold distinct negatives of the image; read their order back.
  neg_lists = []
  for b in range(len(pos_counts)):
    drawn = index[b, len(pos_lists[b]):][live[b, len(pos_lists[b]):]]
    assert len(set(drawn)) == len(drawn) and np.all(negative[b, drawn])
    neg_lists.append(list(drawn))
  k, groups = np_codetr_group(pos_lists, neg_lists, max_pos)
  for b, group in enumerate(groups):
    assert len(group) == k                                  # enough negatives here: every image fills K
    np.testing.assert_array_equal(live[b], np.arange(num_slots) < k)
    np.testing.assert_array_equal(index[b, :k], [c for c, _ in group])
    np.testing.assert_array_equal(index[b, k:], 0)          # dead slots: an in-range index nothing reads


def test_short_of_negatives_leaves_dead_slots():
  """K = 12 (image 0's positives), image 1 has 2 positives and only 4 negatives: 6 live slots, 6 dead ones
  (Co-DETR would fail there)."""
  rng = np.random.default_rng(0)
  pos_index, pos_valid, negative, pos_lists = make_case(rng, (12, 2), 16, num_negatives=(30, 4))
  index, live = aux_heads.query_group(jax.random.PRNGKey(0), pos_index, pos_valid, negative, num_slots=16,
                                      padding='negatives')
  index, live = np.asarray(index), np.asarray(live)
  np.testing.assert_array_equal(live[0], np.arange(16) < 12)
  np.testing.assert_array_equal(live[1], np.arange(16) < 6)
  np.testing.assert_array_equal(index[1, :2], pos_lists[1])
  assert set(index[1, 2:6]) == set(np.flatnonzero(negative[1]))


def test_negatives_are_a_uniform_random_subset_in_random_order():
  """1 positive, 8 negatives of 12 candidates, K = 9: every negative is in the group (8 slots for 8); with 2
  positives in the other image K stays 9 and it draws 7 of its 8: each negative with probability 7/8, and each
  slot holds each negative equally often."""
  rng = np.random.default_rng(1)
  pos_index, pos_valid, negative, _ = make_case(rng, (1, 2), 4, num_negatives=(8, 8))
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  index, live = jax.jit(jax.vmap(lambda r: aux_heads.query_group(r, pos_index, pos_valid, negative, num_slots=9,
                                                                 padding='negatives')))(keys)
  index, live = np.asarray(index), np.asarray(live)
  assert live.all()
  negatives_1 = np.flatnonzero(negative[1])
  chosen = np.stack([np.isin(negatives_1, index[t, 1, 2:]) for t in range(len(keys))])
  np.testing.assert_allclose(chosen.mean(0), 7 / 8, atol=0.03)
  first_negative_slot = np.stack([index[:, 1, 2] == c for c in negatives_1], axis=1)
  np.testing.assert_allclose(first_negative_slot.mean(0), 1 / 8, atol=0.02)
  assert len({tuple(index[t, 0]) for t in range(len(keys))}) > 100        # image 0: many orders of its 8


def test_masked_keeps_the_positives_only():
  rng = np.random.default_rng(2)
  pos_index, pos_valid, negative, _ = make_case(rng, (3, 0), 6)
  assert aux_heads.query_group_slots(6, 'masked') == 6
  index, live = aux_heads.query_group(None, pos_index, pos_valid, negative, num_slots=6, padding='masked')
  np.testing.assert_array_equal(live, pos_valid)
  np.testing.assert_array_equal(index, np.where(pos_valid, pos_index, 0))


def test_pinned_indices_give_exactly_the_pinned_group():
  rng = np.random.default_rng(3)
  pos_index, pos_valid, negative, _ = make_case(rng, (3, 5), 16)
  pinned = rng.integers(0, NUM_CANDIDATES, (2, 16)).astype(np.int32)
  pinned[0, 10:] = -1
  pinned[1, 3] = -1
  for key in (jax.random.PRNGKey(0), jax.random.PRNGKey(1)):
    index, live = aux_heads.query_group(key, pos_index, pos_valid, negative, num_slots=16, padding='negatives',
                                        pinned=pinned)
    np.testing.assert_array_equal(live, pinned >= 0)
    np.testing.assert_array_equal(np.asarray(index)[pinned >= 0], pinned[pinned >= 0])
  with pytest.raises(ValueError, match='K_max'):
    aux_heads.query_group(None, pos_index, pos_valid, negative, num_slots=16, padding='negatives',
                          pinned=pinned[:, :9])


def test_anchor_group_labels_negatives_background():
  assigned = np.array([[2, -1, -1, 0, -1, 1], [-1, -1, 4, -1, -1, -1]], np.int32)
  anchor_valid = np.array([[True] * 6, [True, False, True, True, True, False]])
  out = aux_heads.anchor_query_group(np.array([[3, 0, 5], [2, 0, 0]], np.int32),
                                     np.array([[True, True, True], [True, False, False]]), assigned, anchor_valid,
                                     rng=jax.random.PRNGKey(0), num_slots=9, padding='negatives', pinned=None)
  index, live, query_gt = (np.asarray(out[k]) for k in ('query_index', 'query_live', 'query_gt'))
  # Image 0: 3 positives + its 3 negatives (short of 9); image 1: 1 positive + its 3 negatives on the image.
  np.testing.assert_array_equal(live.sum(1), [6, 4])
  np.testing.assert_array_equal(query_gt[0, :3], [0, 2, 1])
  np.testing.assert_array_equal(query_gt[1, :1], [4])
  assert set(index[0, 3:6]) == {1, 2, 4} and set(index[1, 1:4]) == {0, 3, 4}
  np.testing.assert_array_equal(query_gt[live & (np.arange(9) >= np.array([[3], [1]]))], -1)
  np.testing.assert_array_equal(query_gt[~live], -1)


def test_bad_padding_is_an_error():
  with pytest.raises(ValueError, match='aux_query_padding'):
    aux_heads.query_group_slots(300, 'zeros')


def test_attention_mask_live_block_and_dead_slots():
  live = np.array([[True] * 9 + [False] * 3, [True] * 4 + [False] * 8])
  mask = np.asarray(detector.aux_query_attention_mask(jnp.asarray(live)))
  for b in range(2):
    for row in range(12):
      expected = live[b].copy()            # a dead slot's row too (as before the switch; never read)
      expected[row] = True
      np.testing.assert_array_equal(mask[b, row], expected)


def test_proposals_clip_to_each_image_as_mmdet():
  """RPN proposals (mmdet's RPNHead.predict_by_feat): every anchor proposes, boxes are clipped to the image's own
  size (img_shape), empty ones dropped; without clip_wh the canvas bounds them (v0.3)."""
  from mrqm_jax.models import rcnn   # pylint: disable=g-import-not-at-top
  canvas = (64, 64)
  px = np.asarray([[10, 10, 30, 30], [40, 10, 60, 30], [52, 10, 62, 30]], np.float32)   # in, straddling, beyond
  anchors = jnp.asarray(np.concatenate([(px[:, :2] + px[:, 2:]) / 2, px[:, 2:] - px[:, :2]], 1) / 64.0)
  logits, deltas = jnp.asarray([3.0, 2.0, 1.0]), jnp.zeros((3, 4))
  fn = lambda clip: rcnn.select_proposals(logits, deltas, anchors, jnp.ones(3, bool), (3,), canvas,  # noqa: E731
                                          nms_pre=3, nms_iou=0.7, num_proposals=3, clip_wh=clip)
  boxes, valid = fn(jnp.asarray([50.0, 40.0]))
  np.testing.assert_array_equal(np.asarray(valid), [True, True, False])
  np.testing.assert_allclose(np.asarray(boxes)[:2], [[10, 10, 30, 30], [40, 10, 50, 30]], atol=1e-4)
  boxes, valid = fn(None)
  assert np.asarray(valid).all()
  np.testing.assert_allclose(np.asarray(boxes), px, atol=1e-4)


def test_rcnn_pinned_draws_are_what_the_loss_uses():
  """RCNNBranch with targets['rcnn_rpn_sample_*'], ['rcnn_proposals'], ['rcnn_roi_sample_*'] (a reference's draws,
  for the parity harness): the RPN loss is over exactly the pinned anchors with the pinned labels (checked with a
  NumPy BCE over the RPN's full logits), the RoIs are the pinned candidates (gts, then the pinned proposals) with
  the pinned gts. The branch's own draw would differ: it fills all 12 RPN slots (image 0 pins 5) and proposes
from its anchors."""
  from mrqm_jax.models import iou_aware_head   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import rcnn   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import box_coder   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import boxes as box_ops   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import losses   # pylint: disable=g-import-not-at-top
  from configs import co_dino   # pylint: disable=g-import-not-at-top

  canvas, strides, dim, b, m = (64, 64), (8, 16, 32), 8, 2, 3
  branch = rcnn.RCNNBranch(num_classes=3, canvas_hw=canvas, strides=strides, rpn_num_samples=12, nms_pre=40,
                           num_proposals=10, roi_num_samples=8, num_roi_levels=3, fc_dim=16, max_pos=2,
                           anchor_grid='mmdet', name='rcnn')
  rng = np.random.default_rng(0)
  maps = [jnp.asarray(rng.normal(size=(b, 64 // s, 64 // s, dim)), jnp.float32) for s in strides]
  level_pad = [jnp.zeros(x.shape[:3], bool) for x in maps]
  targets = {'boxes': jnp.asarray([[[0.3, 0.3, 0.3, 0.25], [0.7, 0.6, 0.2, 0.3], [0.5, 0.5, 0.1, 0.1]]] * b),
             'labels': jnp.asarray([[0, 2, 1]] * b), 'box_valid': jnp.asarray([[True, True, False]] * b)}
  key = jax.random.PRNGKey(0)
  variables = jax.jit(lambda k: branch.init({'params': k, 'aux': k}, maps, level_pad, targets))(key)

  num_anchors = 9 * sum((64 // s) ** 2 for s in strides)
  rpn_index = np.full((b, 12), -1, np.int32)
  rpn_gt = np.full((b, 12), -1, np.int32)
  rpn_index[0, :5], rpn_gt[0, :2] = [num_anchors - 1, 3, 17, 200, 5], [1, 0]     # 2 positives, 3 negatives
  rpn_index[1, :12] = rng.permutation(num_anchors)[:12]                          # no positive
  proposals = np.zeros((b, 10, 4), np.float32)
  proposals[:, :4] = [[2, 2, 20, 30], [30, 30, 60, 50], [10, 40, 25, 60], [0, 0, 64, 64]]
  proposal_valid = np.zeros((b, 10), bool)
  proposal_valid[:, :4] = True
  roi_index = np.full((b, 8), -1, np.int32)
  roi_gt = np.full((b, 8), -1, np.int32)
  roi_index[0, :4], roi_gt[0, :2] = [1, m + 1, m + 0, m + 3], [1, 1]             # gt 1, proposal 1 (+), 2 negatives
  roi_index[1, :3] = [m + 2, m + 3, m + 0]
  pins = {'rcnn_rpn_sample_index': rpn_index, 'rcnn_rpn_sample_gt': rpn_gt, 'rcnn_proposals': proposals,
          'rcnn_proposal_valid': proposal_valid, 'rcnn_roi_sample_index': roi_index, 'rcnn_roi_sample_gt': roi_gt}
  out = jax.jit(lambda v, t: branch.apply(v, maps, level_pad, t, rngs={'aux': key}))(
      variables, dict(targets, **{k: jnp.asarray(v) for k, v in pins.items()}))

  # RPN: the loss's inputs are the pinned anchors' outputs and labels.
  rpn = aux_heads.RPNHead(9, dim).apply({'params': variables['params']['rpn']}, maps)
  valid = rpn_index >= 0
  np.testing.assert_array_equal(out['rpn_valid'], valid)
  np.testing.assert_array_equal(out['rpn_pos'], valid & (rpn_gt >= 0))
  logits = np.take_along_axis(np.asarray(rpn['logits']), np.maximum(rpn_index, 0), 1)
  np.testing.assert_array_equal(np.asarray(out['rpn_logits'])[valid], logits[valid])
  sizes, scales = rcnn.rpn_anchor_sizes(strides, 4.0, 3)
  anchors = iou_aware_head.generate_anchors([x.shape[1:3] for x in maps], canvas, sizes, (0.5, 1.0, 2.0), scales,
                                            grid='mmdet', strides=strides)
  expected_targets = box_coder.encode_deltas(jnp.asarray(anchors[[num_anchors - 1, 3]]), targets['boxes'][0, [1, 0]],
                                             box_coder.UNIT_STDS)
  np.testing.assert_allclose(out['rpn_delta_targets'][0, :2], expected_targets, rtol=1e-6)
  config = co_dino.get_config()
  config.dataset.num_classes = 3
  terms = losses.rcnn_losses(out, (targets['boxes'], targets['labels'], targets['box_valid']), config, None)
  labels = (valid & (rpn_gt >= 0)).astype(np.float64)
  bce = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
  scale = config.rcnn.rpn_cls_weight * config.loss.aux_dense_weight * config.decoder.num_layers
  np.testing.assert_allclose(terms['rpn.cls'], (bce * valid).sum() / valid.sum() * scale, rtol=1e-5)

  # Proposals and RoIs: the pinned ones, with the pinned gts.
  np.testing.assert_allclose(out['proposals'], box_ops.pixel_xyxy_to_cxcywh(jnp.asarray(proposals), canvas),
                             rtol=1e-6)
  np.testing.assert_array_equal(out['proposal_valid'], proposal_valid)
  np.testing.assert_array_equal(out['roi_valid'], roi_index >= 0)
  np.testing.assert_array_equal(out['roi_gt'], roi_gt)
  gts_px = np.asarray(box_ops.cxcywh_to_pixel_xyxy(targets['boxes'], canvas))
  candidates = np.concatenate([gts_px, proposals], 1)
  rois = np.take_along_axis(candidates, np.maximum(roi_index, 0)[..., None], 1)
  np.testing.assert_allclose(out['pos_ref_boxes'], box_ops.pixel_xyxy_to_cxcywh(jnp.asarray(rois[:, :2]), canvas),
                             rtol=1e-6, atol=1e-7)
