"""mrqm_jax.ops.boxes against a float64 NumPy reference written with per-pair loops, closed-form cases and
gradient finiteness at degenerate boxes."""

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrqm_jax.ops import boxes as B

# --- independent reference: scalar loops in float64 --------------------------------------------------------


def _ref_overlap_1d(lo_a, hi_a, lo_b, hi_b):
  """Length of the overlap of [lo_a, hi_a] and [lo_b, hi_b]; 0 for inverted or disjoint intervals."""
  lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
  if hi_a < lo_a or hi_b < lo_b or hi <= lo:
    return 0.0
  return hi - lo


def _ref_area(box):
  x0, y0, x1, y1 = (float(v) for v in box)
  return (x1 - x0 if x1 > x0 else 0.0) * (y1 - y0 if y1 > y0 else 0.0)


def _ref_iou_giou(a, b, eps=B.EPS):
  """(IoU, GIoU) of two xyxy boxes with the documented convention: zero union -> IoU 0."""
  inter = _ref_overlap_1d(a[0], a[2], b[0], b[2]) * _ref_overlap_1d(a[1], a[3], b[1], b[3])
  union = _ref_area(a) + _ref_area(b) - inter
  iou = inter / union if union > eps else inter / eps
  hull_w = max(a[2], b[2]) - min(a[0], b[0])
  hull_h = max(a[3], b[3]) - min(a[1], b[1])
  hull = max(hull_w, 0.0) * max(hull_h, 0.0)
  if hull > eps:
    return iou, iou - (hull - union) / hull
  return iou, iou - (hull - union) / eps


def _ref_pairwise(a, b):
  """a [N, 4], b [M, 4] -> (iou [N, M], giou [N, M]) by loops."""
  iou = np.zeros((len(a), len(b)))
  giou = np.zeros((len(a), len(b)))
  for i, j in itertools.product(range(len(a)), range(len(b))):
    iou[i, j], giou[i, j] = _ref_iou_giou(np.float64(a[i]), np.float64(b[j]))
  return iou, giou


# Fixed shapes so jit compiles each function once across all hypothesis examples.
N, M = 5, 7


@pytest.fixture(scope='module')
def pairwise_fns():
  return jax.jit(lambda a, b: (B.pairwise_iou(a, b), B.pairwise_giou(a, b)))


@pytest.fixture(scope='module')
def elementwise_fns():
  return jax.jit(lambda a, b: (B.elementwise_iou(a, b), B.elementwise_giou(a, b)))


# Coordinates on a 1/8 grid: many exactly identical, touching, nested, zero-width and zero-height boxes, and
# every non-zero area >= 1/64, so the float32 result is exact enough to compare with float64 at 1e-5.
_grid_coord = st.integers(0, 12).map(lambda k: k / 8.0)


def _grid_boxes(n):
  """n xyxy boxes on the grid, sorted so x0 <= x1 and y0 <= y1 (zero extent allowed)."""
  return hnp.arrays(np.float64, (n, 4), elements=_grid_coord).map(
      lambda x: np.concatenate([np.minimum(x[:, :2], x[:, 2:]), np.maximum(x[:, :2], x[:, 2:])], -1))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(a=_grid_boxes(N), b=_grid_boxes(M))
def test_pairwise_matches_loop_reference(pairwise_fns, a, b):
  iou, giou = pairwise_fns(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  ref_iou, ref_giou = _ref_pairwise(a, b)
  np.testing.assert_allclose(np.asarray(iou), ref_iou, atol=1e-5)
  np.testing.assert_allclose(np.asarray(giou), ref_giou, atol=1e-5)
  assert np.all((np.asarray(iou) >= 0) & (np.asarray(iou) <= 1 + 1e-6))
  assert np.all((np.asarray(giou) >= -1 - 1e-6) & (np.asarray(giou) <= 1 + 1e-6))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(a=_grid_boxes(N), b=_grid_boxes(N))
def test_elementwise_is_pairwise_diagonal(pairwise_fns, elementwise_fns, a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  iou, giou = elementwise_fns(a, b)
  ref_iou, ref_giou = _ref_pairwise(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(iou), np.diag(ref_iou), atol=1e-5)
  np.testing.assert_allclose(np.asarray(giou), np.diag(ref_giou), atol=1e-5)


def test_random_float_boxes_batched_leading_dims():
  """Real-valued boxes with leading batch dims [2, 3, ...] agree with the loop reference per batch item."""
  rng = np.random.default_rng(0)
  cxcywh_a = rng.uniform(0.0, 1.0, (2, 3, N, 4)) * [1, 1, 0.3, 0.3]
  cxcywh_b = rng.uniform(0.0, 1.0, (2, 3, M, 4)) * [1, 1, 0.3, 0.3]
  a = B.cxcywh_to_xyxy(jnp.asarray(cxcywh_a, jnp.float32))
  b = B.cxcywh_to_xyxy(jnp.asarray(cxcywh_b, jnp.float32))
  iou, giou = jax.jit(lambda a, b: (B.pairwise_iou(a, b), B.pairwise_giou(a, b)))(a, b)
  assert iou.shape == giou.shape == (2, 3, N, M)
  for i, j in itertools.product(range(2), range(3)):
    ref_iou, ref_giou = _ref_pairwise(np.asarray(a[i, j]), np.asarray(b[i, j]))
    np.testing.assert_allclose(np.asarray(iou[i, j]), ref_iou, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(giou[i, j]), ref_giou, atol=2e-5, rtol=1e-4)
  # Random boxes must overlap sometimes, or this test would not exercise the intersection branch.
  assert np.mean(np.asarray(iou) > 0) > 0.05


def test_conversions_round_trip_and_known_values():
  cxcywh = jnp.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.0]])
  xyxy = B.cxcywh_to_xyxy(cxcywh)
  np.testing.assert_allclose(np.asarray(xyxy), [[0.4, 0.3, 0.6, 0.7], [0.1, 0.9, 0.1, 0.9]], atol=1e-7)
  np.testing.assert_allclose(np.asarray(B.xyxy_to_cxcywh(xyxy)), np.asarray(cxcywh), atol=1e-7)
  np.testing.assert_allclose(np.asarray(B.box_area(xyxy)), [0.08, 0.0], atol=1e-7)
  # An inverted box has zero area, not a negative one.
  assert float(B.box_area(jnp.array([0.6, 0.3, 0.4, 0.7]))) == 0.0


def test_closed_form_cases():
  unit = jnp.array([0.0, 0.0, 1.0, 1.0])
  # Identical box: IoU = GIoU = 1.
  assert float(B.elementwise_iou(unit, unit)) == pytest.approx(1.0)
  assert float(B.elementwise_giou(unit, unit)) == pytest.approx(1.0)
  # Nested box of a quarter of the area: IoU = 0.25, hull = outer box so GIoU = IoU.
  inner = jnp.array([0.0, 0.0, 0.5, 0.5])
  assert float(B.elementwise_iou(unit, inner)) == pytest.approx(0.25)
  assert float(B.elementwise_giou(unit, inner)) == pytest.approx(0.25)
  # Two unit squares 1 apart horizontally: IoU 0, hull 3x1, union 2 -> GIoU = -(3 - 2) / 3.
  far = jnp.array([2.0, 0.0, 3.0, 1.0])
  assert float(B.elementwise_iou(unit, far)) == 0.0
  assert float(B.elementwise_giou(unit, far)) == pytest.approx(-1.0 / 3.0)
  # Tiny normalized box (1x1 px on a 1333x800 canvas) against itself: eps must not distort it.
  tiny = jnp.array([0.5, 0.5, 0.5 + 1 / 1333, 0.5 + 1 / 800])
  assert float(B.elementwise_iou(tiny, tiny)) == pytest.approx(1.0, abs=1e-3)


# Degenerate inputs: identical points, identical lines, a point inside a box, touching boxes, inverted boxes.
_DEGENERATE_A = np.array([
    [0.3, 0.3, 0.3, 0.3],
    [0.1, 0.2, 0.5, 0.2],
    [0.4, 0.4, 0.4, 0.4],
    [0.0, 0.0, 0.5, 0.5],
    [0.6, 0.6, 0.2, 0.2],
    [0.2, 0.2, 0.6, 0.6],
], np.float32)
_DEGENERATE_B = np.array([
    [0.3, 0.3, 0.3, 0.3],
    [0.1, 0.2, 0.5, 0.2],
    [0.2, 0.2, 0.6, 0.6],
    [0.5, 0.0, 1.0, 0.5],
    [0.6, 0.6, 0.2, 0.2],
    [0.2, 0.2, 0.6, 0.6],
], np.float32)


def test_degenerate_values_follow_convention():
  a, b = jnp.asarray(_DEGENERATE_A), jnp.asarray(_DEGENERATE_B)
  iou, giou = B.elementwise_iou(a, b), B.elementwise_giou(a, b)
  assert np.all(np.isfinite(np.asarray(iou))) and np.all(np.isfinite(np.asarray(giou)))
  # Zero-area boxes have IoU 0 even with themselves; the last pair is a regular identical box.
  np.testing.assert_allclose(np.asarray(iou), [0, 0, 0, 0, 0, 1], atol=1e-6)
  ref = np.array([_ref_iou_giou(x, y) for x, y in zip(_DEGENERATE_A.astype(np.float64), _DEGENERATE_B)])
  np.testing.assert_allclose(np.asarray(iou), ref[:, 0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(giou), ref[:, 1], atol=1e-6)


def test_gradients_finite_at_degenerate_boxes():
  """Gradients of IoU/GIoU losses w.r.t. both inputs stay finite, including through cxcywh with w = h = 0."""
  a, b = jnp.asarray(_DEGENERATE_A), jnp.asarray(_DEGENERATE_B)

  def loss(a, b):
    return (jnp.sum(1.0 - B.elementwise_giou(a, b)) + jnp.sum(B.pairwise_giou(a, b))
            + jnp.sum(B.pairwise_iou(a, b)) + jnp.sum(B.elementwise_iou(a, b)))

  grad_a, grad_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
  assert np.all(np.isfinite(np.asarray(grad_a))) and np.all(np.isfinite(np.asarray(grad_b)))

  zero_size = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.2, 0.7, 0.3, 0.0], [0.2, 0.2, 0.1, 0.1]])

  def cxcywh_loss(pred):
    xyxy = B.cxcywh_to_xyxy(pred)
    return jnp.sum(1.0 - B.elementwise_giou(xyxy, xyxy)) + jnp.sum(B.pairwise_giou(xyxy, xyxy))

  grad = jax.jit(jax.grad(cxcywh_loss))(zero_size)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_gradient_matches_finite_differences_on_regular_boxes():
  """Away from degeneracies the safe division must not change the gradient: compare with central
  differences of the float64 loop reference."""
  a = np.array([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.4]])
  b = np.array([[0.2, 0.3, 0.7, 0.8], [0.0, 0.5, 0.2, 0.9]])
  grad = np.asarray(jax.grad(lambda x: jnp.sum(B.elementwise_giou(x, jnp.asarray(b, jnp.float32))))(
      jnp.asarray(a, jnp.float32)))
  step = 1e-6
  numeric = np.zeros_like(a)
  for idx in itertools.product(range(2), range(4)):
    plus, minus = a.copy(), a.copy()
    plus[idx] += step
    minus[idx] -= step
    f = lambda x: sum(_ref_iou_giou(x[k], b[k])[1] for k in range(2))  # noqa: E731
    numeric[idx] = (f(plus) - f(minus)) / (2 * step)
  np.testing.assert_allclose(grad, numeric, atol=1e-3, rtol=1e-3)


def test_jit_and_vmap_agree_with_eager():
  rng = np.random.default_rng(1)
  a = B.cxcywh_to_xyxy(jnp.asarray(rng.uniform(0.1, 0.4, (3, N, 4)), jnp.float32))
  b = B.cxcywh_to_xyxy(jnp.asarray(rng.uniform(0.1, 0.4, (3, M, 4)), jnp.float32))
  eager = B.pairwise_giou(a, b)
  np.testing.assert_allclose(np.asarray(jax.jit(B.pairwise_giou)(a, b)), np.asarray(eager), atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(B.pairwise_giou)(a, b)), np.asarray(eager), atol=1e-6)


def test_pixel_frame_round_trip_and_closed_form():
  """Normalized cxcywh <-> canvas-pixel xyxy: a closed-form case and the round trip."""
  canvas = (100, 200)   # H, W
  box = jnp.asarray([[0.5, 0.25, 0.1, 0.2]])
  np.testing.assert_allclose(B.cxcywh_to_pixel_xyxy(box, canvas), [[90.0, 15.0, 110.0, 35.0]], rtol=1e-6)
  np.testing.assert_allclose(B.pixel_xyxy_to_cxcywh(B.cxcywh_to_pixel_xyxy(box, canvas), canvas), box, rtol=1e-6)
