"""Exact greedy NMS as a jittable, static-shaped op (mmcv / torchvision semantics)."""

import jax
import jax.numpy as jnp

from mrqm_jax.ops import boxes as box_ops


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float, valid: jnp.ndarray | None = None
        ) -> jnp.ndarray:
  """Greedy non-maximum suppression: boxes [N, 4] xyxy, scores [N] -> keep [N] bool (in input order).

  Visits boxes by descending score (equal scores: lower index first, a stable sort); a visited box that is
  still alive is kept and removes every later box whose IoU with it is > iou_threshold (strictly, as mmcv and
  torchvision). IoU uses areas (x1 - x0) * (y1 - y0) without +1 (mmcv offset=0); a zero-area box has IoU 0
  with everything, so it suppresses nothing and is suppressed by nothing. Invalid boxes (valid False, or a
  NaN score) are never kept and suppress nothing.

  Cost: N sequential steps of O(N) each (one IoU row per step), no [N, N] matrix.
  """
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  scores = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
  n = boxes.shape[0]
  if n == 0:
    return jnp.zeros((0,), bool)
  alive = ~jnp.isnan(scores)
  if valid is not None:
    alive &= jnp.asarray(valid, bool)
  # Invalid entries sort last (their key is +inf) and start dead, so they neither stay nor suppress.
  order = jnp.argsort(jnp.where(alive, -scores, jnp.inf), stable=True)
  sorted_boxes = jnp.where(alive[order][:, None], boxes[order], 0.0)
  positions = jnp.arange(n)

  def step(i, keep):
    iou = box_ops.elementwise_iou(sorted_boxes[i][None, :], sorted_boxes)
    suppress = keep[i] & (positions > i) & (iou > iou_threshold)
    return keep & ~suppress

  keep_sorted = jax.lax.fori_loop(0, n, step, alive[order])
  return jnp.zeros((n,), bool).at[order].set(keep_sorted)
