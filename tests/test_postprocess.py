"""postprocess: top-k over queries x classes and canvas -> original-pixel boxes, vs a NumPy reference."""

import jax
import numpy as np
import pytest

from mrqm_jax.ops import postprocess


def _numpy_detections(logits, boxes, canvas_hw, scale, origin, orig_size, k):
  """Per-image loop, written independently: sort all (query, class) scores, map boxes corner by corner."""
  h, w = canvas_hw
  out_boxes, out_scores, out_labels = [], [], []
  for b in range(logits.shape[0]):
    scores = 1.0 / (1.0 + np.exp(-logits[b].astype(np.float64)))  # [Q, C]
    pairs = sorted(((scores[q, c], q, c) for q in range(scores.shape[0]) for c in range(scores.shape[1])),
                   reverse=True)[:k]
    rows = []
    for _, q, _ in pairs:
      cx, cy, bw, bh = boxes[b, q]
      x0 = ((cx - bw / 2) * w) / scale[b] + origin[b, 0]
      x1 = ((cx + bw / 2) * w) / scale[b] + origin[b, 0]
      y0 = ((cy - bh / 2) * h) / scale[b] + origin[b, 1]
      y1 = ((cy + bh / 2) * h) / scale[b] + origin[b, 1]
      img_h, img_w = orig_size[b]
      rows.append([min(max(x0, 0), img_w), min(max(y0, 0), img_h), min(max(x1, 0), img_w),
                   min(max(y1, 0), img_h)])
    out_boxes.append(rows)
    out_scores.append([p[0] for p in pairs])
    out_labels.append([p[2] for p in pairs])
  return np.array(out_boxes), np.array(out_scores), np.array(out_labels)


def test_matches_numpy_reference():
  rng = np.random.default_rng(0)
  b, q, c, k = 3, 7, 5, 12
  logits = rng.normal(size=(b, q, c)).astype(np.float32) * 3
  boxes = np.concatenate([rng.uniform(0, 1, (b, q, 2)), rng.uniform(0.01, 0.6, (b, q, 2))], -1).astype(np.float32)
  canvas_hw = (96, 160)
  scale = np.array([0.5, 1.25, 2.0], np.float32)
  origin = np.array([[0, 0], [30, 12], [100, 7]], np.float32)
  orig_size = np.array([[150, 200], [60, 110], [90, 140]], np.int32)
  fn = jax.jit(lambda *a: postprocess.detections_from_outputs(
      *a[:2], canvas_hw=canvas_hw, scale=a[2], patch_origin=a[3], orig_size=a[4], num_detections=k))
  got = fn(logits, boxes, scale, origin, orig_size)
  want_boxes, want_scores, want_labels = _numpy_detections(logits, boxes, canvas_hw, scale, origin, orig_size, k)
  assert got['boxes'].shape == (b, k, 4) and got['scores'].shape == (b, k) and got['labels'].shape == (b, k)
  assert got['labels'].dtype == np.int32
  np.testing.assert_allclose(got['scores'], want_scores, rtol=1e-6)
  np.testing.assert_array_equal(got['labels'], want_labels)
  np.testing.assert_allclose(got['boxes'], want_boxes, rtol=1e-5, atol=1e-3)
  # Clipping really happened somewhere (boxes near the border / past the un-padded image).
  assert np.any(want_boxes == 0) and np.any(want_boxes[..., 2] == orig_size[:, None, 1])


def test_closed_form_box():
  # One query, canvas 100x200 (H, W), image resized by 0.5 into the canvas, patch at (10, 20):
  # cxcywh (0.5, 0.5, 0.2, 0.4) -> canvas xyxy (80, 30, 120, 70) -> /0.5 + origin = (170, 80, 250, 160).
  logits = np.array([[[2.0, -1.0]]], np.float32)
  boxes = np.array([[[0.5, 0.5, 0.2, 0.4]]], np.float32)
  got = postprocess.detections_from_outputs(
      logits, boxes, canvas_hw=(100, 200), scale=np.array([0.5], np.float32),
      patch_origin=np.array([[10.0, 20.0]], np.float32), orig_size=np.array([[1000, 1000]], np.int32),
      num_detections=2)
  np.testing.assert_allclose(got['boxes'][0, 0], [170, 80, 250, 160], rtol=1e-6)
  np.testing.assert_array_equal(got['labels'][0], [0, 1])
  np.testing.assert_allclose(got['scores'][0], 1 / (1 + np.exp([-2.0, 1.0])), rtol=1e-6)


def test_too_many_detections_is_a_clear_error():
  with pytest.raises(ValueError, match='max_detections'):
    postprocess.topk_queries_classes(np.zeros((1, 3, 2), np.float32), 7)
