"""Pictures people would rather look at: detections drawn on images, query heatmaps (paper Fig. 2)."""

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
  """Distinct, bright colours, one per class (evenly spaced hues)."""
  return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(1, num_classes), 0.9, 1.0))
          for i in range(num_classes)]


def draw_detections(image: np.ndarray | Image.Image, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    class_names: tuple[str, ...] | list[str], score_threshold: float = 0.3,
                    line_width: int = 2) -> Image.Image:
  """Draws boxes with 'class score' tags.

  Args:
    image: [H, W, 3] uint8 RGB array or a PIL image (original resolution).
    boxes: [K, 4] xyxy pixels; labels: [K] 0-based class indices; scores: [K] in [0, 1].
    class_names: name per label. score_threshold: detections below are not drawn.
  Returns:
    A new RGB PIL image.
  """
  image = image.copy() if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
  image = image.convert('RGB')
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  colors = class_colors(len(class_names))
  order = np.argsort(np.asarray(scores))  # draw the most confident last, on top
  for i in order:
    score = float(scores[i])
    if score < score_threshold:
      continue
    label = int(labels[i])
    color = colors[label % len(colors)]
    x0, y0, x1, y1 = (float(v) for v in boxes[i])
    draw.rectangle([x0, y0, x1, y1], outline=color, width=line_width)
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    tag = f'{name} {score:.2f}'
    tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), tag, font=font)
    ty = max(0.0, y0 - (ty1 - ty0) - 2)
    draw.rectangle([x0, ty, x0 + (tx1 - tx0) + 2, ty + (ty1 - ty0) + 2], fill=color)
    draw.text((x0 + 1, ty), tag, fill=(0, 0, 0), font=font)
  return image


def heatmap_overlay(image: np.ndarray | Image.Image, points_xy: np.ndarray, weights: np.ndarray | None = None,
                    sigma: float = 6.0, alpha: float = 0.55) -> Image.Image:
  """Overlays a density heatmap of query positions (e.g. selected encoder proposals, IAH positives).

  Args:
    image: [H, W, 3] uint8 or PIL image.
    points_xy: [N, 2] pixel coordinates (x, y) of the queries.
    weights: optional [N] non-negative weights (e.g. scores); default 1.
    sigma: Gaussian splat radius in pixels.
  """
  image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
  image = image.convert('RGB')
  w, h = image.size
  # Splat on a coarse grid (fast for thousands of points), then upsample.
  stride = max(1, int(sigma // 2))
  gh, gw = (h + stride - 1) // stride, (w + stride - 1) // stride
  density = np.zeros((gh, gw), np.float64)
  pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
  wts = np.ones(len(pts)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
  if len(pts):
    gx = np.clip((pts[:, 0] / stride).astype(int), 0, gw - 1)
    gy = np.clip((pts[:, 1] / stride).astype(int), 0, gh - 1)
    np.add.at(density, (gy, gx), wts)
    radius = max(1, int(round(sigma / stride * 2)))
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps * stride / sigma) ** 2)
    density = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode='same'), 1, density)
    density = np.apply_along_axis(lambda c: np.convolve(c, kernel, mode='same'), 0, density)
  peak = density.max()
  norm = density / peak if peak > 0 else density
  heat = Image.fromarray((norm * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
  heat = np.asarray(heat, np.float64) / 255.0
  # 'Jet'-like ramp without matplotlib: blue -> green -> red.
  rgb = np.stack([np.clip(1.5 - np.abs(4 * heat - 3), 0, 1), np.clip(1.5 - np.abs(4 * heat - 2), 0, 1),
                  np.clip(1.5 - np.abs(4 * heat - 1), 0, 1)], -1)
  base = np.asarray(image, np.float64) / 255.0
  mix = alpha * heat[..., None]
  out = base * (1 - mix) + rgb * mix
  return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))
