"""Sine positional encodings vs NumPy references written element by element."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mrqm_jax.models import position_encoding as pe


def _channel(t, k, num_feats, temperature):
  """Channel k of one coordinate's encoding: sin for even k, cos for odd k, frequency index k // 2."""
  arg = t / temperature ** (2 * (k // 2) / num_feats)
  return math.sin(arg) if k % 2 == 0 else math.cos(arg)


def reference_map_pe(pad_mask, dim, temperature, offset):
  b, h, w = pad_mask.shape
  half = dim // 2
  out = np.zeros((b, h, w, dim))
  for bi in range(b):
    for i in range(h):
      for j in range(w):
        col = ~pad_mask[bi, :, j]
        row = ~pad_mask[bi, i, :]
        y = (col[:i + 1].sum() + offset) / (col.sum() + 1e-6) * 2 * math.pi
        x = (row[:j + 1].sum() + offset) / (row.sum() + 1e-6) * 2 * math.pi
        for k in range(half):
          out[bi, i, j, k] = _channel(y, k, half, temperature)
          out[bi, i, j, half + k] = _channel(x, k, half, temperature)
  return out


@pytest.mark.parametrize('temperature,offset', [(10000.0, -0.5), (20.0, 0.0)])
def test_sine_pe_2d_matches_reference(temperature, offset):
  mask = np.zeros((2, 5, 7), bool)
  mask[1, 3:, :] = True   # image 1 is 3 x 4 valid
  mask[1, :, 4:] = True
  got = np.asarray(pe.sine_pe_2d(jnp.asarray(mask), 12, temperature=temperature, offset=offset))
  want = reference_map_pe(mask, 12, temperature, offset)
  assert got.shape == (2, 5, 7, 12)
  valid = ~mask
  np.testing.assert_allclose(got[valid], want[valid], atol=2e-5)


def test_sine_pe_2d_depends_on_valid_extent_only():
  """A padded image's valid pixels get the encoding of the same-size un-padded image."""
  small = np.zeros((1, 3, 4), bool)
  padded = np.ones((1, 6, 9), bool)
  padded[:, :3, :4] = False
  a = np.asarray(pe.sine_pe_2d(jnp.asarray(small), 8))
  b = np.asarray(pe.sine_pe_2d(jnp.asarray(padded), 8))
  np.testing.assert_allclose(b[:, :3, :4], a, atol=1e-6)


def test_sine_pe_2d_rejects_bad_input():
  with pytest.raises(ValueError, match='even'):
    pe.sine_pe_2d(jnp.zeros((1, 2, 2), bool), 7)
  with pytest.raises(ValueError, match=r'\[B, H, W\]'):
    pe.sine_pe_2d(jnp.zeros((2, 2), bool), 8)


@pytest.mark.parametrize('ncoord', [2, 4])
def test_box_sine_embedding_matches_reference(ncoord):
  rng = np.random.default_rng(0)
  coords = rng.uniform(0, 1, size=(3, 5, ncoord)).astype(np.float32)
  nf = 16
  got = np.asarray(pe.box_sine_embedding(jnp.asarray(coords), num_feats=nf))
  assert got.shape == (3, 5, ncoord * nf)
  order = [1, 0, 2, 3][:ncoord]  # y, x, (w, h)
  want = np.zeros(got.shape)
  for idx in np.ndindex(3, 5):
    for part, c in enumerate(order):
      t = float(coords[idx + (c,)]) * 2 * math.pi
      for k in range(nf):
        want[idx + (part * nf + k,)] = _channel(t, k, nf, 10000.0)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_box_sine_embedding_default_width_and_closed_form():
  point = jnp.array([0.25, 0.5])  # x = 1/4 turn, y = 1/2 turn
  emb = np.asarray(pe.box_sine_embedding(point))
  assert emb.shape == (256,)
  # Lowest frequency (1) channels: y first, then x at offset 128.
  np.testing.assert_allclose(emb[[0, 1, 128, 129]], [0.0, -1.0, 1.0, 0.0], atol=1e-6)
  assert pe.box_sine_embedding(jnp.zeros((7, 4))).shape == (7, 512)
  with pytest.raises(ValueError, match='last axis'):
    pe.box_sine_embedding(jnp.zeros((3,)))
