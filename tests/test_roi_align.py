"""mrqm_jax.ops.roi_align against a float64 NumPy implementation of torchvision.ops.roi_align written from the
published algorithm with per-RoI / per-bin / per-sample loops, mmdet's level mapping, and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mrqm_jax.ops import roi_align as RA


def _ref_bilinear(feat, y, x):
  """feat [H, W, C]; one sample, mmcv/torchvision bilinear_interpolate."""
  height, width = feat.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(feat.shape[2])
  y, x = max(y, 0.0), max(x, 0.0)
  y0, x0 = int(y), int(x)
  if y0 >= height - 1:
    y0 = y1 = height - 1
    y = float(y0)
  else:
    y1 = y0 + 1
  if x0 >= width - 1:
    x0 = x1 = width - 1
    x = float(x0)
  else:
    x1 = x0 + 1
  ly, lx = y - y0, x - x0
  hy, hx = 1 - ly, 1 - lx
  return hy * hx * feat[y0, x0] + hy * lx * feat[y0, x1] + ly * hx * feat[y1, x0] + ly * lx * feat[y1, x1]


def _ref_roi_align(feat, rois, scale, out, ratio, aligned):
  """ratio 0: mmcv's adaptive grid, ceil(roi side / out) samples per bin side, the mean over max(ny * nx, 1)."""
  res = np.zeros((len(rois), out, out, feat.shape[2]))
  off = 0.5 if aligned else 0.0
  for r, (x1, y1, x2, y2) in enumerate(rois):
    sx, sy = x1 * scale - off, y1 * scale - off
    rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
    if not aligned:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    bw, bh = rw / out, rh / out
    ny = ratio if ratio > 0 else int(math.ceil(rh / out))
    nx = ratio if ratio > 0 else int(math.ceil(rw / out))
    for ph in range(out):
      for pw in range(out):
        acc = np.zeros(feat.shape[2])
        for iy in range(ny):
          y = sy + ph * bh + (iy + 0.5) * bh / ny
          for ix in range(nx):
            x = sx + pw * bw + (ix + 0.5) * bw / nx
            acc += _ref_bilinear(feat, y, x)
        res[r, ph, pw] = acc / max(ny * nx, 1)
  return res


def _rois(rng, n, canvas_hw):
  h, w = canvas_hw
  xy = rng.uniform([-30, -30], [w + 10, h + 10], (n, 2))            # some start outside the canvas
  wh = np.exp(rng.uniform(np.log(0.3), np.log(max(h, w)), (n, 2)))  # tiny to larger than the canvas
  rois = np.concatenate([xy, xy + wh], 1)
  rois[0] = [-40, -40, -20, -20]                                    # entirely outside: all zeros
  rois[1] = [10.3, 12.7, 10.4, 12.9]                                # sub-pixel
  rois[2] = [-5, -5, w + 5, h + 5]                                  # covers everything, partly outside
  return rois.astype(np.float32)


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('stride,out,ratio', [(8, 7, 2), (4, 5, 3), (16, 7, 1)])
def test_roi_align_matches_reference(aligned, stride, out, ratio):
  rng = np.random.default_rng(stride + out)
  canvas = (96, 128)
  feat = rng.normal(size=(canvas[0] // stride, canvas[1] // stride, 3)).astype(np.float32)
  rois = _rois(rng, 24, canvas)
  fn = jax.jit(lambda f, r: RA.roi_align(f, r, spatial_scale=1.0 / stride, output_size=out, sampling_ratio=ratio,
                                         aligned=aligned))
  got = np.asarray(fn(feat, rois))
  ref = _ref_roi_align(feat.astype(np.float64), rois.astype(np.float64), 1.0 / stride, out, ratio, aligned)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
  assert np.all(got[0] == 0) and np.abs(got[2]).max() > 0


@pytest.mark.parametrize('aligned', [True, False])
def test_adaptive_sampling_matches_mmcv_rule(aligned):
  """sampling_ratio=0 (Co-DINO's RoIAlign): per-RoI ceil(side / out) samples per bin side, exact while no RoI
  needs more than max_samples; a RoI that needs more gets max_samples evenly spaced ones."""
  rng = np.random.default_rng(3)
  stride, out, cap = 4, 3, 5
  feat = rng.normal(size=(24, 32, 2)).astype(np.float32)
  xy = rng.uniform(-6, 100, (12, 2))
  wh = rng.uniform(0.2, 55, (12, 2))                 # <= 55 / 4 / 3 -> at most 5 samples per bin side
  rois = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  rois[0] = [20, 20, 20, 20] if aligned else rois[0]   # zero extent: no samples, zeros (aligned)
  fn = jax.jit(lambda f, r: RA.roi_align(f, r, spatial_scale=1.0 / stride, output_size=out, sampling_ratio=0,
                                         aligned=aligned, max_samples=cap))
  got = np.asarray(fn(feat, rois))
  ref = _ref_roi_align(feat.astype(np.float64), rois.astype(np.float64), 1.0 / stride, out, 0, aligned)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
  counts = np.ceil((rois[:, 2:] - rois[:, :2]) / stride / out)
  assert counts.max() == cap and len(set(counts.reshape(-1))) > 3   # the cap is reached, counts vary
  # A RoI needing 8 per side, capped at 5: the mean of 5 x 5 evenly spaced samples (the fixed-ratio rule).
  big = np.asarray([[0, 0, 96, 96]], np.float32)
  capped = np.asarray(RA.roi_align(feat, big, spatial_scale=1.0 / stride, output_size=out, sampling_ratio=0,
                                   aligned=aligned, max_samples=cap))
  np.testing.assert_allclose(capped, _ref_roi_align(feat.astype(np.float64), big.astype(np.float64),
                                                    1.0 / stride, out, cap, aligned), atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match='max_samples'):
    RA.roi_align(feat, rois, spatial_scale=0.25, sampling_ratio=0)


def test_map_roi_levels():
  sizes = np.array([1, 50, 111.9, 112.1, 223, 225, 447, 449, 5000], np.float64)
  rois = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], 1).astype(np.float32)
  got = np.asarray(RA.map_roi_levels(rois, 4))
  ref = [min(max(math.floor(math.log2(s / 56.0 + 1e-6)), 0), 3) for s in sizes]
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(np.asarray(RA.map_roi_levels(rois, 2)), np.minimum(ref, 1))
  # Non-square: sqrt(w * h); inverted boxes -> level 0.
  rect = np.array([[0, 0, 224, 56], [0, 0, 448, 112], [10, 10, 0, 0]], np.float32)   # sqrt(w h) = 112, 224, 0
  np.testing.assert_array_equal(np.asarray(RA.map_roi_levels(rect, 5)), [1, 2, 0])


def test_multilevel_matches_per_level_reference():
  rng = np.random.default_rng(7)
  canvas = (256, 320)
  strides = (8, 16, 32)
  maps = [rng.normal(size=(2, canvas[0] // s, canvas[1] // s, 4)).astype(np.float32) for s in strides]
  rois = np.stack([_rois(rng, 12, canvas), _rois(rng, 12, canvas)])
  rois[:, 3:6] = [[0, 0, 120, 130], [20, 20, 300, 250], [5, 5, 60, 60]]   # levels 1, 2, 0 for sure
  fn = jax.jit(lambda m, r: RA.multilevel_roi_align(m, r, strides, output_size=4, sampling_ratio=2))
  got = np.asarray(fn(maps, rois))
  assert got.shape == (2, 12, 4, 4, 4)
  levels = np.asarray(RA.map_roi_levels(rois, 3))
  assert set(levels.ravel().tolist()) == {0, 1, 2}
  for b in range(2):
    for r in range(12):
      lvl = levels[b, r]
      ref = _ref_roi_align(maps[lvl][b].astype(np.float64), rois[b, r:r + 1].astype(np.float64),
                           1.0 / strides[lvl], 4, 2, True)
      np.testing.assert_allclose(got[b, r], ref[0], atol=2e-5, rtol=1e-4)


def test_gradients():
  rng = np.random.default_rng(3)
  feat = jnp.asarray(rng.normal(size=(6, 7, 2)), jnp.float32)
  rois = _rois(rng, 5, (24, 28))
  fn = lambda f: RA.roi_align(f, rois, spatial_scale=0.25, output_size=3, sampling_ratio=2)
  check_grads(fn, (feat,), order=1, modes=['fwd', 'rev'], atol=1e-2, rtol=1e-2)
  # Closed form: the output is linear in the features, so d sum(out) / d feat[i] = the total weight of pixel i;
  # the total weight of a bin is (fraction of its samples inside [-1, H] x [-1, W]) <= 1.
  g = jax.grad(lambda f: fn(f).sum())(feat)
  assert float(jnp.abs(g).sum()) <= 5 * 9 * 2 + 1e-4 and float(g.min()) >= 0
  # No gradient into the rois (torchvision/mmcv's RoIAlign has none).
  g_rois = jax.grad(lambda r: RA.roi_align(feat, r, spatial_scale=0.25, output_size=3).sum())(jnp.asarray(rois))
  np.testing.assert_array_equal(np.asarray(g_rois), 0.0)


def _count_primitives(jaxpr, name):
  """Occurrences of primitive `name` in a jaxpr and its sub-jaxprs (loop bodies counted once)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, 'eqns') or hasattr(sub, 'jaxpr'):
          count += _count_primitives(getattr(sub, 'jaxpr', sub), name)
  return count


def test_sample_terms_are_a_loop_not_unrolled():
  # The adaptive rule's 6 slots per side are 4 * 36 = 144 (corner, sample) terms. Unrolled, the gradient had
  # 144 gathers and 144 scatter-adds, each a full-map gradient buffer, that XLA:TPU compiled for minutes (README,
  # measured table): the terms run as one loop, one gather and one scatter-add in the program whatever the slots.
  feat = jnp.zeros((2, 10, 12, 3), jnp.float32)
  rois = jnp.asarray([[[1.0, 2.0, 30.0, 20.0]] * 4] * 2, jnp.float32)

  def gradient_program(max_samples):
    fn = lambda f: RA.multilevel_roi_align([f], rois, (4,), output_size=7, sampling_ratio=0,  # noqa: E731
                                           max_samples=max_samples)
    return jax.make_jaxpr(jax.grad(lambda f: fn(f).sum()))(feat).jaxpr

  one, six = gradient_program(1), gradient_program(6)
  for primitive in ('gather', 'scatter-add'):
    assert _count_primitives(six, primitive) == _count_primitives(one, primitive) > 0, primitive


def test_nan_rois_give_zeros_and_finite_gradients():
  rng = np.random.default_rng(4)
  maps = [jnp.asarray(rng.normal(size=(1, 8 // s, 8 // s, 2)), jnp.float32) for s in (1, 2)]
  rois = np.array([[[1.0, 1.0, 5.0, 6.0], [np.nan] * 4]], np.float32)
  fn = lambda m: RA.multilevel_roi_align(m, rois, (1, 2), output_size=2, finest_scale=4.0)
  out = np.asarray(fn(maps))
  assert np.isfinite(out).all() and np.all(out[0, 1] == 0) and np.abs(out[0, 0]).max() > 0
  grads = jax.grad(lambda m: fn(m).sum())(maps)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  np.testing.assert_array_equal(np.asarray(RA.map_roi_levels(rois, 2)), [[0, 0]])


def test_bad_sampling_ratio():
  with pytest.raises(ValueError, match='sampling_ratio'):
    RA.roi_align(jnp.zeros((4, 4, 1)), jnp.zeros((1, 4)), spatial_scale=1.0, sampling_ratio=-1)
