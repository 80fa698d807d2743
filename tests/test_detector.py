"""MRQM detector: query selection and denoising pieces vs NumPy/closed forms, and the whole SMOKE model
(compiled once per mode): output contract, DN isolation, eval outputs, finite gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import smoke

from mrqm_jax import export
from mrqm_jax.models import aux_heads
from mrqm_jax.models import detector
from mrqm_jax.models import layers
from mrqm_jax.ops import boxes as box_ops


# --------------------------------------------------------------------------------------- pure functions
def test_encoder_proposals_closed_form():
  logits, in_range = detector.encoder_proposals(((2, 4), (1, 2)))
  boxes = 1 / (1 + np.exp(-logits))
  # Level 0: 2 x 4 tokens, centres ((j + .5) / 4, (i + .5) / 2), side 0.05; level 1: side 0.1.
  np.testing.assert_allclose(boxes[0], [0.125, 0.25, 0.05, 0.05], rtol=1e-5)
  np.testing.assert_allclose(boxes[5], [0.375, 0.75, 0.05, 0.05], rtol=1e-5)
  np.testing.assert_allclose(boxes[9], [0.75, 0.5, 0.1, 0.1], rtol=1e-5)
  assert in_range.all()
  # A 1 x 128 level puts its first centre at 0.5 / 128 < 0.01: invalid, and the last at > 0.99.
  _, in_range = detector.encoder_proposals(((1, 128),))
  assert not in_range[0] and not in_range[-1] and in_range[1:-1].all()


def test_level_pad_masks_nearest():
  rng = np.random.default_rng(0)
  mask = rng.uniform(size=(2, 12, 10)) > 0.5
  got = detector.level_pad_masks(jnp.asarray(mask), ((3, 3), (6, 5)))
  # Independent: PyTorch nearest picks source index floor(dst * in / out).
  for (h, w), g in zip(((3, 3), (6, 5)), got):
    want = np.array([[[mask[b, int(i * 12 / h), int(j * 10 / w)] for j in range(w)] for i in range(h)]
                     for b in range(2)])
    np.testing.assert_array_equal(g, want)


def test_invalid_tokens_compete_as_in_codino():
  # Co-DINO: an invalid token (zeroed memory, +inf proposal) may win the top-k; its box is then (1, 1, 1, 1)
  # exactly and no gradient flows through it (no inf/NaN from the finite stand-in either).
  logits = jnp.asarray([[[0.0, 1.0], [9.0, 0.0], [2.0, 0.5]]])
  boxes_logit = jnp.asarray([[[0.1, 0.2, -1.0, -2.0], [0.3, 0.1, -1.5, -0.5], [-0.2, 0.4, -2.0, -1.0]]])
  valid = jnp.asarray([[True, False, True]])

  def top_boxes(b, exclude):
    b, selectable = detector.selectable_proposals(b, valid, exclude)
    _, top = detector.select_top_proposals(logits, b, selectable, 2)
    return jax.nn.sigmoid(top)

  codino = top_boxes(boxes_logit, False)
  np.testing.assert_array_equal(codino[0, 0], [1.0, 1.0, 1.0, 1.0])            # token 1 (score 9) first
  np.testing.assert_allclose(codino[0, 1], jax.nn.sigmoid(boxes_logit[0, 2]))   # then token 2 (score 2)
  grad = jax.grad(lambda b: top_boxes(b, False).sum())(boxes_logit)
  assert np.all(np.isfinite(grad)) and np.all(grad[0, 1] == 0) and np.all(grad[0, 2] != 0)
  legacy = top_boxes(boxes_logit, True)
  np.testing.assert_allclose(legacy[0], jax.nn.sigmoid(boxes_logit[0, jnp.asarray([2, 0])]))


def test_select_top_proposals_skips_invalid_tokens():
  logits = jnp.asarray([[[5.0, 0.0], [1.0, 3.0], [9.0, 0.0], [2.0, 0.0]]])
  boxes = jnp.arange(16.0).reshape(1, 4, 4)
  valid = jnp.asarray([[True, True, False, True]])
  top_logits, top_boxes = detector.select_top_proposals(logits, boxes, valid, 2)
  np.testing.assert_array_equal(top_logits[0], [[5.0, 0.0], [1.0, 3.0]])  # token 2 (score 9) is invalid
  np.testing.assert_array_equal(top_boxes[0], boxes[0, :2])


@pytest.mark.parametrize('num_dn,max_gt', [(20, 32), (100, 200), (100, 7)])
def test_dn_num_slots_fits_every_count(num_dn, max_gt):
  d = detector.dn_num_slots(num_dn, max_gt)
  needed = [2 * max(1, num_dn // n) * n for n in range(1, max_gt + 1)]
  assert d == max(needed) and d % 2 == 0


def test_dn_layout_image_rule_groups_each_image_by_its_own_count():
  num_dn, max_gt = 20, 32
  d = detector.dn_num_slots(num_dn, max_gt)
  counts = np.array([0, 1, 3, 7, 20, 25, 40])
  lay = {k: np.asarray(v) for k, v in detector.dn_layout(jnp.asarray(counts), num_dn, max_gt, d,
                                                         group_rule='image').items()}
  for b, count in enumerate(counts):
    n = min(count, max_gt)
    groups = max(1, num_dn // n) if n else 0
    valid = lay['valid'][b]
    assert valid.sum() == 2 * groups * n
    assert np.all(valid[:2 * groups * n]) and not np.any(valid[2 * groups * n:])   # groups packed first
    for g in range(groups):
      block = slice(2 * g * n, 2 * (g + 1) * n)
      assert np.all(lay['group'][b, block] == g)
      np.testing.assert_array_equal(lay['positive'][b, block], np.arange(2 * n) < n)    # n pos then n neg
      np.testing.assert_array_equal(lay['gt_rank'][b, block], np.tile(np.arange(n), 2))
    assert np.all(lay['group'][b, ~valid] == -1)


def _co_dino_blocked_mask(single_pad, num_groups, num_queries):
  """Co-DINO's CdnQueryGenerator attention mask (True = blocked), rebuilt by slicing."""
  pad = single_pad * 2 * num_groups
  blocked = np.zeros((pad + num_queries,) * 2, bool)
  blocked[pad:, :pad] = True
  for i in range(num_groups):
    rows = slice(single_pad * 2 * i, single_pad * 2 * (i + 1))
    blocked[rows, single_pad * 2 * (i + 1):pad] = True
    blocked[rows, :single_pad * 2 * i] = True
  return blocked


def test_dn_mask_equals_co_dino_when_groups_fill_the_slots():
  # n = 5 gts, 20 DN queries: 4 groups of 10 fill exactly D = 40 slots; Co-DINO's mask must come out.
  num_dn, max_gt, q = 20, 5, 7
  d = detector.dn_num_slots(num_dn, max_gt)
  lay = detector.dn_layout(jnp.asarray([5]), num_dn, max_gt, d, group_rule='image')
  allowed = np.asarray(detector.dn_self_attention_mask(lay['group'], q))[0]
  np.testing.assert_array_equal(allowed, ~_co_dino_blocked_mask(5, 4, q))


def test_dn_mask_hides_empty_slots_and_isolates_groups():
  num_dn, max_gt, q = 20, 32, 4
  d = detector.dn_num_slots(num_dn, max_gt)
  lay = detector.dn_layout(jnp.asarray([3, 0]), num_dn, max_gt, d, group_rule='image')
  allowed = np.asarray(detector.dn_self_attention_mask(lay['group'], q))
  group, valid = np.asarray(lay['group']), np.asarray(lay['valid'])
  for b in range(2):
    a = allowed[b]
    assert not a[d:, :d].any()                       # matching queries never see DN queries
    assert a[d:, d:].all() and a[:d, d:].all()       # matching see matching; DN see matching (DINO)
    assert np.all(np.diag(a))                        # every row has at least itself
    off_diag = a[:d, :d] & ~np.eye(d, dtype=bool)
    i, j = np.nonzero(off_diag)
    assert np.all(group[b, i] == group[b, j]) and np.all(valid[b, j])   # only own group, only real queries
  assert allowed[0, :6, :6].all() and not allowed[0, :6, 6:12].any()  # group 0 vs group 1 (n = 3)


def test_jitter_boxes_positive_and_negative_ranges():
  n = 4000
  boxes = jnp.tile(jnp.asarray([[0.5, 0.5, 0.2, 0.1]]), (n, 1))
  negative = jnp.arange(n) % 2 == 1
  out = np.asarray(detector.jitter_boxes(jax.random.PRNGKey(0), boxes, negative, box_noise=1.0))
  corners = np.stack([out[:, 0] - out[:, 2] / 2, out[:, 1] - out[:, 3] / 2,
                      out[:, 0] + out[:, 2] / 2, out[:, 1] + out[:, 3] / 2], -1)
  base = np.array([0.4, 0.45, 0.6, 0.55])
  moved = np.abs(corners - base) / np.array([0.1, 0.05, 0.1, 0.05])   # in units of half the side
  neg = np.asarray(negative)
  assert moved[~neg].max() < 1 + 1e-5 and moved[neg].min() > 1 - 1e-5 and moved[neg].max() < 2 + 1e-5
  assert 0.4 < np.mean(corners[:, 0] > base[0]) < 0.6          # random signs
  # Clipping: a box at the border stays inside [0, 1].
  edge = detector.jitter_boxes(jax.random.PRNGKey(1), jnp.asarray([[0.02, 0.98, 0.04, 0.04]] * 50),
                               jnp.ones(50, bool), 1.0)
  edge_xyxy = np.concatenate([edge[:, :2] - edge[:, 2:] / 2, edge[:, :2] + edge[:, 2:] / 2], -1)
  assert edge_xyxy.min() >= -1e-6 and edge_xyxy.max() <= 1 + 1e-6


def test_make_dn_queries_image_rule_uses_valid_gts_and_flips_labels():
  m, c, dim = 6, 5, 8
  boxes = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.4, (2, m, 4)), jnp.float32)
  labels = jnp.asarray([[0, 1, 2, 3, 4, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  box_valid = jnp.asarray([[False, True, False, True, True, False], [False] * m])
  embedding = jnp.asarray(np.random.default_rng(1).normal(size=(c, dim)), jnp.float32)
  d = detector.dn_num_slots(12, 6)
  kwargs = dict(num_dn_queries=12, max_gt=6, num_slots=d, group_rule='image')
  dn = detector.make_dn_queries(jax.random.PRNGKey(0), {'boxes': boxes, 'labels': labels, 'box_valid': box_valid},
                                embedding, label_noise=0.0, box_noise=0.0, **kwargs)
  valid = np.asarray(dn['valid'])
  # Image 0: gts 1, 3, 4 in 4 groups (12 // 3) -> 24 valid slots; image 1 has no gt.
  assert valid[0].sum() == 24 and not valid[1].any()
  np.testing.assert_array_equal(np.asarray(dn['gt_index'])[0, :6], [1, 3, 4, 1, 3, 4])
  assert np.all(np.asarray(dn['gt_index'])[~valid] == -1)
  # Without noise: positives and negatives are the gt box (through the 1e-3 logit clamp) and its embedding.
  gi = np.asarray(dn['gt_index'])[0, :24]
  np.testing.assert_allclose(dn['ref_boxes'][0, :24], boxes[0, gi], atol=1e-6)
  np.testing.assert_allclose(dn['content'][0, :24], embedding[labels[0, gi]], atol=1e-6)
  assert np.all(np.asarray(dn['content'])[1] == 0)
  np.testing.assert_allclose(dn['ref_boxes'][1], 0.5)
  # With label noise 0.5 about a quarter of the labels are redrawn (uniformly, so ~4/5 of those change).
  many = {'boxes': jnp.tile(boxes[:1], (64, 1, 1)), 'labels': jnp.tile(labels[:1], (64, 1)),
          'box_valid': jnp.tile(box_valid[:1], (64, 1))}
  noisy = detector.make_dn_queries(jax.random.PRNGKey(2), many, embedding, label_noise=0.5, box_noise=1.0,
                                   **kwargs)
  v = np.asarray(noisy['valid'])
  clean = embedding[np.asarray(many['labels'])[np.arange(64)[:, None], np.asarray(noisy['gt_index'])]]
  changed = np.any(np.abs(np.asarray(noisy['content']) - np.asarray(clean)) > 1e-6, axis=-1)[v]
  assert 0.25 * 0.8 - 0.05 < changed.mean() < 0.25 * 0.8 + 0.05


# One compile per shape instead of op-by-op dispatch (much faster on CPU for these many small ops).
_make_dn_queries = jax.jit(detector.make_dn_queries, static_argnames=(
    'num_dn_queries', 'max_gt', 'num_slots', 'label_noise', 'box_noise', 'group_rule'))


def mmdet_dn_reference(counts, num_dn_queries, num_classes):
  """mmdet 3.3 CdnQueryGenerator + DINOHead._get_dn_targets_single, rebuilt in NumPy for gt counts per image.

  Returns (total queries 2NG, groups G, per image: gt [2NG] (gt rank of a real query, -1 = zero padding),
  label target [2NG] (num_classes = background), label weight [2NG], box weight [2NG]).
  """
  width = max(counts)
  groups = 1 if width == 0 else max(1, num_dn_queries // width)
  total = 2 * width * groups
  gt, label, label_weight, box_weight = [], [], [], []
  for n in counts:
    g = np.full(total, -1)
    for k in range(2 * groups):          # collate: block k of width N holds the image's n queries first
      g[k * width:k * width + n] = np.arange(n)
    pos = (np.arange(groups)[:, None] * 2 * width + np.arange(n)[None]).ravel()
    lab = np.full(total, num_classes)
    lab[pos] = 0                          # any class: only where the label lands matters here
    bw = np.zeros(total)
    bw[pos] = 1
    gt.append(g), label.append(lab), label_weight.append(np.ones(total)), box_weight.append(bw)
  return total, groups, np.array(gt), np.array(label), np.array(label_weight), np.array(box_weight)


def _dn_targets(counts, m, rng, num_classes=4):
  """Targets with counts[b] valid gts scattered over m rows (not first), random boxes and labels."""
  box_valid = np.zeros((len(counts), m), bool)
  for b, n in enumerate(counts):
    box_valid[b, rng.choice(m, n, replace=False)] = True
  centres, sizes = rng.uniform(0.3, 0.7, (len(counts), m, 2)), rng.uniform(0.05, 0.2, (len(counts), m, 2))
  return {'boxes': jnp.asarray(np.concatenate([centres, sizes], -1), jnp.float32),
          'labels': jnp.asarray(rng.integers(0, num_classes, (len(counts), m)), jnp.int32),
          'box_valid': jnp.asarray(box_valid)}


# The DN tests below share one shape (batch 2, 16 gt rows, 4 classes) and these settings: one compile.
_DN_M, _DN_C = 16, 4
_DN = dict(num_dn_queries=20, max_gt=16, num_slots=detector.dn_num_slots(20, 16), label_noise=0.5, box_noise=1.0,
           group_rule='batch')


@pytest.mark.parametrize('counts', [(3, 7), (1, 1), (0, 0), (12, 2), (5, 0)])
def test_dn_batch_rule_equals_mmdet_groups_slots_mask_and_background(counts):
  """Group count from the densest image, slot layout, attention mask, and which slots are classified
  (background unless positive) against mmdet's CdnQueryGenerator / DINOHead dn targets, in NumPy."""
  num_dn, d, q, c = _DN['num_dn_queries'], _DN['num_slots'], 5, _DN_C
  targets = _dn_targets(counts, _DN_M, np.random.default_rng(sum(counts)), c)
  dn = _make_dn_queries(jax.random.PRNGKey(0), targets, jnp.ones((c, 8)), **_DN)
  total, groups, ref_gt, ref_label, ref_label_weight, ref_box_weight = mmdet_dn_reference(counts, num_dn, c)
  valid, positive = np.asarray(dn['valid']), np.asarray(dn['positive'])
  gt_index, group = np.asarray(dn['gt_index']), np.asarray(dn['group'])
  box_valid = np.asarray(targets['box_valid'])
  for b in range(len(counts)):
    # Slots in use = mmdet's 2NG queries, each with label weight 1 (padding included); the rest do not exist.
    np.testing.assert_array_equal(valid[b, :total], ref_label_weight[b] == 1)
    assert not valid[b, total:].any()
    np.testing.assert_array_equal(positive[b, :total], ref_box_weight[b] == 1)          # box loss + class
    np.testing.assert_array_equal(positive[b, :total], ref_label[b] < c)                # the rest: background
    # The gt behind each query: the image's valid gts in file order; zero padding has none.
    file_order = np.nonzero(box_valid[b])[0]
    want = np.where(ref_gt[b] >= 0, file_order[np.clip(ref_gt[b], 0, None)] if len(file_order) else -1, -1)
    np.testing.assert_array_equal(gt_index[b, :total], want)
    assert np.all(gt_index[b, total:] == -1)
    # Padding queries: zero content, reference box sigmoid(0) = 0.5, as mmdet's zero-initialised batch.
    pad = valid[b] & (gt_index[b] < 0)
    assert np.all(np.asarray(dn['content'])[b][pad] == 0) and np.allclose(np.asarray(dn['ref_boxes'])[b][pad], 0.5)
    if total:
      np.testing.assert_array_equal(group[b, :total], np.arange(total) // (total // groups))
  # Attention: on the slots in use + the matching queries, exactly mmdet's mask; slots not in use are seen by no
  # other query.
  allowed = np.asarray(detector.dn_self_attention_mask(dn['group'], q))
  keep = np.concatenate([np.arange(total), d + np.arange(q)])
  width = max(counts)
  for b in range(len(counts)):
    np.testing.assert_array_equal(allowed[b][np.ix_(keep, keep)], ~_co_dino_blocked_mask(width, groups, q))
    unused = np.arange(total, d)
    assert not (allowed[b][:, unused] & ~np.eye(d + q, dtype=bool)[:, unused]).any()


def test_dn_batch_rule_loss_gives_padding_slots_a_background_loss():
  """The DN loss over make_dn_queries' slots equals mmdet's _loss_dn_single (QFL over every query with label
  weight 1, background unless positive; L1 / GIoU over positives; avg factor = positives), in NumPy."""
  from mrqm_jax.ops import losses  # pylint: disable=g-import-not-at-top
  from tests.test_losses import np_iou_giou, np_qfl  # pylint: disable=g-import-not-at-top
  counts, num_dn, d, c = (3, 1), _DN['num_dn_queries'], _DN['num_slots'], _DN_C
  rng = np.random.default_rng(5)
  targets = _dn_targets(counts, _DN_M, rng, c)
  dn = _make_dn_queries(jax.random.PRNGKey(3), targets, jnp.ones((c, 8)), **_DN)
  logits = rng.normal(size=(1, 2, d, c)).astype(np.float32)
  pred = np.concatenate([rng.uniform(0.3, 0.7, (1, 2, d, 2)), rng.uniform(0.05, 0.2, (1, 2, d, 2))], -1)
  outputs = dict(dn, pred_logits=jnp.asarray(logits), pred_boxes=jnp.asarray(pred, jnp.float32))
  config = smoke.get_config()
  gt = losses._sanitize_targets(targets, c)  # pylint: disable=protected-access
  terms = jax.jit(lambda o, g: losses.denoising_losses(o, g, config, None))(outputs, gt)

  total, groups, ref_gt, ref_label, ref_label_weight, ref_box_weight = mmdet_dn_reference(counts, num_dn, c)
  assert total == 2 * 3 * 6 and groups == 6   # N = 3 (densest image), G = 20 // 3
  gt_boxes, gt_labels = np.asarray(targets['boxes']), np.asarray(targets['labels'])
  cls = l1 = giou = 0.0
  num_pos = ref_box_weight.sum()
  for b in range(2):
    rows = np.nonzero(np.asarray(targets['box_valid'])[b])[0][np.clip(ref_gt[b], 0, None)]
    target_boxes = gt_boxes[b, rows]
    labels = np.where(ref_label[b] < c, gt_labels[b, rows], c)
    iou, g = np_iou_giou(pred[0, b, :total], target_boxes)
    cls += (np_qfl(logits[0, b, :total].astype(np.float64), labels, np.where(labels < c, iou, 0.0),
                   config.loss.qfl_beta).sum(-1) * ref_label_weight[b]).sum()
    l1 += (np.abs(pred[0, b, :total] - target_boxes).sum(-1) * ref_box_weight[b]).sum()
    giou += ((1 - g) * ref_box_weight[b]).sum()
  w = config.loss
  np.testing.assert_allclose(float(terms['dn.cls']), cls / num_pos * w.cls_weight * w.dn_weight, rtol=2e-5)
  np.testing.assert_allclose(float(terms['dn.bbox']), l1 / num_pos * w.bbox_weight * w.dn_weight, rtol=2e-5)
  np.testing.assert_allclose(float(terms['dn.giou']), giou / num_pos * w.giou_weight * w.dn_weight, rtol=2e-5)


def test_dn_cap_keeps_a_random_subset_in_file_order():
  """An image over dn.max_gt denoises a random max_gt of its gts each step (not the first ones in the file)."""
  num_dn, max_gt, m = 10, 4, 9
  d = detector.dn_num_slots(num_dn, max_gt)
  box_valid = jnp.asarray([[True] * 7 + [False, True], [True, False, True] + [False] * 6])
  targets = {'boxes': jnp.full((2, m, 4), 0.3), 'labels': jnp.zeros((2, m), jnp.int32), 'box_valid': box_valid}
  chosen = []
  for seed in range(12):
    dn = _make_dn_queries(jax.random.PRNGKey(seed), targets, jnp.ones((3, 4)), num_dn_queries=num_dn,
                                  max_gt=max_gt, num_slots=d, label_noise=0.0, box_noise=0.0, group_rule='batch')
    first_group = np.asarray(dn['gt_index'])[:, :max_gt]     # width = cap = 4 (image 0), positives of group 0
    assert len(set(first_group[0])) == max_gt and list(first_group[0]) == sorted(first_group[0])
    assert set(first_group[0]) <= {0, 1, 2, 3, 4, 5, 6, 8}
    np.testing.assert_array_equal(first_group[1], [0, 2, -1, -1])   # under the cap: all, file order, padding
    chosen.append(tuple(first_group[0]))
  assert len(set(chosen)) > 3 and set(np.concatenate(chosen)) == {0, 1, 2, 3, 4, 5, 6, 8}


def test_make_dn_queries_takes_given_noise():
  """The noise draws live in draw_dn_noise: passing them equals drawing them; other draws change the queries."""
  counts, d, c = (3, 2), _DN['num_slots'], _DN_C
  targets = _dn_targets(counts, _DN_M, np.random.default_rng(0), c)
  embedding = jnp.asarray(np.random.default_rng(1).normal(size=(c, 8)), jnp.float32)
  kwargs = _DN
  rng = jax.random.PRNGKey(4)
  drawn = _make_dn_queries(rng, targets, embedding, **kwargs)
  noise = detector.draw_dn_noise(rng, d, c, targets['box_valid'])
  given = _make_dn_queries(None, targets, embedding, noise=noise, **kwargs)
  for key in drawn:
    np.testing.assert_array_equal(drawn[key], given[key])
  quiet = dict(noise, box_u=jnp.zeros_like(noise['box_u']), flip_u=jnp.ones_like(noise['flip_u']))
  clean = _make_dn_queries(None, targets, embedding, noise=quiet, **kwargs)
  positive = np.asarray(clean['positive'])
  gi = np.asarray(clean['gt_index'])
  np.testing.assert_allclose(np.asarray(clean['ref_boxes'])[positive],
                             np.asarray(targets['boxes'])[np.nonzero(positive)[0], gi[positive]], atol=1e-6)


def test_dn_cap_report_counts_images_over_the_cap():
  import types  # pylint: disable=g-import-not-at-top
  from mrqm_jax import datasets  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()   # dn.max_gt = 32
  config.dataset.max_boxes = 36  # the input pipeline keeps at most 36 (and reports the rest itself)
  records = [types.SimpleNamespace(boxes=np.zeros((n, 4))) for n in (3, 40, 32, 33, 0)]
  line = datasets.dn_cap_report(config, records)
  assert line.startswith('dn.max_gt=32: 2 of 5 training images hold more boxes (5 of their 69 boxes')
  assert 'random 32' in line and 'dn.max_gt=36 would' in line
  config.dn.max_gt = 8
  assert 'dn.max_gt=8: 3 of 5 training images' in datasets.dn_cap_report(config, records)
  config.dn.max_gt = 40
  assert datasets.dn_cap_report(config, records) is None


# ------------------------------------------------------------------------------------------- whole model
def _smoke_config() -> ml_collections.ConfigDict:
  config = smoke.get_config()
  with config.unlocked():
    config.iah.a_s = 4.0  # resolved from the dataset in training; any number here
    config.model.aux_heads = ('iah', 'atss', 'rcnn')   # every auxiliary head
  return config


@pytest.fixture(scope='module')
def model_setup():
  config = _smoke_config()
  model = detector.build_model(config)
  b, (h, w), m = 2, config.input.image_size, config.dataset.max_boxes
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(b, h, w, 3)), jnp.float32)
  pad = np.zeros((b, h, w), bool)
  pad[1, :, 96:] = True          # image 1 is 128 x 96, padded on the right
  pad = jnp.asarray(pad)
  centres = rng.uniform(0.2, 0.6, (b, m, 2))
  sizes = rng.uniform(0.02, 0.15, (b, m, 2))
  box_valid = np.zeros((b, m), bool)
  box_valid[0, :5] = True
  box_valid[1, [2, 7, 9]] = True
  targets = {'boxes': jnp.asarray(np.concatenate([centres, sizes], -1), jnp.float32),
             'labels': jnp.asarray(rng.integers(0, config.dataset.num_classes, (b, m)), jnp.int32),
             'box_valid': jnp.asarray(box_valid)}
  targets['scale'] = jnp.asarray([0.5, 1.0], jnp.float32)
  variables = jax.jit(lambda r: model.init({'params': r, 'dropout': r, 'dn': r, 'aux': r}, images, pad,
                                           train=False))(
      jax.random.PRNGKey(0))

  def loss_and_outputs(params, targets, dn_rng):
    out = model.apply({**variables, 'params': params}, images, pad, targets=targets, train=True,
                      rngs={'dn': dn_rng, 'dropout': dn_rng, 'aux': dn_rng})
    scalar = (out['pred_boxes'].sum() + out['pred_logits'].mean() + out['enc_outputs']['pred_boxes'].sum()
              + out['dn_outputs']['pred_boxes'].sum() + out['dn_outputs']['pred_logits'][-1, :, 0].sum()
              + out['iah_outputs']['cls_logits'].mean() + out['atss_outputs']['centerness'].mean()
              + out['atss_outputs']['pred_boxes'].mean() + out['rcnn_outputs']['rpn_logits'].mean()
              + out['rcnn_outputs']['rpn_deltas'].mean() + out['rcnn_outputs']['roi_logits'].mean()
              + out['rcnn_outputs']['roi_boxes'].mean())
    for head in ('iah', 'atss', 'rcnn'):
      scalar += (out[f'{head}_outputs']['query_boxes'].sum()
                 + out[f'{head}_outputs']['query_logits'][-1, :, :, 0].sum())
    return scalar, out

  train_fn = jax.jit(jax.value_and_grad(loss_and_outputs, has_aux=True))
  eval_fn = jax.jit(lambda v: model.apply(v, images, pad, train=False))
  return dict(config=config, model=model, variables=variables, targets=targets, train_fn=train_fn,
              eval_fn=eval_fn, images=images, pad=pad)


@pytest.fixture(scope='module')
def train_result(model_setup):
  s = model_setup
  return s['train_fn'](s['variables']['params'], s['targets'], jax.random.PRNGKey(1))


@pytest.mark.slow
def test_train_outputs_contract(model_setup, train_result):
  cfg = model_setup['config']
  (_, out), _ = train_result
  b, q, c, nl = 2, cfg.decoder.num_queries, cfg.dataset.num_classes, cfg.decoder.num_layers
  d = detector.dn_num_slots(cfg.dn.num_queries, min(cfg.dn.max_gt, cfg.dataset.max_boxes))
  k = aux_heads.query_group_slots(cfg.iah.max_pos, cfg.model.aux_query_padding)
  assert set(out) == {'pred_logits', 'pred_boxes', 'aux_outputs', 'enc_outputs', 'dn_outputs', 'iah_outputs',
                      'atss_outputs', 'rcnn_outputs', 'box_frame'}
  # The smoke config's 'image' frame: image 1 is 96 of the canvas's 128 columns wide.
  np.testing.assert_array_equal(out['box_frame'], [[1, 1, 1, 1], [0.75, 1, 0.75, 1]])
  assert out['pred_logits'].shape == (b, q, c) and out['pred_boxes'].shape == (b, q, 4)
  assert out['aux_outputs']['pred_logits'].shape == (nl - 1, b, q, c)
  assert out['aux_outputs']['pred_boxes'].shape == (nl - 1, b, q, 4)
  assert out['enc_outputs']['pred_logits'].shape == (b, q, c) and out['enc_outputs']['pred_boxes'].shape == (b, q, 4)
  dn = out['dn_outputs']
  assert dn['pred_logits'].shape == (nl, b, d, c) and dn['pred_boxes'].shape == (nl, b, d, 4)
  assert dn['gt_index'].shape == (b, d) and dn['gt_index'].dtype == jnp.int32
  # dn.group_rule 'batch': the densest image has 5 gts -> 20 // 5 = 4 groups of 5 + 5 slots for both images;
  # image 1 (gts 2, 7, 9) pads each half-group with 2 background queries.
  assert int(dn['valid'][0].sum()) == 2 * 4 * 5 and int(dn['valid'][1].sum()) == 2 * 4 * 5
  assert int(dn['positive'][0].sum()) == 4 * 5 and int(dn['positive'][1].sum()) == 4 * 3
  real = np.asarray(dn['valid'][1]) & (np.asarray(dn['gt_index'][1]) >= 0)
  assert set(np.asarray(dn['gt_index'][1])[real]) == {2, 7, 9} and real.sum() == 2 * 4 * 3
  iah = out['iah_outputs']
  for key in ('cls_logits', 'pred_boxes', 'anchors', 'assigned_gt'):
    assert key in iah
  assert iah['query_logits'].shape == (nl, b, k, c) and iah['query_boxes'].shape == (nl, b, k, 4)
  assert iah['query_gt'].shape == (b, k) and iah['query_valid'].shape == (b, k)
  assert np.all(np.asarray(iah['query_gt'])[~np.asarray(iah['query_valid'])] == -1)
  assert np.asarray(iah['query_valid']).any()
  # ATSS: one anchor per aux location (5 aux levels of the 128 x 128 canvas: 32^2 + ... + 2^2).
  atss = out['atss_outputs']
  num_locations = sum((128 // s) ** 2 for s in (4, 8, 16, 32, 64))
  assert atss['cls_logits'].shape == (b, num_locations, c) and atss['centerness'].shape == (b, num_locations)
  assert atss['query_logits'].shape == (nl, b, aux_heads.query_group_slots(cfg.atss.max_pos, 'negatives'), c)
  # R-CNN: sampled RPN anchors and RoIs; the query group holds the positive RoIs (IoU >= 0.5 with their gt).
  r = out['rcnn_outputs']
  assert r['rpn_logits'].shape == (b, cfg.rcnn.rpn_num_samples)
  assert r['roi_logits'].shape == (b, cfg.rcnn.roi_num_samples, c + 1)
  kr = aux_heads.query_group_slots(min(cfg.rcnn.max_pos, int(cfg.rcnn.roi_num_samples * cfg.rcnn.roi_pos_fraction)),
                                   cfg.model.aux_query_padding)
  assert r['query_logits'].shape == (nl, b, kr, c) and r['query_valid'].shape == (b, kr)
  gts = np.asarray(model_setup['targets']['boxes'])
  for i in range(b):
    positive = np.asarray(r['query_gt'][i]) >= 0
    assert positive.sum() >= int(model_setup['targets']['box_valid'][i].sum())   # every gt is its own RoI
    refs = np.asarray(r['query_ref_boxes'][i])[positive]
    owners = gts[i][np.asarray(r['query_gt'][i])[positive]]
    ious = np.diag(np.asarray(box_ops.pairwise_iou(box_ops.cxcywh_to_xyxy(refs), box_ops.cxcywh_to_xyxy(owners))))
    assert np.all(ious >= 0.5 - 1e-5)
    assert not np.any(np.asarray(r['rpn_pos'][i]) & ~np.asarray(r['rpn_valid'][i]))
    assert int(np.asarray(r['rpn_valid'][i]).sum()) == cfg.rcnn.rpn_num_samples   # 12k anchors: always filled
  for leaf in jax.tree.leaves(out):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(leaf))
  boxes = np.asarray(out['pred_boxes'])
  assert np.all((boxes >= 0) & (boxes <= 1))


@pytest.mark.slow
def test_aux_query_groups_padded_with_negatives(model_setup, train_result):
  """model.aux_query_padding='negatives' (the default, Co-DETR): each head's group holds K = max(9, most
  positives of an image in the batch) live slots per image: the image's chosen positives, then distinct negatives
  of that image (anchors on the image assigned to no gt; R-CNN: sampled negative RoIs), classified as background."""
  (_, out), _ = train_result
  assert model_setup['config'].model.aux_query_padding == 'negatives'
  for head in ('iah', 'atss', 'rcnn'):
    o = {k: np.asarray(v) for k, v in out[f'{head}_outputs'].items()}
    num_pos = o['pos_valid'].sum(1)
    k = max(9, num_pos.max())
    slots = np.arange(o['query_live'].shape[1])
    np.testing.assert_array_equal(o['query_valid'], o['query_live'])
    np.testing.assert_array_equal(o['query_live'], np.broadcast_to(slots < k, o['query_live'].shape))
    for i in range(2):
      np.testing.assert_array_equal(o['query_gt'][i] >= 0, slots < num_pos[i])
      np.testing.assert_array_equal(o['query_ref_boxes'][i, :num_pos[i]], o['pos_ref_boxes'][i, :num_pos[i]])
      negatives = o['query_index'][i, num_pos[i]:k]
      assert len(set(negatives)) == k - num_pos[i]
      if head == 'rcnn':
        assert np.all(o['roi_valid'][i, negatives]) and np.all(o['roi_gt'][i, negatives] == -1)
      else:
        assert np.all(o['assigned_gt'][i, negatives] == -1) and np.all(o['anchor_valid'][i, negatives])
        np.testing.assert_array_equal(o['query_ref_boxes'][i, :k], o['anchors'][o['query_index'][i, :k]])
    assert np.all(np.isfinite(o['query_logits'])) and np.all(np.isfinite(o['query_boxes']))
  assert not out['iah_outputs']['anchor_valid'][1].all()     # image 1's padding anchors exist, and are excluded


@pytest.mark.slow
def test_gradients_finite_and_reach_every_part(train_result):
  (scalar, _), grads = train_result
  assert np.isfinite(scalar)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
  norms = {name: float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(grads[name]))))
           for name in grads}
  # DN label embedding, decoder, encoder, neck, backbone, IAH and the aux projections all get gradient.
  for name in ('label_embedding', 'decoder', 'encoder', 'neck', 'backbone', 'iah', 'atss', 'rcnn', 'aux_levels',
               'aux_query_iah', 'aux_query_atss', 'aux_query_rcnn', 'enc_box_head', 'query_embed'):
    assert norms[name] > 0, (name, norms)


@pytest.mark.slow
def test_dn_inputs_do_not_change_matching_outputs(model_setup, train_result):
  s = model_setup
  (_, base), _ = train_result
  other_targets = dict(s['targets'], boxes=s['targets']['boxes'].at[:, :, :2].add(0.05),
                       labels=(s['targets']['labels'] + 1) % s['config'].dataset.num_classes)
  (_, moved), _ = s['train_fn'](s['variables']['params'], other_targets, jax.random.PRNGKey(7))
  # Different DN noise and different gts: the DN queries change ...
  assert not np.allclose(base['dn_outputs']['pred_boxes'], moved['dn_outputs']['pred_boxes'], atol=1e-4)
  # ... but the matching group (and the encoder proposals) cannot see them.
  np.testing.assert_allclose(base['pred_logits'], moved['pred_logits'], atol=1e-5)
  np.testing.assert_allclose(base['pred_boxes'], moved['pred_boxes'], atol=1e-6)
  np.testing.assert_allclose(base['aux_outputs']['pred_logits'], moved['aux_outputs']['pred_logits'], atol=1e-5)
  np.testing.assert_allclose(base['enc_outputs']['pred_boxes'], moved['enc_outputs']['pred_boxes'], atol=1e-6)


@pytest.mark.slow
def test_eval_outputs_have_no_training_groups(model_setup, train_result):
  s = model_setup
  out = s['eval_fn'](s['variables'])
  assert set(out) == {'pred_logits', 'pred_boxes', 'aux_outputs', 'enc_outputs', 'box_frame'}
  # Eval equals the training pass's matching group (no dropout in smoke; DN/IAH are masked away from it).
  (_, train_out), _ = train_result
  np.testing.assert_allclose(out['pred_logits'], train_out['pred_logits'], atol=1e-5)
  np.testing.assert_allclose(out['pred_boxes'], train_out['pred_boxes'], atol=1e-6)
  # Selected proposals never come from padded tokens: image 1's right quarter is padding. At init the enc box
  # head's last layer is zero, so the selected boxes are the token proposals themselves (here canvas-normalized).
  boxes = np.asarray(out['enc_outputs']['pred_boxes']) * np.asarray(out['box_frame'])[:, None]
  assert np.all(boxes[1, :, 0] < 0.75) and np.any(boxes[0, :, 0] > 0.75)


@pytest.mark.slow
def test_inference_does_not_depend_on_auxiliary_heads(model_setup):
  """Training-only heads: NaN in every auxiliary parameter leaves the inference outputs unchanged."""
  s = model_setup
  params = dict(s['variables']['params'])
  aux_names = [n for n in params if n.startswith(('aux_', 'iah', 'atss', 'rcnn'))]
  assert set(aux_names) >= {'aux_levels', 'iah', 'atss', 'rcnn', 'aux_query_iah'}
  poisoned = {**params, **{n: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params[n]) for n in aux_names}}
  base = s['eval_fn'](s['variables'])
  out = s['eval_fn']({**s['variables'], 'params': poisoned})
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(out)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_export_has_no_auxiliary_branch(model_setup):
  """The exported inference function of a model with every aux head lowers to the same StableHLO as the same
  model built without aux heads, and the export's parameters hold none of them."""
  s = model_setup
  params = detector.inference_params(s['variables']['params'])
  assert not any(k.startswith(detector.TRAINING_ONLY_PREFIXES) for k in params) and 'decoder' in params
  variables = {**s['variables'], 'params': params}
  plain_config = _smoke_config()
  with plain_config.unlocked():
    plain_config.model.aux_heads = ()
  texts = []
  for config in (s['config'], plain_config):
    fn = export.inference_fn(detector.build_model(config), config.eval.max_detections)
    texts.append(jax.jit(fn).lower(variables, s['images'], s['pad']).as_text())
  assert texts[0] == texts[1]


@pytest.mark.parametrize('norm_region', ['batch', 'canvas'])
def test_every_group_norm_gets_the_norm_region(norm_region):
  """model.norm_region reaches every GroupNorm of the detector (neck, aux level, IAH and ATSS towers): 'batch'
  hands each the batch's extent (`layers.batch_extent`, tested in test_layers.py, as each part's use of it in
  test_bifpn.py), 'canvas' none. Traced abstractly (eval_shape): nothing compiles."""
  config = _smoke_config()
  config.model.norm_region = norm_region
  config.model.aux_heads = ('iah', 'atss')   # the heads with GroupNorm (R-CNN has none)
  model = detector.build_model(config)
  b, (h, w) = 2, config.input.image_size
  pad = np.ones((b, h, w), bool)
  pad[0, :96, :80] = False
  pad[1, :64, :112] = False
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.NeckNorm) and context.method_name == '__call__':
      region = args[1] if len(args) > 1 else kwargs.get('norm_region')
      seen['/'.join(context.module.path)] = None if region is None else tuple(region.shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda r: model.init({'params': r, 'dropout': r, 'dn': r, 'aux': r}, jnp.zeros((b, h, w, 3)),
                                        jnp.asarray(pad), train=False), jax.random.key(0))
  assert {path.split('/')[0] for path in seen} == {'neck', 'aux_levels', 'iah', 'atss'}
  assert len(seen) == 4 + 6 + 1 + 2 + 2   # BiFPN: 4 input projections, 6 blocks; downsample; 2 towers per head
  want = (1, h, w) if norm_region == 'batch' else None
  assert {path: region for path, region in seen.items() if region != want} == {}

