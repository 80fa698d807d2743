"""Losses: elementwise losses and matching cost against NumPy references written here, the full objective on
hand-built detector outputs (contract shapes), padding invariance (values and gradients), normalization."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from configs import smoke
from mrqm_jax.ops import losses

B, Q, C, L, M, D, K, A = 2, 12, 4, 3, 5, 8, 6, 40


# ----------------------------------------------------------------------------------------------- references
def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_xyxy(b):
  b = np.asarray(b, np.float64)
  return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], axis=-1)


def np_iou_giou(a, b):
  """Corresponding cxcywh boxes [..., 4] -> (iou, giou) [...]."""
  a, b = np_xyxy(a), np_xyxy(b)
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  inter = iw * ih
  union = area_a + area_b - inter
  ew = np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0])
  eh = np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])
  iou = inter / union
  return iou, iou - (ew * eh - union) / (ew * eh)


def np_focal(x, t, alpha, gamma):
  p = np_sigmoid(x)
  # Written per class of target: -alpha (1-p)^g log p for t=1, -(1-alpha) p^g log(1-p) for t=0.
  return np.where(t == 1, -alpha * (1 - p) ** gamma * np.log(p), -(1 - alpha) * p ** gamma * np.log(1 - p))


def np_qfl(x, labels, scores, beta):
  """mmdet's two-branch form: x [N, C], labels [N] (C = background), scores [N] -> [N, C]."""
  p = np_sigmoid(x)
  loss = -np.log(1 - p) * p ** beta
  for n, (label, score) in enumerate(zip(labels, scores)):
    if label < x.shape[1]:
      pn = p[n, label]
      loss[n, label] = -(score * np.log(pn) + (1 - score) * np.log(1 - pn)) * abs(score - pn) ** beta
  return loss


def np_query_loss(logits, boxes, query_gt, valid, gt_boxes, gt_labels, normalizer, beta=2.0):
  """Unweighted QFL / L1 / GIoU of one image with known targets (query_gt -1 = background)."""
  cls = bbox = giou = 0.0
  for q in range(len(logits)):
    if not valid[q]:
      continue
    g = query_gt[q]
    if g >= 0:
      iou, gi = np_iou_giou(boxes[q], gt_boxes[g])
      cls += np_qfl(logits[q:q + 1], [gt_labels[g]], [iou], beta).sum()
      bbox += np.abs(boxes[q] - gt_boxes[g]).sum()
      giou += 1 - gi
    else:
      cls += np_qfl(logits[q:q + 1], [logits.shape[1]], [0.0], beta).sum()
  return np.array([cls, bbox, giou]) / normalizer


# ----------------------------------------------------------------------------------------------- fixtures
def make_config(**loss_overrides):
  config = smoke.get_config()
  with config.unlocked():
    config.decoder.num_layers = L
    config.dataset.num_classes = C
    for k, v in loss_overrides.items():
      setattr(config.loss, k, v)
  return config


def random_boxes(rng, shape):
  centers = rng.uniform(0.2, 0.8, shape + (2,))
  sizes = rng.uniform(0.05, 0.3, shape + (2,))
  return np.concatenate([centers, sizes], axis=-1).astype(np.float32)


def make_batch(seed=0, num_valid=(3, 5)):
  """Hand-built detector outputs with the contract's shapes, and matching targets."""
  rng = np.random.default_rng(seed)
  box_valid = np.arange(M)[None, :] < np.asarray(num_valid)[:, None]
  targets = {'boxes': random_boxes(rng, (B, M)), 'labels': rng.integers(0, C, (B, M)).astype(np.int32),
             'box_valid': box_valid}
  dn_count = 8
  dn_valid = np.ones((B, dn_count), bool)
  dn_valid[1, 6:] = False
  outputs = {
      'pred_logits': rng.normal(size=(B, Q, C)).astype(np.float32),
      'pred_boxes': random_boxes(rng, (B, Q)),
      'aux_outputs': {'pred_logits': rng.normal(size=(L - 1, B, Q, C)).astype(np.float32),
                      'pred_boxes': random_boxes(rng, (L - 1, B, Q))},
      'enc_outputs': {'pred_logits': rng.normal(size=(B, Q, C)).astype(np.float32),
                      'pred_boxes': random_boxes(rng, (B, Q))},
      'dn_outputs': {'pred_logits': rng.normal(size=(L, B, dn_count, C)).astype(np.float32),
                     'pred_boxes': random_boxes(rng, (L, B, dn_count)),
                     'gt_index': np.tile(np.arange(dn_count) % 3, (B, 1)).astype(np.int32),
                     'positive': np.tile(np.arange(dn_count) % 2 == 0, (B, 1)),
                     'valid': dn_valid},
      'iah_outputs': {'cls_logits': rng.normal(size=(B, A, C)).astype(np.float32) - 2,
                      'pred_boxes': random_boxes(rng, (B, A)),
                      'anchors': random_boxes(rng, (A,)),
                      'anchor_valid': rng.random((B, A)) > 0.1,
                      'assigned_gt': np.where(rng.random((B, A)) < 0.3, rng.integers(0, 3, (B, A)), -1
                                              ).astype(np.int32),
                      'query_logits': rng.normal(size=(L, B, K, C)).astype(np.float32),
                      'query_boxes': random_boxes(rng, (L, B, K)),
                      'query_gt': rng.integers(0, 3, (B, K)).astype(np.int32),
                      'query_valid': np.arange(K)[None, :] < np.array([[4], [6]])},
  }
  return outputs, targets


def split_float(tree):
  """(float leaves as a pytree with None elsewhere, a function rebuilding the full tree from float leaves)."""
  leaves, treedef = jax.tree.flatten(tree)
  is_float = [np.issubdtype(np.asarray(x).dtype, np.floating) for x in leaves]
  floats = [jnp.asarray(x) for x, f in zip(leaves, is_float) if f]

  def rebuild(float_leaves):
    it = iter(float_leaves)
    return jax.tree.unflatten(treedef, [next(it) if f else x for x, f in zip(leaves, is_float)])
  return floats, rebuild


@pytest.fixture(scope='module')
def config():
  return make_config()


def jitted(config, **kwargs):
  """compute_losses under jit (eager dispatch of the many small ops is far slower than one compilation)."""
  return jax.jit(lambda o, t: losses.compute_losses(o, t, config, **kwargs))


# ----------------------------------------------------------------------------------------------- elementwise
def test_focal_and_bce_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, (50, 4))
  t = (rng.random((50, 4)) < 0.3).astype(np.float64)
  got = losses.sigmoid_focal_loss(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), 0.25, 2.0)
  np.testing.assert_allclose(got, np_focal(x, t, 0.25, 2.0), rtol=2e-5, atol=1e-7)
  big = jnp.asarray([-200.0, 200.0, 0.0])
  assert np.all(np.isfinite(losses.sigmoid_bce_with_logits(big, jnp.asarray([1.0, 0.0, 0.5]))))
  np.testing.assert_allclose(losses.sigmoid_bce_with_logits(big, jnp.asarray([1.0, 0.0, 0.5])),
                             [200.0, 200.0, np.log(2.0)], rtol=1e-6)


def test_quality_focal_against_mmdet_two_branch_form():
  rng = np.random.default_rng(1)
  x = rng.normal(0, 2, (30, 5))
  labels = np.where(rng.random(30) < 0.5, rng.integers(0, 5, 30), 5)
  scores = rng.random(30)
  targets = np.zeros((30, 5))
  for n in range(30):
    if labels[n] < 5:
      targets[n, labels[n]] = scores[n]
  got = losses.quality_focal_loss(jnp.asarray(x, jnp.float32), jnp.asarray(targets, jnp.float32), 2.0)
  np.testing.assert_allclose(got, np_qfl(x, labels, scores, 2.0), rtol=2e-5, atol=1e-7)


def test_l1_and_giou_against_numpy():
  rng = np.random.default_rng(2)
  a, b = random_boxes(rng, (40,)), random_boxes(rng, (40,))
  b[:5] = a[:5]                                        # identical boxes: GIoU loss 0
  np.testing.assert_allclose(losses.l1_loss(a, b), np.abs(a - b).sum(-1), rtol=1e-6)
  _, giou = np_iou_giou(a, b)
  np.testing.assert_allclose(losses.giou_loss(a, b), 1 - giou, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.giou_loss(a[:5], b[:5]), 0.0, atol=1e-6)


def test_matching_cost_against_numpy(config):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(Q, C))
  boxes, gt = random_boxes(rng, (Q,)), random_boxes(rng, (M,))
  labels = rng.integers(0, C, M)
  got = losses.matching_cost(jnp.asarray(logits, jnp.float32), boxes, gt, jnp.asarray(labels), config)
  p = np_sigmoid(logits)
  expected = np.zeros((Q, M))
  for q in range(Q):
    for m in range(M):
      pq = p[q, labels[m]]
      focal = 0.25 * (1 - pq) ** 2 * -np.log(pq) - 0.75 * pq ** 2 * -np.log(1 - pq)
      _, giou = np_iou_giou(boxes[q], gt[m])
      expected[q, m] = 2.0 * focal + 5.0 * np.abs(boxes[q] - gt[m]).sum() - 2.0 * giou
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- objective
@pytest.fixture(scope='module')
def loss_fn(config):
  return jax.jit(lambda o, t: losses.compute_losses(o, t, config))


def test_terms_sum_to_total_and_names(loss_fn):
  outputs, targets = make_batch()
  total, terms = loss_fn(outputs, targets)
  assert np.isfinite(total) and abs(float(total) - sum(float(v) for v in terms.values())) < 1e-4
  expected = {f'{p}{k}' for k in ('cls', 'bbox', 'giou')
              for p in ('', 'd0.', 'd1.', 'enc.', 'dn.', 'd0.dn.', 'd1.dn.', 'aux_iah.', 'd0.aux_iah.', 'd1.aux_iah.')}
  assert set(terms) == expected | {'iah.cls', 'iah.giou'}


def test_matched_loss_against_scipy_matching_and_numpy(config):
  """Decoder-layer loss = NumPy loss after SciPy's Hungarian on a NumPy cost."""
  outputs, targets = make_batch(seed=4)
  single = {'pred_logits': outputs['pred_logits'], 'pred_boxes': outputs['pred_boxes']}
  _, terms = jitted(config)(single, targets)
  expected = np.zeros(3)
  num_boxes = targets['box_valid'].sum()
  for b in range(B):
    valid = np.flatnonzero(targets['box_valid'][b])
    cost = np.asarray(losses.matching_cost(outputs['pred_logits'][b], outputs['pred_boxes'][b],
                                           targets['boxes'][b][valid], targets['labels'][b][valid], config))
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    query_gt = np.full(Q, -1)
    query_gt[rows] = valid[cols]
    expected += np_query_loss(outputs['pred_logits'][b], outputs['pred_boxes'][b], query_gt, np.ones(Q, bool),
                              targets['boxes'][b], targets['labels'][b], num_boxes)
  got = np.array([terms['cls'], terms['bbox'] / 5.0, terms['giou'] / 2.0])
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_perfect_prediction_is_minimal(config):
  _, targets = make_batch(seed=5, num_valid=(5, 5))
  rng = np.random.default_rng(5)
  perm = np.stack([rng.permutation(Q)[:M] for _ in range(B)])
  logits = np.full((B, Q, C), -12.0, np.float32)
  boxes = np.tile(np.array([0.05, 0.05, 0.02, 0.02], np.float32), (B, Q, 1))
  for b in range(B):
    boxes[b, perm[b]] = targets['boxes'][b]
    logits[b, perm[b], targets['labels'][b]] = 12.0
  perfect = {'pred_logits': logits, 'pred_boxes': boxes}
  query_gt = losses.match_queries(jnp.asarray(logits), jnp.asarray(boxes), targets['boxes'],
                                  targets['labels'], targets['box_valid'], config)
  for b in range(B):
    np.testing.assert_array_equal(np.asarray(query_gt[b])[perm[b]], np.arange(M))
  fn = jitted(config)
  total, terms = fn(perfect, targets)
  assert float(terms['bbox']) < 1e-6 and float(terms['giou']) < 1e-5 and float(total) < 1e-3
  noisy = {'pred_logits': logits, 'pred_boxes': boxes + rng.normal(0, 0.01, boxes.shape).astype(np.float32)}
  assert float(fn(noisy, targets)[0]) > float(total) + 1e-3


def test_dn_aux_and_dense_terms_against_numpy(config, loss_fn):
  outputs, targets = make_batch(seed=6)
  _, terms = loss_fn(outputs, targets)
  gt_valid = targets['box_valid']
  # DN: positives reconstruct gt_index, negatives / positives of invalid gts are background.
  dn = outputs['dn_outputs']
  positive = dn['valid'] & dn['positive'] & np.take_along_axis(gt_valid, dn['gt_index'], 1)
  for layer, prefix in ((L - 1, 'dn.'), (0, 'd0.dn.')):
    expected = sum(np_query_loss(dn['pred_logits'][layer, b], dn['pred_boxes'][layer, b],
                                 np.where(positive[b], dn['gt_index'][b], -1), dn['valid'][b],
                                 targets['boxes'][b], targets['labels'][b], positive.sum()) for b in range(B))
    got = [terms[prefix + 'cls'], terms[prefix + 'bbox'] / 5.0, terms[prefix + 'giou'] / 2.0]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
  # Auxiliary queries: every valid one is a positive of query_gt.
  iah = outputs['iah_outputs']
  qpos = iah['query_valid'] & np.take_along_axis(gt_valid, iah['query_gt'], 1)
  expected = sum(np_query_loss(iah['query_logits'][L - 1, b], iah['query_boxes'][L - 1, b],
                               np.where(qpos[b], iah['query_gt'][b], -1), iah['query_valid'][b],
                               targets['boxes'][b], targets['labels'][b], qpos.sum()) for b in range(B))
  np.testing.assert_allclose([terms['aux_iah.cls'], terms['aux_iah.bbox'] / 5.0, terms['aux_iah.giou'] / 2.0], expected,
                             rtol=1e-4)
  # Dense head: focal on valid anchors, GIoU on positives, / positives, x lambda_2 * L.
  assigned = iah['assigned_gt']
  apos = iah['anchor_valid'] & (assigned >= 0) & np.take_along_axis(gt_valid, np.maximum(assigned, 0), 1)
  cls = giou = 0.0
  for b in range(B):
    for a in range(A):
      if not iah['anchor_valid'][b, a]:
        continue
      t = np.zeros(C)
      if apos[b, a]:
        g = assigned[b, a]
        t[targets['labels'][b, g]] = 1.0
        giou += 1 - np_iou_giou(iah['pred_boxes'][b, a], targets['boxes'][b, g])[1]
      cls += np_focal(iah['cls_logits'][b, a].astype(np.float64), t, 0.25, 2.0).sum()
  scale = config.loss.aux_dense_weight * L
  np.testing.assert_allclose([terms['iah.cls'], terms['iah.giou']],
                             [cls / apos.sum() * scale, 2.0 * giou / apos.sum() * scale], rtol=1e-4)


def test_padding_contributes_exactly_zero(config, loss_fn):
  """Extra invalid gts / DN queries / aux queries / anchors full of garbage change neither loss nor grads."""
  outputs, targets = make_batch(seed=7)
  extra = 3
  p_targets = {
      'boxes': np.concatenate([targets['boxes'], np.full((B, extra, 4), np.nan, np.float32)], 1),
      'labels': np.concatenate([targets['labels'], np.full((B, extra), 999, np.int32)], 1),
      'box_valid': np.concatenate([targets['box_valid'], np.zeros((B, extra), bool)], 1)}
  p_outputs = jax.tree.map(lambda x: x, outputs)
  dn, iah = dict(outputs['dn_outputs']), dict(outputs['iah_outputs'])

  def garbage(x, axis, fill):
    shape = list(x.shape)
    shape[axis] = extra
    return np.concatenate([x, np.full(shape, fill, x.dtype)], axis)
  # DN queries: garbage preds, marked invalid (some even claim to be positives of a padding gt).
  p_dn = {'pred_logits': garbage(dn['pred_logits'], 2, np.nan), 'pred_boxes': garbage(dn['pred_boxes'], 2, np.inf),
          'gt_index': garbage(dn['gt_index'], 1, M + 1), 'positive': garbage(dn['positive'], 1, True),
          'valid': garbage(dn['valid'], 1, False)}
  p_iah = dict(iah)
  p_iah.update(query_logits=garbage(iah['query_logits'], 2, np.nan),
               query_boxes=garbage(iah['query_boxes'], 2, -1e30),
               query_gt=garbage(iah['query_gt'], 1, 1), query_valid=garbage(iah['query_valid'], 1, False),
               cls_logits=garbage(iah['cls_logits'], 1, np.nan), pred_boxes=garbage(iah['pred_boxes'], 1, np.nan),
               assigned_gt=garbage(iah['assigned_gt'], 1, 0), anchor_valid=garbage(iah['anchor_valid'], 1, False))
  p_outputs['dn_outputs'], p_outputs['iah_outputs'] = p_dn, p_iah

  def value_and_grads(outs, tgts):
    floats, rebuild = split_float(outs)
    fn = jax.jit(jax.value_and_grad(lambda f: losses.compute_losses(rebuild(f), tgts, config)[0]))
    return fn(floats)

  loss, grads = value_and_grads(outputs, targets)
  p_loss, p_grads = value_and_grads(p_outputs, p_targets)
  np.testing.assert_allclose(p_loss, loss, rtol=1e-6)
  padded_shapes = {g.shape for g in grads}
  for g, pg in zip(map(np.asarray, grads), map(np.asarray, p_grads)):
    assert np.all(np.isfinite(pg))
    if pg.shape == g.shape:
      np.testing.assert_allclose(pg, g, rtol=1e-5, atol=1e-8)
    else:   # the padded arrays: the original slice is unchanged, the padding has zero gradient
      axis = [i for i, (a, b) in enumerate(zip(g.shape, pg.shape)) if a != b][0]
      np.testing.assert_allclose(np.take(pg, np.arange(g.shape[axis]), axis), g, rtol=1e-5, atol=1e-8)
      assert np.all(np.take(pg, np.arange(g.shape[axis], pg.shape[axis]), axis) == 0)
  assert padded_shapes


def test_no_objects_and_900_objects_have_finite_gradients():
  config = make_config()
  with config.unlocked():
    config.matcher.backend = 'scipy'     # the device solver is exercised above; 900 columns are slow on CPU
  for num_gt in (0, 900):
    rng = np.random.default_rng(num_gt)
    targets = {'boxes': random_boxes(rng, (1, 900)), 'labels': rng.integers(0, C, (1, 900)).astype(np.int32),
               'box_valid': np.arange(900)[None] < num_gt}
    outputs = {'pred_logits': rng.normal(size=(1, 30, C)).astype(np.float32),
               'pred_boxes': random_boxes(rng, (1, 30)),
               'iah_outputs': {'cls_logits': rng.normal(size=(1, A, C)).astype(np.float32),
                               'pred_boxes': random_boxes(rng, (1, A)),
                               'assigned_gt': rng.integers(-1, 900 if num_gt else 1, (1, A)).astype(np.int32),
                               'anchor_valid': np.ones((1, A), bool),
                               'query_logits': rng.normal(size=(L, 1, K, C)).astype(np.float32),
                               'query_boxes': random_boxes(rng, (L, 1, K)),
                               'query_gt': rng.integers(0, 900, (1, K)).astype(np.int32),
                               'query_valid': np.full((1, K), num_gt > 0)}}
    floats, rebuild = split_float(outputs)
    (total, terms), grads = jax.jit(jax.value_and_grad(
        lambda f: losses.compute_losses(rebuild(f), targets, config), has_aux=True))(floats)
    assert np.isfinite(total) and all(np.all(np.isfinite(g)) for g in grads)
    if num_gt == 0:   # only "background" terms remain
      assert float(terms['bbox']) == 0 and float(terms['iah.giou']) == 0 and float(terms['aux_iah.cls']) == 0
    else:
      assert float(terms['bbox']) > 0


def test_normalizers_sum_over_the_named_axis(config, loss_fn):
  """Split over a named axis with psum-ed normalizers, the per-shard losses sum to the whole-batch loss."""
  outputs, targets = make_batch(seed=8)
  whole, _ = loss_fn(outputs, targets)

  def batch_axis(path):   # 1 for layer-stacked arrays, 0 for per-image ones; `anchors` is shared
    name = jax.tree_util.keystr(path)
    if 'anchors' in name:
      return None
    layered = 'aux_outputs' in name or 'query_logits' in name or 'query_boxes' in name or (
        'dn_outputs' in name and 'pred_' in name)
    return 1 if layered else 0

  def to_shards(path, x):  # [.., B, ..] -> [.., B, 1, ..]: vmap over the B shards of one image each
    axis = batch_axis(path)
    return x if axis is None else np.expand_dims(x, axis + 1)
  out_axes = jax.tree_util.tree_map_with_path(lambda p, x: batch_axis(p), outputs)
  shards = jax.jit(jax.vmap(lambda o, t: losses.compute_losses(o, t, config, axis_name='data')[0],
                            in_axes=(out_axes, 0), axis_name='data'))(
      jax.tree_util.tree_map_with_path(to_shards, outputs), jax.tree.map(lambda x: x[:, None], targets))
  assert shards.shape == (B,)
  np.testing.assert_allclose(float(shards.sum()), float(whole), rtol=1e-5)
  # num_boxes overrides the matched-loss normalizer.
  single = {'pred_logits': outputs['pred_logits'], 'pred_boxes': outputs['pred_boxes']}
  base, _ = jitted(config)(single, targets)
  doubled, _ = jitted(config, num_boxes=2 * targets['box_valid'].sum())(single, targets)
  np.testing.assert_allclose(float(doubled), float(base) / 2, rtol=1e-5)


def test_config_switches():
  outputs, targets = make_batch(seed=9)
  config = make_config(cls_type='focal')
  with config.unlocked():
    config.model.aux_heads = ()
  total, terms = jitted(config)(outputs, targets)
  assert np.isfinite(total) and not any(k.startswith(('iah.', 'aux_iah.', 'd0.aux_iah.')) for k in terms)
  with pytest.raises(ValueError, match='cls_type'):
    losses.compute_losses(outputs, targets, make_config(cls_type='ce'))


def test_matcher_backends_give_the_same_losses_with_one_host_call():
  """'jax' (device solver), 'scipy' and 'auto' give the same objective and gradients; with the SciPy solver every
  matching of the step (each decoder layer, the encoder proposals, each image) is ONE pure_callback, also in
  the gradient's jaxpr (the training step's)."""
  from mrqm_jax.ops import matching  # pylint: disable=g-import-not-at-top
  from tests.test_matching import count_callbacks  # pylint: disable=g-import-not-at-top
  outputs, targets = make_batch(seed=8, num_valid=(4, 5))
  floats, rebuild = split_float(outputs)
  results = {}
  for backend in ('jax', 'scipy', 'auto'):
    config = make_config()
    with config.unlocked():
      config.matcher.backend = backend
    grad_fn = jax.value_and_grad(lambda f, c=config: losses.compute_losses(rebuild(f), targets, c), has_aux=True)
    expected_calls = 0 if matching.resolve_backend(backend) == 'jax' else 1
    assert count_callbacks(jax.make_jaxpr(grad_fn)(floats)) == expected_calls, backend
    (total, terms), grads = jax.jit(grad_fn)(floats)
    results[backend] = (float(total), {k: float(v) for k, v in terms.items()}, [np.asarray(g) for g in grads])
  total, terms, grads = results['jax']
  for backend in ('scipy', 'auto'):
    other_total, other_terms, other_grads = results[backend]
    assert other_total == pytest.approx(total, rel=1e-6), backend
    assert other_terms.keys() == terms.keys()
    for name in terms:
      assert other_terms[name] == pytest.approx(terms[name], rel=1e-6, abs=1e-7), (backend, name)
    for g, other in zip(grads, other_grads):
      np.testing.assert_allclose(other, g, rtol=1e-5, atol=1e-8)
