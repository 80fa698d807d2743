"""DINO decoder: shapes, refinement chain and look-forward-twice, attention-mask isolation, padding."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mrqm_jax.models import decoder as decoder_lib
from mrqm_jax.models import detector

SHAPES = ((8, 8), (4, 4), (2, 2), (1, 1))
S = sum(h * w for h, w in SHAPES)
B, N = 2, 6


@pytest.fixture(scope='module')
def setup():
  config = smoke.get_config()
  model = detector.build_decoder(config)
  d = config.model.hidden_dim
  rng = np.random.default_rng(0)
  queries = jnp.asarray(rng.normal(size=(B, N, d)), jnp.float32)
  refs = jnp.asarray(np.concatenate([rng.uniform(0.2, 0.8, (B, N, 2)), rng.uniform(0.05, 0.3, (B, N, 2))], -1),
                     jnp.float32)
  memory = jnp.asarray(rng.normal(size=(B, S, d)), jnp.float32)
  pad = np.zeros((B, S), bool)
  pad[1, :20] = True  # some padded tokens in image 1
  pad = jnp.asarray(pad)
  params = model.init(jax.random.PRNGKey(0), queries, refs, memory, pad, SHAPES)['params']
  # Random last layers of the box heads so the refinement actually moves boxes.
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
  params = flax.core.unfreeze(params)
  for lid in range(config.decoder.num_layers):
    last = params[f'box_heads_{lid}']['layers_2']
    last['kernel'] = 0.1 * jax.random.normal(next(keys), last['kernel'].shape)
    last['bias'] = 0.1 * jax.random.normal(next(keys), last['bias'].shape)
  # A non-identity final norm: at init LN(LN(x)) == LN(x), which would hide which input each head sees.
  params['final_norm']['scale'] = 1.0 + 0.5 * jax.random.normal(next(keys), params['final_norm']['scale'].shape)
  params['final_norm']['bias'] = 0.2 * jax.random.normal(next(keys), params['final_norm']['bias'].shape)

  def run(p, q, r, mem, mask=None, lft=True, capture=False):
    m = model.clone(look_forward_twice=lft)
    return m.apply({'params': p}, q, r, mem, pad, SHAPES, mask, capture_intermediates=capture,
                   mutable=['intermediates'] if capture else False)

  return dict(config=config, model=model, params=params, queries=queries, refs=refs, memory=memory, pad=pad,
              run=jax.jit(run, static_argnames=('lft', 'capture')))


def test_shapes_and_finite(setup):
  out = setup['run'](setup['params'], setup['queries'], setup['refs'], setup['memory'])
  num_layers, c = setup['config'].decoder.num_layers, setup['config'].dataset.num_classes
  assert out['pred_logits'].shape == (num_layers, B, N, c)
  assert out['pred_boxes'].shape == (num_layers, B, N, 4)
  assert np.all(np.isfinite(out['pred_logits'])) and np.all(np.isfinite(out['pred_boxes']))
  assert np.all((out['pred_boxes'] > 0) & (out['pred_boxes'] < 1))


def test_zero_box_heads_keep_the_reference(setup):
  # At initialization the box heads' last layer is zero: every layer predicts exactly its reference box.
  s = setup
  params = s['model'].init(jax.random.PRNGKey(3), s['queries'], s['refs'], s['memory'], s['pad'], SHAPES)['params']
  out = s['run'](params, s['queries'], s['refs'], s['memory'])
  np.testing.assert_allclose(out['pred_boxes'], np.broadcast_to(s['refs'], out['pred_boxes'].shape), atol=1e-6)
  # and the class bias is the 0.01 prior.
  np.testing.assert_allclose(params['class_heads_0']['bias'], np.log(0.01 / 0.99), rtol=1e-6)


def _logit(x, eps=1e-3):
  x = np.clip(x, 0, 1)
  return np.log(np.maximum(x, eps) / np.maximum(1 - x, eps))


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_refinement_chain_uses_normed_head_and_previous_refined_box(setup):
  # Rebuild every layer's boxes from the captured sub-module outputs with NumPy: box_heads_l is called first
  # on final_norm(x_l) (prediction) and then on x_l (refinement of the next layer's reference).
  s = setup
  out, state = s['run'](s['params'], s['queries'], s['refs'], s['memory'], capture=True)
  inter = state['intermediates']
  ref = np.asarray(s['refs'], np.float64)
  prev_refined = ref
  for lid in range(s['config'].decoder.num_layers):
    pred_delta, refine_delta = (np.asarray(v) for v in inter[f'box_heads_{lid}']['__call__'])
    want_boxes = _sigmoid(pred_delta + _logit(prev_refined))
    np.testing.assert_allclose(out['pred_boxes'][lid], want_boxes, rtol=1e-4, atol=1e-5)
    refined = _sigmoid(refine_delta + _logit(ref))
    prev_refined, ref = refined, refined
  # The prediction head sees the normed output, the refinement the un-normed one (different inputs).
  assert not np.allclose(*[np.asarray(v) for v in inter['box_heads_0']['__call__']])


def test_look_forward_twice_gradient(setup):
  # Layer 1's box depends on layer 0's box head only through the UN-detached refined box: with
  # look-forward-twice its gradient is non-zero, without it exactly zero (references are detached).
  s = setup

  def layer1_box_sum(p, refs, lft):
    return s['run'](p, s['queries'], refs, s['memory'], lft=lft)['pred_boxes'][1].sum()

  for lft, expect_nonzero in ((True, True), (False, False)):
    g, g_ref = jax.grad(layer1_box_sum, argnums=(0, 1))(s['params'], s['refs'], lft)
    g0 = np.abs(np.asarray(g['box_heads_0']['layers_2']['kernel'])).max()
    assert (g0 > 0) == expect_nonzero, (lft, g0)
    assert np.abs(np.asarray(g['box_heads_1']['layers_2']['kernel'])).max() > 0
    # No gradient ever reaches the input reference boxes.
    assert np.all(np.asarray(g_ref) == 0)


def test_block_diagonal_mask_isolates_groups(setup):
  s = setup
  groups = np.array([0, 0, 0, 1, 1, 1])
  mask = jnp.asarray(groups[:, None] == groups[None, :])
  changed_q = s['queries'].at[:, 3:].add(1.0)
  changed_r = s['refs'].at[:, 3:, :2].add(0.05)
  base = s['run'](s['params'], s['queries'], s['refs'], s['memory'], mask)
  moved = s['run'](s['params'], changed_q, changed_r, s['memory'], mask)
  np.testing.assert_allclose(base['pred_logits'][:, :, :3], moved['pred_logits'][:, :, :3], atol=1e-5)
  np.testing.assert_allclose(base['pred_boxes'][:, :, :3], moved['pred_boxes'][:, :, :3], atol=1e-6)
  assert not np.allclose(base['pred_logits'][:, :, 3:], moved['pred_logits'][:, :, 3:], atol=1e-3)
  # Without the mask the first group does see the change (the test above can fail).
  base_nm = s['run'](s['params'], s['queries'], s['refs'], s['memory'])
  moved_nm = s['run'](s['params'], changed_q, changed_r, s['memory'])
  assert not np.allclose(base_nm['pred_logits'][:, :, :3], moved_nm['pred_logits'][:, :, :3], atol=1e-3)
  # A per-image [B, N, N] mask equal to the shared one gives the same result.
  batched = s['run'](s['params'], s['queries'], s['refs'], s['memory'], jnp.broadcast_to(mask, (B, N, N)))
  np.testing.assert_allclose(batched['pred_logits'], base['pred_logits'], atol=1e-6)


def test_padded_memory_is_ignored(setup):
  s = setup
  noisy = s['memory'].at[1, :20].set(100.0)  # only padded tokens of image 1 change
  base = s['run'](s['params'], s['queries'], s['refs'], s['memory'])
  moved = s['run'](s['params'], s['queries'], s['refs'], noisy)
  np.testing.assert_allclose(base['pred_logits'], moved['pred_logits'], atol=1e-5)


def test_bad_mask_shape_is_a_clear_error(setup):
  s = setup
  with pytest.raises(ValueError, match='self_attn_mask'):
    s['model'].apply({'params': s['params']}, s['queries'], s['refs'], s['memory'], s['pad'], SHAPES,
                     jnp.ones((N, N + 1), bool))


def test_inverse_sigmoid_closed_form():
  x = jnp.array([0.0, 1e-4, 0.5, 0.9, 1.0, 1.5])
  np.testing.assert_allclose(decoder_lib.inverse_sigmoid(x),
                             [np.log(1e-3), np.log(1e-3 / 0.9999), 0.0, np.log(9.0), -np.log(1e-3), -np.log(1e-3)],
                             rtol=1e-5)
