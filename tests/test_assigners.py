"""mrqm_jax.ops.assigners against float64 NumPy references that follow mmdet 2.x step by step on the
subset of valid anchors / valid gts (as mmdet sees them) and map the result back, with per-anchor/per-gt loops."""

import collections

import jax
import numpy as np
import pytest

from mrqm_jax.ops import assigners as AS

# Jitted entry points (eager dispatch of the chunked loops is slower than compiling them once).
_max_iou = jax.jit(AS.max_iou_assign, static_argnames=('pos_iou_thr', 'neg_iou_thr', 'min_pos_iou',
                                                       'match_low_quality', 'chunk_size'))
_atss = jax.jit(AS.atss_assign, static_argnums=1, static_argnames=('topk', 'gt_chunk_size'))

# --- references --------------------------------------------------------------------------------------------


def _ref_iou(a, b):
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  inter = iw * ih
  union = max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0) * max(b[3] - b[1], 0) - inter
  # The test data has coordinates on a 1/4-px grid, so inter and union are exact in float32 too; rounding the
  # quotient to float32 then gives bit-identical IoUs, and exact ties (a small gt inside several equal-size
  # anchors) stay ties in both implementations.
  return float(np.float32(inter) / np.float32(union)) if union > 0 else 0.0


def _ref_max_iou(anchors, gt, gt_valid, anchor_valid, pos_thr, neg_thr, min_pos, low_quality):
  a_ids = [i for i in range(len(anchors)) if anchor_valid[i]]
  g_ids = [j for j in range(len(gt)) if gt_valid[j]]
  out = np.full(len(anchors), -2, np.int64)
  max_iou_out = np.zeros(len(anchors))
  if not g_ids:
    out[a_ids] = -1
    return out, max_iou_out
  ov = np.array([[_ref_iou(anchors[i], gt[j]) for i in a_ids] for j in g_ids]).reshape(len(g_ids), len(a_ids))
  res = [-2] * len(a_ids)   # mmdet: -1 ignore, 0 negative, k+1 gt k; here -2, -1, k
  pos_thr, neg_thr, min_pos = np.float32(pos_thr), np.float32(neg_thr), np.float32(min_pos)
  for col in range(len(a_ids)):
    best = max(range(len(g_ids)), key=lambda r: (ov[r, col], -r))   # first max
    m = ov[best, col]
    if 0 <= m < neg_thr:
      res[col] = -1
    if m >= pos_thr:
      res[col] = best
  if low_quality:
    for r in range(len(g_ids)):
      gmax = ov[r].max() if len(a_ids) else -1
      if gmax >= min_pos:
        for col in range(len(a_ids)):
          if ov[r, col] == gmax:
            res[col] = r
  for col, i in enumerate(a_ids):
    out[i] = g_ids[res[col]] if res[col] >= 0 else res[col]
    max_iou_out[i] = ov[:, col].max()
  return out, max_iou_out


def _ref_atss(anchors, levels, gt, gt_valid, anchor_valid, topk):
  out = np.full(len(anchors), -1, np.int64)
  iou_out = np.zeros(len(anchors))
  # mmdet runs on the valid anchors with per-level counts of valid anchors.
  starts = np.cumsum([0] + list(levels))
  level_ids = [[i for i in range(starts[l], starts[l + 1]) if anchor_valid[i]] for l in range(len(levels))]
  g_ids = [j for j in range(len(gt)) if gt_valid[j]]
  best = {}   # anchor -> (iou, gt)
  center = lambda b: ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0)
  for j in g_ids:
    g = gt[j]
    gc = center(g)
    cands = []
    for ids in level_ids:
      d = sorted(ids, key=lambda i: (np.hypot(*(np.subtract(center(anchors[i]), gc))), i))
      cands += d[:min(topk, len(ids))]
    ious = [_ref_iou(anchors[i], g) for i in cands]
    thr = np.mean(ious) + (np.std(ious, ddof=1) if len(ious) > 1 else np.nan)
    for i, v in zip(cands, ious):
      cx, cy = center(anchors[i])
      inside = min(cx - g[0], cy - g[1], g[2] - cx, g[3] - cy) > 0.01
      if v >= thr and inside and (i not in best or v > best[i][0]):   # strict >: earlier gt keeps ties
        best[i] = (v, j)
  for i, (v, j) in best.items():
    out[i], iou_out[i] = j, v
  return out, iou_out


# --- data --------------------------------------------------------------------------------------------------


def _grid_anchors(strides, sizes, canvas):
  """Level-major anchors: per level a grid of centers at stride/2 + k*stride, 3 aspect ratios; sizes rounded
  to even integers so every coordinate is on the 1/4-px grid (see `_ref_iou`)."""
  out, counts = [], []
  for s, size in zip(strides, sizes):
    ys, xs = np.meshgrid(np.arange(s / 2, canvas[0], s), np.arange(s / 2, canvas[1], s), indexing='ij')
    per = []
    for ratio in (0.5, 1.0, 2.0):
      w, h = 2 * np.round(size / np.sqrt(ratio) / 2), 2 * np.round(size * np.sqrt(ratio) / 2)
      per.append(np.stack([xs - w / 2, ys - h / 2, xs + w / 2, ys + h / 2], -1).reshape(-1, 4))
    level = np.stack(per, 1).reshape(-1, 4)
    out.append(level)
    counts.append(len(level))
  return np.concatenate(out).astype(np.float32), tuple(counts)


def _random_gts(rng, m, canvas, tiny=0.3, invalid=0.25):
  xy = rng.uniform(0, [canvas[1] - 4, canvas[0] - 4], (m, 2))
  wh = np.exp(rng.uniform(np.log(1.5), np.log(60), (m, 2)))
  wh[rng.uniform(size=m) < tiny] = rng.uniform(0.5, 3, (1, 2))   # tiny objects
  gt = np.concatenate([xy, np.minimum(xy + wh, [canvas[1], canvas[0]])], 1)
  gt = (np.round(gt * 4) / 4).astype(np.float32)   # 1/4-px grid (see `_ref_iou`)
  gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 0.25)
  valid = rng.uniform(size=m) > invalid
  gt[~valid] = np.nan   # garbage in padded rows
  return gt, valid


CANVAS = (64, 96)


# --- max IoU -----------------------------------------------------------------------------------------------

MAX_IOU_CASES = [   # (pos, neg, min_pos, low_quality): RPN-like and R-CNN-like configs
    (0.7, 0.3, 0.3, True), (0.5, 0.5, 0.5, False), (0.5, 0.4, 0.0, True)]


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('cfg', MAX_IOU_CASES)
def test_max_iou_matches_reference(seed, cfg):
  rng = np.random.default_rng(seed)
  anchors, _ = _grid_anchors((8, 16), (16.0, 32.0), CANVAS)
  gt, gt_valid = _random_gts(rng, 12, CANVAS)
  anchor_valid = rng.uniform(size=len(anchors)) > 0.1
  gt[0], gt_valid[0] = anchors[np.flatnonzero(anchor_valid)[40]], True   # one exact match: a sure positive
  pos, neg, min_pos, lq = cfg
  fn = jax.jit(lambda a, g, v, av: AS.max_iou_assign(a, g, v, pos_iou_thr=pos, neg_iou_thr=neg,
                                                     min_pos_iou=min_pos, match_low_quality=lq,
                                                     anchor_valid=av, chunk_size=100))
  got, got_iou = (np.asarray(x) for x in fn(anchors, gt, gt_valid, anchor_valid))
  ref, ref_iou = _ref_max_iou(anchors.astype(np.float64), gt.astype(np.float64), gt_valid, anchor_valid,
                              pos, neg, min_pos, lq)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_allclose(got_iou, ref_iou, atol=1e-6)
  assert (got >= 0).any() and (got == -1).any() and (got == -2).any()
  assert not np.isin(got[got >= 0], np.flatnonzero(~gt_valid)).any()


def test_max_iou_low_quality_ties_later_gt_wins():
  # Integer coordinates: IoUs are exact, so the ties are real. Anchor 0 and 1 tie as gt 0's best; gt 1 has the
  # same best anchor 1 and is later, so it takes anchor 1; anchor 0 stays with gt 0.
  anchors = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [40, 40, 50, 50], [60, 60, 61, 61]], np.float32)
  gt = np.array([[5, 0, 15, 10], [12, 0, 22, 10]], np.float32)
  got, max_iou = _max_iou(anchors, gt, np.array([True, True]), pos_iou_thr=0.9, neg_iou_thr=0.3,
                                   min_pos_iou=0.2, match_low_quality=True, chunk_size=3)
  ref, _ = _ref_max_iou(anchors, gt, [True, True], [True] * 4, 0.9, 0.3, 0.2, True)
  np.testing.assert_array_equal(np.asarray(got), ref)
  np.testing.assert_array_equal(np.asarray(got), [0, 1, -1, -1])


def test_max_iou_no_valid_gt_and_empty():
  anchors, _ = _grid_anchors((16,), (32.0,), CANVAS)
  gt = np.full((5, 4), np.nan, np.float32)
  anchor_valid = np.arange(len(anchors)) % 3 != 0
  got, iou = AS.max_iou_assign(anchors, gt, np.zeros(5, bool), pos_iou_thr=0.7, neg_iou_thr=0.3,
                               min_pos_iou=0.3, match_low_quality=True, anchor_valid=anchor_valid)
  np.testing.assert_array_equal(np.asarray(got), np.where(anchor_valid, -1, -2))
  np.testing.assert_array_equal(np.asarray(iou), 0.0)
  got, _ = AS.max_iou_assign(anchors, np.zeros((0, 4), np.float32), np.zeros(0, bool), pos_iou_thr=0.7,
                             neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
  np.testing.assert_array_equal(np.asarray(got), -1)


def test_max_iou_chunking_invariant():
  rng = np.random.default_rng(5)
  anchors, _ = _grid_anchors((8,), (16.0,), CANVAS)
  gt, gt_valid = _random_gts(rng, 7, CANVAS)
  outs = [_max_iou(anchors, gt, gt_valid, pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                            match_low_quality=True, chunk_size=c) for c in (7, 64, 100000)]
  for got, iou in outs[1:]:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(outs[0][0]))
    np.testing.assert_array_equal(np.asarray(iou), np.asarray(outs[0][1]))


# --- ATSS --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed,topk', [(0, 9), (1, 9), (2, 4)])
def test_atss_matches_reference(seed, topk):
  rng = np.random.default_rng(seed)
  anchors, levels = _grid_anchors((8, 16, 32), (16.0, 32.0, 64.0), CANVAS)
  gt, gt_valid = _random_gts(rng, 20, CANVAS)
  anchor_valid = rng.uniform(size=len(anchors)) > 0.1
  anchor_valid[levels[0] + levels[1]:] = False
  anchor_valid[levels[0] + levels[1]:][:5] = True   # last level: fewer valid anchors than topk
  fn = jax.jit(lambda a, g, v, av: AS.atss_assign(a, levels, g, v, topk=topk, anchor_valid=av, gt_chunk_size=6))
  got, got_iou = (np.asarray(x) for x in fn(anchors, gt, gt_valid, anchor_valid))
  ref, ref_iou = _ref_atss(anchors.astype(np.float64), levels, gt.astype(np.float64), gt_valid, anchor_valid,
                           topk)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_allclose(got_iou, ref_iou, atol=1e-6)
  assert (got >= 0).sum() > 10
  assert not np.isin(got[got >= 0], np.flatnonzero(~gt_valid)).any()
  assert (got[~anchor_valid] == -1).all()


def test_atss_distance_ties_and_overlapping_gts():
  # Integer lattice: gt centers on half-integers midway between anchor centers, so distances tie exactly;
  # two identical gts compete for the same anchors (equal IoU: the lower gt index wins).
  anchors, levels = _grid_anchors((4, 8), (8.0, 16.0), (32, 32))
  gt = np.array([[6, 6, 18, 18], [6, 6, 18, 18], [0, 16, 16, 28], [20, 2, 30, 30]], np.float32)
  valid = np.ones(4, bool)
  got, iou = _atss(anchors, levels, gt, valid, topk=9, gt_chunk_size=3)
  ref, ref_iou = _ref_atss(anchors.astype(np.float64), levels, gt.astype(np.float64), valid, [True] * len(anchors), 9)
  np.testing.assert_array_equal(np.asarray(got), ref)
  np.testing.assert_allclose(np.asarray(iou), ref_iou, atol=1e-6)
  assert (np.asarray(got) == 0).any() and not (np.asarray(got) == 1).any()


def test_atss_no_valid_gt_and_level_check():
  anchors, levels = _grid_anchors((8, 16), (16.0, 32.0), CANVAS)
  got, iou = _atss(anchors, levels, np.full((3, 4), np.nan, np.float32), np.zeros(3, bool))
  np.testing.assert_array_equal(np.asarray(got), -1)
  np.testing.assert_array_equal(np.asarray(iou), 0.0)
  with pytest.raises(ValueError, match='sums to'):
    AS.atss_assign(anchors, (levels[0],), np.zeros((1, 4), np.float32), np.ones(1, bool))


# --- random sampler ----------------------------------------------------------------------------------------


def _sample_case():
  rng = np.random.default_rng(0)
  assigned = rng.choice([-2, -1, -1, -1, 0, 1, 2], 300).astype(np.int32)
  valid = rng.uniform(size=300) > 0.2
  return assigned, valid


@pytest.mark.parametrize('num,frac,limit_pos,limit_neg', [(64, 0.25, None, None), (64, 0.5, 5, None),
                                                          (64, 0.25, None, 10), (512, 0.25, None, None)])
def test_random_sample_counts_membership_no_duplicates(num, frac, limit_pos, limit_neg):
  assigned, valid = _sample_case()
  if limit_pos is not None:
    assigned[np.flatnonzero(assigned >= 0)[limit_pos:]] = -2
  if limit_neg is not None:
    assigned[np.flatnonzero(assigned == -1)[limit_neg:]] = -2
  fn = jax.jit(AS.random_sample, static_argnums=(2, 3))
  index, is_pos, ok = (np.asarray(x) for x in fn(jax.random.PRNGKey(3), assigned, num, frac, valid=valid))
  n_pos_avail = int(((assigned >= 0) & valid).sum())
  n_neg_avail = int(((assigned == -1) & valid).sum())
  exp_pos = min(n_pos_avail, int(num * frac))
  exp_neg = min(n_neg_avail, num - exp_pos)
  assert is_pos.sum() == exp_pos and (ok & ~is_pos).sum() == exp_neg
  # Layout: positives, then negatives, then empty slots with index 0.
  np.testing.assert_array_equal(is_pos, np.arange(num) < exp_pos)
  np.testing.assert_array_equal(ok, np.arange(num) < exp_pos + exp_neg)
  assert (index[~ok] == 0).all()
  assert (assigned[index[is_pos]] >= 0).all() and valid[index[is_pos]].all()
  assert (assigned[index[ok & ~is_pos]] == -1).all() and valid[index[ok & ~is_pos]].all()
  assert len(set(index[ok].tolist())) == ok.sum()


def test_random_sample_rng_dependence_and_uniformity():
  assigned = np.full(40, -1, np.int32)
  assigned[:8] = 0
  fn = jax.jit(lambda k: AS.random_sample(k, assigned, 8, 0.25))
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  index, is_pos, ok = (np.asarray(x) for x in jax.vmap(fn)(keys))
  assert ok.all()
  assert len({tuple(sorted(r)) for r in index}) > 1900   # different rngs give different subsets
  pos_counts = collections.Counter(index[is_pos].tolist())
  neg_counts = collections.Counter(index[~is_pos].tolist())
  # 2 of 8 positives per draw: each is drawn 2000 * 2/8 = 500 times on average (binomial sd ~19).
  assert set(pos_counts) == set(range(8)) and all(abs(c - 500) < 100 for c in pos_counts.values())
  # 6 of 32 negatives per draw: 2000 * 6/32 = 375 each.
  assert set(neg_counts) == set(range(8, 40)) and all(abs(c - 375) < 90 for c in neg_counts.values())


def test_vmap_over_images_matches_per_image():
  rng = np.random.default_rng(9)
  anchors, levels = _grid_anchors((8, 16), (16.0, 32.0), CANVAS)
  gts, valids = zip(*[_random_gts(rng, 6, CANVAS) for _ in range(3)])
  gts, valids = np.stack(gts), np.stack(valids)
  valids[2] = False   # one image without objects
  mi = lambda g, v: AS.max_iou_assign(anchors, g, v, pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                      match_low_quality=True, chunk_size=50)
  at = lambda g, v: AS.atss_assign(anchors, levels, g, v, gt_chunk_size=4)
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  for fn in (mi, at):
    batched = jax.jit(jax.vmap(fn))(gts, valids)
    for b in range(3):
      single = jax.jit(fn)(gts[b], valids[b])
      for x, y in zip(batched, single):
        np.testing.assert_array_equal(np.asarray(x[b]), np.asarray(y))
  assigned = jax.jit(jax.vmap(mi))(gts, valids)[0]
  samples = jax.jit(jax.vmap(lambda k, a: AS.random_sample(k, a, 32, 0.25)))(keys, assigned)
  for b in range(3):
    for x, y in zip(samples, AS.random_sample(keys[b], assigned[b], 32, 0.25)):
      np.testing.assert_array_equal(np.asarray(x[b]), np.asarray(y))
