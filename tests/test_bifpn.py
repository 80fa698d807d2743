"""Necks: shapes, fast normalized fusion vs NumPy, information flow (BiFPN bottom-up path vs FPN), a fusion
weight selecting one input cuts the others off, translation equivariance of interior features; GroupNorm over
the batch's extent (model.norm_region='batch') against the batch cropped to its extent (mmdet's batch tensor),
for every GroupNorm part: the neck, the aux extra level, the dense heads' towers."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mrqm_jax.models import aux_heads
from mrqm_jax.models import bifpn
from mrqm_jax.models import detector
from mrqm_jax.models import layers

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


# --------------------------------------------- GroupNorm over the batch's extent vs the batch cropped to it
# Two images of 130 x 150 and 100 x 180 px on a 192 x 256 canvas: mmdet pads the batch to 130 x 180 (its
# extent); at strides 4 .. 64 that is 33 x 45, 17 x 23, 9 x 12, 5 x 6, 3 x 3 of the canvas' 48 x 64 .. 3 x 4 (5
# rows at stride 32 on purpose: the stride-2 convs then read one row past the extent).
CANVAS, IMAGES = (192, 256), ((130, 150), (100, 180))


def _extent_region():
  pad = np.ones((len(IMAGES), *CANVAS), bool)
  for i, (h, w) in enumerate(IMAGES):
    pad[i, :h, :w] = False
  return layers.batch_extent(jnp.asarray(pad))


def _extent_at(stride):
  return tuple(-(-max(hw[k] for hw in IMAGES) // stride) for k in range(2))


def _zero_beyond(x, hw):
  """x [B, H, W, C] with zeros past hw: what a conv sees beyond mmdet's batch tensor (its zero padding)."""
  return x.at[:, hw[0]:].set(0.0).at[:, :, hw[1]:].set(0.0)


def _canvas_pyramid(channels, seed=0):
  """Random [B, H_l, W_l, c] maps at strides 4, 8, ... of CANVAS, zero beyond the extent at each level."""
  rng = np.random.default_rng(seed)
  out = []
  for l, c in enumerate(channels):
    s = 4 * 2**l
    x = jnp.asarray(rng.normal(size=(len(IMAGES), -(-CANVAS[0] // s), -(-CANVAS[1] // s), c)), jnp.float32)
    out.append(_zero_beyond(x, _extent_at(s)))
  return out


def _cropped(maps):
  return [m[:, :_extent_at(4 * 2**l)[0], :_extent_at(4 * 2**l)[1]] for l, m in enumerate(maps)]


def test_channel_mapper_over_the_batch_extent_equals_the_cropped_batch():
  """THE check that norm_region='batch' is mmdet's batch tensor for Co-DINO's neck: ChannelMapper (C2..C5 -> 5
  levels) on the canvas with the batch's extent as GroupNorm region equals the same neck on the batch cropped to
  its extent, inside the extent (the features are zero beyond the extent, as the cropped tensor's conv padding);
  'canvas' statistics do not."""
  neck = bifpn.ChannelMapper(hidden_dim=16, num_levels=5)
  feats = _canvas_pyramid(CHANNELS)
  variables = jax.jit(neck.init)(jax.random.key(0), feats)
  apply = jax.jit(neck.apply)
  batch, canvas, cropped = apply(variables, feats, _extent_region()), apply(variables, feats), apply(
      variables, _cropped(feats))
  for l, (b, c, ref) in enumerate(zip(batch, canvas, cropped)):
    h, w = _extent_at(4 * 2**l)
    assert ref.shape[1:3] == (h, w) and b.shape[1:3] != (h, w)
    np.testing.assert_allclose(np.asarray(b[:, :h, :w]), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(c[:, :h, :w] - ref).max()) > 0.1   # the canvas' padding moves the statistics


def test_aux_level_and_dense_head_over_the_batch_extent_equal_the_cropped_batch():
  """The aux `downsample` (conv s2 + GN) and a dense head's towers (conv + GN + ReLU, then output convs) over the
  batch's extent equal the cropped batch inside the extent. The head's output convs (no norm after them) read the
  towers' activations one position past the extent, where the canvas has normalized padding and the cropped
  tensor zeros: there the two differ, so the head is compared on the extent less its last row and column."""
  dim = 16
  maps = _canvas_pyramid((dim,) * 4, seed=1)
  shapes = [m.shape[1:3] for m in maps]
  memory = jnp.concatenate([m.reshape(m.shape[0], -1, dim) for m in maps], axis=1)
  cropped = _cropped(maps)
  cropped_memory = jnp.concatenate([m.reshape(m.shape[0], -1, dim) for m in cropped], axis=1)
  levels = aux_heads.AuxLevels()
  variables = levels.init(jax.random.key(0), memory, shapes)
  region = _extent_region()
  level_apply = jax.jit(levels.apply, static_argnums=2)
  batch = level_apply(variables, memory, tuple(shapes), region)
  ref = level_apply(variables, cropped_memory, tuple(m.shape[1:3] for m in cropped))
  h, w = _extent_at(64)
  assert ref[-1].shape[1:3] == (h, w) == (3, 3) and batch[-1].shape[1:3] == (3, 4)
  np.testing.assert_allclose(np.asarray(batch[-1][:, :h, :w]), np.asarray(ref[-1]), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(level_apply(variables, memory, tuple(shapes))[-1][:, :h, :w] - ref[-1]).max()) > 0.1

  # The head on the five levels, zero beyond the extent (as the cropped tensor's conv padding).
  head = aux_heads.DenseHead(num_anchors=1, num_classes=3, stacked_convs=1, with_centerness=True)
  head_maps = [_zero_beyond(m, _extent_at(4 * 2**l)) for l, m in enumerate(batch)]
  head_vars = head.init(jax.random.key(1), head_maps)
  apply = jax.jit(head.apply)
  # (Its towers' statistics over the whole canvas would differ as the aux level's above: not compiled again.)
  outs = {'batch': apply(head_vars, head_maps, region),
          'cropped': apply(head_vars, [m[:, :_extent_at(4 * 2**l)[0], :_extent_at(4 * 2**l)[1]]
                                       for l, m in enumerate(head_maps)])}

  def per_level(flat, level_shapes):   # [B, A, ...] -> [[B, H_l, W_l, ...]]
    out, start = [], 0
    for hl, wl in level_shapes:
      out.append(np.asarray(flat[:, start:start + hl * wl]).reshape(flat.shape[0], hl, wl, *flat.shape[2:]))
      start += hl * wl
    return out

  canvas_shapes = [m.shape[1:3] for m in head_maps]
  extent_shapes = [_extent_at(4 * 2**l) for l in range(5)]
  for key in ('cls_logits', 'deltas', 'centerness'):
    got, want = per_level(outs['batch'][key], canvas_shapes), per_level(outs['cropped'][key], extent_shapes)
    for g, r, (h, w) in zip(got, want, extent_shapes):
      interior = (slice(None), slice(0, max(h - 1, 1)), slice(0, max(w - 1, 1)))
      np.testing.assert_allclose(g[:, :h, :w][interior], r[interior], rtol=1e-4, atol=1e-5)
