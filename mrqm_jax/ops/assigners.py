"""Anchor/proposal assigners and the random sampler of Co-DINO's collaborative heads (mmdet 2.x semantics).

Pure, jittable, static-shaped; one image per call (vmap for a batch). All boxes are pixel xyxy of one image.
Padded ground truths are marked by `gt_valid` and may hold anything (NaN included): they are zeroed before any
arithmetic and take part in nothing. Invalid anchors (mmdet drops them before assigning, e.g. anchors outside
the image) are never positive, negative or candidates.

Memory: neither assigner builds an [A, M] matrix. `max_iou_assign` works on [chunk_size, M] blocks of anchors
(two passes, as `models.iou_aware_head.assign_anchors`); `atss_assign` works on [gt_chunk_size, A] blocks of gts
and scatters the per-gt candidates back onto the anchors.
"""

from typing import Sequence, Union

import jax
import jax.numpy as jnp

from mrqm_jax.ops import boxes as box_ops

NEGATIVE = -1
IGNORED = -2


def _prepare(anchors, gt, gt_valid, anchor_valid):
  anchors = jax.lax.stop_gradient(jnp.asarray(anchors, jnp.float32))
  gt_valid = jnp.asarray(gt_valid, bool)
  gt = jnp.where(gt_valid[:, None], jax.lax.stop_gradient(jnp.asarray(gt, jnp.float32)), 0.0)
  if anchor_valid is None:
    anchor_valid = jnp.ones(anchors.shape[:1], bool)
  return anchors, gt, gt_valid, jnp.asarray(anchor_valid, bool)


def max_iou_assign(anchors, gt, gt_valid, *, pos_iou_thr: float,
                   neg_iou_thr: Union[float, tuple[float, float]], min_pos_iou: float,
                   match_low_quality: bool, anchor_valid=None, chunk_size: int = 16384):
  """mmdet `MaxIoUAssigner` (gt_max_assign_all=True, no ignore_iof) for one image.

  Per valid anchor, with max_iou / best gt over the valid gts (first gt on ties):
    1. negative (-1) if 0 <= max_iou < neg_iou_thr (or lo <= max_iou < hi for a (lo, hi) tuple);
    2. positive (best gt) if max_iou >= pos_iou_thr, overriding 1;
    3. if match_low_quality: for g = 0..M-1 in order, if gt g's max IoU over valid anchors is >= min_pos_iou,
       every anchor whose IoU with g equals that max goes to g, overriding 1, 2 and earlier gts (so the
       highest such gt index wins). As in mmdet, a gt whose max IoU is 0 claims every anchor with IoU 0 when
       min_pos_iou <= 0.
    Otherwise ignored (-2). With no valid gt every valid anchor is negative (mmdet's num_gts == 0 branch).

  The equality in 3 compares IoUs recomputed in a second pass; the gt's own argmax anchor (pass 1) is matched
  by index as well, so a last-bit difference between the passes can never drop a gt's best anchor.

  Args:
    anchors: [A, 4] pixel xyxy.
    gt: [M, 4] pixel xyxy (any values in invalid rows).
    gt_valid: [M] bool.
    anchor_valid: optional [A] bool; invalid anchors are ignored (-2), max_iou 0.
    chunk_size: anchors per block (memory [chunk_size, M]).

  Returns:
    assigned [A] int32 (gt index >= 0 positive, -1 negative, -2 ignored), max_iou [A] float32 (max IoU with
    the valid gts; 0 for invalid anchors or when there is no valid gt). No gradient.
  """
  anchors, gt, gt_valid, anchor_valid = _prepare(anchors, gt, gt_valid, anchor_valid)
  num_anchors, num_gt = anchors.shape[0], gt.shape[0]
  if num_anchors == 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
  if num_gt == 0:
    return (jnp.where(anchor_valid, NEGATIVE, IGNORED).astype(jnp.int32),
            jnp.zeros((num_anchors,), jnp.float32))
  any_gt = gt_valid.any()

  chunk = max(1, min(int(chunk_size), num_anchors))
  num_chunks = -(-num_anchors // chunk)
  pad = num_chunks * chunk - num_anchors
  anchor_chunks = jnp.pad(anchors, ((0, pad), (0, 0))).reshape(num_chunks, chunk, 4)
  valid_chunks = jnp.pad(anchor_valid, (0, pad)).reshape(num_chunks, chunk)   # padding anchors are invalid
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk

  def chunk_iou(anchor_xyxy, valid):   # [chunk, M]; -1 where the pair takes part in nothing
    iou = box_ops.pairwise_iou(anchor_xyxy, gt)
    return jnp.where(valid[:, None] & gt_valid[None, :], iou, -1.0)

  # Pass 1: every gt's max IoU over the valid anchors and its (first) argmax anchor.
  def best_in_chunk(args):
    iou = chunk_iou(*args)
    return iou.max(axis=0), iou.argmax(axis=0).astype(jnp.int32)
  chunk_best_iou, chunk_best_idx = jax.lax.map(best_in_chunk, (anchor_chunks, valid_chunks))   # [n, M]
  best_chunk = jnp.argmax(chunk_best_iou, axis=0)
  columns = jnp.arange(num_gt)
  gt_max = chunk_best_iou[best_chunk, columns]
  gt_best_anchor = best_chunk.astype(jnp.int32) * chunk + chunk_best_idx[best_chunk, columns]
  low_quality_ok = gt_valid & (gt_max >= min_pos_iou)

  if isinstance(neg_iou_thr, (tuple, list)):
    neg_lo, neg_hi = (float(t) for t in neg_iou_thr)
  else:
    neg_lo, neg_hi = 0.0, float(neg_iou_thr)

  # Pass 2: per-anchor decision.
  def assign_chunk(args):
    anchor_xyxy, valid, start = args
    iou = chunk_iou(anchor_xyxy, valid)
    max_iou = jnp.where(any_gt, iou.max(axis=1), 0.0)
    best_gt = iou.argmax(axis=1).astype(jnp.int32)
    negative = valid & (((max_iou >= neg_lo) & (max_iou < neg_hi)) | ~any_gt)
    positive = valid & any_gt & (max_iou >= pos_iou_thr)
    assigned = jnp.where(positive, best_gt, jnp.where(negative, NEGATIVE, IGNORED))
    if match_low_quality:
      index = start + jnp.arange(chunk, dtype=jnp.int32)
      match = ((iou == gt_max[None, :]) | (index[:, None] == gt_best_anchor[None, :]))
      match &= low_quality_ok[None, :] & valid[:, None]
      last_gt = (num_gt - 1 - jnp.argmax(match[:, ::-1], axis=1)).astype(jnp.int32)
      assigned = jnp.where(match.any(axis=1), last_gt, assigned)
    return assigned.astype(jnp.int32), jnp.where(valid, max_iou, 0.0)

  assigned, max_iou = jax.lax.map(assign_chunk, (anchor_chunks, valid_chunks, starts))
  return assigned.reshape(-1)[:num_anchors], max_iou.reshape(-1)[:num_anchors]


def atss_assign(anchors, num_anchors_per_level: Sequence[int], gt, gt_valid, *, topk: int = 9,
                anchor_valid=None, gt_chunk_size: int = 64):
  """mmdet `ATSSAssigner` (alpha=1, no ignore_iof) for one image.

  For every valid gt: on each level l, the min(topk, #valid anchors of l) valid anchors whose centers are
  closest (L2) to the gt center are candidates (equal distances: lower anchor index first). threshold = mean +
  std of the candidates' IoUs (std unbiased, as torch; one candidate gives std NaN and, as in mmdet, no
  positive). A candidate is positive if IoU >= threshold and its center is strictly inside the gt
  (min(l, t, r, b) > 0.01 px). An anchor positive for several gts goes to the one with the highest IoU (lowest
  gt index on ties). Invalid anchors have distance +inf and are never candidates, which reproduces mmdet running
  on the valid ("inside") anchors with per-level counts of valid anchors.

  Args:
    anchors: [A, 4] pixel xyxy, level-major (level 0's anchors first).
    num_anchors_per_level: static per-level anchor counts, summing to A.
    gt: [M, 4] pixel xyxy (any values in invalid rows); gt_valid: [M] bool.
    topk: candidates per level per gt.
    anchor_valid: optional [A] bool.
    gt_chunk_size: gts per block (memory [gt_chunk_size, A] distances).

  Returns:
    assigned [A] int32 (gt index, -1 negative), iou [A] float32 (IoU with the assigned gt, 0 if negative).
  """
  anchors, gt, gt_valid, anchor_valid = _prepare(anchors, gt, gt_valid, anchor_valid)
  num_anchors, num_gt = anchors.shape[0], gt.shape[0]
  levels = tuple(int(n) for n in num_anchors_per_level)
  if sum(levels) != num_anchors:
    raise ValueError(f'num_anchors_per_level sums to {sum(levels)}, but there are {num_anchors} anchors')
  if num_gt == 0 or num_anchors == 0:
    return jnp.full((num_anchors,), NEGATIVE, jnp.int32), jnp.zeros((num_anchors,), jnp.float32)

  anchor_centers = 0.5 * (anchors[:, :2] + anchors[:, 2:])                            # [A, 2]
  chunk = max(1, min(int(gt_chunk_size), num_gt))
  num_chunks = -(-num_gt // chunk)
  pad = num_chunks * chunk - num_gt
  gt_padded = jnp.pad(gt, ((0, pad), (0, 0)))
  valid_padded = jnp.pad(gt_valid, (0, pad))
  starts = [0]
  for n in levels:
    starts.append(starts[-1] + n)

  def candidates_of_chunk(args):
    gt_xyxy, valid = args                                                             # [G, 4], [G]
    gt_centers = 0.5 * (gt_xyxy[:, :2] + gt_xyxy[:, 2:])
    diff = anchor_centers[None, :, :] - gt_centers[:, None, :]
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))                                    # [G, A]
    dist = jnp.where(anchor_valid[None, :], dist, jnp.inf)
    idx, ok = [], []
    for level, n in enumerate(levels):
      k = min(topk, n)
      if k == 0:
        continue
      neg_dist, level_idx = jax.lax.top_k(-dist[:, starts[level]:starts[level + 1]], k)   # nearest first
      idx.append(level_idx + starts[level])
      ok.append(jnp.isfinite(neg_dist))
    idx, ok = jnp.concatenate(idx, axis=1), jnp.concatenate(ok, axis=1)               # [G, K]
    iou = box_ops.elementwise_iou(anchors[idx], gt_xyxy[:, None, :])
    count = ok.sum(axis=1)
    mean = jnp.sum(jnp.where(ok, iou, 0.0), axis=1) / count
    var = jnp.sum(jnp.where(ok, (iou - mean[:, None]) ** 2, 0.0), axis=1) / (count - 1)
    threshold = mean + jnp.sqrt(var)       # NaN for <= 1 candidate: nothing passes, as torch
    centers = anchor_centers[idx]                                                     # [G, K, 2]
    inside = jnp.minimum(centers - gt_xyxy[:, None, :2], gt_xyxy[:, None, 2:] - centers).min(axis=-1) > 0.01
    positive = ok & valid[:, None] & (iou >= threshold[:, None]) & inside
    return idx, positive, iou

  idx, positive, iou = jax.lax.map(
      candidates_of_chunk, (gt_padded.reshape(num_chunks, chunk, 4), valid_padded.reshape(num_chunks, chunk)))
  num_candidates = idx.shape[-1]
  idx = idx.reshape(-1)
  positive = positive.reshape(-1)
  iou = iou.reshape(-1)
  gt_index = jnp.repeat(jnp.arange(num_chunks * chunk, dtype=jnp.int32), num_candidates)
  # Scatter back: highest IoU per anchor first, then the lowest gt index reaching it.
  best = jnp.full((num_anchors,), -jnp.inf, jnp.float32).at[idx].max(jnp.where(positive, iou, -jnp.inf))
  winner = positive & (iou == best[idx])
  sentinel = jnp.int32(num_chunks * chunk)
  owner = jnp.full((num_anchors,), sentinel, jnp.int32).at[idx].min(jnp.where(winner, gt_index, sentinel))
  assigned = jnp.where(owner < sentinel, owner, NEGATIVE).astype(jnp.int32)
  return assigned, jnp.where(assigned >= 0, best, 0.0)


def random_sample(rng, assigned, num: int, pos_fraction: float, *, valid=None):
  """mmdet `RandomSampler` (neg_pos_ub=-1, no gt-as-proposals) over one image's assignment.

  num_pos = min(#positives, int(num * pos_fraction)) positives (assigned >= 0) drawn uniformly without
  replacement, then min(#negatives, num - num_pos) negatives (assigned == -1); ignored entries (-2) and
  entries with valid False are never drawn. Uniform subsets come from iid uniform priorities and top_k.

  Returns:
    index [num] int32 (positives first, then negatives, then empty slots with index 0),
    is_pos [num] bool, sample_valid [num] bool.
  """
  assigned = jnp.asarray(assigned, jnp.int32)
  size = assigned.shape[0]
  usable = jnp.ones((size,), bool) if valid is None else jnp.asarray(valid, bool)
  priority = jax.random.uniform(rng, (size,))                                       # in [0, 1)
  padded = max(size, num)

  def draw(mask, k):   # up to k entries of mask, uniformly; (index [k], found [k]) with found ones first
    scores = jnp.pad(jnp.where(mask, priority, -1.0), (0, padded - size), constant_values=-1.0)
    values, index = jax.lax.top_k(scores, k)
    return index.astype(jnp.int32), values >= 0.0

  max_pos = min(int(num * pos_fraction), num)
  slots = jnp.arange(num, dtype=jnp.int32)
  if max_pos > 0:
    pos_index, pos_found = draw(usable & (assigned >= 0), max_pos)
    num_pos = pos_found.sum().astype(jnp.int32)
    pos_at_slot = pos_index[jnp.minimum(slots, max_pos - 1)]
  else:
    num_pos = jnp.int32(0)
    pos_at_slot = jnp.zeros((num,), jnp.int32)
  neg_index, neg_found = draw(usable & (assigned == NEGATIVE), num)
  neg_slot = jnp.maximum(slots - num_pos, 0)
  is_pos = slots < num_pos
  sample_valid = is_pos | neg_found[neg_slot]
  index = jnp.where(is_pos, pos_at_slot, neg_index[neg_slot])
  return jnp.where(sample_valid, index, 0).astype(jnp.int32), is_pos, sample_valid
