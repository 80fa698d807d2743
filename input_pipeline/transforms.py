"""tf ops turning one image and its annotations into a static-shape example of the batch contract.

Geometry (all sizes in pixels; the model's canvas is `config.input.image_size = (H, W)`):

  window   the part of the source image an example shows: the whole image, or one slicing patch
           [x0, x0 + window_w) x [y0, y0 + window_h) that may reach past the image (small images are padded).
  content  window ∩ image, decoded from the file: [content_h, content_w, 3], at the window's top-left.
  scale    one factor for both axes (`resize_factors`, on the host, per example): `input.resize_rule='mmdet'`
           (Co-DINO's keep-ratio Resize, scale `input.resize_scale` = (1333, 800)): min(1333 / long side,
           800 / short side), capped at the canvas fit below when the image would not fit the static canvas (a
           portrait image at 800 x 1344); 'fit_canvas': min(H / window_h, W / window_w), the largest factor that
           fits the canvas. Applied exactly (`resize_exact`), so the single `scale` of the batch contract
           inverts the mapping without error: canvas px = content px * scale.
  canvas   the resized content at the top-left of a zero [H, W, 3] canvas; `pad_mask` is True on every canvas
           pixel whose centre lies outside the resized content (DETR convention: True = padding).

Boxes follow the same map: content-pixel xyxy * scale, then cxcywh normalized by the padded canvas (W, H), not by
the image, as DESIGN.md's contract requires. Ignore regions stay xyxy, normalized the same way.

Annotation counts are static per example (`max_boxes`, `max_ignore`). Images with more are handled in Python
before anything reaches tf.data (`limit_annotations`): each is logged and counted in an `OverflowReport`, then
either the first `max_boxes` targets / `max_ignore` regions in reader order are kept (default) or, with
`strict=True` (`config.dataset.strict_max_boxes`), a ValueError names the image. The in-graph padding asserts
the limit instead of cutting, so nothing is ever dropped silently.
"""

import dataclasses

from absl import logging
import numpy as np
import tensorflow as tf

JPEG_MARGIN = 16  # px: one 4:2:0 MCU

# ---------------------------------------------------------------------------------------------- Python side
@dataclasses.dataclass
class OverflowReport:
  """Examples that had more annotations than the static limits, and what was dropped from them.

  Attributes:
    max_boxes, max_ignore: the limits (config.dataset.max_boxes / max_ignore).
    images_over_max_boxes: examples with more than max_boxes targets.
    dropped_boxes: targets dropped from them (all beyond the first max_boxes).
    images_over_max_ignore, dropped_ignore: the same for ignore regions.
    names: the first `max_names` offending example names.
  """
  max_boxes: int
  max_ignore: int
  images_over_max_boxes: int = 0
  dropped_boxes: int = 0
  images_over_max_ignore: int = 0
  dropped_ignore: int = 0
  names: list = dataclasses.field(default_factory=list)
  max_names: int = 20

  def summary(self) -> str:
    if not (self.images_over_max_boxes or self.images_over_max_ignore):
      return f'no example over max_boxes={self.max_boxes} / max_ignore={self.max_ignore}'
    return (f'{self.images_over_max_boxes} example(s) over max_boxes={self.max_boxes} '
            f'({self.dropped_boxes} targets dropped), {self.images_over_max_ignore} over '
            f'max_ignore={self.max_ignore} ({self.dropped_ignore} ignore regions dropped); e.g. '
            + ', '.join(self.names[:5]))


def limit_annotations(name: str, boxes: np.ndarray, labels: np.ndarray, ignore: np.ndarray, *,
                      max_boxes: int, max_ignore: int, strict: bool, report: OverflowReport
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Caps one example's annotations at the static limits, logging and counting every cap.

  Args:
    name: the example's name, for messages.
    boxes [N, 4], labels [N], ignore [R, 4]: its annotations (any coordinates).
    max_boxes, max_ignore: static limits.
    strict: raise instead of capping.
    report: counts are added here.

  Returns:
    (boxes [min(N, max_boxes), 4], labels, ignore [min(R, max_ignore), 4]): the first rows in reader order.

  Raises:
    ValueError naming the example and the config key when `strict` and a limit is exceeded.
  """
  over_boxes, over_ignore = len(boxes) > max_boxes, len(ignore) > max_ignore
  if not (over_boxes or over_ignore):
    return boxes, labels, ignore
  what = []
  if over_boxes:
    what.append(f'{len(boxes)} targets > config.dataset.max_boxes={max_boxes}')
  if over_ignore:
    what.append(f'{len(ignore)} ignore regions > config.dataset.max_ignore={max_ignore}')
  message = f'{name}: ' + ' and '.join(what)
  if strict:
    raise ValueError(message + ' (raise the limit, or set config.dataset.strict_max_boxes=False to keep the '
                     'first ones)')
  if over_boxes:
    report.images_over_max_boxes += 1
    report.dropped_boxes += len(boxes) - max_boxes
  if over_ignore:
    report.images_over_max_ignore += 1
    report.dropped_ignore += len(ignore) - max_ignore
  if len(report.names) < report.max_names:
    report.names.append(name)
  logging.warning('%s: keeping the first ones', message)
  return boxes[:max_boxes], labels[:max_boxes], ignore[:max_ignore]


# ---------------------------------------------------------------------------------------------- tf ops
def decode_content(contents: tf.Tensor, image_hw: tf.Tensor, origin_xy: tf.Tensor,
                   content_hw: tf.Tensor) -> tf.Tensor:
  """Decodes the content rectangle of an encoded image (JPEG: only that rectangle is decoded).

  Args:
    contents: scalar string, the encoded file (JPEG, PNG, BMP or GIF).
    image_hw: [2] int32 the image size the record claims; a file of another size fails (InvalidArgumentError),
      since its boxes would not line up.
    origin_xy: [2] int32 top-left (x, y) of the rectangle.
    content_hw: [2] int32 its (height, width), inside the image.

  Returns:
    [content_h, content_w, 3] uint8 RGB.
  """
  image_hw = tf.cast(image_hw, tf.int32)
  origin_xy = tf.cast(origin_xy, tf.int32)
  content_hw = tf.cast(content_hw, tf.int32)

  def check_size(actual_hw):
    return tf.debugging.assert_equal(actual_hw, image_hw,
                                     message='decoded image size (h, w) differs from the record')

  def jpeg():
    with tf.control_dependencies([check_size(tf.io.extract_jpeg_shape(contents)[:2])]):
      # libjpeg upsamples chroma from neighbouring blocks: a crop decoded flush with its edges differs from the
      # full decode along them. Decoding JPEG_MARGIN more px on every side (within the image) and slicing them
      # off gives exactly the full decode's pixels.
      start_yx = tf.maximum(origin_xy[::-1] - JPEG_MARGIN, 0)
      end_yx = tf.minimum(origin_xy[::-1] + content_hw + JPEG_MARGIN, image_hw)
      decoded = tf.io.decode_and_crop_jpeg(contents, tf.concat([start_yx, end_yx - start_yx], 0), channels=3)
      offset = origin_xy[::-1] - start_yx
      return decoded[offset[0]:offset[0] + content_hw[0], offset[1]:offset[1] + content_hw[1]]

  def other():
    image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    with tf.control_dependencies([check_size(tf.shape(image)[:2])]):
      return image[origin_xy[1]:origin_xy[1] + content_hw[0], origin_xy[0]:origin_xy[0] + content_hw[1]]

  image = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


def flip_horizontal(image: tf.Tensor, boxes: tf.Tensor, ignore: tf.Tensor
                    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Mirrors image [h, w, C] left-right and its pixel-xyxy boxes [N, 4] and ignore regions [R, 4] with it."""
  width = tf.cast(tf.shape(image)[1], tf.float32)

  def mirror(xyxy):
    x0, y0, x1, y1 = tf.unstack(xyxy, axis=-1)
    return tf.stack([width - x1, y0, width - x0, y1], axis=-1)

  return tf.reverse(image, [1]), mirror(boxes), mirror(ignore)  # tf.reverse: far faster than image[:, ::-1] here


def random_flip(image: tf.Tensor, boxes: tf.Tensor, ignore: tf.Tensor, seed: tf.Tensor
                ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """`flip_horizontal` with probability 1/2, decided by the stateless `seed` [2] int (same seed, same result)."""
  coin = tf.random.stateless_uniform([], seed=seed, alg='philox')
  return tf.cond(coin < 0.5, lambda: flip_horizontal(image, boxes, ignore), lambda: (image, boxes, ignore))


RESIZE_RULES = ('mmdet', 'fit_canvas')


def resize_factors(window_hw: np.ndarray, canvas_hw: tuple[int, int], rule: str,
                   resize_scale: tuple[float, float] = (1333, 800)) -> tuple[np.ndarray, np.ndarray]:
  """Per-example resize factors: window_hw [N, 2] (h, w) -> (scale [N] f32, capped [N] bool).

  rule 'fit_canvas': the largest factor at which the window fits the canvas (H, W). 'mmdet': mmcv's keep-ratio
  rescale to `resize_scale` (its larger entry bounds the long side, the smaller the short side), i.e.
  min(max(resize_scale) / long side, min(resize_scale) / short side); where that would not fit the canvas, the
  fit factor instead (`capped` True: the caller counts and reports these).
  """
  window = np.asarray(window_hw, np.float32).reshape(-1, 2)
  canvas = np.asarray(canvas_hw, np.float32)
  fit = np.minimum(canvas[0] / window[:, 0], canvas[1] / window[:, 1])   # f32 as the tf graph computed it
  if rule == 'fit_canvas':
    return fit, np.zeros(len(window), bool)
  if rule != 'mmdet':
    raise ValueError(f'input.resize_rule must be one of {RESIZE_RULES}, got {rule!r}')
  long_max, short_max = np.float32(max(resize_scale)), np.float32(min(resize_scale))
  mmdet = np.minimum(long_max / window.max(axis=1), short_max / window.min(axis=1))
  capped = mmdet > fit
  return np.where(capped, fit, mmdet).astype(np.float32), capped


def fit_scale(window_hw: tf.Tensor, canvas_hw: tuple[int, int]) -> tf.Tensor:
  """Scalar f32: the largest factor at which the window [2] (h, w) fits inside the canvas (H, W)."""
  window_hw = tf.cast(window_hw, tf.float32)
  return tf.minimum(canvas_hw[0] / window_hw[0], canvas_hw[1] / window_hw[1])


def resized_size(content_hw: tf.Tensor, scale: tf.Tensor, canvas_hw: tuple[int, int]) -> tf.Tensor:
  """[2] int32: canvas pixels whose centre lies inside the scaled content, i.e. ceil(extent - 1/2) per axis.

  Pixel j (centre j + 1/2) is content iff j + 1/2 <= content * scale; clipped to [1, canvas].
  """
  extent = tf.cast(content_hw, tf.float32) * scale
  size = tf.cast(tf.math.ceil(extent - 0.5), tf.int32)
  return tf.clip_by_value(size, 1, tf.constant(canvas_hw, tf.int32))


def resize_exact(image: tf.Tensor, scale: tf.Tensor, size_hw: tf.Tensor) -> tf.Tensor:
  """Bilinear resample of image [h, w, C] by exactly `scale` on both axes into [size_h, size_w, C] f32.

  Output pixel centre u samples the input at u / scale on both axes (half-pixel centres, edges clamped), so
  boxes scaled by `scale` stay on their pixels. tf.image.resize alone would stretch h -> size_h and
  w -> size_w, two factors that differ after rounding unless h * scale and w * scale are both integers
  (1360x765, 1920x1080 and 960x540 into 800x1344 are; 2000x1500 is not). It computes the same samples and is
  much faster than ScaleAndTranslate, so it is used whenever the sizes are exact (and a copy at scale 1).
  Bilinear without antialiasing, like mmcv's cv2 INTER_LINEAR resize.
  """
  in_hw = tf.cast(tf.shape(image)[:2], tf.float32)
  exact_sizes = tf.reduce_all(tf.abs(in_hw * scale - tf.cast(size_hw, tf.float32)) < 1e-3)

  def stretch():  # exact here: size / input = scale on both axes
    return tf.image.resize(image, size_hw, method='bilinear', antialias=False)

  def resample():
    scales = tf.stack([scale, scale])
    return tf.raw_ops.ScaleAndTranslate(images=image[None], size=size_hw, scale=scales,
                                        translation=tf.zeros([2], tf.float32), kernel_type='triangle',
                                        antialias=False)[0]

  same = tf.logical_and(tf.equal(scale, 1.0), tf.reduce_all(tf.equal(size_hw, tf.shape(image)[:2])))
  return tf.case([(same, lambda: tf.cast(image, tf.float32)), (exact_sizes, stretch)], default=resample)


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """(image - mean) / std per channel; image [h, w, 3] in 0..255, mean/std 3 floats in 0..255."""
  mean = tf.constant(mean, tf.float32)
  inv_std = 1.0 / tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) - mean) * inv_std


def pad_to_canvas(image: tf.Tensor, canvas_hw: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
  """Places image [h, w, C] (h <= H, w <= W) at the top-left of a zero canvas.

  Returns (image [H, W, C], pad_mask [H, W] bool, True where the canvas pixel is padding).
  """
  height, width = canvas_hw
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  canvas = tf.pad(image, [[0, height - h], [0, width - w], [0, 0]])
  canvas = tf.ensure_shape(canvas, [height, width, image.shape[-1]])
  inside = (tf.range(height) < h)[:, None] & (tf.range(width) < w)[None, :]
  return canvas, tf.logical_not(inside)


def regions_to_canvas_xyxy(regions_xyxy: tf.Tensor, scale: tf.Tensor, canvas_hw: tuple[int, int]) -> tf.Tensor:
  """Content-pixel xyxy [R, 4] -> xyxy [R, 4] normalized by the canvas (W, H), clipped to [0, 1]."""
  height, width = canvas_hw
  norm = tf.constant([width, height, width, height], tf.float32)
  return tf.clip_by_value(tf.cast(regions_xyxy, tf.float32) * scale / norm, 0.0, 1.0)


def boxes_to_canvas_cxcywh(boxes_xyxy: tf.Tensor, scale: tf.Tensor, canvas_hw: tuple[int, int]) -> tf.Tensor:
  """Content-pixel xyxy [N, 4] -> cxcywh [N, 4] normalized by the canvas (W, H), clipped to [0, 1]."""
  x0, y0, x1, y1 = tf.unstack(regions_to_canvas_xyxy(boxes_xyxy, scale, canvas_hw), axis=-1)
  return tf.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def pad_rows(values: tf.Tensor, num_rows: int) -> tuple[tf.Tensor, tf.Tensor]:
  """values [n, ...] -> (values zero-padded to [num_rows, ...], valid [num_rows] bool).

  Asserts n <= num_rows: counts are capped (and counted) in Python by `limit_annotations`, never here.
  """
  n = tf.shape(values)[0]
  check = tf.debugging.assert_less_equal(n, num_rows, message='more annotations than the static limit')
  with tf.control_dependencies([check]):
    paddings = tf.concat([[[0, num_rows - n]], tf.zeros([tf.rank(values) - 1, 2], tf.int32)], axis=0)
    padded = tf.pad(values, paddings)
  padded = tf.ensure_shape(padded, [num_rows] + values.shape[1:].as_list())
  return padded, tf.range(num_rows) < n


def preprocess(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, ignore: tf.Tensor, *,
               window_hw: tf.Tensor, canvas_hw: tuple[int, int], mean, std, max_boxes: int, max_ignore: int,
               flip_seed: tf.Tensor | None = None, scale: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
  """Decoded content -> the per-example tensors of the batch contract.

  Args:
    image: [h, w, 3] uint8 content (window ∩ image, top-left aligned with the window).
    boxes: [N, 4] f32 content-pixel xyxy targets; labels [N] int32; ignore [R, 4] content-pixel xyxy.
    window_hw: [2] the window's (height, width) (padding past the image included).
    canvas_hw: static (H, W).
    mean, std: RGB normalization in 0..255.
    max_boxes, max_ignore: static M, R.
    flip_seed: [2] int stateless seed for a random horizontal flip; None = no flip.
    scale: [] f32 resize factor (`resize_factors`); None = `fit_scale` of the window.

  Returns:
    {'image' [H, W, 3] f32, 'pad_mask' [H, W] bool, 'boxes' [M, 4] cxcywh, 'labels' [M] i32, 'box_valid' [M],
     'ignore' [R, 4] xyxy, 'ignore_valid' [R], 'scale' [] f32}; boxes/ignore normalized by the canvas.
  """
  boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
  ignore = tf.reshape(tf.cast(ignore, tf.float32), [-1, 4])
  if flip_seed is not None:
    image, boxes, ignore = random_flip(image, boxes, ignore, flip_seed)
  scale = fit_scale(window_hw, canvas_hw) if scale is None else tf.cast(scale, tf.float32)
  size = resized_size(tf.shape(image)[:2], scale, canvas_hw)
  pixels = normalize(resize_exact(image, scale, size), mean, std)
  canvas, pad_mask = pad_to_canvas(pixels, canvas_hw)
  boxes, box_valid = pad_rows(boxes_to_canvas_cxcywh(boxes, scale, canvas_hw), max_boxes)
  labels, _ = pad_rows(tf.cast(tf.reshape(labels, [-1]), tf.int32), max_boxes)
  ignore, ignore_valid = pad_rows(regions_to_canvas_xyxy(ignore, scale, canvas_hw), max_ignore)
  return {'image': canvas, 'pad_mask': pad_mask, 'boxes': boxes, 'labels': labels, 'box_valid': box_valid,
          'ignore': ignore, 'ignore_valid': ignore_valid, 'scale': scale}
