"""RoIAlign (torchvision / mmcv semantics) and mmdet's multi-level RoI extraction, as gathers; jittable.

Semantics (torchvision.ops.roi_align, mmcv RoIAlign with pool_mode='avg'), per RoI (x1, y1, x2, y2) in image
pixels and a feature map of H x W:
  start = (x1, y1) * spatial_scale - offset, end = (x2, y2) * spatial_scale - offset, offset = 0.5 if aligned
  (pixel centers at half-integers) else 0; size = end - start, clamped to >= 1 only when not aligned.
  Each of the output_size^2 bins averages sampling_ratio^2 bilinear samples on a regular grid inside the bin
  (sample (i + 0.5) / s of the way across, per axis).
  A sample with y < -1, y > H, x < -1 or x > W is 0; otherwise y, x are clamped at 0 from below, and a sample at
  or beyond the last row/column uses that row/column alone (mmcv's bilinear_interpolate).

`sampling_ratio` >= 1 samples every bin on a fixed s x s grid. sampling_ratio=0 is mmcv/torchvision's adaptive
rule (Co-DINO's RoI head): n_y = ceil(roi height / output_size) samples per bin side along y, n_x likewise along
x, different per RoI (a RoI of zero or negative extent has none and pools zeros), the bin's mean over its
n_y x n_x samples. Shapes stay static: every RoI runs `max_samples` sample slots per axis and the slots beyond its
own n are weighted 0 (so the cost is that of a fixed max_samples x max_samples grid); a RoI that would need more
than `max_samples` gets max_samples evenly spaced samples (not mmcv's count: the only approximation).

Formulation: bilinear weights are separable (w = w_y * w_x, the out-of-range test is a product of per-axis
tests too), so per RoI we compute per-axis corner indices and weights for the output_size * s sample rows and
columns, then accumulate the 4 * s^2 (corner, sample) terms one at a time in a loop (lax.scan, so the program
holds one gather and one scatter-add however many terms): each term is one gather of
[R, out, out, C] from the flattened [H * W, C] features, weighted and added. Peak memory is therefore a few
[R, out, out, C] arrays (not one [R, out * out * s * s * 4, C] gather), and the gradient w.r.t. the features is
the matching scatter-add. RoIs get no gradient (stop_gradient), as in torchvision/mmcv, whose RoIAlign has no
RoI gradient. A RoI with NaN coordinates (padding) pools exact zeros and passes no gradient.
"""

from typing import Sequence

import jax
import jax.numpy as jnp


def map_roi_levels(rois: jnp.ndarray, num_levels: int, finest_scale: float = 56.0) -> jnp.ndarray:
  """mmdet SingleRoIExtractor.map_roi_levels: rois [..., 4] pixel xyxy -> level [...] int32 in [0, L-1].

  scale = sqrt(w * h); level = floor(log2(scale / finest_scale + 1e-6)), clipped to [0, num_levels - 1]
  (scale < 112 -> 0, < 224 -> 1, < 448 -> 2, else 3 with the default 56). Negative widths/heights count as
  0 (level 0) instead of mmdet's NaN; NaN RoIs map to level 0.
  """
  rois = jnp.asarray(rois, jnp.float32)
  w = jnp.maximum(rois[..., 2] - rois[..., 0], 0.0)
  h = jnp.maximum(rois[..., 3] - rois[..., 1], 0.0)
  level = jnp.floor(jnp.log2(jnp.sqrt(w * h) / finest_scale + 1e-6))
  level = jnp.where(jnp.isnan(level), 0.0, level)   # NaN RoIs (padding) -> level 0 rather than an undefined cast
  return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def _axis_samples(lo, hi, size, output_size, sampling_ratio, aligned, max_samples=0):
  """Per-axis sample corners: lo, hi [R] RoI bounds in feature pixels (before the aligned shift), size [R]
  map extent -> (low index, high index, low weight, high weight), each [R, output_size, s], and the samples per
  bin side [R] float32; s = sampling_ratio, or max_samples for the adaptive rule (sampling_ratio 0)."""
  offset = 0.5 if aligned else 0.0
  start, end = lo - offset, hi - offset
  extent = end - start
  if not aligned:
    extent = jnp.maximum(extent, 1.0)
  bin_size = extent / output_size
  if sampling_ratio > 0:
    slots = sampling_ratio
    count = jnp.full(lo.shape, float(sampling_ratio), jnp.float32)
  else:   # mmcv: ceil(extent / output_size) samples per bin side (NaN RoIs -> 0 samples)
    slots = max_samples
    count = jnp.clip(jnp.nan_to_num(jnp.ceil(bin_size), nan=0.0), 0.0, float(max_samples))
  slot = jnp.arange(slots, dtype=jnp.float32)
  grid = (jnp.arange(output_size, dtype=jnp.float32)[None, :, None]
          + (slot[None, None, :] + 0.5) / jnp.maximum(count, 1.0)[:, None, None])            # [R, out, s]
  coord = start[:, None, None] + grid * bin_size[:, None, None]                              # [R, out, s]
  size = size[:, None, None]
  inside = (coord >= -1.0) & (coord <= size.astype(jnp.float32)) & (slot < count[:, None, None])
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord).astype(jnp.int32)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  coord = jnp.where(at_edge, low.astype(jnp.float32), coord)
  frac = coord - low.astype(jnp.float32)
  # where, not a 0/1 factor: a NaN RoI (e.g. a padded row) then gives exact zeros and zero feature gradients.
  return low, high, jnp.where(inside, 1.0 - frac, 0.0), jnp.where(inside, frac, 0.0), count


def _roi_align_flat(flat, rois, offset, height, width, spatial_scale, output_size, sampling_ratio, aligned,
                    max_samples=0, bound_h=None, bound_w=None):
  """flat [N, C] (one or more maps flattened row-major and concatenated); per RoI: rois [R, 4] pixel xyxy,
  offset [R] int32 (start of its map in flat), height/width [R] int32, spatial_scale [R] -> [R, out, out, C].
  bound_h / bound_w [R] int32 (default height / width): the rows / columns the samples see (the bounds of the
  module doc's rule), a top-left part of the map."""
  if sampling_ratio < 0 or (sampling_ratio == 0 and max_samples < 1):
    raise ValueError(f'sampling_ratio must be a static int >= 1, or 0 (adaptive) with max_samples >= 1, got '
                     f'sampling_ratio={sampling_ratio}, max_samples={max_samples}')
  rois = jax.lax.stop_gradient(jnp.asarray(rois, jnp.float32))
  scaled = rois * spatial_scale[:, None]
  bound_h = height if bound_h is None else bound_h
  bound_w = width if bound_w is None else bound_w
  y_low, y_high, wy_low, wy_high, y_count = _axis_samples(scaled[:, 1], scaled[:, 3], bound_h, output_size,
                                                          sampling_ratio, aligned, max_samples)
  x_low, x_high, wx_low, wx_high, x_count = _axis_samples(scaled[:, 0], scaled[:, 2], bound_w, output_size,
                                                          sampling_ratio, aligned, max_samples)
  slots = sampling_ratio if sampling_ratio > 0 else max_samples
  # Per axis, the 2 * slots (sample, corner) positions in (sample, low/high) order: [R, out, 2 * slots].
  y_pos = jnp.stack([y_low, y_high], axis=-1).reshape(*y_low.shape[:2], 2 * slots)
  y_wgt = jnp.stack([wy_low, wy_high], axis=-1).reshape(*y_low.shape[:2], 2 * slots)
  x_pos = jnp.stack([x_low, x_high], axis=-1).reshape(*x_low.shape[:2], 2 * slots)
  x_wgt = jnp.stack([wx_low, wx_high], axis=-1).reshape(*x_low.shape[:2], 2 * slots)
  rows = offset[:, None, None] + y_pos * width[:, None, None]                                  # [R, out, 2s]

  def add_term(out, term):
    # Term (y sample/corner, x sample/corner) = divmod(term, 2 * slots): one gather of [R, out, out, C].
    iy, ix = jnp.divmod(term, 2 * slots)
    index = rows[:, :, iy][:, :, None] + x_pos[:, None, :, ix]                                 # [R, out, out]
    weight = y_wgt[:, :, iy][:, :, None] * x_wgt[:, None, :, ix]
    return out + weight[..., None].astype(flat.dtype) * jnp.take(flat, index, axis=0, mode='clip'), None

  # A loop (lax.scan), not 4 * slots^2 unrolled terms: one gather (and, in the backward pass, one scatter-add
  # into one carried [N, C] gradient) compiled once instead of 144 of each for the adaptive rule's 6 slots,
  # which XLA:TPU compiled for minutes and kept as 144 full-map gradient buffers. Same terms, same order.
  out = jnp.zeros((rois.shape[0], output_size, output_size, flat.shape[-1]), flat.dtype)
  out, _ = jax.lax.scan(add_term, out, jnp.arange(4 * slots * slots, dtype=jnp.int32))
  if sampling_ratio > 0:
    return out / (sampling_ratio * sampling_ratio)
  divisor = jnp.maximum(y_count * x_count, 1.0)   # mmcv: max(n_y * n_x, 1)
  return out / divisor[:, None, None, None].astype(flat.dtype)


def roi_align(features: jnp.ndarray, rois: jnp.ndarray, *, spatial_scale: float, output_size: int = 7,
              sampling_ratio: int = 2, aligned: bool = True, max_samples: int = 0) -> jnp.ndarray:
  """RoIAlign on one map: features [H, W, C], rois [R, 4] pixel xyxy (canvas pixels) -> [R, out, out, C].

  See the module docstring for the exact semantics; spatial_scale = 1 / stride of the map.
  """
  height, width, channels = features.shape
  num = rois.shape[0]
  return _roi_align_flat(features.reshape(height * width, channels), rois, jnp.zeros((num,), jnp.int32),
                         jnp.full((num,), height, jnp.int32), jnp.full((num,), width, jnp.int32),
                         jnp.full((num,), spatial_scale, jnp.float32), output_size, sampling_ratio, aligned,
                         max_samples)


def multilevel_roi_align(feature_maps: Sequence[jnp.ndarray], rois: jnp.ndarray, strides: Sequence[int], *,
                         output_size: int = 7, sampling_ratio: int = 2, finest_scale: float = 56.0,
                         aligned: bool = True, max_samples: int = 0,
                         extent_hw: jnp.ndarray | None = None) -> jnp.ndarray:
  """mmdet SingleRoIExtractor: each RoI pooled from the level `map_roi_levels` picks for it.

  Args:
    feature_maps: L maps [B, H_l, W_l, C] (finest first), strides: their L strides in canvas pixels.
    rois: [B, R, 4] pixel xyxy.
    extent_hw: optional [L, 2] int32, the rows and columns of each map that exist (the batch's extent at that
      level: mmcv's map is the batch tensor's, so a sample at or past its last row uses that row alone, and one
      past it by more than a pixel is 0); default the whole maps.

  Returns [B, R, out, out, C]. The maps of one image are flattened and concatenated ([B, sum H_l W_l, C], one
  copy of the features) and every RoI gathers from its level's slice (level offsets), so each of the 4 * s^2
  accumulated gather terms is [B, R, out, out, C] (see the module docstring); no per-level masking or
  recomputation.
  """
  if len(feature_maps) != len(strides):
    raise ValueError(f'{len(feature_maps)} feature maps but {len(strides)} strides')
  num_levels = len(feature_maps)
  shapes = [(int(f.shape[1]), int(f.shape[2])) for f in feature_maps]
  starts = [0]
  for h, w in shapes:
    starts.append(starts[-1] + h * w)
  batch, channels = feature_maps[0].shape[0], feature_maps[0].shape[-1]
  flat = jnp.concatenate([f.reshape(batch, -1, channels) for f in feature_maps], axis=1)
  level = map_roi_levels(rois, num_levels, finest_scale)                                    # [B, R]
  offset = jnp.asarray(starts[:-1], jnp.int32)[level]
  height = jnp.asarray([h for h, _ in shapes], jnp.int32)[level]
  width = jnp.asarray([w for _, w in shapes], jnp.int32)[level]
  scale = jnp.asarray([1.0 / s for s in strides], jnp.float32)[level]
  if extent_hw is None:
    bound_h, bound_w = height, width
  else:
    bound_h = jnp.asarray(extent_hw, jnp.int32)[level, 0]
    bound_w = jnp.asarray(extent_hw, jnp.int32)[level, 1]
  fn = lambda f, r, o, h, w, s, bh, bw: _roi_align_flat(f, r, o, h, w, s, output_size, sampling_ratio,  # noqa
                                                        aligned, max_samples, bh, bw)
  return jax.vmap(fn)(flat, rois, offset, height, width, scale, bound_h, bound_w)
