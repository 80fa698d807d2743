"""layers: Conv2D implementations vs a NumPy convolution (values and gradients), FrozenBatchNorm, NeckNorm,
MLP, max-pool."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from mrqm_jax.models import layers


def numpy_conv(x, w, stride, pads, groups=1):
  """Direct definition: out[b,y,x,o] = sum_{i,j,c} xpad[b, y*s+i, x*s+j, g(o)*Cg + c] * w[i,j,c,o]."""
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw, cg, cout = w.shape
  og = cout // groups
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, cout), np.float64)
  for y in range(ho):
    for xx in range(wo):
      window = xp[:, y * stride:y * stride + kh, xx * stride:xx * stride + kw, :]  # [B, kh, kw, Cin]
      for g in range(groups):
        out[:, y, xx, g * og:(g + 1) * og] = np.einsum(
            'bijc,ijco->bo', window[..., g * cg:(g + 1) * cg], w[..., g * og:(g + 1) * og])
  return out


def numpy_kernel_grad(x, g, kernel_shape, stride, pads, groups=1):
  """d/dw of sum(conv(x, w) * g): dw[i,j,c,o] = sum_{b,y,x} xpad[b, y*s+i, x*s+j, g(o)*Cg+c] * g[b,y,x,o]."""
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw, cg, cout = kernel_shape
  og = cout // groups
  ho, wo = g.shape[1:3]
  dw = np.zeros(kernel_shape, np.float64)
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride, :]
      for o in range(cout):
        grp = o // og
        dw[i, j, :, o] = np.einsum('byxc,byx->c', patch[..., grp * cg:(grp + 1) * cg], g[..., o])
  return dw


# (name, H, W, Cin, Cout, kernel, stride, padding, groups)
CASES = [
    ('3x3_same', 7, 6, 4, 5, 3, 1, 'SAME', 1),
    ('3x3_stride2_torch_pad', 8, 9, 4, 6, 3, 2, 1, 1),
    ('3x3_stride2_same_asymmetric', 8, 8, 20, 3, 3, 2, 'SAME', 1),
    ('1x1', 5, 5, 6, 4, 1, 1, 0, 1),
    ('1x1_stride2', 7, 6, 6, 4, 1, 2, 0, 1),
    ('7x7_stem_stride2', 12, 10, 3, 4, 7, 2, 3, 1),
    ('depthwise_3x3', 6, 7, 5, 5, 3, 1, 'SAME', 5),
    ('depthwise_3x3_stride2', 8, 8, 4, 4, 3, 2, 1, 4),
    ('depthwise_multiplier2', 6, 6, 3, 6, 3, 1, 1, 3),
    ('grouped_2', 6, 6, 4, 6, 3, 1, 1, 2),
]


@pytest.mark.parametrize('impl', ['lax', 'matmul'])
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_conv_matches_numpy_values_and_gradients(case, impl):
  _, h, w, cin, cout, k, s, padding, groups = case
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, h, w, cin)).astype(np.float32)
  kernel = rng.normal(size=(k, k, cin // groups, cout)).astype(np.float32)
  pads = layers.resolve_padding(padding, (h, w), (k, k), (s, s))
  conv = layers.conv2d_matmul if impl == 'matmul' else layers.conv2d_lax
  hi = lax.Precision.HIGHEST

  out = conv(jnp.asarray(x), jnp.asarray(kernel), (s, s), pads, groups, hi)
  expected = numpy_conv(x.astype(np.float64), kernel.astype(np.float64), s, pads, groups)
  assert out.shape == expected.shape
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
  # And against XLA's convolution called directly with the same padding.
  ref = lax.conv_general_dilated(x, kernel, (s, s), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                 feature_group_count=groups, precision=hi)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)

  cotangent = rng.normal(size=expected.shape).astype(np.float32)
  dx, dk = jax.grad(lambda a, b: jnp.sum(conv(a, b, (s, s), pads, groups, hi) * cotangent),
                    argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
  np.testing.assert_allclose(np.asarray(dk), numpy_kernel_grad(x, cotangent, kernel.shape, s, pads, groups),
                             rtol=1e-4, atol=1e-3)
  _, vjp = jax.vjp(lambda a: lax.conv_general_dilated(a, kernel, (s, s), pads,
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                                     feature_group_count=groups, precision=hi), x)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(vjp(cotangent)[0]), rtol=1e-4, atol=1e-3)


def test_resolve_padding_same_matches_xla():
  for size, k, s in [(8, 3, 2), (9, 3, 2), (7, 7, 2), (5, 1, 2), (6, 3, 1)]:
    ours = layers.resolve_padding('SAME', (size, size), (k, k), (s, s))
    xla = lax.padtype_to_pads((size, size), (k, k), (s, s), 'SAME')
    assert ours == tuple(tuple(p) for p in xla)
  assert layers.resolve_padding(3, (8, 8), (7, 7), (2, 2)) == ((3, 3), (3, 3))
  with pytest.raises(ValueError, match='padding'):
    layers.resolve_padding('FULL', (8, 8), (3, 3), (1, 1))


def test_auto_impl_choice_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert layers.resolve_conv_impl('auto', (1, 1), 1) == 'matmul'
  assert layers.resolve_conv_impl('auto', (3, 3), 8) == 'matmul'
  assert layers.resolve_conv_impl('auto', (3, 3), 1) == 'lax'
  assert layers.resolve_conv_impl('lax', (1, 1), 1) == 'lax'
  with pytest.raises(ValueError, match='conv_impl'):
    layers.resolve_conv_impl('cudnn')


@pytest.mark.parametrize('impl', ['lax', 'matmul', 'auto'])
def test_conv2d_module_is_a_drop_in_for_nn_conv(impl):
  x = jax.random.normal(jax.random.key(0), (2, 7, 8, 4))
  ours = layers.Conv2D(6, kernel_size=3, strides=2, padding='SAME', impl=impl)
  variables = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, variables) == {'params': {'kernel': (3, 3, 4, 6), 'bias': (6,)}}
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-zero bias
  flax_conv = nn.Conv(6, (3, 3), strides=2, padding='SAME', precision='highest')
  np.testing.assert_allclose(np.asarray(ours.apply(variables, x)), np.asarray(flax_conv.apply(variables, x)),
                             rtol=1e-4, atol=1e-4)


def test_conv2d_depthwise_params_and_errors():
  x = jnp.ones((1, 5, 5, 6))
  dw = layers.Conv2D(6, 3, feature_group_count=6, use_bias=False)
  assert jax.tree.map(jnp.shape, dw.init(jax.random.key(0), x)) == {'params': {'kernel': (3, 3, 1, 6)}}
  with pytest.raises(ValueError, match='feature_group_count'):
    layers.Conv2D(5, 3, feature_group_count=4).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    layers.Conv2D(5, 3).init(jax.random.key(0), jnp.ones((5, 5, 6)))


def test_conv2d_bfloat16_activations_keep_float32_params():
  x = jnp.ones((1, 4, 4, 3))
  conv = layers.Conv2D(2, 3, dtype='bfloat16', impl='matmul')
  variables = conv.init(jax.random.key(0), x)
  assert variables['params']['kernel'].dtype == jnp.float32
  assert conv.apply(variables, x).dtype == jnp.bfloat16


def test_frozen_batchnorm_is_affine_and_not_trainable():
  c = 4
  rng = np.random.default_rng(1)
  stats = {'scale': rng.uniform(0.5, 2, c), 'bias': rng.normal(size=c), 'mean': rng.normal(size=c),
           'var': rng.uniform(0.1, 3, c)}
  stats = {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}
  bn = layers.FrozenBatchNorm()
  x = jnp.asarray(rng.normal(size=(2, 3, 3, c)), jnp.float32)
  init = bn.init(jax.random.key(0), x)
  assert 'params' not in init
  assert set(init[layers.FROZEN_COLLECTION]) == {'scale', 'bias', 'mean', 'var'}
  np.testing.assert_allclose(np.asarray(bn.apply(init, x)), np.asarray(x), rtol=1e-5, atol=1e-5)  # identity init
  variables = {layers.FROZEN_COLLECTION: stats}
  y = bn.apply(variables, x)
  expected = (np.asarray(x) - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * stats['scale'] + stats['bias']
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda v: bn.apply(v, x).sum())(variables)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_neck_norm_group_and_none():
  assert layers.num_groups_for(256) == 32
  assert layers.num_groups_for(24) == 24
  assert layers.num_groups_for(40) == 20
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) * 3 + 1
  y = layers.NeckNorm('group').apply(layers.NeckNorm('group').init(jax.random.key(0), x), x)
  groups = np.asarray(y).reshape(2, 16, 8, 1)  # 8 groups of one channel each: zero mean, unit variance
  np.testing.assert_allclose(groups.mean(axis=1), 0, atol=1e-5)
  np.testing.assert_allclose(groups.var(axis=1), 1, atol=1e-3)
  assert layers.NeckNorm('none').apply({}, x) is x
  with pytest.raises(ValueError, match='neck_norm'):
    layers.NeckNorm('batch').init(jax.random.key(0), x)


def test_mlp_matches_manual_layers():
  mlp = layers.MLP(hidden_dim=5, output_dim=3, num_layers=3)
  x = jax.random.normal(jax.random.key(0), (2, 7, 4))
  params = mlp.init(jax.random.key(1), x)['params']
  assert sorted(params) == ['layers_0', 'layers_1', 'layers_2']
  h = np.asarray(x)
  for i in range(3):
    h = h @ np.asarray(params[f'layers_{i}']['kernel']) + np.asarray(params[f'layers_{i}']['bias'])
    if i < 2:
      h = np.maximum(h, 0)
  np.testing.assert_allclose(np.asarray(mlp.apply({'params': params}, x)), h, rtol=1e-5, atol=1e-5)
  zero_last = layers.MLP(5, 3, 2, last_kernel_init=nn.initializers.zeros_init())
  np.testing.assert_array_equal(np.asarray(zero_last.apply(zero_last.init(jax.random.key(0), x), x)), 0)


def test_max_pool_matches_numpy():
  x = np.random.default_rng(2).normal(size=(1, 7, 8, 2)).astype(np.float32)
  y = np.asarray(layers.max_pool_2x(jnp.asarray(x)))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  expected = np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(4)], 1)
                       for i in range(4)], 1)
  assert y.shape == (1, 4, 4, 2)
  np.testing.assert_array_equal(y, expected)



def _layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


class _SharesFFN(nn.Module):
  """A layer that shares its scope with the FFN block, as the encoder/decoder layers do."""
  token_chunk_size: int | None = None

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = nn.Dense(x.shape[-1], name='own')(x)
    ffn = layers.PostNormFFN(12, 0.5, None, 'linear1', 'linear2', 'norm2', token_chunk_size=self.token_chunk_size)
    nn.share_scope(self, ffn)
    return ffn(x, deterministic)


def test_post_norm_ffn_matches_numpy_and_keeps_the_callers_names():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  model = _SharesFFN()
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert set(params) == {'own', 'linear1', 'linear2', 'norm2'}     # beside the layer's own, not nested
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.1, p.dtype), params)
  p = jax.tree.map(np.asarray, params)
  h = np.asarray(x) @ p['own']['kernel'] + p['own']['bias']
  y = np.maximum(h @ p['linear1']['kernel'] + p['linear1']['bias'], 0) @ p['linear2']['kernel'] + p['linear2']['bias']
  want = _layer_norm(h + y, p['norm2']['scale'], p['norm2']['bias'])
  np.testing.assert_allclose(model.apply({'params': params}, x), want, rtol=1e-4, atol=1e-5)
  # Dropout (rate 0.5) is active only when not deterministic, and draws from the 'dropout' stream.
  a = model.apply({'params': params}, x, False, rngs={'dropout': jax.random.PRNGKey(1)})
  b = model.apply({'params': params}, x, False, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(a, want, atol=1e-3) and not np.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize('chunk', [2, 3, 5])
def test_post_norm_ffn_in_token_chunks_same_result_and_gradients(chunk):
  """token_chunk_size runs the block over chunks of tokens (Q = 7: padded to a multiple for 2 and 3): same output
  as the whole block, and the same gradients for the parameters and the input; the variable tree is unchanged."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
  whole, chunked = _SharesFFN(), _SharesFFN(token_chunk_size=chunk)
  params = whole.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(chunked.init(jax.random.PRNGKey(0), x))
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  loss = lambda model: lambda p, x: (model.apply(p, x) * weights).sum()  # noqa: E731
  np.testing.assert_allclose(chunked.apply(params, x), whole.apply(params, x), rtol=1e-5, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(chunked.apply)(params, x))
  assert ('scan' in jaxpr) == (chunk < 7)
  g_whole = jax.grad(loss(whole), argnums=(0, 1))(params, x)
  g_chunked = jax.grad(loss(chunked), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_chunked)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Training dropout keeps the whole block (the chunk loop has no RNG plumbing), drawing from 'dropout'.
  a = chunked.apply(params, x, False, rngs={'dropout': jax.random.PRNGKey(1)})
  assert not np.allclose(a, whole.apply(params, x), atol=1e-3)


def test_map_over_chunks_pads_and_drops_the_padding():
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.normal(size=(2, 10, 3)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 10)), jnp.float32)
  fn = lambda x, y: jnp.tanh(x) * y[..., None] + 1.0   # noqa: E731  row-wise; padded rows would give 1.0
  for chunk in (1, 3, 4, 10, 16):
    np.testing.assert_allclose(layers.map_over_chunks(fn, (a, b), chunk), fn(a, b), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='chunk_size must be >= 1'):
    layers.map_over_chunks(fn, (a, b), 0)


def test_conv_norm_names_its_layers():
  x = jnp.ones((1, 6, 6, 4))
  default = layers.ConvNorm(8, 3).init(jax.random.PRNGKey(0), x)['params']
  assert set(default) == {'conv', 'norm'} and 'bias' not in default['conv']   # no bias before the norm
  named = layers.ConvNorm(8, 1, norm='none', conv_name='pointwise', norm_name='n').init(jax.random.PRNGKey(0), x)
  assert set(named['params']) == {'pointwise'} and named['params']['pointwise']['kernel'].shape == (1, 1, 4, 8)


# ------------------------------------------------------- GroupNorm over a region (config.model.norm_region)
def _numpy_group_norm(x, region, groups, scale, bias, eps=1e-5):
  """GroupNorm whose statistics come from the region's positions only, applied everywhere (float64).
  x [B, H, W, C], region [B, H, W] bool, scale / bias [C]."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  per_group = x.shape[-1] // groups
  for i in range(x.shape[0]):
    for g in range(groups):
      chans = slice(g * per_group, (g + 1) * per_group)
      inside = x[i][region[i]][:, chans]                      # [positions in the region, channels of g]
      out[i, ..., chans] = (x[i, ..., chans] - inside.mean()) / np.sqrt(inside.var() + eps)
  return out * scale + bias


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_group_norm_over_a_region_matches_numpy(dtype):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 6, 9, 64)) * 2 + 10   # an offset: bf16 statistics (E[x^2] - E[x]^2) would be off by %
  x[:, 4:] += 40.0                              # outside image 0's region: would move its statistics
  x[:, :, 7:] -= 30.0
  region = np.zeros((2, 6, 9), bool)
  region[0, :4, :7] = True
  region[1, :2, :5] = True                      # one region per image (the batch extent is one for all)
  scale, bias = rng.normal(size=64), rng.normal(size=64)
  variables = {'params': {'gn': {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}}}
  norm = layers.NeckNorm('group', dtype=dtype)
  xin = jnp.asarray(x, dtype)
  expected = _numpy_group_norm(np.asarray(xin.astype(jnp.float32)), region, 32, scale, bias)   # 32 groups of 2
  tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=1e-2, atol=2e-2)
  apply = jax.jit(norm.apply)
  y = apply(variables, xin, jnp.asarray(region))
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, **tol)
  # The region at the image's resolution (2x, odd size): the level's positions are its every other row/column.
  fine = np.repeat(np.repeat(region, 2, axis=1), 2, axis=2)[:, :11, :17]
  np.testing.assert_array_equal(np.asarray(apply(variables, xin, jnp.asarray(fine))), np.asarray(y))
  # No region: statistics over the whole map, as before; a region covering the map (a canvas-filling batch's
  # extent) gives the same up to float rounding.
  whole = _numpy_group_norm(np.asarray(xin.astype(jnp.float32)), np.ones_like(region), 32, scale, bias)
  unmasked = np.asarray(apply(variables, xin).astype(jnp.float32))
  np.testing.assert_allclose(unmasked, whole, **tol)
  assert not np.allclose(whole, expected, rtol=0.1)
  covering = np.asarray(apply(variables, xin, jnp.ones((1, 11, 17), bool)).astype(jnp.float32))
  np.testing.assert_allclose(covering, unmasked, rtol=1e-5 if dtype == jnp.float32 else 1e-2, atol=1e-5)


def _rect(hw, inside_hw):
  r = np.zeros(hw, bool)
  r[:inside_hw[0], :inside_hw[1]] = True
  return r


def test_batch_extent_is_the_union_of_the_images():
  pad = np.ones((3, 20, 30), bool)
  pad[0, :12, :9] = False     # tall-narrow and short-wide images: the extent is 15 x 25, holding padding of both
  pad[1, :15, :25] = False
  pad[2, :4, :4] = False
  extent = np.asarray(layers.batch_extent(jnp.asarray(pad)))
  assert extent.shape == (1, 20, 30)
  np.testing.assert_array_equal(extent[0], _rect((20, 30), (15, 25)))
  # A batch without a valid pixel: the whole canvas (statistics over no position are undefined).
  assert np.asarray(layers.batch_extent(jnp.ones((2, 20, 30), bool))).all()
  assert np.asarray(layers.batch_extent(jnp.zeros((2, 20, 30), bool))).all()


@pytest.mark.parametrize('extent_hw', [(75, 101), (40, 66), (33, 1), (1, 101), (17, 64)])
def test_region_at_each_level_is_the_feature_map_of_the_extent(extent_hw):
  """The extent at each level (`region_at`) is exactly the feature map our own backbone, neck extra levels and aux
  `downsample` produce for an image of the extent's size — what mmdet's batch tensor of that size has there."""
  from mrqm_jax.models import backbone, bifpn   # pylint: disable=g-import-not-at-top
  resnet, neck = backbone.ResNet(18, width=4), bifpn.ChannelMapper(8, num_levels=6)
  downsample = layers.ConvNorm(8, 3, 2)

  def level_shapes(hw):
    image = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    feats = jax.eval_shape(resnet.apply, jax.eval_shape(resnet.init, jax.random.key(0), image), image)
    maps = jax.eval_shape(neck.apply, jax.eval_shape(neck.init, jax.random.key(0), feats), feats)
    extra = jax.eval_shape(downsample.apply, jax.eval_shape(downsample.init, jax.random.key(0), maps[-1]), maps[-1])
    return [tuple(m.shape[1:3]) for m in maps + [extra]]

  canvas = (75, 101)
  pad = np.ones((2, *canvas), bool)
  pad[0, :extent_hw[0], :max(1, extent_hw[1] // 2)] = False
  pad[1, :max(1, extent_hw[0] // 3), :extent_hw[1]] = False
  region = layers.batch_extent(jnp.asarray(pad))
  for canvas_level, extent_level in zip(level_shapes(canvas), level_shapes(extent_hw)):   # strides 4 .. 256
    at_level = np.asarray(layers.region_at(region, canvas_level))
    assert at_level.shape == (1, *canvas_level)
    np.testing.assert_array_equal(at_level[0], _rect(canvas_level, extent_level))
  with pytest.raises(ValueError, match='power-of-two'):
    layers.region_at(region, (25, 34))
