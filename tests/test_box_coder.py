"""mrqm_jax.ops.box_coder against a float64 NumPy transcription of mmdet v2's bbox2delta / delta2bbox, written
in xyxy (the frame mmdet uses), and round trips."""

import math

import jax
import numpy as np
import pytest

from mrqm_jax.ops import box_coder as C
from mrqm_jax.ops import boxes as B


def _ref_bbox2delta(proposals, gt, stds):
  """Per-box loop in xyxy, mmdet v2 DeltaXYWH (means 0): centers (x1+x2)/2, sizes x2-x1 (no +1)."""
  out = np.zeros((len(proposals), 4))
  for i, (p, g) in enumerate(zip(proposals, gt)):
    px, py = (p[0] + p[2]) * 0.5, (p[1] + p[3]) * 0.5
    pw, ph = p[2] - p[0], p[3] - p[1]
    gx, gy = (g[0] + g[2]) * 0.5, (g[1] + g[3]) * 0.5
    gw, gh = g[2] - g[0], g[3] - g[1]
    d = [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]
    out[i] = [d[k] / stds[k] for k in range(4)]
  return out


def _ref_delta2bbox(rois, deltas, stds, wh_ratio_clip=16 / 1000):
  max_ratio = abs(math.log(wh_ratio_clip))
  out = np.zeros((len(rois), 4))
  for i, (r, d) in enumerate(zip(rois, deltas)):
    dx, dy, dw, dh = (d[k] * stds[k] for k in range(4))
    dw = min(max(dw, -max_ratio), max_ratio)
    dh = min(max(dh, -max_ratio), max_ratio)
    px, py = (r[0] + r[2]) * 0.5, (r[1] + r[3]) * 0.5
    pw, ph = r[2] - r[0], r[3] - r[1]
    gw, gh = pw * math.exp(dw), ph * math.exp(dh)
    gx, gy = px + pw * dx, py + ph * dy
    out[i] = [gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5]
  return out


def _random_xyxy(rng, n, lo=1.0, hi=200.0):
  xy = rng.uniform(0, 800, (n, 2))
  wh = np.exp(rng.uniform(np.log(lo), np.log(hi), (n, 2)))
  return np.concatenate([xy, xy + wh], axis=1)


STDS = [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)]


@pytest.mark.parametrize('stds', STDS)
def test_encode_matches_mmdet_formula(stds):
  rng = np.random.default_rng(0)
  anchors, gts = _random_xyxy(rng, 64, lo=0.5), _random_xyxy(rng, 64, lo=0.5)
  got = C.encode_deltas(B.xyxy_to_cxcywh(anchors.astype(np.float32)), B.xyxy_to_cxcywh(gts.astype(np.float32)),
                        stds)
  np.testing.assert_allclose(np.asarray(got), _ref_bbox2delta(anchors, gts, stds), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('stds', STDS)
def test_decode_matches_mmdet_formula_including_clip(stds):
  rng = np.random.default_rng(1)
  anchors = _random_xyxy(rng, 64)
  deltas = rng.normal(0, 2.0, (64, 4))
  deltas[:8, 2:] = rng.choice([-1, 1], (8, 2)) * rng.uniform(5, 60, (8, 2))   # far beyond the clip
  got = B.cxcywh_to_xyxy(C.decode_deltas(B.xyxy_to_cxcywh(anchors.astype(np.float32)),
                                         deltas.astype(np.float32), stds))
  ref = _ref_delta2bbox(anchors, deltas, stds)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize('stds', STDS)
def test_round_trip(stds):
  rng = np.random.default_rng(2)
  anchors = B.xyxy_to_cxcywh(_random_xyxy(rng, 128, lo=1.0, hi=50.0).astype(np.float32))
  # Targets within the clip range (size ratios < 1000/16) round-trip; tiny 1-px boxes included.
  boxes = B.xyxy_to_cxcywh(_random_xyxy(rng, 128, lo=1.0, hi=50.0).astype(np.float32))
  enc = jax.jit(C.encode_deltas)(anchors, boxes, np.asarray(stds, np.float32))
  dec = jax.jit(C.decode_deltas)(anchors, enc, np.asarray(stds, np.float32))
  np.testing.assert_allclose(np.asarray(dec), np.asarray(boxes), rtol=1e-4, atol=1e-3)


def test_decode_clip_bound_and_leading_dims():
  anchors = np.tile(np.array([[10.0, 10.0, 4.0, 8.0]], np.float32), (2, 3, 1))
  deltas = np.zeros((2, 3, 4), np.float32)
  deltas[..., 2] = 100.0
  deltas[..., 3] = -100.0
  out = np.asarray(C.decode_deltas(anchors, deltas, (1.0, 1.0, 1.0, 1.0)))
  assert out.shape == (2, 3, 4)
  np.testing.assert_allclose(out[..., 2], 4.0 * 1000 / 16, rtol=1e-5)
  np.testing.assert_allclose(out[..., 3], 8.0 * 16 / 1000, rtol=1e-5)
  np.testing.assert_allclose(out[..., :2], 10.0)
