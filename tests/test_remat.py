"""config.model.remat recomputes layers in the backward pass: same outputs and gradients as without."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import smoke
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
