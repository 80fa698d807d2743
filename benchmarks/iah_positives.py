r"""IoU-Aware Head assignment statistics on real VisDrone annotations: positives per object by size band.

For every threshold setting (the paper's dynamic T_I with T_b in {0.5, 0.55, 0.6, 0.65}, and a fixed 0.5) and
anchor scheme, each image is resized keeping its aspect ratio into the config's canvas (800 x 1344 for
VisDrone), anchors are laid on the P2..P5 grids (strides 4, 8, 16, 32) and assigned with
`iou_aware_head.assign_anchors`; anchors on padding tokens are invalid, as in training. Then the top
`iah.max_pos` positives per image are selected as the auxiliary queries (`select_positives`).

Columns, per VisDrone size band (original-pixel area: S <= 32^2 < M <= 96^2 < L):
  pos/obj     mean positive anchors per object
  >thr        % of objects with at least one anchor above their own threshold (the rest only have the
              best-anchor fallback, or nothing when no anchor overlaps them at all)
  IoU         mean IoU of the positives with their object
  q/obj       mean auxiliary queries per object after the top-K selection
  T_I         mean threshold of the band

Usage:
  python benchmarks/iah_positives.py [--data ../shared/data/visdrone/val_dev] [--a_s 3] [--max_images N]
A_s defaults to the smallest valid training box area (VisDrone train annotations: 3 px^2, paper eq. 8); 1024 is
shown for sensitivity. Runtime on 2 shared CPU cores: ~45 min for the config scheme (803k anchors), ~10 min
for one_scale, ~5 min for codetr (all 142 val_dev images); seconds on an accelerator.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import visdrone as visdrone_config  # noqa: E402
from input_pipeline import visdrone  # noqa: E402
from mrqm_jax.models import iou_aware_head as iah  # noqa: E402

BANDS = (('S', 0.0, 32.0 ** 2), ('M', 32.0 ** 2, 96.0 ** 2), ('L', 96.0 ** 2, np.inf))
STRIDES = (4, 8, 16, 32)


def parse_args():
  here = pathlib.Path(__file__).resolve().parents[1]
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', default=str(here.parent / 'shared' / 'data' / 'visdrone' / 'val_dev'))
  p.add_argument('--a_s', default='3,1024',
                 help='comma list of A_s values (px^2) for eq. 8; 3 = smallest VisDrone train box, the paper\'s '
                      'definition; others show the sensitivity')
  p.add_argument('--max_images', type=int, default=-1)
  p.add_argument('--schemes', default='config,one_scale,codetr',
                 help='comma list of anchor schemes: config (iah.anchor_*), codetr (ATSS 8 x stride, ratio 1), '
                      'one_scale / two_scales / three_scales (config sizes and ratios with 1, 2 or 3 octave '
                      'scales)')
  return p.parse_args()


def anchor_schemes(config):
  """name -> (sizes per level, ratios, scales)."""
  sizes = tuple(config.iah.anchor_sizes)
  ratios = tuple(config.iah.anchor_ratios)
  return {
      'config': (sizes, ratios, tuple(config.iah.anchor_scales)),
      'codetr': (tuple(8.0 * s for s in STRIDES), (1.0,), (1.0,)),       # Co-DINO's ATSS head
      'one_scale': (sizes, ratios, (1.0,)),
      'two_scales': (sizes, ratios, (1.0, 2.0 ** 0.5)),
      'three_scales': (sizes, ratios, (1.0, 2.0 ** (1 / 3), 2.0 ** (2 / 3))),
  }


def main():
  args = parse_args()
  config = visdrone_config.get_config()
  canvas_h, canvas_w = config.input.image_size
  shapes = tuple((canvas_h // s, canvas_w // s) for s in STRIDES)
  records, report = visdrone.read_split(args.data)
  if args.max_images > 0:
    records = records[:args.max_images]
  print(report.summary() if hasattr(report, 'summary') else report)
  settings = [(f'A_s={a_s:g} T_b={t}', a_s, t) for a_s in (float(v) for v in args.a_s.split(','))
              for t in (0.5, 0.55, 0.6, 0.65)] + [('fixed 0.5', None, 0.5)]
  max_pos = config.iah.max_pos

  # One padded gt count for all images (one compilation per scheme and setting).
  max_gt = int(max(len(r.boxes) for r in records))
  max_gt = -(-max_gt // 64) * 64

  for scheme in args.schemes.split(','):
    sizes, ratios, scales = anchor_schemes(config)[scheme]
    anchors = jnp.asarray(iah.generate_anchors(shapes, (canvas_h, canvas_w), sizes, ratios, scales))
    num_per_location = len(ratios) * len(scales)
    print(f'\nanchor scheme {scheme!r}: sizes {sizes} px on strides {STRIDES}, ratios {ratios}, '
          f'scales {tuple(round(v, 3) for v in scales)}; '
          f'{anchors.shape[0]} anchors; canvas {canvas_h}x{canvas_w}; K={max_pos}; '
          f'{len(records)} images')

    # vmap over the settings' thresholds only: the IoU blocks do not depend on them, so they are computed once.
    @jax.jit
    def run(boxes, valid, anchor_valid, thresholds):
      def one(t):
        assigned, iou = iah.assign_anchors(anchors, boxes, valid, t, anchor_valid=anchor_valid)
        idx, pos_valid = iah.select_positives(assigned, iou, max_pos)
        return assigned, iou, jnp.where(pos_valid, assigned[idx], -1)
      return jax.vmap(one)(thresholds)

    per_setting = [{b: {'n': 0, 'pos': 0, 'above': 0, 'iou': 0.0, 'q': 0, 't': 0.0} for b, _, _ in BANDS}
                   for _ in settings]
    t0 = time.time()
    for record in records:
      scale = min(canvas_h / record.height, canvas_w / record.width)
      n = len(record.boxes)
      xyxy = record.boxes * scale
      boxes = np.zeros((max_gt, 4), np.float32)
      boxes[:n, 0] = (xyxy[:, 0] + xyxy[:, 2]) / 2 / canvas_w
      boxes[:n, 1] = (xyxy[:, 1] + xyxy[:, 3]) / 2 / canvas_h
      boxes[:n, 2] = (xyxy[:, 2] - xyxy[:, 0]) / canvas_w
      boxes[:n, 3] = (xyxy[:, 3] - xyxy[:, 1]) / canvas_h
      valid = np.arange(max_gt) < n
      img_h, img_w = record.height * scale, record.width * scale
      token_valid = np.concatenate([
          ((((np.arange(h) + 0.5) * canvas_h / h)[:, None] < img_h)
           & (((np.arange(w) + 0.5) * canvas_w / w)[None, :] < img_w)).reshape(-1) for h, w in shapes])
      thresholds = np.stack([
          np.full((max_gt,), t_b, np.float32) if a_s is None else np.asarray(iah.dynamic_iou_threshold(
              boxes[:, 2] * canvas_w, boxes[:, 3] * canvas_h, t_b=t_b, k=config.iah.k, p=config.iah.p, a_s=a_s))
          for _, a_s, t_b in settings]).astype(np.float32)
      all_assigned, all_iou, all_queries = jax.device_get(
          run(boxes, valid, np.repeat(token_valid, num_per_location), thresholds))
      orig_area = (record.boxes[:, 2] - record.boxes[:, 0]) * (record.boxes[:, 3] - record.boxes[:, 1])
      for s_i in range(len(settings)):
        assigned, iou, queries, thr = all_assigned[s_i], all_iou[s_i], all_queries[s_i], thresholds[s_i]
        pos = assigned >= 0
        pos_count = np.bincount(assigned[pos], minlength=max_gt)[:n]
        iou_sum = np.bincount(assigned[pos], weights=iou[pos], minlength=max_gt)[:n]
        above = np.bincount(assigned[pos & (iou > thr[np.maximum(assigned, 0)])], minlength=max_gt)[:n] > 0
        q_count = np.bincount(queries[queries >= 0], minlength=max_gt)[:n]
        for band, lo, hi in BANDS:
          sel = (orig_area > lo) & (orig_area <= hi)
          acc = per_setting[s_i][band]
          acc['n'] += int(sel.sum())
          acc['pos'] += int(pos_count[sel].sum())
          acc['above'] += int(above[sel].sum())
          acc['iou'] += float(iou_sum[sel].sum())
          acc['q'] += int(q_count[sel].sum())
          acc['t'] += float(thr[:n][sel].sum())

    header = f'{"setting":<20}' + ''.join(
        f'| {b:<1} {"pos/obj":>7} {">thr":>5} {"IoU":>5} {"q/obj":>5} {"T_I":>5} ' for b, _, _ in BANDS)
    print(header)
    print('-' * len(header))
    for (name, _, _), per_band in zip(settings, per_setting):
      row = f'{name:<20}'
      for band, _, _ in BANDS:
        acc = per_band[band]
        count = max(acc['n'], 1)
        row += (f'| {band:<1} {acc["pos"] / count:7.2f} {100 * acc["above"] / count:4.0f}% '
                f'{acc["iou"] / max(acc["pos"], 1):5.2f} {acc["q"] / count:5.2f} {acc["t"] / count:5.2f} ')
      print(row)
    print(f'({time.time() - t0:.0f}s)')
    counts = {b: per_setting[0][b]['n'] for b, _, _ in BANDS}
    print(f'objects per band: {counts}')


if __name__ == '__main__':
  main()
