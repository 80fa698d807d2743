"""Drawn detections land where the boxes are; heatmaps peak where the queries are."""

import numpy as np

from mrqm_jax import visualize


def test_draw_detections_colours_box_outline_only_above_threshold():
  image = np.zeros((64, 80, 3), np.uint8)
  boxes = np.array([[10, 20, 30, 40], [50, 5, 70, 25]], np.float32)
  out = np.asarray(visualize.draw_detections(image, boxes, np.array([0, 1]), np.array([0.9, 0.1]),
                                             ('car', 'bus'), score_threshold=0.3))
  color = np.array(visualize.class_colors(2)[0])
  assert (out[40, 20] == color).all()          # bottom edge of the drawn box
  assert (out[30, 20] == 0).all()              # inside stays untouched
  assert (out[15:26, 50:71] == 0).all()        # the low-score box is not drawn
  assert out.shape == image.shape


def test_heatmap_peaks_at_points():
  image = np.full((100, 120, 3), 128, np.uint8)
  out = np.asarray(visualize.heatmap_overlay(image, np.array([[30.0, 70.0]] * 5), sigma=6), np.float64)
  change = np.abs(out - 128).sum(-1)
  y, x = np.unravel_index(np.argmax(change), change.shape)
  assert abs(x - 30) <= 6 and abs(y - 70) <= 6
  assert change[5, 110] < change[70, 30] / 10
