r"""How far is each GroupNorm part of the model from mmdet's batch tensor, with model.norm_region 'batch' and
'canvas'? Prints a table.

  python benchmarks/norm_region.py [--images=800x1067,800x1067] [--canvas=800x1344] [--hidden_dim=256]
                                   [--beyond=zero|constant|random]

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


def main(argv):
  del argv
  run([_hw(t) for t in _IMAGES.value.split(',')], _hw(_CANVAS.value), _HIDDEN.value, _BEYOND.value, _MARGIN.value)


if __name__ == '__main__':
  app.run(main)
