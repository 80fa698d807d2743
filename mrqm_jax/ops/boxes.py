"""Box conversions and overlap measures (IoU, GIoU); pure jnp, batched over leading dims, jittable.

Formats: `cxcywh` = (center x, center y, width, height); `xyxy` = (x0, y0, x1, y1) with x0 <= x1, y0 <= y1.
All functions accept any leading batch dims `[...]` and broadcast them like jnp arithmetic.

Degenerate boxes: widths/heights are clipped at 0, so an inverted box (x1 < x0) has zero area. Every division
is by `max(denominator, eps)`, which keeps values AND gradients finite for zero-area boxes (points, lines,
inverted boxes). Convention (same as mmdet's `bbox_overlaps`): a zero-area box has IoU 0 with every box,
itself included, and GIoU = IoU - (enclosing area - union) / max(enclosing area, eps).

`EPS` is 1e-9 rather than the usual 1e-6 because the model's boxes are normalized by the canvas: a 1x1-pixel
box on a 1333x800 canvas has area ~1e-6, so eps=1e-6 would halve its IoU. 1e-9 is far below any real box
area, while 1 / 1e-9**2 (the largest gradient factor) is still far from float32 overflow.
"""

import jax.numpy as jnp

EPS = 1e-9


def to_box_frame(boxes: jnp.ndarray, box_frame: jnp.ndarray) -> jnp.ndarray:
  """Canvas-normalized cxcywh [B, N, 4] -> the detector's box frame: / box_frame [B, 4] ((w, h, w, h) of each
  image's frame in canvas units; all ones in the 'canvas' frame, where this is exactly the input)."""
  return boxes / jnp.asarray(box_frame, boxes.dtype)[:, None, :]


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """[..., 4] cxcywh -> [..., 4] xyxy."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """[..., 4] xyxy -> [..., 4] cxcywh."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0], axis=-1)


def cxcywh_to_pixel_xyxy(boxes: jnp.ndarray, canvas_hw) -> jnp.ndarray:
  """[..., 4] cxcywh normalized by the canvas (H, W) -> [..., 4] canvas-pixel xyxy."""
  h, w = canvas_hw
  return cxcywh_to_xyxy(boxes) * jnp.asarray([w, h, w, h], jnp.float32)


def pixel_xyxy_to_cxcywh(boxes: jnp.ndarray, canvas_hw) -> jnp.ndarray:
  """Inverse of `cxcywh_to_pixel_xyxy`: [..., 4] canvas-pixel xyxy -> [..., 4] canvas-normalized cxcywh."""
  h, w = canvas_hw
  return xyxy_to_cxcywh(boxes / jnp.asarray([w, h, w, h], jnp.float32))


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """[..., 4] xyxy -> [...] area; inverted boxes have area 0."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.maximum(x1 - x0, 0.0) * jnp.maximum(y1 - y0, 0.0)


def _intersection_union(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """a, b [..., 4] xyxy (broadcastable) -> (intersection [...], union [...])."""
  top_left = jnp.maximum(a[..., :2], b[..., :2])
  bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(bottom_right - top_left, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a) + box_area(b) - inter
  return inter, union


def _enclosing_area(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """a, b [..., 4] xyxy (broadcastable) -> [...] area of the smallest box containing both."""
  top_left = jnp.minimum(a[..., :2], b[..., :2])
  bottom_right = jnp.maximum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(bottom_right - top_left, 0.0)
  return wh[..., 0] * wh[..., 1]


def elementwise_iou(a: jnp.ndarray, b: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
  """IoU of corresponding boxes: a, b [..., 4] xyxy (broadcastable) -> [...] in [0, 1]."""
  inter, union = _intersection_union(a, b)
  return inter / jnp.maximum(union, eps)


def elementwise_giou(a: jnp.ndarray, b: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
  """Generalized IoU of corresponding boxes: a, b [..., 4] xyxy (broadcastable) -> [...] in [-1, 1]."""
  inter, union = _intersection_union(a, b)
  iou = inter / jnp.maximum(union, eps)
  enclosing = _enclosing_area(a, b)
  return iou - (enclosing - union) / jnp.maximum(enclosing, eps)


def pairwise_iou(a: jnp.ndarray, b: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
  """IoU of every pair: a [..., N, 4], b [..., M, 4] xyxy -> [..., N, M]."""
  return elementwise_iou(a[..., :, None, :], b[..., None, :, :], eps)


def pairwise_giou(a: jnp.ndarray, b: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
  """Generalized IoU of every pair: a [..., N, 4], b [..., M, 4] xyxy -> [..., N, M]."""
  return elementwise_giou(a[..., :, None, :], b[..., None, :, :], eps)
