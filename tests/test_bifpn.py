"""Necks: shapes, fast normalized fusion vs NumPy, information flow (BiFPN bottom-up path vs FPN), a fusion
weight selecting one input cuts the others off, translation equivariance of interior features."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mrqm_jax.models import bifpn
from mrqm_jax.models import detector

CHANNELS = (8, 16, 32, 64)


def pyramid(hw2=(16, 16), batch=1, seed=0):
  """Random [C2..C5] with C_l [B, ceil(H2 / 2^(l-2)), ..., CHANNELS[l-2]]."""
  rng = np.random.default_rng(seed)
  h, w = hw2
  feats = []
  for c in CHANNELS:
    feats.append(jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32))
    h, w = -(-h // 2), -(-w // 2)
  return feats


def test_fast_normalized_fusion_matches_numpy():
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32) for _ in range(3)]
  fusion = bifpn.FastNormalizedFusion()
  params = fusion.init(jax.random.key(0), xs)
  np.testing.assert_array_equal(params['params']['weights'], np.ones(3))  # init: plain average
  w = np.array([-1.0, 2.0, 0.5])
  out = fusion.apply({'params': {'weights': jnp.asarray(w, jnp.float32)}}, xs)
  expected = (2.0 * np.asarray(xs[1]) + 0.5 * np.asarray(xs[2])) / (2.5 + 1e-4)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)
  # Equal inputs come back (weights normalized), whatever the positive weights.
  same = [xs[0]] * 3
  np.testing.assert_allclose(np.asarray(fusion.apply({'params': {'weights': jnp.array([0.3, 4.0, 1.0])}}, same)),
                             np.asarray(xs[0]), rtol=1e-4)
  with pytest.raises(ValueError, match='one shape'):
    fusion.init(jax.random.key(0), [xs[0], xs[0][:, :2]])


@pytest.mark.parametrize('neck', ['bifpn', 'fpn'])
def test_build_neck_shapes(neck):
  config = smoke.get_config()
  config.model.neck = neck
  config.model.bifpn_repeats = 2
  model = detector.build_neck(config)
  assert isinstance(model, bifpn.BiFPN if neck == 'bifpn' else bifpn.FPN)
  feats = pyramid((9, 12), batch=2)  # odd sizes: (9,12), (5,6), (3,3), (2,2)
  variables = jax.eval_shape(model.init, jax.random.key(0), feats)
  outs = jax.eval_shape(model.apply, variables, feats)
  d = config.model.hidden_dim
  assert [o.shape for o in outs] == [(2, 9, 12, d), (2, 5, 6, d), (2, 3, 3, d), (2, 2, 2, d)]
  if neck == 'bifpn':
    layer = variables['params']['layer_1']
    assert {k: v['weights'].shape for k, v in layer.items() if 'fuse' in k} == {
        'td_fuse_0': (2,), 'td_fuse_1': (2,), 'td_fuse_2': (2,),
        'bu_fuse_1': (3,), 'bu_fuse_2': (3,), 'bu_fuse_3': (2,)}  # middle bottom-up nodes take three inputs
    assert layer['td_conv_0']['depthwise']['kernel'].shape == (3, 3, 1, d)


def test_build_neck_errors():
  config = smoke.get_config()
  config.model.neck = 'pafpn'
  with pytest.raises(ValueError, match='config.model.neck'):
    detector.build_neck(config)
  config.model.neck = 'bifpn'
  config.model.neck_norm = 'batch'
  with pytest.raises(ValueError, match='neck_norm'):
    detector.build_neck(config)


@pytest.fixture(scope='module')
def bifpn_setup():
  model = bifpn.BiFPN(hidden_dim=8, repeats=1)
  feats = pyramid()
  variables = jax.jit(model.init)(jax.random.key(0), feats)
  return model, feats, variables, jax.jit(model.apply)


def _perturb_c2(feats):
  """C2 plus noise (a constant shift would be removed by the projection's GroupNorm)."""
  noise = jax.random.normal(jax.random.key(9), feats[0].shape)
  return [feats[0] + noise] + feats[1:]


def test_bifpn_bottom_up_path_reaches_top_and_fpn_does_not(bifpn_setup):
  model, feats, variables, apply = bifpn_setup
  base, moved = apply(variables, feats), apply(variables, _perturb_c2(feats))
  assert float(jnp.abs(base[3] - moved[3]).max()) > 1e-3  # C2 reaches P5 through the bottom-up pass
  # Top-down: C5 reaches P2.
  assert float(jnp.abs(apply(variables, feats[:3] + [-feats[3]])[0] - base[0]).max()) > 1e-3
  fpn = bifpn.FPN(hidden_dim=8)
  fv = jax.jit(fpn.init)(jax.random.key(0), feats)
  fpn_apply = jax.jit(fpn.apply)
  np.testing.assert_array_equal(np.asarray(fpn_apply(fv, feats)[3]),
                                np.asarray(fpn_apply(fv, _perturb_c2(feats))[3]))  # FPN: top-down only


def test_fusion_weight_selecting_one_input_cuts_the_others(bifpn_setup):
  model, feats, variables, apply = bifpn_setup
  params = flax.core.unfreeze(variables['params'])
  # P5_out = block(fuse(P5_in, down(P4_out))): select P5_in only, so C2..C4 no longer reach P5.
  params['layer_0']['bu_fuse_3']['weights'] = jnp.array([1.0, -1.0])
  selected = {**variables, 'params': params}
  base, moved = apply(selected, feats), apply(selected, _perturb_c2(feats))
  np.testing.assert_array_equal(np.asarray(base[3]), np.asarray(moved[3]))
  assert float(jnp.abs(base[2] - moved[2]).max()) > 1e-3  # P4 still sees C2
  # And the selected node equals its single input through the block: block(P5_in / (1 + 1e-4)).
  p = params['input_proj_3']
  p5_in = bifpn.input_projection(8, 'group', 'auto', None, 'p').apply({'params': p}, feats[3])
  block = bifpn.SeparableConvBlock(8)
  expected = block.apply({'params': params['layer_0']['bu_conv_3']}, p5_in / (1 + 1e-4))
  np.testing.assert_allclose(np.asarray(base[3]), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_interior_features_are_translation_equivariant():
  """Shifting the pyramid by (8, 4, 2, 1) px at P2..P5 shifts the interior outputs by the same amounts
  (norm='none': GroupNorm's whole-map statistics are not local)."""
  model = bifpn.BiFPN(hidden_dim=8, repeats=1, norm='none')
  size2 = 128
  big = pyramid((size2 + 8, size2 + 8), seed=3)  # two windows of the same pyramid, one P5 pixel apart
  window = [f[:, :size2 >> l, :size2 >> l] for l, f in enumerate(big)]
  shifted = [f[:, 8 >> l:(8 >> l) + (size2 >> l), 8 >> l:(8 >> l) + (size2 >> l)] for l, f in enumerate(big)]
  variables = jax.jit(model.init)(jax.random.key(1), window)
  apply = jax.jit(model.apply)
  out_a, out_b = apply(variables, window), apply(variables, shifted)
  # Zero padding perturbs a band along the border (one BiFPN layer: ~7, 5, 4, 4 px at P2..P5); skip a bit more.
  margins = (8, 6, 5, 5)
  for l in range(4):
    size, s, m = size2 >> l, 8 >> l, margins[l]
    a = np.asarray(out_a[l])[:, s + m:size - m, s + m:size - m]
    b = np.asarray(out_b[l])[:, m:size - m - s, m:size - m - s]
    assert a.shape[1] >= 4
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # The border is not equivariant (zero padding), so the test is not vacuous.
  assert not np.allclose(np.asarray(out_a[0])[:, 8:, 8:], np.asarray(out_b[0])[:, :-8, :-8], atol=1e-4)
