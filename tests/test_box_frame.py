"""`model.box_frame`: Co-DINO's per-image box frame ('image', mmdet without LSJ) and the padded canvas ('canvas').

NumPy restatements of mmdet's formulas (level masks by PyTorch's nearest resize, `get_valid_ratio`,
`get_encoder_reference_points`, `gen_encoder_output_proposals`, the DINO decoder's `reference_points_input`) on a
padded batch of two differently sized images; the encoder and decoder handing those references to their
deformable attention; the query losses in the image frame (closed forms); the whole detector: both frames agree
on images that fill the canvas and differ on padded ones.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mrqm_jax import model_lib
from mrqm_jax.models import decoder as decoder_lib
from mrqm_jax.models import detector
from mrqm_jax.models import encoder as encoder_lib
from mrqm_jax.models.deformable_attention import MSDeformAttn
from mrqm_jax.models.position_encoding import box_sine_embedding
from mrqm_jax.ops import boxes as box_ops
from mrqm_jax.ops import losses
from tests.test_backbone import random_values

# A 100 x 140 canvas holding a 100 x 105 image (right columns padded) and a 77 x 140 one (bottom rows padded);
# the neck's levels of a stride-4..32 pyramid (rounded up).
CANVAS = (100, 140)
IMAGES = ((100, 105), (77, 140))
SHAPES = ((25, 35), (13, 18), (7, 9), (4, 5))


def _pad_mask(canvas=CANVAS, images=IMAGES):
  mask = np.ones((len(images),) + tuple(canvas), bool)
  for i, (h, w) in enumerate(images):
    mask[i, :h, :w] = False
  return mask


def _torch_nearest_index(size_in, size_out):
  """PyTorch's `F.interpolate(mode='nearest')` source index (aten UpSample.h `nearest_idx`): the scale in/out as
  a float32, floor(out_index * scale) in float32, at most in - 1."""
  scale = np.float32(size_in) / np.float32(size_out)
  return np.array([min(int(np.floor(np.float32(i) * scale)), size_in - 1) for i in range(size_out)])


def _numpy_level_masks(mask, shapes):
  return [mask[:, _torch_nearest_index(mask.shape[1], h)][:, :, _torch_nearest_index(mask.shape[2], w)]
          for h, w in shapes]


def _numpy_valid_ratios(level_masks):
  """mmdet `get_valid_ratio`: unpadded rows of column 0 / H, unpadded columns of row 0 / W -> [B, L, 2] (x, y)."""
  out = np.zeros((level_masks[0].shape[0], len(level_masks), 2))
  for lvl, m in enumerate(level_masks):
    for b in range(m.shape[0]):
      out[b, lvl] = [(~m[b, 0, :]).sum() / m.shape[2], (~m[b, :, 0]).sum() / m.shape[1]]
  return out


# ----------------------------------------------------------------------------------- formulas vs NumPy
def test_level_masks_are_pytorchs_nearest_resize():
  # Sizes where PyTorch's float32 index differs from the float64 one (found by running PyTorch 2.1's
  # F.interpolate): 106 -> 26 reads row 52 at 13, 164 -> 20 reads 123 at 15, 150 -> 18 reads 124 at 15.
  for size_in, size_out, index, torch_source in ((106, 26, 13, 52), (164, 20, 15, 123), (150, 18, 15, 124)):
    assert _torch_nearest_index(size_in, size_out)[index] == torch_source
    rows = np.zeros((1, size_in, 3), bool)
    rows[0, torch_source] = True     # only PyTorch's source row is padding
    torch_like = detector.level_pad_masks(jnp.asarray(rows), ((size_out, 3),), torch_nearest=True)[0]
    legacy = detector.level_pad_masks(jnp.asarray(rows), ((size_out, 3),))[0]
    assert bool(torch_like[0, index, 0]) and not bool(legacy[0, index, 0])
  mask = _pad_mask()
  for got, want in zip(detector.level_pad_masks(jnp.asarray(mask), SHAPES, torch_nearest=True),
                       _numpy_level_masks(mask, SHAPES)):
    np.testing.assert_array_equal(got, want)


def test_valid_ratios_and_box_frame_of_a_padded_batch():
  mask = _pad_mask()
  levels = _numpy_level_masks(mask, SHAPES)
  got = np.asarray(detector.valid_ratios([jnp.asarray(m) for m in levels]))
  np.testing.assert_allclose(got, _numpy_valid_ratios(levels), rtol=1e-6)
  # Closed form: image 0 keeps 27 of 35, 14 of 18, 7 of 9, 4 of 5 columns; image 1 20 of 25, 11 of 13, 6 of 7,
  # 4 of 4 rows (PyTorch's masks, as mmdet computed them for this batch).
  np.testing.assert_allclose(got[0, :, 0], [27 / 35, 14 / 18, 7 / 9, 4 / 5], rtol=1e-6)
  np.testing.assert_allclose(got[1, :, 1], [20 / 25, 11 / 13, 6 / 7, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(got[0, :, 1], 1.0)
  np.testing.assert_array_equal(got[1, :, 0], 1.0)
  np.testing.assert_allclose(detector.image_box_frame(jnp.asarray(mask)),
                             [[105 / 140, 1, 105 / 140, 1], [1, 77 / 100, 1, 77 / 100]], rtol=1e-6)


def test_encoder_reference_points_are_mmdets():
  levels = _numpy_level_masks(_pad_mask(), SHAPES)
  ratios = _numpy_valid_ratios(levels)
  got = np.asarray(encoder_lib.encoder_reference_points(SHAPES, jnp.asarray(ratios, jnp.float32)))
  want = []
  for lvl, (h, w) in enumerate(SHAPES):   # token (i, j) of level l, read on every level l'
    for i in range(h):
      for j in range(w):
        point = np.stack([(j + 0.5) / (ratios[:, lvl, 0] * w), (i + 0.5) / (ratios[:, lvl, 1] * h)], -1)  # [B, 2]
        want.append(point[:, None, :] * ratios)                                                           # [B, L, 2]
  want = np.stack(want, axis=1)
  assert got.shape == want.shape == (2, sum(h * w for h, w in SHAPES), len(SHAPES), 2)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # An unpadded image's points are the canvas frame's token centres on every level.
  ones = np.asarray(encoder_lib.encoder_reference_points(SHAPES, jnp.ones((1, len(SHAPES), 2))))
  np.testing.assert_allclose(ones, np.broadcast_to(encoder_lib.token_centres(SHAPES)[None, :, None], ones.shape),
                             rtol=1e-6)


def test_encoder_proposals_are_per_image_and_valid_in_the_image_frame():
  levels = _numpy_level_masks(_pad_mask(), SHAPES)
  logits, in_range = detector.image_frame_proposals([jnp.asarray(m) for m in levels])
  logits, in_range = np.asarray(logits), np.asarray(in_range)
  token_valid = in_range & ~np.concatenate([m.reshape(2, -1) for m in levels], 1)
  want_boxes, want_valid = [], []
  for b in range(2):
    rows, valid = [], []
    for lvl, (h, w) in enumerate(SHAPES):   # mmdet: centre / the level's unpadded extent, side 0.05 * 2^l
      valid_h, valid_w = (~levels[lvl][b, :, 0]).sum(), (~levels[lvl][b, 0, :]).sum()
      for i in range(h):
        for j in range(w):
          box = np.array([(j + 0.5) / valid_w, (i + 0.5) / valid_h, 0.05 * 2**lvl, 0.05 * 2**lvl])
          rows.append(box)
          valid.append(bool(np.all((box > 0.01) & (box < 0.99))) and not levels[lvl][b, i, j])
    want_boxes.append(rows)
    want_valid.append(valid)
  want_boxes, want_valid = np.array(want_boxes), np.array(want_valid)
  np.testing.assert_array_equal(token_valid, want_valid)
  np.testing.assert_allclose(1 / (1 + np.exp(-logits[want_valid])), want_boxes[want_valid], rtol=1e-5)
  # Image 0's right padding is 25% of level 0: the canvas frame's centres stop at 27/35 of its width, the image
  # frame's reach 0.98 (its last unpadded column), as Co-DINO's proposals do.
  canvas_logits, _ = detector.encoder_proposals(SHAPES)
  last = 26   # level 0, row 0, column 26
  np.testing.assert_allclose(1 / (1 + np.exp(-canvas_logits[last, 0])), 26.5 / 35, rtol=1e-5)
  np.testing.assert_allclose(1 / (1 + np.exp(-logits[0, last, 0])), 26.5 / 27, rtol=1e-5)


def test_giou_is_invariant_to_a_per_axis_scaling():
  rng = np.random.default_rng(0)
  a = np.concatenate([rng.uniform(0.2, 0.8, (50, 2)), rng.uniform(0.05, 0.4, (50, 2))], -1)
  b = np.concatenate([rng.uniform(0.2, 0.8, (50, 2)), rng.uniform(0.05, 0.4, (50, 2))], -1)
  frame = np.concatenate([rng.uniform(0.3, 1.0, (50, 2))] * 2, -1)   # (w, h, w, h)

  def giou(p, q):
    xyxy = lambda boxes: box_ops.cxcywh_to_xyxy(jnp.asarray(boxes, jnp.float32))  # noqa: E731
    return np.asarray(box_ops.elementwise_giou(xyxy(p), xyxy(q)))

  np.testing.assert_allclose(giou(a / frame, b / frame), giou(a, b), rtol=1e-5, atol=1e-6)
  assert np.abs(giou(a, b)).max() > 0.05 and np.any(giou(a, b) < 0)   # not trivially equal values
  # L1 is not invariant: that is the difference the frame makes.
  assert not np.allclose(np.abs(a / frame - b / frame).sum(-1), np.abs(a - b).sum(-1))


# ------------------------------------------------------------------------ encoder and decoder wiring
def _apply_recording_references(module, variables, *args, **kwargs):
  """module.apply(variables, *args, **kwargs), jitted over the variables -> (output, {'attn': the reference
  points every MSDeformAttn call received, 'pos': the input of every ref_point_head call (the decoder's position
  embedding)}), in call order."""
  def run(variables):
    seen = {'attn': [], 'pos': []}

    def interceptor(next_fun, call_args, call_kwargs, context):
      if context.method_name == '__call__' and isinstance(context.module, MSDeformAttn):
        seen['attn'].append(call_args[1])
      if context.method_name == '__call__' and context.module.name == 'ref_point_head':
        seen['pos'].append(call_args[0])
      return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      out = module.apply(variables, *args, **kwargs)
    return out, seen
  return jax.tree.map(np.asarray, jax.jit(run)(variables))


@pytest.mark.parametrize('kind', ['sae', 'deformable'])
def test_encoder_layers_read_each_level_at_its_scaled_reference(kind):
  config = smoke.get_config()
  with config.unlocked():
    config.model.hidden_dim, config.encoder.ffn_dim, config.encoder.type = 16, 32, kind
  model = detector.build_encoder(config)
  levels = _numpy_level_masks(_pad_mask(), SHAPES)
  ratios = jnp.asarray(_numpy_valid_ratios(levels), jnp.float32)
  feats = [np.random.default_rng(lvl).normal(size=(2, h, w, 16)).astype(np.float32)
           for lvl, (h, w) in enumerate(SHAPES)]
  variables = random_values(jax.eval_shape(model.init, jax.random.key(0), feats, levels))
  _, seen = _apply_recording_references(model, variables, feats, levels, valid_ratios=ratios)
  want = np.asarray(encoder_lib.encoder_reference_points(SHAPES, ratios))
  split = SHAPES[0][0] * SHAPES[0][1]
  # SAE: num_layers calls with the F3..F5 queries, then the F2 update; plain encoder: every token each layer.
  expected = ([want[:, split:]] * config.encoder.num_layers + [want[:, :split]] if kind == 'sae'
              else [want] * config.encoder.num_layers)
  assert len(seen['attn']) == len(expected)
  for got, ref in zip(seen['attn'], expected):
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_decoder_reads_each_level_at_the_scaled_box_and_embeds_level_0():
  config = smoke.get_config()
  model = detector.build_decoder(config)
  d, n = config.model.hidden_dim, 6
  rng = np.random.default_rng(0)
  queries = jnp.asarray(rng.normal(size=(2, n, d)), jnp.float32)
  refs = jnp.asarray(np.concatenate([rng.uniform(0.2, 0.8, (2, n, 2)), rng.uniform(0.05, 0.3, (2, n, 2))], -1),
                     jnp.float32)
  memory = jnp.asarray(rng.normal(size=(2, sum(h * w for h, w in SHAPES), d)), jnp.float32)
  levels = _numpy_level_masks(_pad_mask(), SHAPES)
  memory_pad = jnp.asarray(np.concatenate([m.reshape(2, -1) for m in levels], 1))
  ratios = _numpy_valid_ratios(levels)
  variables = random_values(jax.eval_shape(lambda k: model.init(k, queries, refs, memory, memory_pad, SHAPES),
                                           jax.random.key(0)))
  out, seen = _apply_recording_references(model, variables, queries, refs, memory, memory_pad, SHAPES,
                                          valid_ratios=jnp.asarray(ratios, jnp.float32))
  assert len(seen['attn']) == len(seen['pos']) == config.decoder.num_layers
  # mmdet: reference_points_input = ref[:, :, None] * cat(valid_ratios, valid_ratios)[:, None]; the position
  # embedding is the sine embedding of its level 0.
  scaled = np.asarray(refs)[:, :, None, :] * np.concatenate([ratios, ratios], -1)[:, None]
  np.testing.assert_allclose(seen['attn'][0], scaled, rtol=1e-6)
  np.testing.assert_allclose(seen['pos'][0], box_sine_embedding(jnp.asarray(scaled[:, :, 0], jnp.float32), d // 2),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(decoder_lib.level_reference_boxes(refs, jnp.asarray(ratios, jnp.float32)), scaled,
                             rtol=1e-6)
  # Later layers: the refined box (in the image frame, not the scaled one), scaled per level the same way.
  ratio_boxes = np.concatenate([ratios, ratios], -1)[:, None]
  for layer, layer_ref in enumerate(seen['attn'][1:]):
    unscaled = layer_ref / ratio_boxes
    np.testing.assert_allclose(unscaled, np.broadcast_to(unscaled[:, :, :1], unscaled.shape), rtol=1e-5)
    # the refinement of layer l's reference, whose prediction of the same layer is refined from the same one
    assert not np.allclose(unscaled[:, :, 0], np.asarray(refs), atol=1e-3), layer
  assert np.all(np.isfinite(out['pred_boxes'])) and np.all((out['pred_boxes'] > 0) & (out['pred_boxes'] < 1))


# ------------------------------------------------------------------------------------------ losses
def _loss_config():
  config = smoke.get_config()
  with config.unlocked():
    config.model.aux_heads = ()
    config.matcher.backend = 'scipy'   # the on-device solver's loops would compile for each shape
  return config


def _query_loss_terms(outputs, targets, config):
  return jax.jit(lambda o, t: losses.compute_losses(o, t, config)[1])(outputs, targets)


def test_l1_loss_of_a_padded_image_in_the_image_frame_closed_form():
  config = _loss_config()
  # Image 0 fills the canvas; image 1 is 0.75 of its width. One query and one gt each (canvas-normalized).
  box_frame = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [0.75, 1.0, 0.75, 1.0]])
  gts = np.array([[[0.5, 0.5, 0.2, 0.2]], [[0.3, 0.5, 0.15, 0.2]]], np.float32)   # image 1: (0.4, 0.5, 0.2, 0.2)
  preds = np.array([[[0.45, 0.5, 0.2, 0.25]], [[0.5, 0.4, 0.1, 0.3]]], np.float32)
  targets = {'boxes': jnp.asarray(gts), 'labels': jnp.zeros((2, 1), jnp.int32), 'box_valid': jnp.ones((2, 1), bool)}
  outputs = {'pred_logits': jnp.zeros((2, 1, config.dataset.num_classes)), 'pred_boxes': jnp.asarray(preds),
             'box_frame': box_frame}
  terms = _query_loss_terms(outputs, targets, config)
  # L1 in the image frame: image 0 |0.45-0.5| + |0.25-0.2| = 0.1; image 1 |0.5-0.4| + |0.4-0.5| + |0.1-0.2|
  # + |0.3-0.2| = 0.4; mean over the 2 gts x loss.bbox_weight.
  np.testing.assert_allclose(terms['bbox'], config.loss.bbox_weight * (0.1 + 0.4) / 2, rtol=1e-5)
  # The canvas frame reads the same predictions as canvas-normalized: image 1's L1 is 0.45 there.
  canvas_terms = _query_loss_terms({k: v for k, v in outputs.items() if k != 'box_frame'}, targets, config)
  np.testing.assert_allclose(canvas_terms['bbox'], config.loss.bbox_weight * (0.1 + 0.45) / 2, rtol=1e-5)
  # GIoU: the image-frame boxes' GIoU equals that of the same boxes mapped to the canvas.
  canvas_preds = preds * np.asarray(box_frame)[:, None]
  mapped = _query_loss_terms({'pred_logits': outputs['pred_logits'], 'pred_boxes': jnp.asarray(canvas_preds)},
                             targets, config)
  np.testing.assert_allclose(terms['giou'], mapped['giou'], rtol=1e-5)


def test_matching_cost_compares_in_the_image_frame():
  # Two identical-scoring queries and one gt of an image half the canvas wide: query 0 is the gt in the image
  # frame, query 1 the same numbers read in the canvas frame. Matching in the image frame picks query 0 (box
  # losses zero); comparing against canvas-frame gts would pick query 1 (and leave a non-zero L1 here).
  config = _loss_config()
  gt_canvas = np.array([0.25, 0.5, 0.1, 0.1], np.float32)
  gt_image = np.array([0.5, 0.5, 0.2, 0.1], np.float32)
  outputs = {'pred_logits': jnp.zeros((1, 2, config.dataset.num_classes)),
             'pred_boxes': jnp.asarray([[gt_image, gt_canvas]]), 'box_frame': jnp.asarray([[0.5, 1.0, 0.5, 1.0]])}
  targets = {'boxes': jnp.asarray(gt_canvas[None, None]), 'labels': jnp.zeros((1, 1), jnp.int32),
             'box_valid': jnp.ones((1, 1), bool)}
  terms = _query_loss_terms(outputs, targets, config)
  np.testing.assert_allclose([terms['bbox'], terms['giou']], [0.0, 0.0], atol=1e-6)


# ------------------------------------------------------------------------------------ whole detector
def _detector_config(frame):
  config = smoke.get_config()
  with config.unlocked():
    config.model.box_frame = frame
    config.model.aux_heads = ('atss',)   # one aux query group: its anchors enter the frame too
  return config


@pytest.fixture(scope='module')
def both_frames():
  """Train-mode outputs and query losses of the same weights in both frames, on a canvas-filling batch and on a
  padded one (image 0 filled, image 1 96 x 80 of the 128 x 128 canvas)."""
  configs = {frame: _detector_config(frame) for frame in detector.BOX_FRAMES}
  config = configs['image']
  b, (h, w), m = 2, config.input.image_size, config.dataset.max_boxes
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(b, h, w, 3)), jnp.float32)
  padded = np.zeros((b, h, w), bool)
  padded[1, 96:, :] = True
  padded[1, :, 80:] = True
  box_valid = np.zeros((b, m), bool)
  box_valid[0, :4] = box_valid[1, :3] = True
  boxes = np.concatenate([rng.uniform(0.2, 0.5, (b, m, 2)), rng.uniform(0.05, 0.2, (b, m, 2))], -1)
  targets = {'boxes': jnp.asarray(boxes, jnp.float32),
             'labels': jnp.asarray(rng.integers(0, config.dataset.num_classes, (b, m)), jnp.int32),
             'box_valid': jnp.asarray(box_valid), 'scale': jnp.ones((b,), jnp.float32)}
  models = {frame: detector.build_model(c) for frame, c in configs.items()}
  # Random values everywhere (zero-initialized box heads would hide the refinement's frame), filled from the
  # variables' shapes: compiling `init` would cost as much as one of the two forwards.
  variables = random_values(model_lib.abstract_variables(models['image'], config), seed=1)
  results = {}
  for frame, model in models.items():
    def forward(variables, pad, model=model, frame=frame):
      out = model.apply(variables, images, pad, targets=targets, train=True,
                        rngs={'dn': jax.random.PRNGKey(2), 'aux': jax.random.PRNGKey(3)})
      _, terms = losses.compute_losses(out, targets, configs[frame])
      return out, terms
    run = jax.jit(forward)
    results[frame] = {'filled': run(variables, jnp.zeros((b, h, w), bool)),
                      'padded': run(variables, jnp.asarray(padded))}
  return results


def _query_outputs(out):
  """Every query-box output (and logits) of a train-mode output dict, by name."""
  return {'pred_boxes': out['pred_boxes'], 'pred_logits': out['pred_logits'],
          'aux_boxes': out['aux_outputs']['pred_boxes'], 'enc_boxes': out['enc_outputs']['pred_boxes'],
          'enc_logits': out['enc_outputs']['pred_logits'], 'dn_boxes': out['dn_outputs']['pred_boxes'],
          'atss_query_boxes': out['atss_outputs']['query_boxes'],
          'atss_query_logits': out['atss_outputs']['query_logits']}


@pytest.mark.slow
def test_frames_agree_on_images_that_fill_the_canvas(both_frames):
  image_out, image_terms = both_frames['image']['filled']
  canvas_out, canvas_terms = both_frames['canvas']['filled']
  np.testing.assert_array_equal(image_out['box_frame'], np.ones((2, 4)))
  np.testing.assert_array_equal(canvas_out['box_frame'], np.ones((2, 4)))
  want = _query_outputs(canvas_out)
  for name, got in _query_outputs(image_out).items():
    np.testing.assert_allclose(got, want[name], rtol=1e-4, atol=1e-5, err_msg=name)
  assert set(image_terms) == set(canvas_terms)
  for name in canvas_terms:
    np.testing.assert_allclose(image_terms[name], canvas_terms[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_frames_differ_on_padded_images(both_frames):
  image_out, image_terms = both_frames['image']['padded']
  canvas_out, canvas_terms = both_frames['canvas']['padded']
  np.testing.assert_allclose(image_out['box_frame'], [[1, 1, 1, 1], [80 / 128, 96 / 128, 80 / 128, 96 / 128]])
  got, want = _query_outputs(image_out), _query_outputs(canvas_out)
  # The image that fills the canvas is not all the same: attention in the decoder's matching group is per image,
  # so its outputs agree; the padded image's differ (box refinement in logit space, per-level references).
  for name in ('pred_boxes', 'pred_logits', 'enc_boxes', 'dn_boxes', 'atss_query_boxes'):
    assert np.abs(np.asarray(got[name])[..., 1, :, :] - np.asarray(want[name])[..., 1, :, :]).max() > 1e-3, name
  for name in ('pred_boxes', 'pred_logits', 'enc_boxes'):
    np.testing.assert_allclose(got[name][0], want[name][0], rtol=1e-4, atol=1e-5, err_msg=name)
  for name in ('bbox', 'enc.bbox', 'dn.bbox', 'aux_atss.bbox'):
    assert abs(float(image_terms[name]) - float(canvas_terms[name])) > 1e-4, name
  for leaf in jax.tree.leaves((image_out, image_terms)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(leaf))
