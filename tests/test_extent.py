"""model.norm_region='batch': the canvas past the batch's extent takes no part. Each part the canvas feeds, run on
the canvas with the batch's extent, equals the same part on the batch cropped to its extent (mmdet's batch
tensor, padded to its largest image) inside the extent, to float32 round-off — with arbitrary (random) values
past the extent, as our backbone's and encoder's activations on canvas padding are: backbone C2..C5, the necks
(ChannelMapper, BiFPN, FPN), the aux extra level, a dense head's whole output (ATSS / IAH), the RPN head, the
RPN's proposal anchors, RoIAlign at the extent's edge, the encoder's level masks, and the whole detector's
inference outputs. Without the extent (today's 'canvas') each differs, so every check can fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mrqm_jax.models import aux_heads
from mrqm_jax.models import backbone as backbone_lib
from mrqm_jax.models import bifpn
from mrqm_jax.models import detector
from mrqm_jax.models import layers
from mrqm_jax.ops import roi_align

# The shapes of tests/test_bifpn.py: two images of 130 x 150 and 100 x 180 px on a 192 x 256 canvas; mmdet's
# batch tensor is 130 x 180 (its extent): at strides 4 .. 64, 33 x 45, 17 x 23, 9 x 12, 5 x 6, 3 x 3.
CANVAS, IMAGES = (192, 256), ((130, 150), (100, 180))
RTOL = 1e-4   # max |canvas - cropped| / max |cropped|: float32 round-off (the target)


def _pad_mask(images=IMAGES, canvas=CANVAS):
  pad = np.ones((len(images), *canvas), bool)
  for i, (h, w) in enumerate(images):
    pad[i, :h, :w] = False
  return jnp.asarray(pad)


def _extent_at(stride, images=IMAGES):
  return tuple(-(-max(hw[k] for hw in images) // stride) for k in range(2))


def _random_maps(channels, seed, first_stride=4):
  """Random [B, H_l, W_l, c] at strides first_stride * 2^l of CANVAS, random past the extent too (what our
  backbone and encoder leave on the canvas padding)."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(len(IMAGES), -(-CANVAS[0] // (first_stride * 2**l)),
                                       -(-CANVAS[1] // (first_stride * 2**l)), c)), jnp.float32)
          for l, c in enumerate(channels)]


def _crop(maps, first_stride=4):
  return [m[:, :_extent_at(first_stride * 2**l)[0], :_extent_at(first_stride * 2**l)[1]]
          for l, m in enumerate(maps)]


def _max_rel(ours, reference):
  """max over levels of |ours - reference| inside the extent / max |reference| (arrays [B, h_l, w_l, ...] and
  [B, H_l, W_l, ...] with h_l <= H_l)."""
  scale = max(float(np.abs(np.asarray(r)).max()) for r in reference)
  diff = max(float(np.abs(np.asarray(o)[:, :r.shape[1], :r.shape[2]] - np.asarray(r)).max())
             for o, r in zip(ours, reference))
  return diff / scale


def test_zero_outside_and_region_extent_hw():
  region = layers.batch_extent(_pad_mask())
  x = jnp.ones((2, 24, 32, 3))   # stride 8: the extent's 17 x 23 of the canvas' 24 x 32
  got = np.asarray(layers.zero_outside(x, region))
  assert got[:, :17, :23].all() and not got[:, 17:].any() and not got[:, :, 23:].any()
  assert np.asarray(layers.region_extent_hw(region, (24, 32))).tolist() == [17, 23]
  assert np.asarray(layers.region_extent_hw(region, CANVAS)).tolist() == [130, 180]


def test_backbone_over_the_batch_extent_equals_the_cropped_batch():
  """ResNet C2..C5: every k > 1 conv and the stem's max-pool read zeros past the extent (mmdet's zero padding),
  so each level inside the extent equals the backbone on the cropped batch, the image past the extent whatever
  it is (here noise)."""
  net = backbone_lib.ResNet(depth=18, width=4, frozen_stages=0)
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, *CANVAS, 3)), jnp.float32)
  cropped_image = image[:, :130, :180]
  variables = jax.jit(net.init)(jax.random.key(0), cropped_image)
  apply = jax.jit(net.apply)
  reference = apply(variables, cropped_image)
  assert [r.shape[1:3] for r in reference] == [_extent_at(4 * 2**l) for l in range(4)]
  assert _max_rel(apply(variables, image, layers.batch_extent(_pad_mask())), reference) < RTOL
  assert _max_rel(apply(variables, image), reference) > 1e-2


@pytest.mark.parametrize('neck', ['channel_mapper', 'bifpn', 'fpn'])
def test_necks_over_the_batch_extent_equal_the_cropped_batch(neck):
  """Every neck level inside the extent equals the neck on the cropped batch, with noise past the extent: the
  GroupNorm statistics over the extent, k > 1 convs (the BiFPN's depthwise ones included) reading zeros and the
  BiFPN's max-pool -inf past it."""
  module = {'channel_mapper': bifpn.ChannelMapper(hidden_dim=16, num_levels=5),
            'bifpn': bifpn.BiFPN(hidden_dim=16, repeats=2), 'fpn': bifpn.FPN(hidden_dim=16)}[neck]
  feats = _random_maps((8, 16, 32, 64), seed=0)
  variables = jax.jit(module.init)(jax.random.key(0), feats)
  apply = jax.jit(module.apply)
  reference = apply(variables, _crop(feats))
  assert _max_rel(apply(variables, feats, layers.batch_extent(_pad_mask())), reference) < RTOL
  assert _max_rel(apply(variables, feats), reference) > 1e-2


def test_aux_level_dense_head_and_rpn_head_over_the_batch_extent_equal_the_cropped_batch():
  """The aux `downsample` level and, on the aux levels, a dense head's every output (ATSS: towers, class,
  box and centerness convs, its last row and column included) and the RPN head equal the cropped batch inside
  the extent, with noise past it (the encoder's memory on tokens past the extent)."""
  dim = 16
  maps = _random_maps((dim,) * 4, seed=1)
  region = layers.batch_extent(_pad_mask())
  flat = lambda ms: jnp.concatenate([m.reshape(m.shape[0], -1, dim) for m in ms], axis=1)  # noqa: E731
  levels = aux_heads.AuxLevels()
  shapes = tuple(m.shape[1:3] for m in maps)
  cropped_shapes = tuple(m.shape[1:3] for m in _crop(maps))
  lv = levels.init(jax.random.key(0), flat(maps), shapes)
  level_apply = jax.jit(levels.apply, static_argnums=2)
  ours = level_apply(lv, flat(maps), shapes, region)
  reference = level_apply(lv, flat(_crop(maps)), cropped_shapes)
  assert _max_rel(ours[-1:], reference[-1:]) < RTOL
  assert _max_rel(level_apply(lv, flat(maps), shapes)[-1:], reference[-1:]) > 1e-2

  level_shapes = [m.shape[1:3] for m in ours]
  extent_shapes = [m.shape[1:3] for m in reference]

  def per_level(out, level_hw):   # {key: [B, A, ...]} (A = R * sum H_l W_l) -> [[B, H_l, W_l, all outputs]]
    parts = []
    for key in sorted(out):
      x, start, split = out[key], 0, []
      x = x.reshape(x.shape[0], sum(h * w for h, w in level_hw), -1)
      for h, w in level_hw:
        split.append(np.asarray(x[:, start:start + h * w]).reshape(x.shape[0], h, w, -1))
        start += h * w
      parts.append(split)
    return [np.concatenate(p, -1) for p in zip(*parts)]

  for head in (aux_heads.DenseHead(num_anchors=2, num_classes=3, stacked_convs=2, with_centerness=True),
               aux_heads.RPNHead(num_anchors=3, feat_channels=dim)):
    hv = head.init(jax.random.key(1), ours)
    apply = jax.jit(head.apply)
    # The head's input past the extent: whatever the aux level left there (noise, then normalized).
    want = per_level(apply(hv, reference), extent_shapes)
    assert _max_rel(per_level(apply(hv, ours, region), level_shapes), want) < RTOL
    assert _max_rel(per_level(apply(hv, ours), level_shapes), want) > 1e-3


def test_roi_align_clamps_at_the_extent_as_on_the_cropped_map():
  """mmcv's RoIAlign on the batch tensor: a sample in [h - 1, h) uses row h - 1 alone, one past h + 1 is 0.
  With `extent_hw` the canvas maps give exactly that (without it the sample reads row h of the canvas)."""
  rng = np.random.default_rng(3)
  maps = [jnp.asarray(rng.normal(size=(1, 48, 64, 4)), jnp.float32),
          jnp.asarray(rng.normal(size=(1, 24, 32, 4)), jnp.float32)]
  extent = [(33, 45), (17, 23)]   # stride 4 and 8 of a 130 x 180 extent
  # RoIs reaching the extent's bottom / right edge (130 x 180 px), small (level 0) and large (level 1).
  rois = jnp.asarray([[[100.0, 90.0, 180.0, 130.0], [10.0, 118.0, 40.0, 130.0], [20.0, 10.0, 180.0, 129.0],
                       [175.0, 125.0, 182.0, 131.0]]], jnp.float32)
  kw = dict(output_size=3, sampling_ratio=0, max_samples=4, finest_scale=56.0)
  reference = roi_align.multilevel_roi_align([m[:, :h, :w] for m, (h, w) in zip(maps, extent)], rois, (4, 8), **kw)
  ours = roi_align.multilevel_roi_align(maps, rois, (4, 8), extent_hw=jnp.asarray(extent), **kw)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(roi_align.multilevel_roi_align(maps, rois, (4, 8), **kw) - reference).max()) > 1e-2


def test_extent_level_pad_masks_are_mmdets_resize_of_the_batch_tensor_mask():
  """mmdet resizes its batch tensor's mask (the extent's) to each level (PyTorch nearest): the same as
  `level_pad_masks(torch_nearest=True)` on the cropped mask, and padding past the extent."""
  pad = _pad_mask(((130, 150), (97, 180)))
  region = layers.batch_extent(pad)
  shapes = [(48, 64), (24, 32), (12, 16), (6, 8)]
  cropped_shapes = [_extent_at(4 * 2**l) for l in range(4)]
  ours = detector.extent_level_pad_masks(pad, region, shapes)
  reference = detector.level_pad_masks(pad[:, :130, :180], cropped_shapes, torch_nearest=True)
  canvas = detector.level_pad_masks(pad, shapes, torch_nearest=True)
  differs = False
  for o, r, c, (h, w) in zip(ours, reference, canvas, cropped_shapes):
    o, r = np.asarray(o), np.asarray(r)
    np.testing.assert_array_equal(o[:, :h, :w], r)
    assert o[:, h:].all() and o[:, :, w:].all()
    differs |= not np.array_equal(np.asarray(c)[:, :h, :w], r)
  assert differs   # the canvas' resize puts some padding boundary elsewhere
  # A batch that fills the canvas: the canvas rule.
  full = jnp.zeros((1, *CANVAS), bool).at[0, :, 200:].set(True)
  for o, c in zip(detector.extent_level_pad_masks(full, layers.batch_extent(full.at[0, 0, 255].set(False)), shapes),
                  detector.level_pad_masks(full, shapes, torch_nearest=True)):
    np.testing.assert_array_equal(np.asarray(o), np.asarray(c))


def test_extent_anchor_valid_marks_the_anchors_of_the_batch_tensor():
  """mmdet's RPN proposes from every anchor of its batch tensor's maps (the RPN's proposal candidates with the
  extent): exactly the anchors at the extent's positions of each level, in `flatten_anchor_maps` order."""
  shapes = [(48, 64), (24, 32), (12, 16), (6, 8), (3, 4)]
  got = np.asarray(aux_heads.extent_anchor_valid(layers.batch_extent(_pad_mask()), shapes, 3, batch=2))
  want = []
  for l, (h, w) in enumerate(shapes):
    he, we = _extent_at(4 * 2**l)
    inside = (np.arange(h)[:, None] < he) & (np.arange(w)[None, :] < we)
    want.append(np.repeat(inside.reshape(-1), 3))
  want = np.concatenate(want)
  assert got.shape == (2, want.size) and 0 < want.sum() < want.size
  np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


@pytest.mark.slow   # two compiles of the smoke detector (~60 CPU-s)
def test_detector_inference_over_the_batch_extent_equals_the_cropped_batch():
  """The whole detector (smoke widths: ResNet-18/8, BiFPN, SAE, DINO decoder; 'image' box frame) on a canvas with
  noise past the batch's extent equals it on the batch cropped to the extent: the encoder's selected proposals
  (logits, boxes) and every decoder output, boxes in each image's own frame. Today's code read the canvas past
  the extent at every conv and took its tokens into the top-k (max rel 1e-1 .. 1 here)."""
  config = smoke.get_config()
  with config.unlocked():
    config.model.norm_region = 'batch'
    config.encoder.num_layers = 1   # one of each layer kind (SAE: a high layer and the F2 update): a shorter compile
  model = detector.build_model(config)
  h, w = config.input.image_size   # 128 x 128
  images_hw = ((100, 70), (84, 90))   # extent 100 x 90
  pad = np.ones((2, h, w), bool)
  for i, (ih, iw) in enumerate(images_hw):
    pad[i, :ih, :iw] = False
  images = jnp.asarray(np.random.default_rng(5).normal(size=(2, h, w, 3)), jnp.float32)
  images = jnp.where(jnp.asarray(pad)[..., None], 0.0, images)   # the pipeline's zero padding ...
  images = images.at[:, 100:].set(3.0).at[:, :, 90:].set(-2.0)   # ... and anything past the extent
  variables = jax.jit(lambda r: model.init({'params': r, 'dropout': r, 'dn': r, 'aux': r}, images[:, :100, :90],
                                           jnp.asarray(pad[:, :100, :90]), train=False))(jax.random.key(0))
  # Every parameter perturbed (the zero-initialised last box layers too), so that each output depends on them.
  leaves, tree = jax.tree.flatten(variables)
  noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(jax.random.split(jax.random.key(1), len(leaves)),
                                                                   leaves)]
  variables = jax.tree.unflatten(tree, [x + 0.05 * n for x, n in zip(leaves, noise)])
  run = jax.jit(lambda im, p: model.apply(variables, im, p, train=False))
  ours, reference = run(images, jnp.asarray(pad)), run(images[:, :100, :90], jnp.asarray(pad[:, :100, :90]))
  for get in (lambda o: o['pred_logits'], lambda o: o['pred_boxes'], lambda o: o['aux_outputs']['pred_boxes'],
              lambda o: o['aux_outputs']['pred_logits'], lambda o: o['enc_outputs']['pred_logits'],
              lambda o: o['enc_outputs']['pred_boxes']):
    got, want = np.asarray(get(ours)), np.asarray(get(reference))
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


def test_anchor_pad_masks_are_mmdets_valid_flags():
  """mmdet's anchor valid flags (row < ceil(image height / stride), column < ceil(image width / stride), each
  image's own size): the same on the canvas and on the cropped batch, and equal to the nearest rule
  (`level_pad_masks`) where the canvas is a multiple of the stride."""
  pad = _pad_mask()
  shapes, strides = [(48, 64), (24, 32), (12, 16), (6, 8), (3, 4)], (4, 8, 16, 32, 64)
  ours = detector.anchor_pad_masks(pad, shapes, strides)
  cropped = detector.anchor_pad_masks(pad[:, :130, :180], [_extent_at(s) for s in strides], strides)
  for o, c, s in zip(ours, cropped, strides):
    o, c = np.asarray(o), np.asarray(c)
    for i, (h, w) in enumerate(IMAGES):
      want = np.ones(o.shape[1:], bool)
      want[:-(-h // s), :-(-w // s)] = False
      np.testing.assert_array_equal(o[i], want)
    np.testing.assert_array_equal(o[:, :c.shape[1], :c.shape[2]], c)
  for o, n in zip(ours, detector.level_pad_masks(pad, shapes)):   # 192 x 256: every stride divides it
    np.testing.assert_array_equal(np.asarray(o), np.asarray(n))
  # The cropped batch's own nearest rule drifts (130 / 33 rows at stride 4 is not 4): not mmdet's flags.
  assert any(not np.array_equal(np.asarray(c), np.asarray(n)) for c, n in zip(
      cropped, detector.level_pad_masks(pad[:, :130, :180], [_extent_at(s) for s in strides])))
