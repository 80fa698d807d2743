"""Scale-Aware Encoder and plain deformable encoder: structure (paper eqs. 1-7), padding, batch independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mrqm_jax.models import encoder as enc
from mrqm_jax.models import detector
from mrqm_jax.models.deformable_attention import MSDeformAttn

SHAPES = ((8, 12), (4, 6), (2, 3), (1, 2))   # P2..P5 of a 32x48 canvas
D, HEADS, POINTS, FFN, LAYERS = 16, 2, 2, 32, 2


def _config(kind):
  c = smoke.get_config()
  c.unlock()
  c.model.hidden_dim, c.encoder.num_heads, c.encoder.num_points, c.encoder.ffn_dim = D, HEADS, POINTS, FFN
  c.encoder.num_layers, c.encoder.type = LAYERS, kind
  return c


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(2, h, w, D)).astype(np.float32) for h, w in SHAPES]
  # Image 1 is 5x7 pixels of level 0 (bottom rows / right columns padded), coarser levels by ceil.
  masks = []
  for h, w in SHAPES:
    m = np.zeros((2, h, w), bool)
    f = SHAPES[0][0] // h
    m[1, -(-5 // f):, :] = True
    m[1, :, -(-7 // f):] = True
    masks.append(m)
  return feats, masks


def _perturbed(params, seed):
  """Random offsets on every parameter: zero-initialized kernels (sampling offsets, attention logits) would hide
  wiring bugs."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope='module', params=['sae', 'deformable'])
def case(request):
  model = detector.build_encoder(_config(request.param))
  feats, masks = _inputs()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), feats, masks)['params']
  params = _perturbed(params, 1)
  run = jax.jit(lambda p, f, m: model.apply({'params': p}, f, m).memory)
  return request.param, model, params, run, feats, masks


def test_output_contract(case):
  kind, model, params, _, feats, masks = case
  assert isinstance(model, enc.ScaleAwareEncoder if kind == 'sae' else enc.DeformableEncoder)
  static = {}

  def forward(p, f, m):
    memory, pad, shapes, starts = out = model.apply({'params': p}, f, m)  # the 4-tuple the decoder consumes
    static.update(shapes=shapes, starts=starts)  # static Python values, seen at trace time
    return memory, pad, out.level_maps()

  memory, pad, maps = jax.jit(forward)(params, feats, masks)
  s = sum(h * w for h, w in SHAPES)
  assert memory.shape == (2, s, D) and pad.shape == (2, s) and pad.dtype == jnp.bool_
  assert static == {'shapes': SHAPES, 'starts': (0, 96, 120, 126)}
  np.testing.assert_array_equal(np.asarray(pad), np.asarray(enc.flatten_levels(masks)))
  assert [m.shape for m in maps] == [(2, h, w, D) for h, w in SHAPES]
  np.testing.assert_array_equal(np.asarray(maps[2][:, 1, 2]), np.asarray(memory[:, 120 + 1 * 3 + 2]))
  assert np.all(np.isfinite(np.asarray(memory)))


def test_padded_pixels_do_not_influence_valid_tokens(case):
  _, _, params, run, feats, masks = case
  rng = np.random.default_rng(5)
  noisy = [np.where(m[..., None], 100 * rng.normal(size=f.shape), f).astype(np.float32)
           for f, m in zip(feats, masks)]
  valid = ~np.asarray(enc.flatten_levels(masks))
  a, b = np.asarray(run(params, feats, masks)), np.asarray(run(params, noisy, masks))
  np.testing.assert_allclose(a[valid], b[valid], atol=1e-5)
  assert np.abs(a[~valid] - b[~valid]).max() > 1e-2   # the perturbation did reach the padded tokens


def test_query_chunking_does_not_change_the_result(case):
  _, model, params, run, feats, masks = case
  chunked = jax.jit(lambda p, f, m: model.clone(query_chunk_size=40).apply({'params': p}, f, m).memory)
  np.testing.assert_allclose(np.asarray(chunked(params, feats, masks)), np.asarray(run(params, feats, masks)),
                             atol=1e-5)


def test_images_are_independent(case):
  _, _, params, run, feats, masks = case
  swap = lambda xs: [x[::-1] for x in xs]  # noqa: E731
  a, b = np.asarray(run(params, feats, masks)), np.asarray(run(params, swap(feats), swap(masks)))
  np.testing.assert_allclose(a[::-1], b, atol=1e-5)


# ------------------------------------------------------------------------------------ SAE structure

@pytest.fixture(scope='module')
def sae():
  model = detector.build_encoder(_config('sae'))
  feats, masks = _inputs(1)
  params = _perturbed(jax.jit(model.init)(jax.random.PRNGKey(2), feats, masks)['params'], 3)
  return model, params, feats, masks


def test_sae_follows_equations(sae):
  """Re-run eqs. (2)-(7) by hand with the SAE's own layers: F3..F5 queries read [original F2, current F_H]
  in every layer; then original-F2 queries read [F2, F'_H] once."""
  model, params, feats, masks = sae
  got = np.asarray(jax.jit(lambda p, f, m: model.apply({'params': p}, f, m).memory)(params, feats, masks))
  layer = enc.EncoderLayer(D, HEADS, 4, POINTS, FFN)
  tokens, mask = enc.flatten_levels(feats), enc.flatten_levels(masks)
  n2 = SHAPES[0][0] * SHAPES[0][1]

  @jax.jit
  def by_hand(params, tokens, mask):
    pos = enc.flatten_levels([enc.sine_pe_2d(m, D, 20.0, 0.0) + params['level_embed'][i]
                              for i, m in enumerate(masks)])
    ref = jnp.broadcast_to(enc.token_centres(SHAPES), (2, tokens.shape[1], 2))
    f2, fh = tokens[:, :n2], tokens[:, n2:]
    for i in range(LAYERS):
      fh = layer.apply({'params': params[f'high_layers_{i}']}, fh, pos[:, n2:], ref[:, n2:],
                       jnp.concatenate([f2, fh], 1), SHAPES, mask)
    f2_new = layer.apply({'params': params['low_layer']}, f2, pos[:, :n2], ref[:, :n2],
                         jnp.concatenate([f2, fh], 1), SHAPES, mask)
    return fh, f2_new

  fh, f2_new = by_hand(params, tokens, mask)
  np.testing.assert_allclose(got[:, n2:], np.asarray(fh), atol=1e-5)
  np.testing.assert_allclose(got[:, :n2], np.asarray(f2_new), atol=1e-5)
  assert np.abs(got[:, :n2] - np.asarray(tokens[:, :n2])).max() > 0.1   # F2 was updated once, at the end


def test_sae_high_levels_ignore_the_f2_update(sae):
  """d(F3..F5 output)/d(F2-update params) is exactly zero; d(F2 output)/d(them) and d(F3..F5)/d(F2 input) are not."""
  model, params, feats, masks = sae
  n2 = SHAPES[0][0] * SHAPES[0][1]

  def parts(p, f):  # [2]: a scalar of the F2 output and one of the F3..F5 output
    memory = jnp.sin(model.apply({'params': p}, f, masks).memory)
    return jnp.stack([memory[:, :n2].sum(), memory[:, n2:].sum()])

  (g_params, g_feats) = jax.jit(jax.jacrev(parts, argnums=(0, 1)))(params, feats)
  low_grads = [np.asarray(x) for x in jax.tree_util.tree_leaves(g_params['low_layer'])]
  assert all(np.all(g[1] == 0) for g in low_grads)       # F3..F5 output vs F2-update params: exactly 0
  assert max(np.abs(g[0]).max() for g in low_grads) > 0  # F2 output vs F2-update params
  assert np.abs(np.asarray(g_feats[0][1])).max() > 0     # F2 input is read as values by the F3..F5 queries


def test_encoder_layer_matches_reference():
  """Post-norm layer: LN(q + attn), then LN(x + FFN(x)); attention via MSDeformAttn (tested on its own)."""
  rng = np.random.default_rng(7)
  s = sum(h * w for h, w in SHAPES)
  q, qpos, value = (rng.normal(size=(2, 5, D)).astype(np.float32) for _ in range(3))
  value = rng.normal(size=(2, s, D)).astype(np.float32)
  ref = rng.uniform(size=(2, 5, 2)).astype(np.float32)
  layer = enc.EncoderLayer(D, HEADS, 4, POINTS, FFN)
  init = jax.jit(lambda *a: layer.init(jax.random.PRNGKey(0), *a, SHAPES, None))
  p = _perturbed(init(q, qpos, ref, value)['params'], 4)
  got = np.asarray(jax.jit(lambda *a: layer.apply({'params': p}, *a, SHAPES, None))(q, qpos, ref, value))

  def ln(x, prm):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * np.asarray(prm['scale']) + np.asarray(prm['bias'])

  dense = lambda x, prm: x @ np.asarray(prm['kernel']) + np.asarray(prm['bias'])  # noqa: E731
  attn = np.asarray(MSDeformAttn(D, HEADS, 4, POINTS).apply({'params': p['self_attn']}, q + qpos, ref, value,
                                                            SHAPES))
  x = ln(q + attn, p['norm1'])
  want = ln(x + dense(np.maximum(dense(x, p['linear1']), 0), p['linear2']), p['norm2'])
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_dropout_is_active_only_when_not_deterministic():
  c = _config('sae')
  c.encoder.dropout = 0.5
  model = detector.build_encoder(c)
  feats, masks = _inputs()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), feats, masks)['params']

  @jax.jit
  def run(key):
    det = model.apply({'params': params}, feats, masks, deterministic=True).memory
    rand = model.apply({'params': params}, feats, masks, deterministic=False, rngs={'dropout': key}).memory
    return det, rand

  (a, d1), (b, d2) = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(d1)).max() > 1e-3
  assert np.abs(np.asarray(d1) - np.asarray(d2)).max() > 1e-3


# ------------------------------------------------------------------------------------ helpers, errors

def test_token_centres_and_level_round_trip():
  c = enc.token_centres(((2, 4), (1, 1)))
  np.testing.assert_allclose(c[:4], [[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]])
  np.testing.assert_allclose(c[4:8], [[0.125, 0.75], [0.375, 0.75], [0.625, 0.75], [0.875, 0.75]])
  np.testing.assert_allclose(c[8], [0.5, 0.5])
  feats, _ = _inputs()
  back = enc.split_levels(enc.flatten_levels(feats), SHAPES)
  for f, b in zip(feats, back):
    np.testing.assert_array_equal(f, np.asarray(b))


def test_bad_inputs_raise_naming_the_field():
  model = detector.build_encoder(_config('sae'))
  feats, masks = _inputs()
  with pytest.raises(ValueError, match='num_levels'):
    model.init(jax.random.PRNGKey(0), feats[:3], masks[:3])
  with pytest.raises(ValueError, match='hidden_dim'):
    model.init(jax.random.PRNGKey(0), [f[..., :8] for f in feats], masks)
  with pytest.raises(ValueError, match='pad mask'):
    model.init(jax.random.PRNGKey(0), feats, [m[:, :1] for m in masks])
  c = _config('sae')
  c.encoder.type = 'dense'
  with pytest.raises(ValueError, match='config.encoder.type'):
    detector.build_encoder(c)
