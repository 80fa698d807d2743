"""mrqm_jax.ops.nms.nms against a float64 NumPy greedy loop (torchvision semantics: strict IoU > threshold,
equal scores visited in index order)."""

import jax
import numpy as np
import pytest

from mrqm_jax.ops.nms import nms


def _ref_iou(a, b):
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _ref_nms(boxes, scores, thr, valid):
  idx = [i for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)) if valid[i]]
  keep = np.zeros(len(scores), bool)
  removed = set()
  for pos, i in enumerate(idx):
    if i in removed:
      continue
    keep[i] = True
    for j in idx[pos + 1:]:
      if j not in removed and _ref_iou(boxes[i], boxes[j]) > thr:
        removed.add(j)
  return keep


def _random_case(seed, n):
  rng = np.random.default_rng(seed)
  # Clustered boxes so many pairs overlap; some duplicated boxes and tied scores.
  centers = rng.uniform(0, 100, (max(n // 8, 1), 2))[rng.integers(0, max(n // 8, 1), n)]
  xy = centers + rng.normal(0, 4, (n, 2))
  wh = rng.uniform(2, 30, (n, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  boxes[: n // 10] = boxes[n // 10: 2 * (n // 10)]
  scores = np.round(rng.uniform(0, 1, n), 2).astype(np.float32)   # rounding makes ties common
  valid = rng.uniform(size=n) > 0.1
  return boxes, scores, valid


@pytest.mark.parametrize('seed,n,thr', [(0, 200, 0.5), (1, 300, 0.7), (2, 257, 0.3), (3, 64, 0.0)])
def test_matches_greedy_reference(seed, n, thr):
  boxes, scores, valid = _random_case(seed, n)
  got = np.asarray(jax.jit(nms, static_argnums=2)(boxes, scores, thr, valid))
  ref = _ref_nms(boxes.astype(np.float64), scores, thr, valid)
  np.testing.assert_array_equal(got, ref)
  assert 0 < got.sum() < valid.sum()


def test_ties_lower_index_wins_and_invalid_never_kept():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 0, 0]], np.float32)
  scores = np.array([0.5, 0.9, 0.9, 0.1, 0.95], np.float32)
  valid = np.array([True, True, True, False, True])
  keep = np.asarray(nms(boxes, scores, 0.5, valid))
  # Box 1 and 2 tie at 0.9: 1 (lower index) is kept and removes 2 and 0; 3 is invalid; the zero-area box 4
  # has IoU 0 with everything, so it is kept and suppresses nothing.
  np.testing.assert_array_equal(keep, [False, True, False, False, True])


def test_nan_scores_and_no_valid():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11]], np.float32)
  keep = np.asarray(nms(boxes, np.array([np.nan, 0.3], np.float32), 0.1))
  np.testing.assert_array_equal(keep, [False, True])
  assert not np.asarray(nms(boxes, np.array([0.2, 0.3], np.float32), 0.1, np.zeros(2, bool))).any()
  assert nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5).shape == (0,)
