"""IoU-aware head: threshold formula, anchors, assignment and positive selection against NumPy references
written independently here, plus the module's outputs and gradients."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mrqm_jax.models import detector
from mrqm_jax.models import iou_aware_head as iah

CANVAS = (64, 96)
SHAPES = ((16, 24), (8, 12), (4, 6), (2, 3))          # strides 4, 8, 16, 32
SIZES = (8.0, 16.0, 32.0, 64.0)
RATIOS = (0.5, 1.0, 2.0)

# Jitted once per input shape: eager dispatch of the assignment's many small ops is slower than compiling it.
assign = jax.jit(iah.assign_anchors, static_argnames=('chunk_size', 'box_format'))
select = jax.jit(iah.select_positives, static_argnums=2)


# ----------------------------------------------------------------------------------------------- references
def np_iou(a_xyxy, b_xyxy):
  """[N, 4], [M, 4] -> [N, M], zero-area boxes give 0."""
  out = np.zeros((len(a_xyxy), len(b_xyxy)))
  for i, a in enumerate(a_xyxy):
    for j, b in enumerate(b_xyxy):
      iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
      ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
      area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
      area_b = max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
      union = area_a + area_b - iw * ih
      out[i, j] = iw * ih / union if area_a > 0 and area_b > 0 else 0.0
  return out


def np_xyxy(cxcywh):
  c = np.asarray(cxcywh, np.float64)
  return np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], axis=1)


def np_assign(anchors, gts, gt_valid, thresholds, anchor_valid):
  """The rules of `assign_anchors`, spelled out with loops."""
  iou = np_iou(np_xyxy(anchors), np_xyxy(np.where(gt_valid[:, None], gts, 0.0)))
  best_anchor_of = {}
  for g in range(len(gts)):
    if not gt_valid[g]:
      continue
    column = [iou[a, g] if anchor_valid[a] else -1.0 for a in range(len(anchors))]
    if max(column) > 0:
      best_anchor_of[g] = int(np.argmax(column))
  assigned = np.full(len(anchors), -1)
  assigned_iou = np.zeros(len(anchors))
  for a in range(len(anchors)):
    if not anchor_valid[a]:
      continue
    forced = [g for g, b in best_anchor_of.items() if b == a]
    wanted = forced or [g for g in range(len(gts)) if gt_valid[g] and iou[a, g] > thresholds[g]]
    if wanted:
      g = max(sorted(wanted), key=lambda g: iou[a, g])      # highest IoU, lowest index on ties
      assigned[a], assigned_iou[a] = g, iou[a, g]
  return assigned, assigned_iou


def np_select(assigned, iou, k):
  positives = [a for a in range(len(assigned)) if assigned[a] >= 0]
  rank = {}
  for g in set(assigned[positives]):
    mine = sorted((a for a in positives if assigned[a] == g), key=lambda a: (-iou[a], a))
    rank.update({a: r for r, a in enumerate(mine)})
  chosen = sorted(positives, key=lambda a: (rank[a], -iou[a], a))[:k]
  return chosen


def random_gts(rng, n, canvas=CANVAS, min_px=3, max_px=50):
  h, w = canvas
  sizes = rng.uniform(min_px, max_px, size=(n, 2))
  centers = rng.uniform(0.2, 0.8, size=(n, 2)) * [w, h]
  # A few near-duplicates so that anchors are wanted by several gts.
  centers[n // 2:] = centers[:n - n // 2] + rng.normal(0, 2, size=(n - n // 2, 2))
  return np.concatenate([centers / [w, h], sizes / [w, h]], axis=1).astype(np.float32)


@pytest.fixture(scope='module')
def anchors():
  return iah.generate_anchors(SHAPES, CANVAS, SIZES, RATIOS)


# ----------------------------------------------------------------------------------------------- threshold
def test_dynamic_threshold_matches_formula():
  rng = np.random.default_rng(0)
  w = rng.uniform(0, 300, 200)
  h = rng.uniform(0, 300, 200)
  w[:3] = 0.0
  t_b, k, p, a_s = 0.55, 0.15, 0.2, 3.0
  got = np.asarray(iah.dynamic_iou_threshold(jnp.asarray(w), jnp.asarray(h), t_b=t_b, k=k, p=p, a_s=a_s))
  # Written through logs: (sqrt(wh)/a_s)^p = exp(p (log(wh)/2 - log a_s)).
  with np.errstate(divide='ignore'):
    growth = np.exp(p * (0.5 * np.log(w * h) - np.log(a_s)))
  expected = np.maximum(t_b, t_b + k * growth)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.all(got[:3] == t_b)                               # zero-size object: exactly T_b
  assert np.all(np.diff(got[np.argsort(w * h)]) >= -1e-6)     # grows with size


def test_threshold_config_modes_and_errors():
  config = smoke.get_config()
  boxes = jnp.asarray([[0.5, 0.5, 6 / 128, 6 / 128], [0.5, 0.5, 64 / 128, 32 / 128]])
  rule = detector.iou_threshold(config)
  assert rule == iah.IoUThreshold(True, 0.55, 0.15, 0.2, -1.0)
  with pytest.raises(ValueError, match='auto'):
    iah.gt_thresholds(boxes, (128, 128), rule)                      # a_s = -1 (auto) unresolved
  dynamic = iah.gt_thresholds(boxes, (128, 128), dataclasses.replace(rule, a_s=3.0))
  side = np.sqrt([36.0, 64 * 32])
  np.testing.assert_allclose(dynamic, 0.55 + 0.15 * (side / 3.0) ** 0.2, rtol=1e-5)
  with config.unlocked():
    config.iah.dynamic_threshold = False
  np.testing.assert_allclose(iah.gt_thresholds(boxes, (128, 128), detector.iou_threshold(config)), [0.55, 0.55],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='positive number'):
    iah.dynamic_iou_threshold(1.0, 1.0, t_b=0.5, k=0.1, p=0.2, a_s=0.0)


# ----------------------------------------------------------------------------------------------- anchors
def test_generate_anchors_against_loops():
  scales = (1.0, 1.5)
  got = iah.generate_anchors(SHAPES, CANVAS, SIZES, RATIOS, scales)
  expected = []
  for (hl, wl), size in zip(SHAPES, SIZES):
    stride_y, stride_x = CANVAS[0] / hl, CANVAS[1] / wl
    for row, col, scale, ratio in itertools.product(range(hl), range(wl), scales, RATIOS):
      aw = size * scale * np.sqrt(1 / ratio)
      ah = size * scale * np.sqrt(ratio)
      expected.append([(col + 0.5) * stride_x / CANVAS[1], (row + 0.5) * stride_y / CANVAS[0],
                       aw / CANVAS[1], ah / CANVAS[0]])
  assert got.shape == (sum(h * w for h, w in SHAPES) * 6, 4)
  np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-6)
  with pytest.raises(ValueError, match='one base size per level'):
    iah.generate_anchors(SHAPES, CANVAS, SIZES[:3], RATIOS)


def test_generate_anchors_mmdet_grid_against_mmdet_generator_restated():
  """grid='mmdet': mmdet's AnchorGenerator (center_offset 0), restated: base anchors centred at the origin,
  x1 = -w / 2 ..., shifted by (j * stride, i * stride) over the level's grid, ratio-major there -> ours
  scale-major; compared in pixel xyxy. A level whose cells do not divide the canvas (here 61.5 px cells of a
  nominal stride 64) keeps the nominal stride."""
  canvas, strides = (800, 1344), (4, 64)
  shapes = ((200, 336), (13, 21))
  sizes, ratios, scales = (8.0, 128.0), (0.5, 1.0, 2.0), (1.0, 2 ** 0.5)
  got = iah.generate_anchors(shapes, canvas, sizes, ratios, scales, grid='mmdet', strides=strides)
  expected = []
  for (hl, wl), size, stride in zip(shapes, sizes, strides):
    h_ratios = np.sqrt(np.asarray(ratios))
    ws = (size * (1 / h_ratios)[:, None] * np.asarray(scales)[None]).reshape(-1)   # mmdet: ratio-major
    hs = (size * h_ratios[:, None] * np.asarray(scales)[None]).reshape(-1)
    base = np.stack([-ws / 2, -hs / 2, ws / 2, hs / 2], -1)                      # [ratio * scale, 4]
    base = base.reshape(len(ratios), len(scales), 4).swapaxes(0, 1).reshape(-1, 4)   # -> scale-major
    for row, col in itertools.product(range(hl), range(wl)):
      expected.append(base + np.asarray([col, row, col, row], np.float64) * stride)
  expected = np.concatenate(expected)
  got_px = np.concatenate([got[:, :2] - got[:, 2:] / 2, got[:, :2] + got[:, 2:] / 2], -1) * np.asarray(
      [canvas[1], canvas[0]] * 2)
  np.testing.assert_allclose(got_px, expected, atol=2e-3)
  cells = iah.generate_anchors(shapes, canvas, sizes, ratios, scales)   # 'cell_centers' (v0.3)
  assert np.abs(cells[:, :2] - got[:, :2]).max() * 1344 > 30          # the coarse level's grid drifts
  with pytest.raises(ValueError, match='anchor_grid'):
    iah.generate_anchors(shapes, canvas, sizes, ratios, grid='corners', strides=strides)
  with pytest.raises(ValueError, match='nominal stride'):
    iah.generate_anchors(shapes, canvas, sizes, ratios, grid='mmdet')


def test_pixel_anchors_and_their_ties_do_not_depend_on_the_canvas():
  """generate_anchors(pixel_xyxy=True), grid='mmdet', is the same on a canvas and on a smaller one (the batch
  cropped to its extent; each level keeps its first rows / columns) to the last bit. A gt inside several same-size
  anchors has exactly equal IoU with each, and the assignment gives it the lowest index on either canvas; the
  float32 normalized anchors turned back into pixels (the previous head) carry per-canvas errors of ~1e-6 px
  that decide such a tie differently."""
  strides, sizes, ratios = (8, 16), (16.0, 32.0), (1.0,)
  big, small = (192, 256), (160, 210)
  shapes = lambda hw: tuple((-(-hw[0] // s), -(-hw[1] // s)) for s in strides)   # noqa: E731
  per_canvas = {}
  for hw in (big, small):
    px = iah.generate_anchors(shapes(hw), hw, sizes, ratios, grid='mmdet', strides=strides, pixel_xyxy=True)
    norm = iah.generate_anchors(shapes(hw), hw, sizes, ratios, grid='mmdet', strides=strides)
    np.testing.assert_allclose(px, np_xyxy(norm) * np.asarray([hw[1], hw[0]] * 2), atol=1e-4)
    levels, start = [], 0
    for h, w in shapes(hw):
      levels.append(px[start:start + h * w].reshape(h, w, 4))
      start += h * w
    per_canvas[hw] = levels
  for level_big, level_small in zip(per_canvas[big], per_canvas[small]):
    h, w = level_small.shape[:2]
    np.testing.assert_array_equal(level_big[:h, :w], level_small)
  # A 5 x 5 px gt inside four 16 px anchors of level 0 (rows 2-3, columns 4-5): each IoU is 25 / 256 exactly.
  gt_px = np.asarray([[34.5, 17.5, 39.5, 22.5]], np.float32)
  winners, round_trip_winners = {}, {}
  for hw in (big, small):
    level0 = shapes(hw)[:1]
    anchors = iah.generate_anchors(level0, hw, sizes[:1], ratios, grid='mmdet', strides=strides[:1],
                                   pixel_xyxy=True)
    round_trip = np_xyxy(iah.generate_anchors(level0, hw, sizes[:1], ratios, grid='mmdet', strides=strides[:1])
                         ).astype(np.float32) * np.asarray([hw[1], hw[0]] * 2, np.float32)
    for boxes, out in ((anchors, winners), (round_trip, round_trip_winners)):
      got, iou = assign(boxes, gt_px, np.ones(1, bool), np.ones(1, np.float32), box_format='xyxy')
      positive = np.flatnonzero(np.asarray(got) >= 0)   # threshold 1: only the gt's best anchor
      assert positive.size == 1, positive
      out[hw] = divmod(int(positive[0]), level0[0][1])
      if out is winners:
        assert np.asarray(iou)[positive[0]] == np.float32(25 / 256)
  assert winners[big] == winners[small] == (2, 4), winners
  assert round_trip_winners[big] != round_trip_winners[small], round_trip_winners   # the bug this guards
  with pytest.raises(ValueError, match='box_format'):
    iah.assign_anchors(anchors, gt_px, np.ones(1, bool), np.ones(1), box_format='xywh')


# ----------------------------------------------------------------------------------------------- assignment
@pytest.mark.parametrize('seed', [0, 1])
def test_assign_matches_numpy_reference(anchors, seed):
  rng = np.random.default_rng(seed)
  num_gt = 12
  gts = random_gts(rng, num_gt)
  gt_valid = rng.random(num_gt) > 0.2
  gts[~gt_valid] = np.nan                                    # garbage in padding rows must not matter
  thresholds = rng.uniform(0.3, 0.7, num_gt).astype(np.float32)
  anchor_valid = rng.random(len(anchors)) > 0.1
  got_gt, got_iou = assign(anchors, gts, gt_valid, thresholds, anchor_valid=anchor_valid,
                                       chunk_size=97)            # 97 does not divide A
  ref_gt, ref_iou = np_assign(anchors, np.nan_to_num(gts), gt_valid, thresholds, anchor_valid)
  np.testing.assert_array_equal(np.asarray(got_gt), ref_gt)
  np.testing.assert_allclose(np.asarray(got_iou), ref_iou, atol=1e-5)
  assert (ref_gt >= 0).sum() > num_gt                        # the case is one-to-many, not trivial


def test_small_object_gets_a_positive_large_object_several(anchors):
  # Paper defaults T_b=0.55, k=0.15, p=0.2 with A_s=3 px^2 (VisDrone's smallest train box).
  gts = np.array([[20.3 / 96, 30.6 / 64, 6 / 96, 6 / 64],        # 6 x 6 px, off the anchor grid
                  [60.0 / 96, 32.0 / 64, 30 / 96, 30 / 64]], np.float32)
  thresholds = iah.dynamic_iou_threshold(gts[:, 2] * 96, gts[:, 3] * 64, t_b=0.55, k=0.15, p=0.2, a_s=3.0)
  # An anchor of 6x6 px object can only reach IoU (6/8)^2 = 0.56 < T_I = 0.72: the best-anchor rule must fire.
  assert float(thresholds[0]) > 0.7
  assigned, iou = assign(anchors, gts, np.array([True, True]), thresholds)
  assigned, iou = np.asarray(assigned), np.asarray(iou)
  assert (assigned == 0).sum() >= 1 and iou[assigned == 0].max() > 0.2
  # Lower thresholds (T_b = 0.3, fixed) give the 30 px object several positives around its center.
  assigned, _ = assign(anchors, gts, np.array([True, True]), np.array([0.3, 0.3], np.float32))
  assert (np.asarray(assigned) == 1).sum() >= 3


def test_positives_grow_as_base_threshold_falls(anchors):
  rng = np.random.default_rng(3)
  gts = random_gts(rng, 10, min_px=4, max_px=60)
  valid = np.ones(10, bool)
  counts = []
  for t_b in (0.65, 0.6, 0.55, 0.5, 0.4, 0.3):
    thresholds = iah.dynamic_iou_threshold(gts[:, 2] * 96, gts[:, 3] * 64, t_b=t_b, k=0.15, p=0.2, a_s=100.0)
    assigned, _ = assign(anchors, gts, valid, thresholds)
    counts.append(int((np.asarray(assigned) >= 0).sum()))
  assert all(a <= b for a, b in zip(counts, counts[1:])), counts
  assert counts[-1] > counts[0], counts


def test_conflicts_go_to_highest_iou():
  anchor = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
  close = [0.5, 0.5, 0.21, 0.2]          # IoU 0.95 with the anchor
  farther = [0.52, 0.5, 0.2, 0.2]        # IoU 0.82
  other_anchor = np.array([[0.1, 0.1, 0.05, 0.05]], np.float32)   # a second anchor far away
  anchors = np.concatenate([anchor, other_anchor])
  for order in ([close, farther], [farther, close]):
    gts = np.array(order, np.float32)
    assigned, iou = assign(anchors, gts, np.array([True, True]), np.array([0.5, 0.5], np.float32))
    winner = order.index(close)
    assert int(assigned[0]) == winner
    np.testing.assert_allclose(float(iou[0]), np_iou(np_xyxy(anchor), np_xyxy([close]))[0, 0], rtol=1e-5)


def test_best_anchor_guarantee_beats_a_plain_candidate():
  # gt 0 is tiny and its best anchor is anchor 0; gt 1 wants anchor 0 too (IoU 0.82 > 0.5, far more than gt 0's
  # 0.09) but its own best anchor is anchor 2. Anchor 0 stays gt 0's: the guarantee wins.
  anchors = np.array([[0.5, 0.5, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1], [0.51, 0.5, 0.1, 0.11]], np.float32)
  gts = np.array([[0.5, 0.5, 0.03, 0.03], [0.51, 0.5, 0.1, 0.11]], np.float32)
  iou = np_iou(np_xyxy(anchors), np_xyxy(gts))
  assert iou[0, 1] > 0.5 > iou[0, 0] > 0 and iou[2, 1] > iou[0, 1]
  assigned, _ = assign(anchors, gts, np.array([True, True]), np.array([0.5, 0.5], np.float32))
  assert np.asarray(assigned).tolist() == [0, -1, 1]


def test_assign_degenerate_inputs(anchors):
  gts = np.zeros((4, 4), np.float32)
  assigned, iou = assign(anchors, gts, np.zeros(4, bool), np.full(4, 0.5, np.float32))
  assert np.all(np.asarray(assigned) == -1) and np.all(np.asarray(iou) == 0)
  # A valid but zero-area gt has IoU 0 everywhere: it gets nothing (and breaks nothing).
  gts[0] = [0.5, 0.5, 0.0, 0.0]
  assigned, _ = assign(anchors, gts, np.array([True, False, False, False]), np.full(4, 0.5))
  assert np.all(np.asarray(assigned) == -1)
  assigned, _ = assign(anchors, np.zeros((0, 4), np.float32), np.zeros(0, bool), np.zeros(0))
  assert assigned.shape == (len(anchors),)


def test_assign_is_vmappable_and_jittable(anchors):
  rng = np.random.default_rng(5)
  gts = np.stack([random_gts(rng, 6) for _ in range(3)])
  valid = rng.random((3, 6)) > 0.3
  thresholds = np.full((3, 6), 0.4, np.float32)
  batched = jax.jit(jax.vmap(lambda g, v, t: assign(anchors, g, v, t, chunk_size=256)))
  got_gt, got_iou = batched(gts, valid, thresholds)
  for b in range(3):
    one_gt, one_iou = assign(anchors, gts[b], valid[b], thresholds[b])
    np.testing.assert_array_equal(got_gt[b], one_gt)
    np.testing.assert_allclose(got_iou[b], one_iou, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- selection
def test_select_positives_round_robin_against_reference():
  rng = np.random.default_rng(7)
  num_anchors = 200
  assigned = np.where(rng.random(num_anchors) < 0.3, rng.integers(0, 6, num_anchors), -1).astype(np.int32)
  assigned[assigned == 5] = -1
  assigned[:30] = np.where(assigned[:30] >= 0, 0, assigned[:30])     # gt 0 owns many anchors
  iou = np.where(assigned >= 0, rng.uniform(0.3, 1.0, num_anchors), 0.0).astype(np.float32)
  num_pos = int((assigned >= 0).sum())
  for k in (10, num_pos + 7, num_anchors + 5):
    index, valid = select(jnp.asarray(assigned), jnp.asarray(iou), k)
    index, valid = np.asarray(index), np.asarray(valid)
    expected = np_select(assigned, iou, k)
    assert index.shape == (k,) and valid.sum() == len(expected)
    assert index[valid].tolist() == expected
    assert np.all(~valid[len(expected):]) and np.all(index[~valid] == 0)
  # With k = number of gts, every gt gets exactly one query: its best anchor.
  owners = sorted(set(assigned[assigned >= 0]))
  index, valid = select(jnp.asarray(assigned), jnp.asarray(iou), len(owners))
  assert sorted(assigned[np.asarray(index)]) == owners


# ----------------------------------------------------------------------------------------------- module
def make_head(config, a_s=3.0, query_padding='negatives'):
  i = config.iah
  return iah.IoUAwareHead(config.dataset.num_classes, CANVAS, SIZES, tuple(i.anchor_ratios), tuple(i.anchor_scales),
                          dataclasses.replace(detector.iou_threshold(config), a_s=a_s), max_pos=i.max_pos,
                          query_padding=query_padding, name='iah')   # named as in the detector


@pytest.fixture(scope='module')
def head_setup():
  config = smoke.get_config()
  with config.unlocked():
    config.iah.max_pos = 16
  batch, dim, max_boxes = 2, 16, 8
  rng = np.random.default_rng(11)
  maps = [jnp.asarray(rng.normal(size=(batch, h, w, dim)), jnp.float32) for h, w in SHAPES]
  pad = [np.zeros((batch, h, w), bool) for h, w in SHAPES]
  for p in pad:
    p[1, :p.shape[1] // 3] = True                          # image 1: top third of every level is padding
  pad = [jnp.asarray(p) for p in pad]
  boxes = np.stack([random_gts(rng, max_boxes) for _ in range(batch)])
  valid = np.zeros((batch, max_boxes), bool)
  valid[0, :5] = True                                      # image 1 has no objects
  targets = {'boxes': jnp.asarray(boxes), 'labels': jnp.zeros((batch, max_boxes), jnp.int32),
             'box_valid': jnp.asarray(valid)}
  head = make_head(config)
  variables = jax.jit(head.init)(jax.random.PRNGKey(0), maps, pad, targets)
  apply = jax.jit(functools.partial(head.apply, rngs={'aux': jax.random.PRNGKey(1)}))
  return config, head, variables, apply, maps, pad, targets


def test_module_outputs(head_setup):
  config, _, variables, apply, maps, pad, targets = head_setup
  out = apply(variables, maps, pad, targets)
  per_location = len(config.iah.anchor_scales) * len(config.iah.anchor_ratios)
  num_anchors = sum(h * w for h, w in SHAPES) * per_location
  k, c = config.iah.max_pos, config.dataset.num_classes
  tokens = np.concatenate([np.asarray(m).reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)
  assert out['cls_logits'].shape == (2, num_anchors, c)
  assert out['pred_boxes'].shape == (2, num_anchors, 4) and out['anchors'].shape == (num_anchors, 4)
  assert out['pos_feat'].shape == (2, k, tokens.shape[-1]) and out['pos_ref_boxes'].shape == (2, k, 4)
  # The classifier starts at the 1% prior.
  np.testing.assert_allclose(jax.nn.sigmoid(out['cls_logits'][0]).mean(), 0.01, rtol=0.1)
  # Image 0: every valid gt has a positive (the best-anchor rule) and a query (5 gts < K).
  assigned = np.asarray(out['assigned_gt'][0])
  assert set(assigned[assigned >= 0]) == set(range(5))
  pos_valid = np.asarray(out['pos_valid'][0])
  assert set(np.asarray(out['pos_gt'][0])[pos_valid]) == set(range(5))
  index = np.asarray(out['pos_anchor_index'][0])[pos_valid]
  np.testing.assert_array_equal(out['pos_ref_boxes'][0][pos_valid], out['anchors'][index])
  np.testing.assert_array_equal(out['pos_feat'][0][pos_valid], tokens[0][index // per_location])
  np.testing.assert_array_equal(np.asarray(out['pos_gt'][0])[pos_valid], assigned[index])
  # Image 1 has no objects: no positive, no query.
  assert np.all(np.asarray(out['assigned_gt'][1]) == -1) and not np.any(out['pos_valid'][1])
  flat_pad = np.concatenate([np.asarray(p).reshape(2, -1) for p in pad], axis=1)
  np.testing.assert_array_equal(out['anchor_valid'], np.repeat(~flat_pad, per_location, axis=1))


def test_module_padding_never_positive_and_grads_finite(head_setup):
  _, _, variables, apply, maps, pad, targets = head_setup
  # Give image 1 objects; some lie over its padding (top third of every level).
  targets = dict(targets, box_valid=jnp.ones_like(targets['box_valid']))
  out = apply(variables, maps, pad, targets)
  assert np.all(np.asarray(out['assigned_gt'][1])[np.asarray(~out['anchor_valid'][1])] == -1)

  def loss(params, feature_maps):
    o = apply({'params': params}, feature_maps, pad, targets)
    return (jnp.sum(o['cls_logits'] ** 2) + jnp.sum(o['pred_boxes']) +
            jnp.sum(jnp.where(o['pos_valid'][..., None], o['pos_feat'], 0.0)))
  grads = jax.grad(loss, argnums=(0, 1))(variables['params'], maps)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(sum(jnp.abs(g).sum() for g in grads[1])) > 0   # pos_feat carries gradient to the features


def test_threshold_uses_original_pixels(head_setup):
  """Eq. 8 takes w, h in original px: the same canvas box at scale 0.5 is twice as large in original px."""
  config, *_ = head_setup
  boxes = jnp.asarray([[0.5, 0.5, 0.1, 0.2]], jnp.float32)
  rule = dataclasses.replace(detector.iou_threshold(config), a_s=3.0)
  at_half = iah.gt_thresholds(boxes[None], CANVAS, rule, scale=jnp.asarray([0.5]))
  h, w = CANVAS
  expected = iah.dynamic_iou_threshold(0.1 * w / 0.5, 0.2 * h / 0.5, t_b=config.iah.t_b, k=config.iah.k,
                                       p=config.iah.p, a_s=3.0)
  np.testing.assert_allclose(at_half[0, 0], expected, rtol=1e-6)
  assert float(at_half[0, 0]) > float(iah.gt_thresholds(boxes[None], CANVAS, rule)[0, 0])


def test_module_requires_resolved_a_s(head_setup):
  config, _, variables, _, maps, pad, targets = head_setup
  with pytest.raises(ValueError, match='auto'):
    make_head(config, a_s=-1.0).apply(variables, maps, pad, targets)     # config.iah.a_s = -1 (auto)


def test_module_query_group_negatives(head_setup):
  """'negatives': image 0's 5 positives, then negatives on the image up to K = 9 (the floor); image 1 (no
  object) holds 9 negatives, none on its padding; each slot's box, feature and target come from its anchor."""
  config, _, variables, apply, maps, pad, targets = head_setup
  out = apply(variables, maps, pad, targets)
  per_location = len(config.iah.anchor_scales) * len(config.iah.anchor_ratios)
  tokens = np.concatenate([np.asarray(m).reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)
  index, live, query_gt = (np.asarray(out[k]) for k in ('query_index', 'query_live', 'query_gt'))
  assert index.shape == (2, config.iah.max_pos)
  np.testing.assert_array_equal(live, np.broadcast_to(np.arange(config.iah.max_pos) < 9, live.shape))
  pos_valid = np.asarray(out['pos_valid'])
  np.testing.assert_array_equal(index[0, :5], np.asarray(out['pos_anchor_index'][0])[pos_valid[0]])
  assigned, anchor_valid = np.asarray(out['assigned_gt']), np.asarray(out['anchor_valid'])
  for b, num_pos in ((0, 5), (1, 0)):
    negatives = index[b, num_pos:9]
    assert len(set(negatives)) == 9 - num_pos
    assert np.all(assigned[b, negatives] == -1) and np.all(anchor_valid[b, negatives])
    np.testing.assert_array_equal(query_gt[b, :9], assigned[b, index[b, :9]])
    np.testing.assert_array_equal(out['query_ref_boxes'][b][live[b]], out['anchors'][index[b][live[b]]])
    np.testing.assert_array_equal(out['query_feat'][b][live[b]], tokens[b][index[b][live[b]] // per_location])
  np.testing.assert_array_equal(query_gt[~live], -1)


def test_module_query_group_masked_is_the_old_positives_group(head_setup):
  """'masked' feeds the decoder what mrqm_jax <= 0.3 fed it (its positives' boxes, features, mask and targets),
  bit for bit; pinned indices override the draw."""
  config, _, variables, _, maps, pad, targets = head_setup
  masked = make_head(config, query_padding='masked').apply(variables, maps, pad, targets)
  np.testing.assert_array_equal(masked['query_live'], masked['pos_valid'])
  np.testing.assert_array_equal(masked['query_ref_boxes'], masked['pos_ref_boxes'])
  np.testing.assert_array_equal(masked['query_feat'], masked['pos_feat'])
  np.testing.assert_array_equal(masked['query_gt'], np.where(masked['pos_valid'], masked['pos_gt'], -1))
  pinned = np.full((2, config.iah.max_pos), -1, np.int32)
  pinned[:, :3] = [[7, 0, 41], [3, 2, 1]]
  out = make_head(config).apply(variables, maps, pad, dict(targets, iah_query_index=jnp.asarray(pinned)))
  np.testing.assert_array_equal(out['query_live'], pinned >= 0)
  np.testing.assert_array_equal(np.asarray(out['query_index'])[:, :3], pinned[:, :3])
  np.testing.assert_array_equal(out['query_ref_boxes'][:, :3], np.asarray(out['anchors'])[pinned[:, :3]])
  np.testing.assert_array_equal(np.asarray(out['query_gt'])[:, :3],
                                np.take_along_axis(np.asarray(out['assigned_gt']), pinned[:, :3], 1))
