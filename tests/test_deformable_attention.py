"""Multi-scale deformable attention vs an independent NumPy reference.

The reference writes bilinear `grid_sample(align_corners=False, padding_mode='zeros')` as a sum over EVERY
pixel of the map with tent weights max(0, 1 - |x - j|) * max(0, 1 - |y - i|) — no floor, no neighbour
bookkeeping, no clipping — so it shares no logic with the gather-based implementation.
"""

import math

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from mrqm_jax.models import deformable_attention as da
from mrqm_jax.models import detector

SHAPES = ((5, 7), (3, 4), (2, 2))  # three levels, non-square, one tiny


def reference_core(value, spatial_shapes, locations, attention_weights):
  """NumPy float64: value [B,S,M,D], locations [B,Q,M,L,P,2], weights [B,Q,M,L,P] -> [B,Q,M*D]."""
  value = np.asarray(value, np.float64)
  locations = np.asarray(locations, np.float64)
  attention_weights = np.asarray(attention_weights, np.float64)
  b, _, m, d = value.shape
  q, nl, p = locations.shape[1], locations.shape[3], locations.shape[4]
  out = np.zeros((b, q, m, d))
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    level = value[:, start:start + h * w].reshape(b, h, w, m, d)
    start += h * w
    rows, cols = np.arange(h), np.arange(w)
    for bi in range(b):
      for qi in range(q):
        for mi in range(m):
          for pi in range(p):
            x = locations[bi, qi, mi, lvl, pi, 0] * w - 0.5
            y = locations[bi, qi, mi, lvl, pi, 1] * h - 0.5
            tent = np.outer(np.maximum(0, 1 - np.abs(y - rows)), np.maximum(0, 1 - np.abs(x - cols)))  # [H, W]
            sample = np.einsum('hw,hwd->d', tent, level[bi, :, :, mi])
            out[bi, qi, mi] += attention_weights[bi, qi, mi, lvl, pi] * sample
  return out.reshape(b, q, m * d)


def _inputs(seed, b=2, q=6, m=2, d=3, p=3, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  value = rng.normal(size=(b, s, m, d)).astype(np.float32)
  # Mostly inside, some up to 0.3 outside on either side: partial and complete zero padding.
  loc = rng.uniform(-0.3, 1.3, size=(b, q, m, len(shapes), p, 2)).astype(np.float32)
  weights = rng.uniform(0.0, 1.0, size=(b, q, m, len(shapes), p)).astype(np.float32)
  return value, loc, weights


def _border_locations(shapes, b, m, p):
  """Locations on every special spot: edges 0 and 1, pixel centres, half a pixel outside, far outside."""
  spots = []
  for h, w in shapes:
    xs = [0.0, 1.0, 0.5 / w, 1 - 0.5 / w, -0.5 / w, 1 + 0.5 / w, -0.25 / w, 1 + 0.25 / w, 2.0 / w, -3.0, 4.0]
    ys = [0.0, 1.0, 0.5 / h, 1 - 0.5 / h, -0.5 / h, 1 + 0.5 / h, -0.25 / h, 1 + 0.25 / h, 1.0 / h, 5.0, -2.0]
    spots.append(np.stack(np.meshgrid(xs, ys, indexing='ij'), -1).reshape(-1, 2))
  n = spots[0].shape[0]  # same count per level -> queries
  loc = np.stack(spots, axis=1)  # [N, L, 2]
  loc = np.broadcast_to(loc[None, :, None, :, None, :], (b, n, m, len(shapes), p, 2))
  return np.ascontiguousarray(loc, np.float32)


VARIANTS = [dict(packed_neighbours=packed, use_einsum=einsum) for packed in (False, True) for einsum in (True, False)]
VARIANTS += [dict(query_chunk_size=4), dict(packed_neighbours=True, query_chunk_size=2)]  # 6 queries: 2 and 3 chunks


@pytest.mark.parametrize('variant', VARIANTS, ids=lambda v: '-'.join(f'{k}={x}' for k, x in v.items()))
def test_core_matches_reference_random(variant):
  value, loc, weights = _inputs(0)
  got = np.asarray(jax.jit(lambda v, l, w: da.ms_deform_attn_core(v, SHAPES, l, w, **variant))(value, loc, weights))
  want = reference_core(value, SHAPES, loc, weights)
  assert got.shape == want.shape == (2, 6, 6)
  np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


@pytest.mark.parametrize('packed', [False, True])
def test_core_matches_reference_on_borders_and_outside(packed):
  b, m, d, p = 1, 2, 3, 2
  loc = _border_locations(SHAPES, b, m, p)
  rng = np.random.default_rng(1)
  value = rng.normal(size=(b, sum(h * w for h, w in SHAPES), m, d)).astype(np.float32)
  weights = rng.uniform(0.5, 1.0, size=loc.shape[:-1]).astype(np.float32)
  got = np.asarray(da.ms_deform_attn_core(value, SHAPES, loc, weights, packed_neighbours=packed))
  want = reference_core(value, SHAPES, loc, weights)
  np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)
  # The far-outside spots (x = -3 or 4 on every level) read pure zero padding.
  far = np.where(np.isclose(np.abs(loc[0, :, 0, 0, 0, 0] - 0.5), 3.5))[0]
  assert far.size and np.all(got[0, far] == 0.0)


def test_pixel_centre_reads_that_pixel_exactly():
  """Closed form: at a pixel centre bilinear sampling returns the pixel itself."""
  shapes = ((4, 6),)
  value = np.arange(24 * 2, dtype=np.float32).reshape(1, 24, 1, 2)
  i, j = 2, 5
  loc = np.array([(j + 0.5) / 6, (i + 0.5) / 4], np.float32).reshape(1, 1, 1, 1, 1, 2)
  out = da.ms_deform_attn_core(value, shapes, loc, np.ones((1, 1, 1, 1, 1), np.float32))
  np.testing.assert_allclose(np.asarray(out)[0, 0], value[0, i * 6 + j, 0], rtol=0, atol=1e-5)


def test_shape_errors_name_the_problem():
  value, loc, weights = _inputs(0)
  with pytest.raises(ValueError, match='spatial_shapes'):
    da.ms_deform_attn_core(value, SHAPES[:2], loc[:, :, :, :2], weights[:, :, :, :2])
  with pytest.raises(ValueError, match='attention_weights'):
    da.ms_deform_attn_core(value, SHAPES, loc, weights[..., :1])


@pytest.mark.parametrize('variant', [dict(), dict(packed_neighbours=True), dict(query_chunk_size=2),
                                     dict(packed_neighbours=True, query_chunk_size=2)],
                         ids=['flat', 'packed', 'chunked', 'packed-chunked'])
def test_core_gradients(variant):
  """Reverse-mode gradients (value, locations, weights) vs finite differences, in float64."""
  shapes = ((3, 4), (2, 2))
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    value = rng.normal(size=(1, 16, 2, 2))
    # Keep locations off pixel-centre lattices (where bilinear has kinks): finite differences need smoothness.
    loc = rng.uniform(-0.1, 1.1, size=(1, 3, 2, 2, 2, 2))
    weights = rng.uniform(size=(1, 3, 2, 2, 2))
    fn = lambda v, l, w: da.ms_deform_attn_core(v, shapes, l, w, **variant)  # noqa: E731
    jtu.check_grads(fn, (value, loc, weights), order=1, modes=('rev',), eps=1e-6, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_flat_gradients_with_padding_and_outside_points():
  """float32, the shapes of the random reference test (locations up to 0.3 outside): the packed layout's
  gradients w.r.t. value, locations and weights are the flat layout's, also through query chunks."""
  value, loc, weights = _inputs(3)
  cot = np.random.default_rng(4).normal(size=(2, 6, 6)).astype(np.float32)

  def grads(**variant):
    fn = lambda v, l, w: jnp.vdot(da.ms_deform_attn_core(v, SHAPES, l, w, **variant), cot)  # noqa: E731
    return jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(value, loc, weights)

  want = grads()
  for variant in (dict(packed_neighbours=True), dict(packed_neighbours=True, query_chunk_size=4)):
    for g, w in zip(grads(**variant), want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_level_start_index():
  assert da.level_start_index(SHAPES) == (0, 35, 47)


# ---------------------------------------------------------------------------------------------- module

def test_grid_offsets_init_closed_form():
  m, nl, p = 8, 2, 3
  grid = np.asarray(da.grid_offsets_init(m, nl, p)(None, (m * nl * p * 2,))).reshape(m, nl, p, 2)
  for k in range(p):
    np.testing.assert_allclose(grid[0, 1, k], [k + 1, 0], atol=1e-6)        # angle 0
    np.testing.assert_allclose(grid[1, 0, k], [k + 1, k + 1], atol=1e-6)    # 45 deg: square ring corner
    np.testing.assert_allclose(grid[2, 1, k], [0, k + 1], atol=1e-6)        # 90 deg
    np.testing.assert_allclose(grid[5, 0, k], [-(k + 1), -(k + 1)], atol=1e-6)  # 225 deg
  # Every head: largest |component| of point k is exactly k + 1.
  np.testing.assert_allclose(np.abs(grid).max(-1), np.broadcast_to(np.arange(1, p + 1), (m, nl, p)), atol=1e-6)


def _module_reference(params, query, ref, value, shapes, pad_mask, m, nl, p):
  """NumPy forward of MSDeformAttn from its parameters, using `reference_core` for the sampling."""
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  lin = lambda x, name: f64(x) @ f64(params[name]['kernel']) + f64(params[name]['bias'])  # noqa: E731
  b, q, c = query.shape
  v = lin(value, 'value_proj')
  if pad_mask is not None:
    v = np.where(pad_mask[..., None], 0.0, v)
  v = v.reshape(b, -1, m, c // m)
  offsets = lin(query, 'sampling_offsets').reshape(b, q, m, nl, p, 2)
  logits = lin(query, 'attention_weights').reshape(b, q, m, nl * p)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True)).reshape(b, q, m, nl, p)
  ref = f64(ref)
  if ref.ndim == 3:
    ref = np.repeat(ref[:, :, None], nl, axis=2)
  loc = np.zeros((b, q, m, nl, p, 2))
  for lvl, (h, w) in enumerate(shapes):
    r = ref[:, :, lvl][:, :, None, None, :]  # [B, Q, 1, 1, 2|4]
    if ref.shape[-1] == 2:
      loc[:, :, :, lvl] = r + offsets[:, :, :, lvl] / np.array([w, h])
    else:
      loc[:, :, :, lvl] = r[..., :2] + offsets[:, :, :, lvl] / p * r[..., 2:] * 0.5
  return lin(reference_core(v, shapes, loc, weights), 'output_proj')


def _perturbed(params, seed):
  """Random non-zero values for every parameter (the zero-initialized kernels would hide bugs)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def module_case():
  c, m, p = 8, 2, 2
  attn = da.MSDeformAttn(d_model=c, num_heads=m, num_levels=len(SHAPES), num_points=p)
  rng = np.random.default_rng(3)
  s = sum(h * w for h, w in SHAPES)
  query = rng.normal(size=(2, 5, c)).astype(np.float32)   # queries are NOT tokens of the value set
  value = rng.normal(size=(2, s, c)).astype(np.float32)
  pad = np.zeros((2, s), bool)
  pad[1, 30:35] = True   # last row of level 0 of image 1
  pad[1, 44:47] = True
  points = rng.uniform(0, 1, size=(2, 5, len(SHAPES), 2)).astype(np.float32)
  boxes = np.concatenate([points, rng.uniform(0.05, 0.5, size=points.shape)], -1).astype(np.float32)
  params = attn.init(jax.random.PRNGKey(0), query, points, value, SHAPES, pad)['params']
  return attn, _perturbed(params, 1), query, value, pad, points, boxes, (m, len(SHAPES), p)


@pytest.mark.parametrize('ref_kind', ['points', 'boxes', 'points_no_level_axis'])
def test_module_matches_reference(module_case, ref_kind):
  attn, params, query, value, pad, points, boxes, (m, nl, p) = module_case
  ref = {'points': points, 'boxes': boxes, 'points_no_level_axis': points[:, :, 0]}[ref_kind]
  got = np.asarray(attn.apply({'params': params}, query, ref, value, SHAPES, pad))
  want = _module_reference(params, query, ref, value, SHAPES, pad, m, nl, p)
  assert got.shape == query.shape
  np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


def test_module_padded_tokens_have_no_influence(module_case):
  attn, params, query, value, pad, points, *_ = module_case
  noisy = np.where(pad[..., None], 1e3 * np.random.default_rng(4).normal(size=value.shape), value)
  a = attn.apply({'params': params}, query, points, value, SHAPES, pad)
  b = attn.apply({'params': params}, query, points, noisy.astype(np.float32), SHAPES, pad)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ...while without the mask the same perturbation does change image 1 (so the test can fail).
  c = attn.apply({'params': params}, query, points, noisy.astype(np.float32), SHAPES, None)
  assert np.abs(np.asarray(c)[1] - np.asarray(a)[1]).max() > 1e-2


def test_module_init_samples_the_grid(module_case):
  """At init (zero offset kernel) a point query samples ref + grid / (W_l, H_l) with uniform weights."""
  attn, _, query, value, _, points, *_ = module_case
  params = attn.init(jax.random.PRNGKey(0), query, points, value, SHAPES)['params']
  m, nl, p = 2, len(SHAPES), 2
  _, inter = attn.apply({'params': params}, query, points, value, SHAPES, capture_intermediates=True)
  offsets = np.asarray(inter['intermediates']['sampling_offsets']['__call__'][0]).reshape(2, 5, m, nl, p, 2)
  want = np.asarray(da.grid_offsets_init(m, nl, p)(None, (m * nl * p * 2,))).reshape(m, nl, p, 2)
  np.testing.assert_allclose(offsets, np.broadcast_to(want, offsets.shape), atol=1e-6)
  logits = np.asarray(inter['intermediates']['attention_weights']['__call__'][0])
  assert np.all(logits == 0.0)
  assert math.isclose(float(np.abs(want[0, 0, 1]).max()), 2.0)


def test_module_rejects_wrong_levels(module_case):
  attn, params, query, value, pad, points, *_ = module_case
  with pytest.raises(ValueError, match='levels'):
    attn.apply({'params': params}, query, points[:, :, :2], value[:, :47], SHAPES[:2], pad[:, :47])


def test_module_layout_and_chunking_do_not_change_the_result(module_case):
  attn, params, query, value, pad, points, *_ = module_case
  a = attn.apply({'params': params}, query, points, value, SHAPES, pad)
  for variant in (attn.clone(packed_neighbours=True), attn.clone(query_chunk_size=2)):
    b = variant.apply({'params': params}, query, points, value, SHAPES, pad)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_sampling_layout_resolves_by_backend_and_reaches_the_encoder():
  assert da.resolve_sampling_layout('auto', 'tpu') == 'packed'
  assert da.resolve_sampling_layout('auto', 'cpu') == da.resolve_sampling_layout('auto', 'gpu') == 'flat'
  assert da.resolve_sampling_layout('flat', 'tpu') == 'flat' and da.resolve_sampling_layout('packed', 'cpu') == 'packed'
  with pytest.raises(ValueError, match='encoder.sampling_layout'):
    da.resolve_sampling_layout('corners')
  config = base.get_config()
  assert config.encoder.sampling_layout == 'auto'
  assert detector.build_encoder(config).packed_neighbours == (jax.default_backend() == 'tpu')
  config.encoder.sampling_layout = 'packed'
  assert detector.build_encoder(config).packed_neighbours
