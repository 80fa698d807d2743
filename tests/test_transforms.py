"""tf transforms against NumPy references: flip, exact-scale bilinear resize, pad/mask geometry, box mapping,
normalization, decoding (JPEG crop window, PNG), and the max_boxes overflow policy."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from input_pipeline import transforms

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def test_flip_matches_numpy():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
  boxes = np.array([[0, 1, 3, 4], [2.5, 0, 7, 5]], np.float32)
  ignore = np.array([[1, 1, 2, 2]], np.float32)
  out_image, out_boxes, out_ignore = transforms.flip_horizontal(tf.constant(image), tf.constant(boxes),
                                                               tf.constant(ignore))
  np.testing.assert_array_equal(out_image, image[:, ::-1])
  np.testing.assert_array_equal(out_boxes, [[4, 1, 7, 4], [0, 0, 4.5, 5]])
  np.testing.assert_array_equal(out_ignore, [[5, 1, 6, 2]])


def test_flip_moves_box_with_its_pixels():
  image = np.zeros((6, 10, 1), np.uint8)
  image[1:4, 2:5] = 255  # box [2, 1, 5, 4] in xyxy pixel-edge coordinates
  out_image, out_boxes, _ = transforms.flip_horizontal(tf.constant(image), tf.constant([[2.0, 1, 5, 4]]),
                                                       tf.zeros([0, 4]))
  x0, y0, x1, y1 = out_boxes.numpy()[0].astype(int)
  painted = np.argwhere(out_image.numpy()[..., 0] == 255)
  assert (painted[:, 1].min(), painted[:, 1].max() + 1, painted[:, 0].min(), painted[:, 0].max() + 1) == (
      x0, x1, y0, y1)


def test_random_flip_is_a_function_of_the_seed():
  image = tf.constant(np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
  boxes, ignore = tf.constant([[0.0, 0, 1, 1]]), tf.zeros([0, 4])
  flipped = []
  for s in range(40):
    seed = tf.constant([7, s], tf.int64)
    a = transforms.random_flip(image, boxes, ignore, seed)[1].numpy()
    b = transforms.random_flip(image, boxes, ignore, seed)[1].numpy()
    np.testing.assert_array_equal(a, b)
    flipped.append(a[0, 0] == 1.0)
  assert 8 < sum(flipped) < 32  # both outcomes, roughly half


def _bilinear_reference(image, scale, size_hw):
  """Half-pixel-centre bilinear sampling at input coordinate (u + 1/2) / scale - 1/2, edges clamped."""
  h, w = image.shape[:2]

  def axis(n_out, n_in):
    x = (np.arange(n_out) + 0.5) / scale - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, x - lo

  ylo, yhi, fy = axis(size_hw[0], h)
  xlo, xhi, fx = axis(size_hw[1], w)
  img = image.astype(np.float64)
  top = img[ylo][:, xlo] * (1 - fx)[None, :, None] + img[ylo][:, xhi] * fx[None, :, None]
  bottom = img[yhi][:, xlo] * (1 - fx)[None, :, None] + img[yhi][:, xhi] * fx[None, :, None]
  return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


# (30, 45) -> exact integer sizes (tf.image.resize path); the others -> ScaleAndTranslate (up- and downscale).
@pytest.mark.parametrize('hw, canvas', [((30, 45), (16, 24)), ((17, 23), (40, 40)), ((50, 20), (32, 64)),
                                        ((765, 1360), (800, 1344))])
def test_resize_exact_matches_numpy_bilinear(hw, canvas):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, hw + (3,), dtype=np.uint8)
  scale = transforms.fit_scale(tf.constant(hw), canvas)
  size = transforms.resized_size(tf.constant(hw), scale, canvas)
  out = transforms.resize_exact(tf.constant(image), scale, size).numpy()
  s = float(scale)
  assert s == pytest.approx(min(canvas[0] / hw[0], canvas[1] / hw[1]))
  expected_size = [int(np.ceil(n * s - 0.5)) for n in hw]  # pixels whose centre is inside the scaled image
  assert list(out.shape[:2]) == expected_size
  # f32 sample coordinates near 1000 px carry ~1e-4 px error: <= 5e-2 of 255 on noise; a geometry error gives tens.
  np.testing.assert_allclose(out, _bilinear_reference(image, s, expected_size), atol=5e-2)


@pytest.mark.parametrize('w, h, mmdet, capped', [
    (2000, 1500, 800 / 1500, False),     # 4:3 landscape: the short side bounds it (1067 x 800), as fit_canvas
    (1920, 1080, 1333 / 1920, False),    # 16:9: the long side bounds it at 1333 px (fit_canvas: 1344)
    (960, 540, 1333 / 960, False),       # upscaled the same way
    (1500, 2000, 800 / 1500, True),      # portrait: mmdet's 800 x 1067 is taller than the 800 px canvas
    (1080, 1920, 1333 / 1920, True),
])
def test_resize_factors_mmdet_keep_ratio_and_canvas_cap(w, h, mmdet, capped):
  """mmcv keep-ratio rescale to (1333, 800): min(1333 / long, 800 / short); capped at the canvas fit."""
  canvas = (800, 1344)
  fit = min(800 / h, 1344 / w)
  scale, was_capped = transforms.resize_factors(np.array([[h, w]]), canvas, 'mmdet', (1333, 800))
  assert bool(was_capped[0]) == capped
  assert scale[0] == pytest.approx(fit if capped else mmdet, rel=1e-6)
  if capped:   # the portrait image at mmdet's scale would not fit; at the returned one it does, exactly
    assert h * mmdet > 800 and h * scale[0] == pytest.approx(800, rel=1e-6)
  # fit_canvas is bit-identical to the in-graph fit_scale (the v0.1-v0.3 rule)
  fit_only, none = transforms.resize_factors(np.array([[h, w]]), canvas, 'fit_canvas')
  assert fit_only[0] == transforms.fit_scale(tf.constant([h, w]), canvas).numpy() and not none.any()
  # the order of resize_scale does not matter (mmdet's (w, h) tuple means long / short bounds)
  np.testing.assert_array_equal(scale, transforms.resize_factors(np.array([[h, w]]), canvas, 'mmdet',
                                                                 (800, 1333))[0])


def test_preprocess_applies_a_given_scale():
  image = np.full((30, 60, 3), 100, np.uint8)
  ex = _example(image, np.array([[10, 5, 40, 25]], np.float32), [1], np.zeros((0, 4)), (40, 48), scale=0.5)
  assert ex['scale'] == 0.5
  assert (~ex['pad_mask']).sum(0).max() == 15 and (~ex['pad_mask']).sum(1).max() == 30   # 30 x 60 at 0.5
  np.testing.assert_allclose(ex['boxes'][0], [25 * 0.5 / 48, 15 * 0.5 / 40, 30 * 0.5 / 48, 20 * 0.5 / 40],
                             rtol=1e-6)


def test_resize_exact_at_scale_one_is_identity():
  image = np.random.default_rng(2).integers(0, 255, (9, 11, 3), dtype=np.uint8)
  out = transforms.resize_exact(tf.constant(image), tf.constant(1.0), tf.constant([9, 11]))
  np.testing.assert_array_equal(out, image.astype(np.float32))


def _example(image, boxes, labels, ignore, canvas, max_boxes=8, max_ignore=4, window=None, flip_seed=None,
             scale=None):
  window = image.shape[:2] if window is None else window
  return {k: v.numpy() for k, v in transforms.preprocess(
      tf.constant(image), tf.constant(boxes, tf.float32), tf.constant(labels, tf.int32),
      tf.constant(ignore, tf.float32), window_hw=tf.constant(window), canvas_hw=canvas, mean=MEAN, std=STD,
      max_boxes=max_boxes, max_ignore=max_ignore, flip_seed=flip_seed,
      scale=None if scale is None else tf.constant(scale, tf.float32)).items()}


def test_box_maps_to_the_same_pixels():
  # A uniform grey image with one white rectangle; after resize + pad the box must sit on the white pixels.
  h, w, canvas = 60, 90, (40, 48)
  image = np.full((h, w, 3), 100, np.uint8)
  box = np.array([30, 12, 66, 42], np.float32)
  image[12:42, 30:66] = 250
  ex = _example(image, box[None], [5], np.zeros((0, 4)), canvas)
  s = min(canvas[0] / h, canvas[1] / w)
  assert ex['scale'] == pytest.approx(s)
  cx, cy, bw, bh = ex['boxes'][0] * np.array([canvas[1], canvas[0], canvas[1], canvas[0]])
  np.testing.assert_allclose([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], box * s, atol=1e-4)
  white = (250 - MEAN[0]) / STD[0]
  grey = (100 - MEAN[0]) / STD[0]
  centres_y, centres_x = np.mgrid[0:canvas[0], 0:canvas[1]] + 0.5
  x0, y0, x1, y1 = box * s
  inside = (centres_x > x0 + 1) & (centres_x < x1 - 1) & (centres_y > y0 + 1) & (centres_y < y1 - 1)
  outside = ((centres_x < x0 - 1) | (centres_x > x1 + 1) | (centres_y < y0 - 1) | (centres_y > y1 + 1)) & \
      ~ex['pad_mask']
  np.testing.assert_allclose(ex['image'][..., 0][inside], white, atol=1e-4)
  np.testing.assert_allclose(ex['image'][..., 0][outside], grey, atol=1e-4)
  assert ex['labels'][0] == 5 and ex['box_valid'].tolist() == [True] + [False] * 7


def test_pad_mask_and_normalized_padding():
  h, w, canvas = 30, 20, (32, 64)  # height-limited: scale 32/30, content 32 x ceil(21.33 - .5) = 21
  image = np.full((h, w, 3), 200, np.uint8)
  ex = _example(image, np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4)), canvas)
  expected_mask = np.ones(canvas, bool)
  expected_mask[:32, :21] = False
  np.testing.assert_array_equal(ex['pad_mask'], expected_mask)
  np.testing.assert_array_equal(ex['image'][ex['pad_mask']], 0.0)
  np.testing.assert_allclose(ex['image'][~ex['pad_mask']],
                             np.broadcast_to((200 - np.array(MEAN)) / np.array(STD), (32 * 21, 3)), atol=1e-5)
  assert ex['box_valid'].sum() == 0 and ex['ignore_valid'].sum() == 0


def test_boxes_and_ignore_normalized_by_canvas_not_image():
  # 100x50 image into a 100x100 canvas: scale 1, so the normalized y values use H = 100, not the image's 50.
  image = np.zeros((50, 100, 3), np.uint8)
  ex = _example(image, [[10, 20, 30, 40]], [1], [[0, 0, 50, 25]], (100, 100))
  np.testing.assert_allclose(ex['boxes'][0], [0.2, 0.3, 0.2, 0.2], atol=1e-6)
  np.testing.assert_allclose(ex['ignore'][0], [0.0, 0.0, 0.5, 0.25], atol=1e-6)
  assert ex['ignore_valid'].tolist() == [True, False, False, False]


def test_window_larger_than_content_sets_scale_and_padding():
  # A 40x30 image shown in an 80x80 patch window (slicing pads small images): scale from the window.
  image = np.full((30, 40, 3), 50, np.uint8)
  ex = _example(image, [[0, 0, 40, 30]], [0], np.zeros((0, 4)), (40, 40), window=(80, 80))
  assert ex['scale'] == pytest.approx(0.5)
  assert (~ex['pad_mask']).sum() == 15 * 20 and not ex['pad_mask'][:15, :20].any()
  np.testing.assert_allclose(ex['boxes'][0], [0.25, 0.1875, 0.5, 0.375], atol=1e-6)


def test_flip_inside_preprocess_flips_boxes_and_ignore_with_image():
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, :10] = 255
  seeds = [tf.constant([0, s], tf.int64) for s in range(20)]
  seen = set()
  for seed in seeds:
    ex = _example(image, [[0, 0, 10, 20]], [0], [[0, 0, 10, 5]], (20, 40), flip_seed=seed)
    flipped = ex['image'][0, -1, 0] > 0
    seen.add(bool(flipped))
    expected_x = 0.875 if flipped else 0.125
    assert ex['boxes'][0, 0] == pytest.approx(expected_x)
    assert ex['ignore'][0, 0] == pytest.approx(0.75 if flipped else 0.0)
  assert seen == {True, False}


def test_pad_rows_asserts_instead_of_cutting():
  padded, valid = transforms.pad_rows(tf.ones([2, 4]), 3)
  np.testing.assert_array_equal(padded, [[1] * 4, [1] * 4, [0] * 4])
  assert valid.numpy().tolist() == [True, True, False]
  with pytest.raises(tf.errors.InvalidArgumentError, match='static limit'):
    transforms.pad_rows(tf.ones([4, 4]), 3)


def test_limit_annotations_counts_keeps_first_or_raises():
  report = transforms.OverflowReport(max_boxes=3, max_ignore=1)
  boxes = np.arange(20, dtype=np.float32).reshape(5, 4)
  labels = np.arange(5, dtype=np.int32)
  ignore = np.zeros((2, 4), np.float32)
  b, l, g = transforms.limit_annotations('dense', boxes, labels, ignore, max_boxes=3, max_ignore=1, strict=False,
                                         report=report)
  np.testing.assert_array_equal(b, boxes[:3])
  np.testing.assert_array_equal(l, [0, 1, 2])
  assert len(g) == 1
  assert (report.images_over_max_boxes, report.dropped_boxes, report.images_over_max_ignore,
          report.dropped_ignore, report.names) == (1, 2, 1, 1, ['dense'])
  assert 'dense' in report.summary()
  transforms.limit_annotations('fine', boxes[:3], labels[:3], ignore[:1], max_boxes=3, max_ignore=1,
                               strict=True, report=report)
  assert report.images_over_max_boxes == 1
  with pytest.raises(ValueError, match='dense: 5 targets > config.dataset.max_boxes=3'):
    transforms.limit_annotations('dense', boxes, labels, ignore[:1], max_boxes=3, max_ignore=1, strict=True,
                                 report=report)


def _encode(image, fmt):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, quality=95)
  return buffer.getvalue()


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_decode_content_crops_the_window(fmt):
  # The window sits inside the image with room on every side, so the JPEG crop decode's extra margin is used.
  rng = np.random.default_rng(3)
  image = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
  data = _encode(image, fmt)
  full = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  out = transforms.decode_content(tf.constant(data), tf.constant([48, 80]), tf.constant([24, 17]),
                                  tf.constant([14, 30]))
  assert out.shape == (14, 30, 3)
  reference = tf.io.decode_image(data, channels=3).numpy()  # TF's own full decode, cropped: bit-identical
  np.testing.assert_array_equal(out, reference[17:31, 24:54])
  if fmt == 'PNG':
    np.testing.assert_array_equal(out, full[17:31, 24:54])
  else:  # PIL's libjpeg build rounds differently (IDCT / chroma upsampling), a few levels on pure noise
    assert np.abs(out.numpy().astype(int) - full[17:31, 24:54]).max() <= 10


def test_decode_content_refuses_a_size_mismatch():
  data = _encode(np.zeros((24, 40, 3), np.uint8), 'PNG')
  with pytest.raises(tf.errors.InvalidArgumentError, match='differs from the record'):
    transforms.decode_content(tf.constant(data), tf.constant([40, 24]), tf.constant([0, 0]),
                              tf.constant([24, 24]))
