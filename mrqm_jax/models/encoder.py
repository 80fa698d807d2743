"""Transformer encoders over the neck's P2..P5: the Scale-Aware Encoder (paper section 3.1) and the plain
deformable encoder (Deformable DETR / DINO), for the ablation.

Scale-Aware Encoder (SAE). With F = [F_L, F_H], F_L = F2 (the many high-resolution tokens) and
F_H = [F3, F4, F5]:
  - `num_layers` times (eqs. 1-4): Q = F_H, K = V = F (the current state of all levels); F_H <- layer(Q, V);
    F_L is carried along unchanged, so every layer's values hold the ORIGINAL F2 and the latest F_H (= F').
  - once (eqs. 5-7): Q = F_L (the original F2), K = V = F' = [F_L, F'_H]; F'_L <- layer(Q, V).
  - output F'' = [F'_L, F'_H], all four levels, in level order P2..P5.
"Layer" is a Deformable-DETR encoder layer (deformable self-attention, add & norm, FFN, add & norm). The
paper does not spell out positional terms; as Deformable DETR / DINO, each query token is its feature plus
its sine positional encoding plus a learned per-level embedding, values are the bare features, and each
query's reference point is its own pixel centre. The F2 update is a separate layer with its own weights.

Cost: the deformable attention + FFN work of a layer is proportional to its query count. On an 800x1344
canvas P2 has 67200 tokens and P3..P5 22050, so 6 SAE layers + the F2 update process 199,500 query tokens
where 6 plain layers process 535,500 (`benchmarks/deformable_attention.py` prints XLA's FLOP count).

Both encoders return an `EncoderOutput`: memory [B, S, D] (level order P2..P5, row-major per level),
memory_pad_mask [B, S] (True = padding), static spatial_shapes ((H_l, W_l), ...) and level_start_index.
Memory tokens at padded positions are computed but meaningless; consumers mask them with memory_pad_mask.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrqm_jax.models import layers
from mrqm_jax.models.deformable_attention import MSDeformAttn, SpatialShapes, level_start_index
from mrqm_jax.models.position_encoding import sine_pe_2d

ENCODER_TYPES = ('sae', 'deformable')


class EncoderOutput(NamedTuple):
  """What the decoder and the IoU-aware head consume (unpacks as a 4-tuple)."""
  memory: jax.Array                    # [B, S, D], levels P2..P5 concatenated
  memory_pad_mask: jax.Array           # [B, S] bool, True = padding
  spatial_shapes: tuple[tuple[int, int], ...]   # static ((H_2, W_2), ..., (H_5, W_5))
  level_start_index: tuple[int, ...]   # static offset of each level in S

  def level_maps(self) -> list[jax.Array]:
    """The memory as per-level maps, [[B, H_l, W_l, D], ...] (reshapes of slices; no copy of note)."""
    return split_levels(self.memory, self.spatial_shapes)


def flatten_levels(maps: Sequence[jax.Array]) -> jax.Array:
  """[[B, H_l, W_l, ...], ...] -> [B, sum H_l W_l, ...] (level-major, row-major inside a level)."""
  return jnp.concatenate([m.reshape(m.shape[0], m.shape[1] * m.shape[2], *m.shape[3:]) for m in maps], axis=1)


def split_levels(tokens: jax.Array, spatial_shapes: SpatialShapes) -> list[jax.Array]:
  """Inverse of `flatten_levels`: [B, S, ...] -> [[B, H_l, W_l, ...], ...]."""
  out = []
  for start, (h, w) in zip(level_start_index(spatial_shapes), spatial_shapes):
    out.append(tokens[:, start:start + h * w].reshape(tokens.shape[0], h, w, *tokens.shape[2:]))
  return out


def token_centres(spatial_shapes: SpatialShapes) -> np.ndarray:
  """[S, 2] normalized (x, y) pixel centres ((j + 0.5) / W_l, (i + 0.5) / H_l) of every token.

  Normalized by each level's full (padded-canvas) size: the reference points of the 'canvas' box frame, the same
  point on every level (no valid ratios).
  """
  parts = []
  for h, w in spatial_shapes:
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing='ij')
    parts.append(np.stack([xs, ys], axis=-1).reshape(h * w, 2))
  return np.concatenate(parts, axis=0).astype(np.float32)


def encoder_reference_points(spatial_shapes: SpatialShapes, valid_ratios: jax.Array) -> jax.Array:
  """Reference points of the 'image' box frame (mmdet `get_encoder_reference_points`): valid_ratios [B, L, 2]
  (x, y) -> [B, S, L, 2].

  Token (i, j) of level l sits at ((j + 0.5) / (r_l,x W_l), (i + 0.5) / (r_l,y H_l)) of its image, and reads
  sampled level l' at that point x r_l' (the image's valid part of each level, its own grid's rounding).
  """
  valid_ratios = valid_ratios.astype(jnp.float32)
  parts = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing='ij')
    x = jnp.asarray(xs.reshape(-1))[None] / (valid_ratios[:, lvl, 0:1] * w)    # [B, H_l W_l]
    y = jnp.asarray(ys.reshape(-1))[None] / (valid_ratios[:, lvl, 1:2] * h)
    parts.append(jnp.stack([x, y], axis=-1))
  return jnp.concatenate(parts, axis=1)[:, :, None, :] * valid_ratios[:, None, :, :]


class EncoderLayer(nn.Module):
  """Deformable-DETR encoder layer (post-norm): `query [B, Q, D]` reads `value [B, S, D]` -> `[B, Q, D]`.

  x = LN(query + Drop(MSDeformAttn(query + query_pos, reference_points, value)));
  out = LN(x + Drop(W2 Drop(relu(W1 x)))).
  query_pos [B, Q, D]; reference_points [B, Q, 2] (same point on every level: 'canvas' box frame) or
  [B, Q, L, 2] (one per sampled level: 'image' frame, `encoder_reference_points`); value [B, S, D] or a tuple of
  parts [B, S_i, D] that concatenate to it; value_pad_mask [B, S].
  """
  d_model: int = 256
  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4
  ffn_dim: int = 2048
  dropout: float = 0.0
  packed_neighbours: bool = False
  query_chunk_size: int | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, query, query_pos, reference_points, value, spatial_shapes, value_pad_mask,
               deterministic: bool = True):
    if isinstance(value, (tuple, list)):
      # Value given in parts (the SAE's [F_L, F_H]): concatenated here, so that a rematerialized layer keeps
      # its parts, one of them shared by every layer, rather than its own concatenated copy of all tokens.
      value = jnp.concatenate(value, axis=1)
    attn = MSDeformAttn(self.d_model, self.num_heads, self.num_levels, self.num_points,
                        packed_neighbours=self.packed_neighbours, query_chunk_size=self.query_chunk_size,
                        dtype=self.dtype, name='self_attn')
    drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=deterministic)  # noqa: E731
    y = attn(query + query_pos.astype(query.dtype), reference_points, value, spatial_shapes, value_pad_mask)
    x = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=self.dtype, name='norm1')(query + drop(y))
    ffn = layers.PostNormFFN(self.ffn_dim, self.dropout, self.dtype, 'linear1', 'linear2', 'norm2',
                             token_chunk_size=self.query_chunk_size)
    nn.share_scope(self, ffn)   # params stay 'linear1', 'linear2', 'norm2' of this layer
    return ffn(x, deterministic)


class _EncoderBase(nn.Module):
  """Fields and input preparation shared by both encoders."""
  hidden_dim: int = 256
  num_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 2048
  dropout: float = 0.0
  num_levels: int = 4
  pe_temperature: float = 20.0
  pe_offset: float = 0.0
  packed_neighbours: bool = False
  query_chunk_size: int | None = None   # attention (ms_deform_attn_core) and FFN chunks; None = all at once
  dtype: Any = None
  # Recompute each layer's activations in the backward pass instead of storing them (config.model.remat):
  # at 800x1344 the P2 tokens' FFN activations alone are ~1 GiB per tensor per layer.
  remat: bool = False

  def _layer(self, name: str, query, query_pos, reference_points, value, spatial_shapes, value_pad_mask,
             deterministic: bool):
    """One EncoderLayer named `name` applied to the arguments, rematerialized when `remat`."""
    # static: spatial_shapes (arg 5) and deterministic (arg 7), counting `self` as 0 as flax does.
    layer_cls = nn.remat(EncoderLayer, static_argnums=(5, 7)) if self.remat else EncoderLayer
    return layer_cls(**self._layer_fields(), name=name)(
        query, query_pos, reference_points, value, spatial_shapes, value_pad_mask, deterministic)

  def _layer_fields(self) -> dict[str, Any]:
    """EncoderLayer's fields, for the named layers and the layer-loop template alike."""
    return dict(d_model=self.hidden_dim, num_heads=self.num_heads, num_levels=self.num_levels,
                num_points=self.num_points, ffn_dim=self.ffn_dim, dropout=self.dropout,
                packed_neighbours=self.packed_neighbours, query_chunk_size=self.query_chunk_size, dtype=self.dtype)

  def _prepare(self, feats: Sequence[jax.Array], pad_masks: Sequence[jax.Array], valid_ratios: jax.Array | None):
    """Validate, flatten, and build positions: tokens [B,S,D], mask [B,S], pos [B,S,D], ref [B,S,2] (no
    valid_ratios: 'canvas' frame) or [B,S,L,2] (valid_ratios [B, L, 2]: 'image' frame)."""
    cls = type(self).__name__
    if len(feats) != self.num_levels or len(pad_masks) != self.num_levels:
      raise ValueError(f'{cls}: expected {self.num_levels} feature levels and pad masks (config.model.num_levels),'
                       f' got {len(feats)} and {len(pad_masks)}')
    for lvl, (f, m) in enumerate(zip(feats, pad_masks)):
      if f.ndim != 4 or f.shape[-1] != self.hidden_dim:
        raise ValueError(f'{cls}: level {lvl} features must be [B, H, W, {self.hidden_dim}] '
                         f'(config.model.hidden_dim), got {f.shape}')
      if m.shape != f.shape[:3]:
        raise ValueError(f'{cls}: level {lvl} pad mask must be {f.shape[:3]}, got {m.shape}')
    spatial_shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in feats)
    level_embed = self.param('level_embed', nn.initializers.normal(1.0), (self.num_levels, self.hidden_dim))
    pos = flatten_levels([sine_pe_2d(m, self.hidden_dim, self.pe_temperature, self.pe_offset) + level_embed[lvl]
                          for lvl, m in enumerate(pad_masks)])
    tokens = flatten_levels(feats)
    if self.dtype is not None:
      tokens = tokens.astype(self.dtype)
    mask = flatten_levels([m.astype(bool) for m in pad_masks])
    if valid_ratios is None:
      ref = jnp.broadcast_to(jnp.asarray(token_centres(spatial_shapes)), (tokens.shape[0], tokens.shape[1], 2))
    else:
      if valid_ratios.shape != (tokens.shape[0], self.num_levels, 2):
        raise ValueError(f'{cls}: valid_ratios must be [B, L, 2] = [{tokens.shape[0]}, {self.num_levels}, 2], got '
                         f'{valid_ratios.shape}')
      ref = encoder_reference_points(spatial_shapes, valid_ratios)
    return tokens, mask, pos, ref, spatial_shapes


class ScaleAwareEncoder(_EncoderBase):
  """SAE (see module doc): `feats [[B, H_l, W_l, D]] x num_levels`, `pad_masks [[B, H_l, W_l]]` -> EncoderOutput.
  valid_ratios: None (the 'canvas' box frame: each token's own pixel centre on every level) or [B, L, 2] (the
  'image' frame: `encoder_reference_points`).

  num_low_levels: how many of the finest levels form F_L (1 = F2 alone, the paper). Parameters:
  'high_layers_{i}' (i < num_layers, queries F_H) and 'low_layer' (the single F_L update), 'level_embed'.
  """
  num_low_levels: int = 1

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], pad_masks: Sequence[jax.Array],
               deterministic: bool = True, valid_ratios: jax.Array | None = None) -> EncoderOutput:
    if not 1 <= self.num_low_levels < self.num_levels:
      raise ValueError(f'ScaleAwareEncoder: num_low_levels must be in [1, {self.num_levels}), '
                       f'got {self.num_low_levels}')
    tokens, mask, pos, ref, shapes = self._prepare(feats, pad_masks, valid_ratios)
    split = sum(h * w for h, w in shapes[:self.num_low_levels])  # F_L tokens come first (level order)
    low, high = tokens[:, :split], tokens[:, split:]
    if self.remat and not self.is_initializing() and self.num_layers > 1 and (deterministic or not self.dropout):
      # One layer's recomputation at a time in the backward pass, on any scheduler (XLA:CPU's otherwise runs all
      # of them first): the layers run as a loop (lax.scan) over their parameters, stacked at call time so the
      # variable tree keeps one entry per layer. (With dropout in training: the unrolled layers below.)
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *[self.variables['params'][f'high_layers_{i}'] for i in range(self.num_layers)])
      template = EncoderLayer(**self._layer_fields(), parent=None)

      def body(h, p):
        return template.apply({'params': p}, h, pos[:, split:], ref[:, split:], (low, h), shapes, mask,
                              deterministic), None

      high, _ = jax.lax.scan(jax.checkpoint(body), high, stacked)
    else:
      for i in range(self.num_layers):  # eqs. (2)-(4): Q = F_H, V = [F_L (never updated here), F_H]
        high = self._layer(f'high_layers_{i}', high, pos[:, split:], ref[:, split:], (low, high), shapes, mask,
                           deterministic)
    # eqs. (5)-(7): Q = original F_L, V = F' = [F_L, F'_H]; output F'' = [F'_L, F'_H].
    low = self._layer('low_layer', low, pos[:, :split], ref[:, :split], (low, high), shapes, mask, deterministic)
    return EncoderOutput(jnp.concatenate([low, high], axis=1), mask, shapes, level_start_index(shapes))


class DeformableEncoder(_EncoderBase):
  """Plain Deformable-DETR encoder: every layer updates all tokens of all levels (the SAE ablation).

  Same interface and output as ScaleAwareEncoder. Parameters: 'layers_{i}', 'level_embed'.
  """

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], pad_masks: Sequence[jax.Array],
               deterministic: bool = True, valid_ratios: jax.Array | None = None) -> EncoderOutput:
    tokens, mask, pos, ref, shapes = self._prepare(feats, pad_masks, valid_ratios)
    for i in range(self.num_layers):
      tokens = self._layer(f'layers_{i}', tokens, pos, ref, tokens, shapes, mask, deterministic)
    return EncoderOutput(tokens, mask, shapes, level_start_index(shapes))
