r"""How far is each GroupNorm part of the model from mmdet's batch tensor, with model.norm_region 'batch' and
'canvas'? Prints a table.

  python benchmarks/norm_region.py [--images=800x1067,800x1067] [--canvas=800x1344] [--hidden_dim=256]
                                   [--beyond=zero|constant|random]
  python benchmarks/norm_region.py --whole [--neck=bifpn|channel_mapper|fpn] [--canvas=192x256]
                                   [--images=160x200,120x210]

--whole runs the whole detector instead (`run_whole`: smoke widths, every aux head), stage by stage, on the
canvas with norm_region 'batch' and 'canvas' vs the same batch cropped to its extent; its last line is
`max_rel_batch=A max_rel_canvas=B`. Without it, the GroupNorm parts alone, as follows.

Co-DETR's GroupNorms see the batch tensor, padded to the batch's largest image (mmdet's DetDataPreprocessor,
pad_size_divisor 1); ours see the static canvas. For each part — Co-DINO's ChannelMapper neck (C2..C5 -> 5
levels), the BiFPN (1 repeat), the aux `downsample` level, a dense head's towers and outputs (ATSS: stacked_convs
1, centerness) on the 5 aux levels — the part runs with random weights on random features of the canvas and on the
same features cropped to the batch's extent (the reference: mmdet's batch tensor), and the table gives
max |ours - reference| / max |reference| inside the extent, and in its interior (the extent less `--margin`
positions at its bottom and right border at each level). `--beyond=zero` (default): the features are zero beyond
the extent, as a conv sees past mmdet's batch tensor (its zero padding), so only the GroupNorm statistics and the
parts' own activations past the extent differ; `constant`: a random constant per channel there, as our backbone's
(and encoder's) features of the flat canvas padding are away from the image (the convs at the extent's border
then read them where mmdet's read zeros: a difference of the whole canvas pipeline, not of this switch);
`random`: N(0, 1) noise there, distributed as inside (so the canvas statistics are not diluted: the border effect
alone).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_IMAGES = flags.DEFINE_string('images', '800x1067,800x1067', 'Image sizes HxW of the batch (top-left on the canvas); '
                              'default: two 4:3 VisDrone images at the recipe resize (21%% of the canvas padding).')
_CANVAS = flags.DEFINE_string('canvas', '800x1344', 'The static canvas HxW (config.input.image_size).')
_HIDDEN = flags.DEFINE_integer('hidden_dim', 256, 'Neck / aux channels (config.model.hidden_dim).')
_BEYOND = flags.DEFINE_enum('beyond', 'zero', ['zero', 'constant', 'random'], 'Feature values beyond the extent.')
_MARGIN = flags.DEFINE_integer('margin', 2, 'Positions left out at the extent border for the interior column.')
_WHOLE = flags.DEFINE_bool('whole', False, 'Run the WHOLE detector (configs/smoke.py widths; --neck, every aux head) '
                           'on --canvas vs the same batch cropped to its extent, stage by stage, instead of the '
                           'GroupNorm parts alone. Default sizes then: --canvas=192x256 --images=160x200,120x210.')
_NECK = flags.DEFINE_enum('neck', 'bifpn', ['bifpn', 'channel_mapper', 'fpn'], '--whole: the neck (channel_mapper: '
                          'Co-DINO\'s, with 5 levels and the plain deformable encoder, as configs/co_dino.py).')

BACKBONE_CHANNELS = (256, 512, 1024, 2048)   # ResNet-50 C2..C5


def _hw(text):
  h, w = text.lower().split('x')
  return int(h), int(w)


def run(images, canvas, hidden_dim, beyond, margin, print_fn=print) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import aux_heads, bifpn, layers  # pylint: disable=g-import-not-at-top

  pad = np.ones((len(images), *canvas), bool)
  for i, (h, w) in enumerate(images):
    pad[i, :h, :w] = False
  region = layers.batch_extent(jnp.asarray(pad))
  extent = tuple(max(hw[k] for hw in images) for k in range(2))
  at = lambda stride, hw: (-(-hw[0] // stride), -(-hw[1] // stride))  # noqa: E731  (ceil per stride-2 step)
  rng = np.random.default_rng(0)

  def features(channels, first_stride=4):
    out = []
    for l, c in enumerate(channels):
      s = first_stride * 2**l
      x = rng.normal(size=(len(images), *at(s, canvas), c)).astype(np.float32)
      if beyond != 'random':
        h, w = at(s, extent)
        fill = 0.0 if beyond == 'zero' else rng.normal(size=c).astype(np.float32)
        x[:, h:], x[:, :, w:] = fill, fill
      out.append(jnp.asarray(x))
    return out

  def crop(maps):
    return [m[:, :at(4 * 2**l, extent)[0], :at(4 * 2**l, extent)[1]] for l, m in enumerate(maps)]

  def compare(ours, reference):
    """(max rel over the extent, over its interior) across levels: lists of [B, H_l, W_l, ...] arrays."""
    scale = max(float(np.abs(r).max()) for r in reference)
    whole = inner = 0.0
    for o, r in zip(ours, reference):
      h, w = r.shape[1:3]
      d = np.abs(np.asarray(o)[:, :h, :w] - np.asarray(r))
      whole = max(whole, float(d.max()))
      if h > margin and w > margin:
        inner = max(inner, float(d[:, :h - margin, :w - margin].max()))
    return whole / scale, inner / scale

  rows = []
  key = jax.random.key(0)

  def neck_row(name, neck, feats):
    variables = jax.jit(neck.init)(key, feats)
    apply = jax.jit(neck.apply)
    reference = apply(variables, crop(feats))
    rows.append((name, compare(apply(variables, feats, region), reference), compare(apply(variables, feats),
                                                                                     reference)))

  neck_row('ChannelMapper (Co-DINO neck, 5 levels)', bifpn.ChannelMapper(hidden_dim, 5),
           features(BACKBONE_CHANNELS))
  neck_row('BiFPN (1 repeat, 4 levels)', bifpn.BiFPN(hidden_dim, 1), features(BACKBONE_CHANNELS))

  maps = features((hidden_dim,) * 5)   # the encoder's 5 levels (Co-DINO) as aux maps
  memory = lambda ms: jnp.concatenate([m.reshape(m.shape[0], -1, hidden_dim) for m in ms], axis=1)  # noqa: E731
  shapes = [m.shape[1:3] for m in maps]
  levels = aux_heads.AuxLevels()
  lv = jax.jit(levels.init, static_argnums=2)(key, memory(maps), tuple(shapes))
  level_apply = jax.jit(levels.apply, static_argnums=2)
  cropped = crop(maps)
  reference = level_apply(lv, memory(cropped), tuple(m.shape[1:3] for m in cropped))
  batch = level_apply(lv, memory(maps), tuple(shapes), region)
  plain = level_apply(lv, memory(maps), tuple(shapes))
  rows.append(('aux downsample (conv s2 + GN)', compare(batch[-1:], reference[-1:]),
               compare(plain[-1:], reference[-1:])))

  head = aux_heads.DenseHead(num_anchors=1, num_classes=10, stacked_convs=1, with_centerness=True)
  head_maps = features((hidden_dim,) * 6)
  hv = jax.jit(head.init)(key, head_maps)
  head_apply = jax.jit(head.apply)

  def per_level(flat, level_shapes):
    out, start = [], 0
    for h, w in level_shapes:
      out.append(np.asarray(flat[:, start:start + h * w]).reshape(flat.shape[0], h, w, -1))
      start += h * w
    return out

  cropped = crop(head_maps)
  ref_out = head_apply(hv, cropped)
  canvas_shapes, extent_shapes = [m.shape[1:3] for m in head_maps], [m.shape[1:3] for m in cropped]
  for name, out in (('batch', head_apply(hv, head_maps, region)), ('canvas', head_apply(hv, head_maps))):
    merged = [np.concatenate([per_level(out[k].reshape(out[k].shape[0], out[k].shape[1], -1), canvas_shapes)[l]
                              for k in ('cls_logits', 'deltas', 'centerness')], -1) for l in range(6)]
    ref = [np.concatenate([per_level(ref_out[k].reshape(ref_out[k].shape[0], ref_out[k].shape[1], -1),
                                     extent_shapes)[l] for k in ('cls_logits', 'deltas', 'centerness')], -1)
           for l in range(6)]
    if name == 'batch':
      batch_cmp = compare(merged, ref)
    else:
      rows.append(('dense head (ATSS towers + outputs, 6 levels)', batch_cmp, compare(merged, ref)))

  print_fn(f'canvas {canvas[0]}x{canvas[1]}, images {", ".join(f"{h}x{w}" for h, w in images)} -> extent '
           f'{extent[0]}x{extent[1]} ({100 * (1 - extent[0] * extent[1] / (canvas[0] * canvas[1])):.0f}% of the '
           f'canvas beyond it); hidden_dim {hidden_dim}; features beyond the extent: {beyond}; float32')
  print_fn('max |ours - batch tensor| / max |batch tensor|   (interior: the extent less '
           f'{margin} positions at its bottom / right border)')
  print_fn(f'{"part":46s} {"batch: extent":>14s} {"interior":>10s} {"canvas: extent":>15s} {"interior":>10s}')
  for name, (b_whole, b_inner), (c_whole, c_inner) in rows:
    print_fn(f'{name:46s} {b_whole:14.1e} {b_inner:10.1e} {c_whole:15.1e} {c_inner:10.1e}')
  return {name: {'batch': b, 'canvas': c} for name, b, c in rows}


def run_whole(images, canvas, neck, print_fn=print) -> dict:
  """The whole detector on the canvas (norm_region 'batch' and 'canvas') vs the batch cropped to its extent (the
  reference: mmdet's batch tensor). Random weights (perturbed so that zero-initialised layers take part), noise
  images, the canvas past the extent filled with a constant. Inference stages from the eval pass; the aux level,
  the dense heads (IAH, ATSS: every output; RPN) and the IAH / ATSS loss terms from a training pass on the same
  random gts (the RPN's and RoI head's losses and the aux query groups depend on random draws over the anchors,
  which differ in number: not compared). Returns {stage: {'batch': rel, 'canvas': rel}}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import detector  # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import losses  # pylint: disable=g-import-not-at-top

  extent = tuple(max(hw[k] for hw in images) for k in range(2))
  b = len(images)
  pad = np.ones((b, *canvas), bool)
  for i, (h, w) in enumerate(images):
    pad[i, :h, :w] = False
  rng = np.random.default_rng(0)
  image = np.where(pad[..., None], 0.0, rng.normal(size=(b, *canvas, 3))).astype(np.float32)
  image[:, extent[0]:], image[:, :, extent[1]:] = 1.5, 1.5   # what lies past the extent must not matter
  m = 8   # random gts inside each image, in px
  centre = rng.uniform(0.2, 0.8, (b, m, 2)) * np.asarray([[w, h] for h, w in images])[:, None]
  size = rng.uniform(6, 40, (b, m, 2))
  boxes_px = np.concatenate([centre, size], -1)

  def config_for(hw, region):
    c = smoke.get_config()
    with c.unlocked():
      c.input.image_size = hw
      c.model.norm_region = region
      c.model.neck = neck
      c.model.aux_heads = ('iah', 'atss', 'rcnn')
      c.iah.a_s = 4.0
      if neck == 'channel_mapper':   # Co-DINO's five levels: the plain deformable encoder, one more anchor size
        c.model.num_levels, c.encoder.type = 5, 'deformable'
        c.iah.anchor_sizes = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    return c

  def setup(hw, region, crop):
    config = config_for(hw, region)
    model = detector.build_model(config)
    im, pm = jnp.asarray(image[:, :hw[0], :hw[1]]), jnp.asarray(pad[:, :hw[0], :hw[1]])
    scale = np.asarray([hw[1], hw[0], hw[1], hw[0]], np.float32)
    mb = config.dataset.max_boxes
    targets = {'boxes': jnp.zeros((b, mb, 4)).at[:, :m].set(boxes_px / scale),
               'labels': jnp.zeros((b, mb), jnp.int32).at[:, :m].set(jnp.asarray(rng_labels)),
               'box_valid': jnp.zeros((b, mb), bool).at[:, :m].set(True)}
    return config, model, im, pm, targets

  rng_labels = rng.integers(0, 10, (b, m))
  ref_config, ref_model, *_ = setup(extent, 'batch', True)
  init_image, init_pad = jnp.asarray(image[:, :extent[0], :extent[1]]), jnp.asarray(pad[:, :extent[0], :extent[1]])
  variables = jax.jit(lambda r: ref_model.init({'params': r, 'dropout': r, 'dn': r, 'aux': r}, init_image,
                                               init_pad, train=False))(jax.random.key(0))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  variables = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])
  wanted = {('backbone',), ('neck',), ('encoder',), ('aux_levels',), ('iah', 'dense'), ('atss', 'dense'),
            ('rcnn', 'rpn')}
  capture = lambda mdl, name: name == '__call__' and tuple(mdl.path) in wanted  # noqa: E731

  def passes(hw, region):
    config, model, im, pm, targets = setup(hw, region, False)
    rngs = {'dn': jax.random.key(2), 'dropout': jax.random.key(2), 'aux': jax.random.key(3)}
    infer = jax.jit(lambda: model.apply(variables, im, pm, train=False, capture_intermediates=capture,
                                        mutable=['intermediates']))
    out, inter = infer()

    def train_fn():
      o, st = model.apply(variables, im, pm, targets=targets, train=True, rngs=rngs,
                          capture_intermediates=capture, mutable=['intermediates'])
      _, terms = losses.compute_losses(o, targets, config)
      return {k: v for k, v in terms.items() if k in ('iah.cls', 'iah.giou', 'atss.cls', 'atss.giou',
                                                      'atss.centerness')}, st
    terms, train_inter = jax.jit(train_fn)()
    return out, inter['intermediates'], terms, train_inter['intermediates']

  results = {region: passes(canvas, region) for region in ('batch', 'canvas')}
  reference = passes(extent, 'batch')

  def call(inter, *path):
    for p in path:
      inter = inter[p]
    return inter['__call__'][0]

  def rel_maps(ours, ref):
    scale = max(float(np.abs(np.asarray(r)).max()) for r in ref)
    return max(float(np.abs(np.asarray(o)[:, :r.shape[1], :r.shape[2]] - np.asarray(r)).max())
               for o, r in zip(ours, ref)) / scale

  def rel(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    return float(np.abs(ours - ref).max()) / max(float(np.abs(ref).max()), 1e-30)

  def memory_levels(enc):   # EncoderOutput -> ([B, H, W, D] maps, [B, H, W] pad masks)
    maps, masks, start = [], [], 0
    for h, w in enc.spatial_shapes:
      h, w = int(h), int(w)
      maps.append(np.asarray(enc.memory[:, start:start + h * w]).reshape(b, h, w, -1))
      masks.append(np.asarray(enc.memory_pad_mask[:, start:start + h * w]).reshape(b, h, w))
      start += h * w
    return maps, masks

  def rel_memory(ours, ref):   # the valid tokens (mmdet's), and the level masks must agree
    (om, opad), (rm, rpad) = memory_levels(ours), memory_levels(ref)
    if any(not np.array_equal(o[:, :r.shape[1], :r.shape[2]], r) for o, r in zip(opad, rpad)):
      return float('nan')
    scale = max(float(np.abs(r).max()) for r in rm)
    return max(float(np.abs(np.where(~rp[..., None], o[:, :r.shape[1], :r.shape[2]] - r, 0.0)).max())
               for o, r, rp in zip(om, rm, rpad)) / scale

  def rel_dense(ours, ref, our_shapes, ref_shapes):   # {key: [B, R * sum H W, ...]} per level, inside the extent
    worst = 0.0
    for key in ref:
      o, r = np.asarray(ours[key]), np.asarray(ref[key])
      o = o.reshape(b, sum(h * w for h, w in our_shapes), -1)
      r = r.reshape(b, sum(h * w for h, w in ref_shapes), -1)
      so = sr = 0
      diff = 0.0
      for (h, w), (hr, wr) in zip(our_shapes, ref_shapes):
        ol = o[:, so:so + h * w].reshape(b, h, w, -1)[:, :hr, :wr]
        diff = max(diff, float(np.abs(ol - r[:, sr:sr + hr * wr].reshape(b, hr, wr, -1)).max()))
        so, sr = so + h * w, sr + hr * wr
      worst = max(worst, diff / float(np.abs(r).max()))
    return worst

  rows = {}
  r_out, r_inter, r_terms, r_train = reference
  for region, (out, inter, terms, train) in results.items():
    def put(name, value):
      rows.setdefault(name, {})[region] = value
    for l, (o, r) in enumerate(zip(call(inter, 'backbone'), call(r_inter, 'backbone'))):
      put(f'backbone C{l + 2}', rel_maps([o], [r]))
    for l, (o, r) in enumerate(zip(call(inter, 'neck'), call(r_inter, 'neck'))):
      put(f'neck level {l}', rel_maps([o], [r]))
    put('encoder memory (valid tokens)', rel_memory(call(inter, 'encoder'), call(r_inter, 'encoder')))
    put('encoder top-k: logits', rel(out['enc_outputs']['pred_logits'], r_out['enc_outputs']['pred_logits']))
    put('encoder top-k: boxes', rel(out['enc_outputs']['pred_boxes'], r_out['enc_outputs']['pred_boxes']))
    layers_logits = np.concatenate([np.asarray(out['aux_outputs']['pred_logits']), np.asarray(out['pred_logits'])[None]])
    ref_logits = np.concatenate([np.asarray(r_out['aux_outputs']['pred_logits']),
                                 np.asarray(r_out['pred_logits'])[None]])
    layers_boxes = np.concatenate([np.asarray(out['aux_outputs']['pred_boxes']), np.asarray(out['pred_boxes'])[None]])
    ref_boxes = np.concatenate([np.asarray(r_out['aux_outputs']['pred_boxes']), np.asarray(r_out['pred_boxes'])[None]])
    for l in range(len(ref_logits)):
      put(f'decoder layer {l}: logits', rel(layers_logits[l], ref_logits[l]))
      put(f'decoder layer {l}: boxes', rel(layers_boxes[l], ref_boxes[l]))
    aux_maps, ref_aux_maps = call(train, 'aux_levels'), call(r_train, 'aux_levels')
    put('aux levels (memory maps + downsample)', rel_maps(aux_maps, ref_aux_maps))
    shapes = [tuple(x.shape[1:3]) for x in aux_maps]
    ref_shapes = [tuple(x.shape[1:3]) for x in ref_aux_maps]
    for head, path in (('IAH head outputs', ('iah', 'dense')), ('ATSS head outputs', ('atss', 'dense')),
                       ('RPN head outputs', ('rcnn', 'rpn'))):
      put(head, rel_dense(call(train, *path), call(r_train, *path), shapes, ref_shapes))
    for k in sorted(r_terms):
      put(f'loss {k}', rel(terms[k], r_terms[k]))

  print_fn(f'whole detector (configs/smoke.py widths, neck {neck}, aux heads iah+atss+rcnn; random weights): canvas '
           f'{canvas[0]}x{canvas[1]}, images {", ".join(f"{h}x{w}" for h, w in images)} -> extent {extent[0]}x'
           f'{extent[1]} ({100 * (1 - extent[0] * extent[1] / (canvas[0] * canvas[1])):.0f}% of the canvas '
           'beyond it); float32')
  print_fn('max |canvas run - cropped run| / max |cropped run| inside the extent (NaN: level masks differ)')
  print_fn(f'{"stage":44s} {"norm_region=batch":>18s} {"canvas":>10s}')
  for name, v in rows.items():
    print_fn(f'{name:44s} {v["batch"]:18.1e} {v["canvas"]:10.1e}')
  worst = max(v['batch'] for v in rows.values())
  print_fn(f'max_rel_batch={worst:.1e} max_rel_canvas={max(v["canvas"] for v in rows.values()):.1e}')
  return rows


def main(argv):
  del argv
  if _WHOLE.value:
    canvas = _hw(_CANVAS.value) if _CANVAS.present else (192, 256)
    images = [_hw(t) for t in _IMAGES.value.split(',')] if _IMAGES.present else [(160, 200), (120, 210)]
    run_whole(images, canvas, _NECK.value)
    return
  run([_hw(t) for t in _IMAGES.value.split(',')], _hw(_CANVAS.value), _HIDDEN.value, _BEYOND.value, _MARGIN.value)


if __name__ == '__main__':
  app.run(main)
