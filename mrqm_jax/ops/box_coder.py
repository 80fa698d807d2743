"""mmdet 2.x `DeltaXYWHBBoxCoder` (means 0) as pure jnp; any leading dims, jittable.

Boxes are cxcywh in any frame (pixels or normalized), as long as anchors and boxes share it: the deltas are
frame-free (offsets in units of the anchor size, log size ratios). mmdet v2 defines the anchor center and size
as px = (x1 + x2) / 2, pw = x2 - x1 (no +1), which is exactly cxcywh, so no conversion convention is hidden here.
"""

import math
from typing import Sequence, Union

import jax.numpy as jnp

# mmdet's default `wh_ratio_clip=16/1000`: decoded widths/heights are at most 1000/16 times the anchor's.
DEFAULT_MAX_LOG_SCALE = abs(math.log(16.0 / 1000.0))

Stds = Union[Sequence[float], jnp.ndarray]

# target_stds of Co-DINO's dense heads (ATSS, and so the IAH) and of its RoI box head; its RPN uses UNIT_STDS.
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)
UNIT_STDS = (1.0, 1.0, 1.0, 1.0)


def encode_deltas(anchors: jnp.ndarray, boxes: jnp.ndarray, stds: Stds) -> jnp.ndarray:
  """Regression targets of `boxes` w.r.t. `anchors`: [..., 4] cxcywh each (broadcastable) -> [..., 4].

  deltas = ((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph)) / stds. Zero-size anchors or boxes give
  inf/NaN exactly as mmdet does; callers encode only positive (non-degenerate) pairs.
  """
  px, py, pw, ph = jnp.moveaxis(anchors, -1, 0)
  gx, gy, gw, gh = jnp.moveaxis(boxes, -1, 0)
  deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], axis=-1)
  return deltas / jnp.asarray(stds, deltas.dtype)


def decode_deltas(anchors: jnp.ndarray, deltas: jnp.ndarray, stds: Stds,
                  max_log_scale: float = DEFAULT_MAX_LOG_SCALE) -> jnp.ndarray:
  """Inverse of `encode_deltas`: anchors [..., 4] cxcywh, deltas [..., 4] -> boxes [..., 4] cxcywh.

  The de-normalized dw, dh are clipped to [-max_log_scale, max_log_scale] before exp (mmdet's wh_ratio_clip),
  so an untrained head cannot produce inf boxes; dx, dy are not clipped (mmdet's add_ctr_clamp=False default).
  """
  dx, dy, dw, dh = jnp.moveaxis(deltas * jnp.asarray(stds, deltas.dtype), -1, 0)
  dw = jnp.clip(dw, -max_log_scale, max_log_scale)
  dh = jnp.clip(dh, -max_log_scale, max_log_scale)
  px, py, pw, ph = jnp.moveaxis(anchors, -1, 0)
  return jnp.stack([px + pw * dx, py + ph * dy, pw * jnp.exp(dw), ph * jnp.exp(dh)], axis=-1)
