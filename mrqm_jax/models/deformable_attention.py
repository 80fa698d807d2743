"""Multi-scale deformable attention (Deformable DETR), with a gather-based bilinear sampling core.

`ms_deform_attn_core` computes what the reference PyTorch `multi_scale_deformable_attn_pytorch` computes —
bilinear `grid_sample(align_corners=False, padding_mode='zeros')` of each head's value map at every sampling
location, weighted by the attention weights and summed over levels and points — without a custom kernel:

- A location (x, y) in [0, 1] on a level of size (H, W) is the pixel coordinate (x*W - 0.5, y*H - 0.5)
  (align_corners=False: pixel centres sit at half-integers of the normalized grid).
- Its four integer neighbours are fetched by ONE gather over the concatenated value tokens of all levels;
  neighbours outside the map get weight 0 (zero padding), so no index is ever out of bounds.
- The bilinear weights and the attention weight are multiplied first, so the weighted sum over
  levels x points x neighbours is a single contraction (`jnp.einsum`, measurably faster on XLA:CPU than
  `(w[..., None] * g).sum(-2)`; `benchmarks/deformable_attention.py` prints both).

`packed_neighbours=True` (layout 'packed') switches to the layout scenic uses for TPUs: each level is zero-padded
by one pixel and its four neighbours are packed along channels, `[H+1, W+1, 4*D]`, so a sample's whole 2x2
footprint is one contiguous row and the gather fetches 4*D values per index instead of D values per each of 4
indices. It exists for XLA:TPU, which tiles an array's minor axis by 128 lanes: the flat layout's gathered
`[..., L*P*4, D]` samples (D = 32) occupy 4x their bytes there, the packed rows (4*D = 128) 1x — and the packed
path keeps every other array of Q*L*P samples lane-dense too (`_sample_packed`). Same function (tests check
both). `resolve_sampling_layout` picks per backend for config `encoder.sampling_layout='auto'`: 'packed' on TPU,
'flat' elsewhere (on XLA:CPU flat is faster and its compiled step smaller; `benchmarks/deformable_attention.py`
prints both layouts, and `--tpu_memory` their XLA:TPU memory).

`query_chunk_size` bounds memory for very many queries (the SAE's F2 update has 67k on an 800x1344 canvas):
the queries are processed in rematerialized chunks, so the gathered samples of one chunk are the peak.

Shapes: B batch, S value tokens (all levels, level-major, row-major inside a level), M heads, D channels per
head, Q queries, L levels, P points per level.
"""

from collections.abc import Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrqm_jax.models import layers

SpatialShapes = Sequence[tuple[int, int]]


def level_start_index(spatial_shapes: SpatialShapes) -> tuple[int, ...]:
  """Offset of each level's first token in the flattened (level-major, row-major) token axis."""
  starts, total = [], 0
  for h, w in spatial_shapes:
    starts.append(total)
    total += h * w
  return tuple(starts)


SAMPLING_LAYOUTS = ('auto', 'flat', 'packed')


def resolve_sampling_layout(layout: str, backend: str | None = None) -> str:
  """'flat' or 'packed' for config `encoder.sampling_layout` on `backend` (default: jax.default_backend()).

  'auto' is 'packed' on TPU (lane-dense gathers: XLA:TPU's memory of the packed core is ~0.6x the flat one's)
  and 'flat' on CPU and GPU (XLA:CPU: flat is faster and smaller; GPUs do not pad minor axes to 128 lanes)."""
  if layout not in SAMPLING_LAYOUTS:
    raise ValueError(f'sampling layout must be one of {SAMPLING_LAYOUTS} (config.encoder.sampling_layout), '
                     f'got {layout!r}')
  if layout != 'auto':
    return layout
  return 'packed' if (backend or jax.default_backend()) == 'tpu' else 'flat'


def _check_shapes(value, spatial_shapes, sampling_locations, attention_weights):
  if value.ndim != 4:
    raise ValueError(f'ms_deform_attn_core: value must be [B, S, M, D], got {value.shape}')
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError(f'ms_deform_attn_core: sampling_locations must be [B, Q, M, L, P, 2], got '
                     f'{sampling_locations.shape}')
  b, s, m, _ = value.shape
  lb, q, lm, nl, p, _ = sampling_locations.shape
  total = sum(h * w for h, w in spatial_shapes)
  if total != s:
    raise ValueError(f'ms_deform_attn_core: value has {s} tokens but spatial_shapes {tuple(spatial_shapes)} '
                     f'sum to {total}')
  if nl != len(spatial_shapes) or (lb, lm) != (b, m):
    raise ValueError(f'ms_deform_attn_core: sampling_locations {sampling_locations.shape} do not match value '
                     f'{value.shape} / {len(spatial_shapes)} levels')
  if attention_weights.shape != (b, q, m, nl, p):
    raise ValueError(f'ms_deform_attn_core: attention_weights must be {(b, q, m, nl, p)}, got '
                     f'{attention_weights.shape}')


def _gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
  """table [B, M, N, C], index [B, M, K] int -> [B, M, K, C] (table[b, m, index[b, m, k]])."""
  return jax.vmap(jax.vmap(lambda t, i: t[i]))(table, index)


def _weighted_sum(weights: jax.Array, samples: jax.Array, use_einsum: bool, precision: Any) -> jax.Array:
  """weights [B, M, Q, K], samples [B, M, Q, K, D] -> [B, M, Q, D] (sum over K)."""
  if use_einsum:
    return jnp.einsum('bmqk,bmqkd->bmqd', weights, samples, precision=precision)
  return (weights[..., None] * samples).sum(axis=-2)


def ms_deform_attn_core(value: jax.Array, spatial_shapes: SpatialShapes, sampling_locations: jax.Array,
                        attention_weights: jax.Array, *, packed_neighbours: bool = False,
                        query_chunk_size: int | None = None, use_einsum: bool = True,
                        precision: Any = None) -> jax.Array:
  """Multi-scale deformable attention sampling + weighting.

  value: [B, S, M, D] per-head value tokens of all levels (level-major; level l spans
    `level_start_index(spatial_shapes)[l]` ... + H_l * W_l, row-major).
  spatial_shapes: static ((H_0, W_0), ..., (H_{L-1}, W_{L-1})).
  sampling_locations: [B, Q, M, L, P, 2] normalized (x, y); 0 and 1 are the outer edges of the map, so
    pixel (i, j) has centre ((j + 0.5) / W, (i + 0.5) / H). Locations outside read zeros (partially, for
    those less than one pixel outside).
  attention_weights: [B, Q, M, L, P] (usually softmax-normalized over L*P per head).
  packed_neighbours: gather the 2x2 footprint as one 4*D row (see module doc); same result.
  query_chunk_size: if set and smaller than Q, process the queries in chunks of this size under
    `jax.checkpoint` inside `lax.map`: the [B, M, chunk, L*P*4, D] gathered samples are the peak memory (instead
    of [B, M, Q, L*P*4, D]: 5.8 GB per image for 89k f32 queries, 8 heads, 4 levels x 4 points) and are
    recomputed in the backward pass. Same result.
  use_einsum: contract with einsum (default) or with multiply + sum (for the benchmark).
  Returns [B, Q, M * D] (heads concatenated, head-major), dtype of value.
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
  q = sampling_locations.shape[1]
  table = _neighbour_table(value, spatial_shapes, packed_neighbours)
  sample = functools.partial(_sample, spatial_shapes=spatial_shapes, packed_neighbours=packed_neighbours,
                             use_einsum=use_einsum, precision=precision)
  # Rematerialized: the backward pass keeps only the table, locations and weights and gathers again, instead
  # of keeping the [B, M, Q, L*P*4, D] samples (64 per query and head) of every attention layer until then.
  body = jax.checkpoint(sample)
  if query_chunk_size is None or query_chunk_size >= q:
    out = body(table, sampling_locations, attention_weights)
  else:
    if query_chunk_size < 1:
      raise ValueError(f'ms_deform_attn_core: query_chunk_size must be >= 1, got {query_chunk_size}')
    # Padded queries get zero weights; their outputs are dropped.
    out = layers.map_over_chunks(lambda locations, weights: body(table, locations, weights),
                                 (sampling_locations, attention_weights), query_chunk_size)
  return out


def _neighbour_table(value: jax.Array, spatial_shapes: SpatialShapes, packed: bool) -> jax.Array:
  """The gather table: [B, M, S, D] (flat) or [B, M, sum_l (H_l+1)(W_l+1), 4D] (packed)."""
  b, _, m, d = value.shape
  value_t = jnp.transpose(value, (0, 2, 1, 3))  # [B, M, S, D]
  if not packed:
    return value_t
  # Pack each level: zero-pad by one pixel, then row (i, j) of [H+1, W+1, 4D] holds the padded map's pixels
  # (i, j), (i, j+1), (i+1, j), (i+1, j+1) = original (i-1, j-1) ... (i, j): the footprint of x0 = j - 1,
  # y0 = i - 1. So any sample with x0 in [-1, W-1] and y0 in [-1, H-1] is one row; others read nothing.
  packed_levels = []
  for start, (h, w) in zip(level_start_index(spatial_shapes), spatial_shapes):
    lvl = value_t[:, :, start:start + h * w].reshape(b, m, h, w, d)
    lvl = jnp.pad(lvl, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    lvl = jnp.concatenate([lvl[:, :, :-1, :-1], lvl[:, :, :-1, 1:], lvl[:, :, 1:, :-1], lvl[:, :, 1:, 1:]],
                          axis=-1)
    packed_levels.append(lvl.reshape(b, m, (h + 1) * (w + 1), 4 * d))
  return jnp.concatenate(packed_levels, axis=2)


def _sample(table: jax.Array, sampling_locations: jax.Array, attention_weights: jax.Array, *,
            spatial_shapes: SpatialShapes, packed_neighbours: bool, use_einsum: bool,
            precision: Any) -> jax.Array:
  """Bilinear samples of `table` (see `_neighbour_table`), weighted and summed: -> [B, Q, M * D]."""
  if packed_neighbours:
    return _sample_packed(table, sampling_locations, attention_weights, spatial_shapes=spatial_shapes)
  b, m, _, d = table.shape
  q, nl, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
  dtype = table.dtype

  # Per-level constants as [L, 1] arrays broadcasting against [B, M, Q, L, P].
  heights = np.array([h for h, _ in spatial_shapes], np.int32)[:, None]
  widths = np.array([w for _, w in spatial_shapes], np.int32)[:, None]

  # Geometry in at least float32 even for bf16 values: pixel coordinates of large maps need the mantissa.
  geo = jnp.promote_types(sampling_locations.dtype, jnp.float32)
  loc = jnp.transpose(sampling_locations, (0, 2, 1, 3, 4, 5)).astype(geo)  # [B, M, Q, L, P, 2]
  attn = jnp.transpose(attention_weights, (0, 2, 1, 3, 4)).astype(geo)     # [B, M, Q, L, P]
  px = loc[..., 0] * widths - 0.5   # pixel coordinates, centres at integers
  py = loc[..., 1] * heights - 0.5
  x0f, y0f = jnp.floor(px), jnp.floor(py)
  fx, fy = px - x0f, py - y0f       # in [0, 1): weight of the right / lower neighbour
  x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)

  # Neighbour order: (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).
  corner_w = [(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]

  starts = np.array(level_start_index(spatial_shapes), np.int32)[:, None]
  weights, indices = [], []
  for (dy, dx), w in zip(((0, 0), (0, 1), (1, 0), (1, 1)), corner_w):
    xi, yi = x0 + dx, y0 + dy
    inside = (xi >= 0) & (xi < widths) & (yi >= 0) & (yi < heights)
    weights.append(jnp.where(inside, w * attn, 0.0))
    indices.append(starts + jnp.clip(yi, 0, heights - 1) * widths + jnp.clip(xi, 0, widths - 1))
  index = jnp.stack(indices, axis=-1).reshape(b, m, q * nl * p * 4)
  samples = _gather_rows(table, index).reshape(b, m, q, nl * p * 4, d)
  weights = jnp.stack(weights, axis=-1).reshape(b, m, q, nl * p * 4).astype(dtype)

  out = _weighted_sum(weights, samples, use_einsum, precision)  # [B, M, Q, D]
  return jnp.transpose(out, (0, 2, 1, 3)).reshape(b, q, m * d)


def _sample_packed(table: jax.Array, sampling_locations: jax.Array, attention_weights: jax.Array, *,
                   spatial_shapes: SpatialShapes) -> jax.Array:
  """`_sample` on the packed table [B, M, S', 4D], keeping every large array's minor axis 4D wide.

  XLA:TPU tiles an array's two minor axes by (8, 128): a minor axis of D = 32 channels, or of L*P*4 = 64
  weights, or of 4 corners, occupies 128 lanes (4x, 2x, 32x its bytes). So nothing of size Q*L*P is ever
  shaped [..., 4, D] or [..., 4] here: the geometry is [B, M, Q, L*P] (one array per corner weight), the
  gathered rows stay [B, M, Q, L*P, 4D], and each corner's weight is broadcast over its D lanes inside the
  multiply-and-sum over L*P (fused, never stored); only the [B, M, Q, 4D] per-corner sums are split into
  the four D-wide corners. Sums accumulate in at least float32 (as the flat path's einsum does for bf16).
  """
  b, m, _, d4 = table.shape
  d = d4 // 4
  q, nl, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
  lp = nl * p
  dtype = table.dtype

  # Per-sample constants as [L*P] vectors (level-major, as the reshape below) broadcasting against [B, M, Q, L*P].
  heights = np.repeat(np.array([h for h, _ in spatial_shapes], np.int32), p)
  widths = np.repeat(np.array([w for _, w in spatial_shapes], np.int32), p)
  packed_sizes = [(h + 1) * (w + 1) for h, w in spatial_shapes]
  starts = np.repeat(np.cumsum([0] + packed_sizes[:-1]).astype(np.int32), p)

  geo = jnp.promote_types(sampling_locations.dtype, jnp.float32)
  loc = sampling_locations.reshape(b, q, m, lp, 2).astype(geo)
  px = jnp.transpose(loc[..., 0], (0, 2, 1, 3)) * widths - 0.5    # [B, M, Q, L*P], centres at integers
  py = jnp.transpose(loc[..., 1], (0, 2, 1, 3)) * heights - 0.5
  attn = jnp.transpose(attention_weights.reshape(b, q, m, lp), (0, 2, 1, 3)).astype(geo)
  x0f, y0f = jnp.floor(px), jnp.floor(py)
  fx, fy = px - x0f, py - y0f
  x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
  # Row (y0 + 1, x0 + 1) of a level's packed [H+1, W+1] grid holds the footprint of (x0, y0) (see
  # `_neighbour_table`): every sample with x0 in [-1, W-1] and y0 in [-1, H-1] is one row, the rest read nothing.
  hits = (x0 >= -1) & (x0 < widths) & (y0 >= -1) & (y0 < heights)
  attn = jnp.where(hits, attn, 0.0)
  corner_weights = [attn * (1 - fy) * (1 - fx), attn * (1 - fy) * fx, attn * fy * (1 - fx), attn * fy * fx]
  index = starts + jnp.clip(y0 + 1, 0, heights) * (widths + 1) + jnp.clip(x0 + 1, 0, widths)

  samples = _gather_rows(table, index.reshape(b, m, q * lp)).reshape(b, m, q, lp, d4)
  # Lane l of a row belongs to corner l // D. Selecting each lane's weight elementwise (not concatenating four
  # broadcasts, which XLA:TPU materializes at 4x) keeps it one fusion with the product and the sum.
  lane_corner = np.arange(d4) // d
  lane_weights = corner_weights[3].astype(dtype)[..., None]
  for c in (2, 1, 0):
    lane_weights = jnp.where(lane_corner == c, corner_weights[c].astype(dtype)[..., None], lane_weights)
  per_corner = jnp.sum(lane_weights * samples, axis=3, dtype=jnp.promote_types(dtype, jnp.float32))  # [B, M, Q, 4D]
  out = sum(per_corner[..., c * d:(c + 1) * d] for c in range(4)).astype(dtype)  # [B, M, Q, D]
  return jnp.transpose(out, (0, 2, 1, 3)).reshape(b, q, m * d)


def grid_offsets_init(num_heads: int, num_levels: int, num_points: int):
  """Bias init of the sampling-offset projection (Deformable DETR / DINO).

  Head h points in direction angle 2*pi*h/M, scaled so the larger of |cos|, |sin| is 1 (a square ring), and
  point k of every level sits k+1 times further out. Returns an initializer of shape [M * L * P * 2],
  ordered (head, level, point, xy) to match the reshape in `MSDeformAttn`.
  """

  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(num_heads, dtype=np.float64) * (2.0 * math.pi / num_heads)
    ring = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    ring = ring / np.abs(ring).max(axis=-1, keepdims=True)                       # [M, 2]
    scale = np.arange(1, num_points + 1, dtype=np.float64)[None, None, :, None]  # [1, 1, P, 1]
    grid = np.broadcast_to(ring[:, None, None, :], (num_heads, num_levels, num_points, 2)) * scale
    grid = grid.reshape(-1)
    if tuple(shape) != grid.shape:
      raise ValueError(f'grid_offsets_init: parameter shape {shape} != {grid.shape}')
    return jnp.asarray(grid, dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention: `query [B, Q, C]` reads `value [B, S, C]` -> `[B, Q, C]`.

  The query and value sets are independent: queries need not be tokens of the value's levels (the SAE's
  F3..F5 queries read F2..F5; the decoder's object queries read the encoder memory). The value's levels are
  given by the static `spatial_shapes`; their number must be `num_levels`.

  reference_points: [B, Q, L, 2] normalized points (x, y), or [B, Q, L, 4] boxes (cx, cy, w, h) — with boxes
    the offsets are scaled by half the box size / num_points, as Deformable DETR's two-stage decoder. The
    level axis may be omitted ([B, Q, 2] / [B, Q, 4]): the same reference for every level (the 'canvas' box
    frame, whose coordinates are those of every padded level; the 'image' frame passes one per level, scaled by
    the level's valid ratio as mmdet does).
  value_pad_mask: [B, S] bool, True = padding token; those tokens' projected values are zeroed, so they
    contribute nothing (bilinear samples touching them read zeros).
  Parameters: value_proj, output_proj (xavier-uniform); sampling_offsets (zero kernel, grid bias);
  attention_weights (zeros: uniform attention at init), softmax over the L*P samples of each head.
  packed_neighbours / query_chunk_size: passed to `ms_deform_attn_core` (layout and memory; same function).
  """
  d_model: int = 256
  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4
  packed_neighbours: bool = False
  query_chunk_size: int | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, query: jax.Array, reference_points: jax.Array, value: jax.Array,
               spatial_shapes: SpatialShapes, value_pad_mask: jax.Array | None = None) -> jax.Array:
    m, nl, p = self.num_heads, self.num_levels, self.num_points
    if self.d_model % m:
      raise ValueError(f'MSDeformAttn: d_model {self.d_model} is not divisible by num_heads {m}')
    if len(spatial_shapes) != nl:
      raise ValueError(f'MSDeformAttn: value has {len(spatial_shapes)} levels, module built for {nl}')
    b, q, _ = query.shape
    s = value.shape[1]
    if reference_points.ndim == 3:
      reference_points = jnp.broadcast_to(reference_points[:, :, None, :],
                                          (b, q, nl, reference_points.shape[-1]))
    if reference_points.shape[:3] != (b, q, nl) or reference_points.shape[-1] not in (2, 4):
      raise ValueError(f'MSDeformAttn: reference_points must be [B, Q, L, 2|4] = [{b}, {q}, {nl}, 2|4], got '
                       f'{reference_points.shape}')
    dense = lambda n, name, **kw: nn.Dense(n, dtype=self.dtype, name=name, **kw)  # noqa: E731
    xavier = nn.initializers.xavier_uniform()

    v = dense(self.d_model, 'value_proj', kernel_init=xavier)(value)
    if value_pad_mask is not None:
      if value_pad_mask.shape != (b, s):
        raise ValueError(f'MSDeformAttn: value_pad_mask must be [B, S] = [{b}, {s}], got {value_pad_mask.shape}')
      v = jnp.where(value_pad_mask[..., None], jnp.zeros((), v.dtype), v)
    v = v.reshape(b, s, m, self.d_model // m)

    offsets = dense(m * nl * p * 2, 'sampling_offsets', kernel_init=nn.initializers.zeros_init(),
                    bias_init=grid_offsets_init(m, nl, p))(query).reshape(b, q, m, nl, p, 2)
    logits = dense(m * nl * p, 'attention_weights', kernel_init=nn.initializers.zeros_init())(query)
    weights = jax.nn.softmax(logits.reshape(b, q, m, nl * p).astype(jnp.float32), axis=-1)
    weights = weights.reshape(b, q, m, nl, p)

    ref = reference_points.astype(jnp.float32)[:, :, None, :, None, :]  # [B, Q, 1, L, 1, 2|4]
    offsets = offsets.astype(jnp.float32)
    if reference_points.shape[-1] == 2:
      # Offsets are in pixels of each level: divide by (W_l, H_l).
      normalizer = np.array([[w, h] for h, w in spatial_shapes], np.float32)[:, None, :]  # [L, 1, 2]
      locations = ref + offsets / normalizer
    else:
      locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5

    out = ms_deform_attn_core(v, spatial_shapes, locations, weights, packed_neighbours=self.packed_neighbours,
                              query_chunk_size=self.query_chunk_size)
    return dense(self.d_model, 'output_proj', kernel_init=xavier)(out)
