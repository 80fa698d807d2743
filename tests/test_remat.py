"""config.model.remat recomputes layers in the backward pass: same outputs and gradients as without."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.train_step import random_batch
from configs import smoke
from mrqm_jax import model_lib
from mrqm_jax import train
from mrqm_jax import train_lib
from mrqm_jax.models import detector


def _encoder_and_inputs(remat):
  config = smoke.get_config()
  config.model.remat = remat
  config.encoder.num_layers = 1
  rng = np.random.default_rng(0)
  d = config.model.hidden_dim
  feats = [jnp.asarray(rng.normal(size=(1, s, s, d)), jnp.float32) for s in (8, 4, 2, 1)]
  masks = [jnp.zeros((1, s, s), bool) for s in (8, 4, 2, 1)]
  return config, detector.build_encoder(config), feats, masks


def test_encoder_and_decoder_remat_match_plain():
  results = []
  for remat in (False, True):
    config, encoder, feats, masks = _encoder_and_inputs(remat)
    params = encoder.init(jax.random.PRNGKey(0), feats, masks)
    decoder = detector.build_decoder(config)

    def loss(enc_params, dec_params, feats):
      out = encoder.apply(enc_params, feats, masks)
      q = jnp.ones((1, 5, config.model.hidden_dim)) * 0.1
      refs = jnp.full((1, 5, 4), 0.3)
      dec = decoder.apply(dec_params, q, refs, out.memory, out.memory_pad_mask, out.spatial_shapes)
      return out.memory.sum() * 1e-3 + dec['pred_boxes'].sum() + dec['pred_logits'].sum()

    mem = encoder.apply(params, feats, masks).memory
    dec_params = decoder.init(jax.random.PRNGKey(1), jnp.ones((1, 5, config.model.hidden_dim)),
                              jnp.full((1, 5, 4), 0.3), mem, jnp.zeros(mem.shape[:2], bool),
                              tuple((s, s) for s in (8, 4, 2, 1)))
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, dec_params, feats)
    results.append((value, grads))
  # Same parameter names, so checkpoints load whichever way they were trained.
  assert jax.tree.structure(results[0][1]) == jax.tree.structure(results[1][1])
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _step_config(remat: bool):
  config = smoke.get_config()
  config.model.remat = remat
  config.model.aux_heads = ('iah',)
  config.iah.a_s = 16.0         # resolved from the data in training; any number here
  config.input.image_size = (64, 64)
  # Two layers each, so that the SAE's and the decoder's layer loops (lax.scan under remat) run; 64-token chunks
  # in the remat'd step (the encoder's attention and FFN over chunks), all tokens at once in the plain one.
  config.encoder.num_layers = 2
  config.decoder.num_layers = 2
  config.encoder.query_chunk_size = 64 if remat else 0
  return config


@pytest.mark.slow
def test_whole_step_remat_same_loss_and_gradients():
  """Backbone blocks, BiFPN layers, encoder and decoder layers rematerialized (the SAE's high layers and the
  decoder's layers as loops, the encoder over token chunks; compiled with the memory-ordered scheduler, as
  training does): the training loss, its terms and every gradient are those of the plain step."""
  batch = random_batch(_step_config(False), 2, 6)
  results = []
  for remat in (False, True):
    config = _step_config(remat)
    model = model_lib.make_model(config)
    params, model_state = model_lib.split_variables(model_lib.init_variables(model, config, jax.random.PRNGKey(0)))
    grad_fn = jax.jit(jax.value_and_grad(train.make_loss_fn(model, config), has_aux=True),
                      compiler_options=train_lib.memory_compiler_options() if remat else None)
    results.append(grad_fn(params, model_state, batch, jax.random.PRNGKey(1)))
  ((loss_a, terms_a), grads_a), ((loss_b, terms_b), grads_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  assert terms_a.keys() == terms_b.keys()
  for key in terms_a:
    np.testing.assert_allclose(terms_a[key], terms_b[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_encoder_remat_keeps_fewer_bytes():
  """XLA's memory analysis of the encoder's gradient: rematerialized layers (memory-ordered schedule) keep
  fewer temporary bytes than stored activations, and the backbone's and BiFPN's remat give equal gradients."""
  temp, grads = [], []
  for remat in (False, True):
    config, encoder, _, _ = _encoder_and_inputs(remat)
    config.encoder.num_layers = 3
    config.encoder.ffn_dim = 512
    encoder = detector.build_encoder(config)
    rng = np.random.default_rng(0)
    d = config.model.hidden_dim
    feats = [jnp.asarray(rng.normal(size=(2, s, s, d)), jnp.float32) for s in (32, 16, 8, 4)]
    masks = [jnp.zeros((2, s, s), bool) for s in (32, 16, 8, 4)]
    params = encoder.init(jax.random.PRNGKey(0), feats, masks)
    loss = lambda p, f: jnp.sum(jnp.sin(encoder.apply(p, f, masks).memory))  # noqa: E731
    fn = jax.jit(jax.grad(loss, argnums=(0, 1)),
                 compiler_options=train_lib.memory_compiler_options() if remat else None)
    compiled = fn.lower(params, feats).compile()
    temp.append(compiled.memory_analysis().temp_size_in_bytes)
    grads.append(compiled(params, feats))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert temp[1] < 0.9 * temp[0], temp


@pytest.mark.parametrize('part', ['backbone', 'neck'])
def test_backbone_and_neck_remat_same_gradients(part):
  results = []
  for remat in (False, True):
    config = smoke.get_config()
    config.model.remat = remat
    rng = np.random.default_rng(0)
    if part == 'backbone':
      module = detector.build_backbone(config)
      x = jnp.asarray(rng.normal(size=(1, 32, 32, 3)), jnp.float32)
    else:
      module = detector.build_neck(config)
      x = [jnp.asarray(rng.normal(size=(1, s, s, c)), jnp.float32) for s, c in ((16, 8), (8, 16), (4, 32), (2, 64))]
    variables = module.init(jax.random.PRNGKey(0), x)
    loss = lambda v, x: sum(jnp.sum(jnp.sin(f)) for f in module.apply(v, x))  # noqa: E731
    results.append(jax.grad(loss, argnums=(0, 1))(variables, x))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize('look_forward_twice, image_frame', [(True, True), (False, False)])
def test_decoder_scan_matches_unrolled_layers(look_forward_twice, image_frame):
  """Under remat the decoder runs its layers as one lax.scan over call-time-stacked parameters: same outputs and
  same gradients (parameters, queries, memory) as the unrolled layers, through the look-forward-twice path that
  carries layer l-1's un-detached refined boxes into layer l's box loss (and in the 'image' box frame, with the
  per-level valid ratios)."""
  config = smoke.get_config()
  config.decoder.num_layers = 3
  config.decoder.look_forward_twice = look_forward_twice
  rng = np.random.default_rng(3)
  d, b, n = config.model.hidden_dim, 2, 7
  shapes = ((8, 8), (4, 4), (2, 2), (1, 1))
  memory = jnp.asarray(rng.normal(size=(b, sum(h * w for h, w in shapes), d)), jnp.float32)
  pad = jnp.asarray(rng.random(memory.shape[:2]) < 0.1)
  queries = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  refs = jnp.asarray(rng.uniform(0.2, 0.8, size=(b, n, 4)), jnp.float32)
  attn_mask = jnp.asarray(np.tril(np.ones((n, n), bool)))    # every row has its diagonal
  ratios = jnp.asarray(rng.uniform(0.6, 1.0, (b, len(shapes), 2)), jnp.float32) if image_frame else None
  config.model.remat = False
  plain = detector.build_decoder(config)
  config.model.remat = True
  scanned = detector.build_decoder(config)
  params = plain.init(jax.random.PRNGKey(0), queries, refs, memory, pad, shapes, attn_mask)
  # The box heads' last layers start at zero; make them non-zero so the refinement really moves the boxes.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(len(path)), x.shape)
      if 'box_heads' in jax.tree_util.keystr(path) else x, params)
  w_logits = jnp.asarray(rng.normal(size=(3, b, n, plain.num_classes)), jnp.float32)
  w_boxes = jnp.asarray(rng.normal(size=(3, b, n, 4)), jnp.float32)

  def loss(model, params, queries, memory):
    out = model.apply(params, queries, refs, memory, pad, shapes, attn_mask, valid_ratios=ratios)
    return (out['pred_logits'] * w_logits).sum() + (out['pred_boxes'] * w_boxes).sum() * 10.0, out

  (v0, out0), g0 = jax.value_and_grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2), has_aux=True)(
      params, queries, memory)
  (v1, out1), g1 = jax.value_and_grad(lambda *a: loss(scanned, *a), argnums=(0, 1, 2), has_aux=True)(
      params, queries, memory)
  jaxpr = jax.make_jaxpr(lambda p: loss(scanned, p, queries, memory)[0])(params)
  assert 'scan' in str(jaxpr) and 'scan' not in str(jax.make_jaxpr(lambda p: loss(plain, p, queries, memory)[0])(
      params))
  for key in out0:
    np.testing.assert_allclose(out0[key], out1[key], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v0, v1, rtol=1e-5)
  assert jax.tree.structure(g0) == jax.tree.structure(g1)
  for a, b_ in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)
