"""postprocess: top-k over queries x classes and canvas -> original-pixel boxes, vs a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input_pipeline import records as records_lib
from mrqm_jax.metrics.detections import Detections
from mrqm_jax.models import detector
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


def test_image_frame_box_maps_to_the_original_pixels():
  # A 2000x1500 (W x H) image resized by 800/1500 to 1066.67 x 800 px at the top-left of an 800x1344 canvas: its
  # pad mask leaves 1067 columns (pixel centres inside the content). In the 'image' frame a box is normalized by
  # 1067 x 800: cxcywh (0.5, 0.25, 0.2, 0.1) is canvas px x (533.5 +- 106.7), y (200 +- 40), i.e. original px
  # x 1000.3125 +- 200.0625, y 375 +- 75.
  pad = np.zeros((1, 800, 1344), bool)
  pad[:, :, 1067:] = True
  box_frame = detector.image_box_frame(pad)
  np.testing.assert_allclose(box_frame, [[1067 / 1344, 1.0, 1067 / 1344, 1.0]], rtol=1e-7)
  scale = 800 / 1500
  got = postprocess.detections_from_outputs(
      np.array([[[3.0]]], np.float32), np.array([[[0.5, 0.25, 0.2, 0.1]]], np.float32), canvas_hw=(800, 1344),
      scale=np.array([scale], np.float32), patch_origin=np.zeros((1, 2), np.float32),
      orig_size=np.array([[1500, 2000]], np.int32), num_detections=1, box_frame=box_frame)
  cx, w = 0.5 * 1067 / scale, 0.2 * 1067 / scale
  cy, h = 0.25 * 800 / scale, 0.1 * 800 / scale
  np.testing.assert_allclose(got['boxes'][0, 0], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], rtol=1e-5)
  # Read as canvas-normalized (no frame), the same numbers land 21% further left: the frame matters.
  canvas = postprocess.detections_from_outputs(
      np.array([[[3.0]]], np.float32), np.array([[[0.5, 0.25, 0.2, 0.1]]], np.float32), canvas_hw=(800, 1344),
      scale=np.array([scale], np.float32), patch_origin=np.zeros((1, 2), np.float32),
      orig_size=np.array([[1500, 2000]], np.int32), num_detections=1)
  np.testing.assert_allclose(canvas['boxes'][0, 0, 0], (0.5 - 0.1) * 1344 / scale, rtol=1e-5)


def test_too_many_detections_is_a_clear_error():
  with pytest.raises(ValueError, match='max_detections'):
    postprocess.topk_queries_classes(np.zeros((1, 3, 2), np.float32), 7)


# ------------------------------------------------------------------------------------------ soft-NMS


def _mmcv_soft_nms_reference(boxes, scores, iou_threshold, sigma, min_score, method):
  """mmcv's softnms_cpu kernel, statement by statement (swap-with-last discarding, float32 arithmetic).

  Returns (kept input indices in selection order, their decayed scores)."""
  x1, y1, x2, y2 = (boxes[:, i].astype(np.float32).copy() for i in range(4))
  sc = scores.astype(np.float32).copy()
  areas = (x2 - x1) * (y2 - y1)
  inds = np.arange(len(sc))
  out_scores = np.zeros(len(sc), np.float32)
  n = len(sc)
  i = 0
  while i < n:
    max_pos = i
    for pos in range(i + 1, n):
      if sc[max_pos] < sc[pos]:
        max_pos = pos
    for arr in (x1, y1, x2, y2, sc, areas, inds):
      arr[i], arr[max_pos] = arr[max_pos], arr[i]
    out_scores[i] = sc[i]
    pos = i + 1
    while pos < n:
      w = max(np.float32(0), min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
      h = max(np.float32(0), min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
      inter = np.float32(w * h)
      ovr = np.float32(inter / (areas[i] + areas[pos] - inter))
      weight = np.float32(1.0)
      if method == 'naive' and ovr >= iou_threshold:
        weight = np.float32(0.0)
      elif method == 'linear' and ovr >= iou_threshold:
        weight = np.float32(1.0) - ovr
      elif method == 'gaussian':
        weight = np.float32(np.exp(-(ovr * ovr) / np.float32(sigma)))
      sc[pos] = np.float32(sc[pos] * weight)
      if sc[pos] < min_score:
        for arr in (x1, y1, x2, y2, sc, areas, inds):
          arr[pos] = arr[n - 1]
        n -= 1
        pos -= 1
      pos += 1
    i += 1
  return inds[:n], out_scores[:n]


def _codino_reference(boxes, scores, labels, max_per_img, **kwargs):
  """Co-DINO's with_nms test path after the top-k: score > 0, mmcv batched_nms (class offsets), [:max_per_img]."""
  valid = scores > 0
  boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
  offsets = labels.astype(np.float32) * (boxes.max() + np.float32(1))
  keep, kept_scores = _mmcv_soft_nms_reference(boxes + offsets[:, None], scores, **kwargs)
  return boxes[keep][:max_per_img], kept_scores[:max_per_img], labels[keep][:max_per_img]


def _clustered_candidates(rng, b, k, num_classes):
  """Boxes in tight clusters (IoU often >= 0.8 within a cluster), several classes, sorted scores as top-k gives."""
  centers = rng.uniform(20, 180, (b, k // 6 + 1, 2))
  sizes = rng.uniform(15, 30, (b, k // 6 + 1, 2))
  which = rng.integers(0, centers.shape[1], (b, k))
  xy = np.take_along_axis(centers, which[..., None], axis=1) + rng.normal(0, 1.0, (b, k, 2))
  wh = np.take_along_axis(sizes, which[..., None], axis=1) + rng.normal(0, 1.0, (b, k, 2))
  boxes = np.concatenate([xy - wh / 2, xy + wh / 2], -1).clip(0, 200).astype(np.float32)
  scores = -np.sort(-rng.uniform(0.0005, 1.0, (b, k)), axis=1).astype(np.float32)
  labels = rng.integers(0, num_classes, (b, k)).astype(np.int32)
  return boxes, scores, labels


@pytest.mark.parametrize('method, iou_threshold', [('linear', 0.8), ('gaussian', 0.8), ('naive', 0.5)])
def test_soft_nms_matches_the_mmcv_kernel_reference(method, iou_threshold):
  rng = np.random.default_rng(3)
  b, k, m = 3, 60, 50
  boxes, scores, labels = _clustered_candidates(rng, b, k, 3)
  kwargs = dict(iou_threshold=iou_threshold, sigma=0.5, min_score=1e-3, method=method)
  got = jax.jit(lambda *a: postprocess.soft_nms(*a, max_detections=m, **kwargs))(boxes, scores, labels)
  assert got['boxes'].shape == (b, m, 4) and got['scores'].shape == (b, m) and got['labels'].dtype == np.int32
  changed = 0
  for i in range(b):
    want_boxes, want_scores, want_labels = _codino_reference(boxes[i], scores[i], labels[i], m, **kwargs)
    n = len(want_scores)
    np.testing.assert_array_equal(got['labels'][i, :n], want_labels)
    np.testing.assert_array_equal(got['boxes'][i, :n], want_boxes)
    np.testing.assert_allclose(got['scores'][i, :n], want_scores, rtol=1e-5)
    assert np.all(got['scores'][i, n:] == 0)
    _, all_kept, _ = _codino_reference(boxes[i], scores[i], labels[i], k, **kwargs)
    changed += int(np.sum(~np.isin(want_scores, scores[i]))) + (k - len(all_kept))
  assert changed > 0  # the overlaps mattered: some kept scores were lowered or some boxes discarded


def test_soft_nms_linear_closed_form_and_class_awareness():
  # Two same-class boxes with IoU 0.81 (>= 0.8): the second is kept with score 0.5 * (1 - 0.81); a third box of
  # another class at the same place is untouched; a fourth with IoU < 0.8 to both is untouched.
  boxes = np.array([[[0, 0, 100, 100], [0, 0, 100, 81], [0, 0, 100, 100], [0, 0, 100, 60]]], np.float32)
  scores = np.array([[0.9, 0.5, 0.8, 0.4]], np.float32)
  labels = np.array([[0, 0, 1, 0]], np.int32)
  got = postprocess.soft_nms(boxes, scores, labels, max_detections=5)
  np.testing.assert_allclose(got['scores'][0], [0.9, 0.8, 0.4, 0.5 * 0.19, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(got['labels'][0], [0, 1, 0, 0, 0])
  # Discarded below min_score: 0.5 * (1 - 1.0) = 0 for an identical box.
  same = postprocess.soft_nms(boxes[:, [0, 0]], scores[:, :2], labels[:, :2], max_detections=2)
  np.testing.assert_allclose(same['scores'][0], [0.9, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match='method'):
    postprocess.soft_nms(boxes, scores, labels, max_detections=2, method='cubic')


# ------------------------------------------------ host-side merging of patch detections (SODA-D slicing)
def _brute_nms(boxes, scores, thr):
  """Reference greedy NMS: pick the best remaining, drop every remaining box overlapping it by IoU > thr."""
  remaining = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
  keep = []
  while remaining:
    i = remaining.pop(0)
    keep.append(i)
    survivors = []
    for j in remaining:
      ix = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
      iy = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
      area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
      union = area(boxes[i]) + area(boxes[j]) - ix * iy
      if not (union > 0 and ix * iy / union > thr):
        survivors.append(j)
    remaining = survivors
  return keep


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_nms_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 60, (80, 2))
  wh = rng.uniform(1, 30, (80, 2))
  boxes = np.concatenate([xy, xy + wh], axis=1)
  scores = np.round(rng.uniform(0, 1, 80), 1)  # ties on purpose
  assert postprocess.nms(boxes, scores, 0.5).tolist() == _brute_nms(boxes.tolist(), scores.tolist(), 0.5)


def test_nms_threshold_is_strict_and_classwise():
  a = [0, 0, 10, 10]
  b = [0, 0, 10, 10]  # a duplicate of a, but of another class
  half = [0, 0, 10, 5]  # IoU with a = 0.5 exactly
  boxes = np.array([a, half, b], np.float64)
  kept = postprocess.classwise_nms(Detections(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1])), 0.5)
  # `half` survives (IoU == 0.5 is not > 0.5); `b` equals `a` but has another label.
  np.testing.assert_array_equal(kept.boxes, boxes)
  np.testing.assert_array_equal(kept.scores, [0.9, 0.8, 0.7])


def test_merge_caps_and_rejects_unknown_images():
  record = records_lib.ImageRecord(image_id=7, name='img', file_name='img.jpg', width=100, height=100,
                                  boxes=np.zeros((0, 4)), labels=np.zeros(0), ignore=np.zeros((0, 4)))
  dets = [Detections(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([0.2, 0.9]), np.array([0, 1]))]
  merged = postprocess.merge_patch_detections({7: dets}, [record], max_detections=1)
  np.testing.assert_array_equal(merged[7].boxes, [[50, 50, 60, 60]])
  assert set(postprocess.merge_patch_detections({}, [record])) == {7}
  with pytest.raises(ValueError, match='no record'):
    postprocess.merge_patch_detections({8: dets}, [record])


def test_shift_detections():
  d = postprocess.shift_detections(Detections(np.array([[1, 2, 3, 4]]), np.array([1.0]), np.array([2])), (650, 100))
  np.testing.assert_array_equal(d.boxes, [[651, 102, 653, 104]])


def test_predict_fn_soft_nms_candidates_are_max_per_img():
  """Co-DETR's test path: topk(max_per_img) (query, class) pairs are the soft-NMS candidates (not all queries).
  A: 0.9; B: 0.8, inside A with IoU 0.95 (linear decay -> 0.04); C: 0.5, apart. With K = 2 the candidates are A, B and the
  result A, B; had C been a candidate (v0.3 took decoder.num_queries), A, C."""
  from mrqm_jax import evaluate, parallel   # pylint: disable=g-import-not-at-top
  from configs import smoke   # pylint: disable=g-import-not-at-top

  def logit(p):
    return float(np.log(p / (1 - p)))

  logits = np.full((1, 3, 2), -20.0, np.float32)
  logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 0] = logit(0.9), logit(0.8), logit(0.5)
  boxes = np.asarray([[[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.19], [0.8, 0.8, 0.1, 0.1]]], np.float32)

  class Stub:
    def apply(self, variables, image, pad_mask, train=False):
      del variables, image, pad_mask, train
      return {'pred_logits': jnp.asarray(logits), 'pred_boxes': jnp.asarray(boxes)}

  config = smoke.get_config()
  config.eval.soft_nms, config.eval.max_detections = True, 2
  h, w = config.input.image_size
  batch = {'image': jnp.zeros((1, h, w, 3)), 'pad_mask': jnp.zeros((1, h, w), bool), 'scale': jnp.ones((1,)),
           'patch_origin': jnp.zeros((1, 2)), 'orig_size': jnp.asarray([[h, w]], jnp.int32)}
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  dets = evaluate.make_predict_fn(Stub(), config, mesh)({}, batch)
  scores = np.asarray(dets['scores'][0])
  np.testing.assert_allclose(scores, [0.9, 0.8 * (1 - 0.19 / 0.2)], rtol=1e-4)
