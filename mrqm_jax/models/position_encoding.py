"""Sine positional encodings: for feature maps (from their padding masks) and for points / boxes.

Both follow the DETR family's layout, so weights and habits carry over:
- `sine_pe_2d` is DETR / Deformable-DETR's `PositionEmbeddingSine(normalize=True)`: each valid pixel's row and
  column are counted over the *valid* (un-padded) part of the map, normalized to (0, 2*pi], and encoded with
  `dim / 2` frequencies each; output channels are `[y-encoding, x-encoding]`.
- `box_sine_embedding` is DINO's `gen_sineembed_for_position`: each coordinate of a normalized point
  (x, y) or box (cx, cy, w, h) is scaled by 2*pi and encoded with `num_feats` frequencies; the outputs are
  concatenated in the order y, x (, w, h).

Within one coordinate's encoding, frequency pairs are interleaved: channel 2i is sin(t / T^(2i/F)) and
channel 2i+1 is cos(t / T^(2i/F)) — the same frequency for both members of a pair, as the references do.
"""

import math

import jax
import jax.numpy as jnp

TWO_PI = 2.0 * math.pi


def _inverse_frequencies(num_feats: int, temperature: float) -> jax.Array:
  """[num_feats] 1 / T^(2*floor(i/2)/num_feats): each frequency appears twice (its sin and its cos channel)."""
  i = jnp.arange(num_feats, dtype=jnp.float32)
  return temperature ** (-2.0 * jnp.floor(i / 2.0) / num_feats)


def _encode(coord: jax.Array, num_feats: int, temperature: float) -> jax.Array:
  """coord [...] (already scaled to radians) -> [..., num_feats] interleaved sin/cos."""
  angles = coord[..., None] * _inverse_frequencies(num_feats, temperature)  # [..., F]
  even = jnp.sin(angles[..., 0::2])
  odd = jnp.cos(angles[..., 1::2])
  return jnp.stack([even, odd], axis=-1).reshape(angles.shape)  # sin, cos, sin, cos, ...


def sine_pe_2d(pad_mask: jax.Array, dim: int, temperature: float = 10000.0, offset: float = -0.5,
               eps: float = 1e-6) -> jax.Array:
  """Sine positional encoding of a padded feature map.

  pad_mask: [B, H, W] bool, True = padding (DETR convention). dim: output channels (even; half for y, half
  for x). offset: added to the 1-based valid row/column count before normalizing (-0.5 = pixel centres, as
  Deformable-DETR; 0.0 as DETR / mmdet's default). Returns [B, H, W, dim] float32; values at padded pixels
  are defined (they repeat the last valid count) but meaningless.
  """
  if pad_mask.ndim != 3:
    raise ValueError(f'sine_pe_2d: pad_mask must be [B, H, W], got shape {pad_mask.shape}')
  if dim % 2 or dim <= 0:
    raise ValueError(f'sine_pe_2d: dim must be a positive even number, got {dim}')
  valid = (~pad_mask.astype(bool)).astype(jnp.float32)
  y = jnp.cumsum(valid, axis=1)  # 1-based row among the valid rows of that column
  x = jnp.cumsum(valid, axis=2)
  # Normalize by the valid extent (the last cumulative count), as DETR: the encoding spans the image, not
  # the padded canvas.
  y = (y + offset) / (y[:, -1:, :] + eps) * TWO_PI
  x = (x + offset) / (x[:, :, -1:] + eps) * TWO_PI
  half = dim // 2
  return jnp.concatenate([_encode(y, half, temperature), _encode(x, half, temperature)], axis=-1)


def box_sine_embedding(coords: jax.Array, num_feats: int = 128, temperature: float = 10000.0) -> jax.Array:
  """DINO's sine embedding of normalized points or boxes.

  coords: [..., 2] points (x, y) or [..., 4] boxes (cx, cy, w, h), in [0, 1].
  Returns [..., 2 * num_feats] (points: y then x) or [..., 4 * num_feats] (boxes: y, x, w, h), float32.
  """
  if coords.shape[-1] not in (2, 4):
    raise ValueError(f'box_sine_embedding: last axis must be 2 (x, y) or 4 (cx, cy, w, h), got {coords.shape}')
  if num_feats % 2:
    raise ValueError(f'box_sine_embedding: num_feats must be even, got {num_feats}')
  scaled = coords.astype(jnp.float32) * TWO_PI
  parts = [_encode(scaled[..., 1], num_feats, temperature), _encode(scaled[..., 0], num_feats, temperature)]
  if coords.shape[-1] == 4:
    parts += [_encode(scaled[..., 2], num_feats, temperature), _encode(scaled[..., 3], num_feats, temperature)]
  return jnp.concatenate(parts, axis=-1)
