r"""Auxiliary-head positives per object by size band on real VisDrone annotations: ATSS, RPN and the IAH.

Every image is resized keeping its aspect ratio into the config's canvas (800 x 1344 for VisDrone) and padded
bottom/right. The auxiliary heads run on the "aux levels": the encoder's strides 4, 8, 16, 32 plus one extra
stride-64 level, grids ceil(canvas / stride) = (200,336) (100,168) (50,84) (25,42) (13,21). Anchors are laid as
`iou_aware_head.generate_anchors` lays them (centers at cell centers of each level's grid); anchors whose cell
center lies on the padding are invalid (as the padding tokens in training) and take part in nothing.

Heads (rows):
  ATSS  Co-DINO's auxiliary ATSS head: one square anchor of 8 x stride per location; mmdet ATSSAssigner topk=9:
        per level the 9 valid anchors whose centers are closest to the gt center, threshold mean + std
        (unbiased) of those candidates' IoUs, positive when IoU >= threshold and the anchor center lies inside
        the gt (margin 0.01 px); an anchor claimed by several gts goes to the highest IoU. No fallback.
  RPN   Co-DINO's RPN: anchors 4 x stride x 2^(0, 1/3, 2/3) x h/w ratios (0.5, 1, 2); mmdet MaxIoUAssigner
        pos 0.7 / neg 0.3 / min_pos_iou 0.3 with low-quality matching (gt_max_assign_all: every anchor that
        ties a gt's best IoU >= 0.3 goes to that gt, later gts overwriting earlier ones).
  IAH   `iou_aware_head.assign_anchors` rules for one anchor scheme (--schemes) and one threshold setting:
        IoU > T(gt), plus every gt's best-IoU anchor; conflicts to the highest IoU. T is eq. 8,
        T_I = max(T_b, T_b + k (sqrt(w h) / A_s)^p) with T_b, k, p from the config and w, h in ORIGINAL image
        pixels, for each A_s value of --a_s (see "A_s readings" below); or a fixed T (--fixed).

Anchor schemes (--schemes, comma list; a name below or a custom 'm<mult>:s<scale>+<scale>..:r<ratio>+..'
meaning base size = mult x stride, octave scales, h/w ratios; anchors per location = #scales x #ratios):
  atss      m8:s1:r1                      Co-DINO's ATSS anchors (under the IAH rules)
  rpn       m4:s1+1.26+1.587:r0.5+1+2     Co-DINO's RPN anchors (under the IAH rules)
  cfg3x3    m2:s1+1.26+1.587:r0.5+1+2     the IAH anchors configured before (one octave of scales per level)
  x2s4r2    m2:s1+1.414+2+2.828:r1+2      scales over 1.5 octaves (every size on two levels), h/w 1 and 2
  x2s3r3    m2:s1+1.587+2.52:r0.5+1+2     scales over 4/3 octave, h/w 0.5, 1, 2
  x2.5s4r2  m2.5:s1+1.414+2+2.828:r1+2    as x2s4r2 with base 2.5 x stride
  ... (see SCHEMES in the code for the rest)

A_s readings (--a_s, comma list; numbers are px^2 of an area or px of a side, as named):
  3         literal: the smallest valid VisDrone train box area, 3 px^2, used as is (eq. 8 divides a side by it)
  1.732     the smallest area read as a side: sqrt(3) px, so that sqrt(w h) / A_s is side / side
  <number>  any other value, e.g. 144 (12^2, SODA-D's "extremely tiny" limit) or 1024 (32^2, the COCO/VisDrone
            small-object area limit used as a reference area)

Columns, per VisDrone size band of ORIGINAL-pixel area (S <= 32^2 < M <= 96^2 < L; xS = the objects of S with
area <= 16^2, shown separately because eq. 8 is about them):
  pos/obj   mean positive anchors per object (before the top-K selection)
  >thr      % of objects with at least one positive above their own threshold: IAH IoU > T_I (the rest
            have only the best-anchor fallback), RPN IoU >= 0.7 (the rest only low-quality matches), ATSS any
            positive (every ATSS positive is above its gt's mean + std; the rest have none)
  IoU       mean IoU of the positives with their object
  hq        mean positives per object with IoU >= T_b (0.55): the count of "high-quality" positives, comparable
            across heads whatever their thresholds
  q/obj     mean auxiliary queries per object after the top-K (iah.max_pos) selection; the same round-robin
            selection (`iou_aware_head.select_positives`) is applied to every head so that only the assignment
            differs (Co-DETR itself keeps a random subset of ATSS positives)
  T         mean threshold of the band: T_I (IAH), mean + std (ATSS), 0.7 (RPN)
  none      % of objects without any positive

The assignment is exact and sparse (NumPy, float32 IoUs in the same normalized frame and formula as the JAX
head): per gt and level only the grid window of anchors that can overlap it is enumerated. --check compares it
with `iou_aware_head.assign_anchors` / `select_positives` (dense JAX) on the first 2 images, and the sparse ATSS
and RPN with dense NumPy transcriptions of the mmdet assigners, and fails (exit 1) on any difference.

Usage:
  python benchmarks/iah_positives.py [--data ../shared/data/visdrone/val_dev] [--schemes x2s4r2,cfg3x3,...]
      [--a_s 3,1.732,144,1024] [--fixed 0.55,0.5] [--heads atss,rpn,iah] [--max_images N] [--check]
The anchor / A_s decision table (all 142 val_dev images):
  python benchmarks/iah_positives.py --schemes x2s4r2,cfg3x3,x2s3r3,x2.5s3r3,rpn,atss
Runtime on 2 shared CPU cores: ~0.2-0.6 s per image per IAH scheme (all threshold settings share one set of IoU
pairs), ~0.3 s per image for ATSS + RPN: ~1-2 min per scheme on val_dev, ~8 min for the decision table;
--check adds ~40 s (dense JAX head on 2 images).
"""

import argparse
import math
import os
import pathlib
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from configs import visdrone as visdrone_config  # noqa: E402
from input_pipeline import visdrone  # noqa: E402
from mrqm_jax.models import iou_aware_head as iah  # noqa: E402

# S, M, L: VisDrone's (COCO's) size bands; xS: the part of S with area <= 16^2 (an extra view, not a fourth band).
BANDS = (('S', 0.0, 32.0 ** 2), ('M', 32.0 ** 2, 96.0 ** 2), ('L', 96.0 ** 2, np.inf), ('xS', 0.0, 16.0 ** 2))
AUX_STRIDES = (4, 8, 16, 32, 64)
EPS = np.float32(1e-9)          # box_ops.EPS
CHECK_GTS = 40                  # gts per image in the dense NumPy references of --check (memory A x G)
OCT3 = (1.0, 2.0 ** (1 / 3), 2.0 ** (2 / 3))
R3 = (0.5, 1.0, 2.0)

# name -> (base size as a multiple of the stride, scales, ratios).
SCHEMES = {
    'atss': (8.0, (1.0,), (1.0,)),
    'rpn': (4.0, OCT3, R3),
    'cfg3x3': (2.0, OCT3, R3),                        # configured IAH anchors (2 x stride, 3 scales, 3 ratios)
    # Scales spanning more than one octave: every object size is matched on two adjacent levels.
    'x2s4r2': (2.0, tuple(2.0 ** (i / 2) for i in range(4)), (1.0, 2.0)),
    'x2s3r3': (2.0, tuple(2.0 ** (2 * i / 3) for i in range(3)), R3),
    'x2.5s4r2': (2.5, tuple(2.0 ** (i / 2) for i in range(4)), (1.0, 2.0)),
    'x3s4r2': (3.0, tuple(2.0 ** (i / 2) for i in range(4)), (1.0, 2.0)),
    'x2.5s3r3': (2.5, tuple(2.0 ** (2 * i / 3) for i in range(3)), R3),
    'x3s3r3': (3.0, tuple(2.0 ** (2 * i / 3) for i in range(3)), R3),
    'x2s4r2b': (2.0, tuple(2.0 ** (2 * i / 3) for i in range(4)), (1.0, 2.0)),      # 2 octaves of scales
    'x2s4r2w': (2.0, tuple(2.0 ** (i / 2) for i in range(4)), (0.6, 1.6)),
    'm2s9': (2.0, tuple(2.0 ** (i / 9) for i in range(9)), (1.0,)),          # squares, 9 scales per octave
    'm1.5x3x3': (1.5, OCT3, R3),
    'm1x3x3': (1.0, OCT3, R3),
    'm1s4r2': (1.0, tuple(2.0 ** (i / 4) for i in range(4)), (1.0, 2.0)),
    'm1.5s3r3n': (1.5, OCT3, (2 / 3, 1.0, 1.5)),       # narrower ratios
    'm1.5s9': (1.5, tuple(2.0 ** (i / 9) for i in range(9)), (1.0,)),
    'm1s9': (1.0, tuple(2.0 ** (i / 9) for i in range(9)), (1.0,)),
    'm1s3r3n': (1.0, OCT3, (2 / 3, 1.0, 1.5)),
    'm1.5s4r2': (1.5, tuple(2.0 ** (i / 4) for i in range(4)), (1.0, 2.0)),
}


def parse_scheme(spec: str):
  if spec in SCHEMES:
    return SCHEMES[spec]
  try:
    parts = dict((p[0], p[1:]) for p in spec.split(':'))
    mult = float(parts['m'])
    scales = tuple(float(v) for v in parts.get('s', '1').split('+'))
    ratios = tuple(float(v) for v in parts.get('r', '1').split('+'))
  except (KeyError, ValueError, IndexError):
    raise ValueError(f'unknown anchor scheme {spec!r}: use one of {sorted(SCHEMES)} or '
                     "'m<mult>:s<scale>+..:r<ratio>+..'") from None
  if mult <= 0 or min(scales) <= 0 or min(ratios) <= 0:
    raise ValueError(f'anchor scheme {spec!r}: sizes, scales and ratios must be positive')
  return mult, scales, ratios


def parse_args():
  here = pathlib.Path(__file__).resolve().parents[1]
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', default=str(here.parent / 'shared' / 'data' / 'visdrone' / 'val_dev'))
  p.add_argument('--schemes', default='x2s4r2,cfg3x3', help='comma list of IAH anchor schemes (names or m..:s..:r..)')
  p.add_argument('--a_s', default='3,1.732,144,1024', help='comma list of A_s values for eq. 8 (empty: none)')
  p.add_argument('--fixed', default='0.55,0.5', help='comma list of fixed IAH thresholds (empty: none)')
  p.add_argument('--heads', default='atss,rpn,iah', help='comma list of atss, rpn, iah')
  p.add_argument('--max_images', type=int, default=-1)
  p.add_argument('--check', action='store_true',
                 help='compare the sparse assignments with the dense JAX head / NumPy mmdet transcriptions')
  return p.parse_args()


# ------------------------------------------------------------------------------------------------------------
# Geometry

class Level:
  """One aux level: grid, cell size (canvas px), the anchor shapes of one location, offset in the anchor list."""

  def __init__(self, shape, canvas_hw, widths, heights, offset):
    self.h, self.w = shape
    self.cell_h, self.cell_w = canvas_hw[0] / self.h, canvas_hw[1] / self.w
    self.widths = np.asarray(widths, np.float64)     # [R] canvas px
    self.heights = np.asarray(heights, np.float64)
    self.r = len(self.widths)
    self.offset = offset
    self.size = self.h * self.w * self.r


class Anchors:
  """All anchors of a scheme on the aux levels, in `generate_anchors` order, + their float32 normalized xyxy."""

  def __init__(self, canvas_hw, mult, scales, ratios):
    self.canvas_hw = canvas_hw
    shapes = [(-(-canvas_hw[0] // s), -(-canvas_hw[1] // s)) for s in AUX_STRIDES]
    self.shapes = shapes
    sizes = [mult * s for s in AUX_STRIDES]
    cxcywh = iah.generate_anchors(shapes, canvas_hw, sizes, ratios, scales)
    xyxy = np.concatenate([cxcywh[:, :2] - np.float32(0.5) * cxcywh[:, 2:],
                           cxcywh[:, :2] + np.float32(0.5) * cxcywh[:, 2:]], axis=1)
    self.cxcywh, self.xyxy = cxcywh, xyxy.astype(np.float32)
    self.area = ((self.xyxy[:, 2] - self.xyxy[:, 0]) * (self.xyxy[:, 3] - self.xyxy[:, 1])).astype(np.float32)
    scale_of = np.repeat(np.asarray(scales, np.float64), len(ratios))
    ratio_of = np.tile(np.asarray(ratios, np.float64), len(scales))
    self.levels, offset = [], 0
    for shape, size in zip(shapes, sizes):
      level = Level(shape, canvas_hw, size * scale_of / np.sqrt(ratio_of), size * scale_of * np.sqrt(ratio_of),
                    offset)
      self.levels.append(level)
      offset += level.size
    self.num = offset
    self.per_location = len(scale_of)
    self.sizes, self.scales, self.ratios = sizes, scales, ratios

  def valid(self, img_h, img_w):
    """[A] bool: the anchor's cell center is on the image (not on the padding)."""
    out = []
    for lv in self.levels:
      rows = (np.arange(lv.h) + 0.5) * lv.cell_h < img_h
      cols = (np.arange(lv.w) + 0.5) * lv.cell_w < img_w
      out.append(np.repeat((rows[:, None] & cols[None, :]).reshape(-1), lv.r))
    return np.concatenate(out)


def iou_pairs(anchor_xyxy, anchor_area, gt_xyxy, gt):
  """IoU of anchor rows with gt rows `gt` (float32, the formula of box_ops.elementwise_iou)."""
  b = gt_xyxy[gt]
  w = np.maximum(np.minimum(anchor_xyxy[:, 2], b[:, 2]) - np.maximum(anchor_xyxy[:, 0], b[:, 0]), np.float32(0))
  h = np.maximum(np.minimum(anchor_xyxy[:, 3], b[:, 3]) - np.maximum(anchor_xyxy[:, 1], b[:, 1]), np.float32(0))
  inter = w * h
  b_area = np.maximum(b[:, 2] - b[:, 0], np.float32(0)) * np.maximum(b[:, 3] - b[:, 1], np.float32(0))
  union = anchor_area + b_area - inter
  return (inter / np.maximum(union, EPS)).astype(np.float32)


def window_pairs(anchors, gt_xyxy, rows_lo, rows_hi, cols_lo, cols_hi, level):
  """(gt, anchor) for every anchor of `level` on the cells [rows_lo..rows_hi] x [cols_lo..cols_hi] of each gt."""
  nr = np.maximum(rows_hi - rows_lo + 1, 0)
  nc = np.maximum(cols_hi - cols_lo + 1, 0)
  cells = nr * nc
  total = int(cells.sum())
  gt = np.repeat(np.arange(len(cells)), cells)
  local = np.arange(total) - np.repeat(np.cumsum(cells) - cells, cells)
  row = rows_lo[gt] + local // np.maximum(nc[gt], 1)
  col = cols_lo[gt] + local % np.maximum(nc[gt], 1)
  base = level.offset + (row * level.w + col) * level.r
  gt = np.repeat(gt, level.r)
  anchor = (base[:, None] + np.arange(level.r)[None, :]).reshape(-1)
  return gt, anchor


def overlapping_pairs(anchors, gt_xyxy, anchor_valid):
  """All (gt, anchor, IoU) with IoU > 0 and a valid anchor: per level, the grid window that can overlap."""
  canvas_h, canvas_w = anchors.canvas_hw
  gx0, gy0 = gt_xyxy[:, 0] * canvas_w, gt_xyxy[:, 1] * canvas_h
  gx1, gy1 = gt_xyxy[:, 2] * canvas_w, gt_xyxy[:, 3] * canvas_h
  out_g, out_a = [], []
  for lv in anchors.levels:
    half_w, half_h = lv.widths.max() / 2, lv.heights.max() / 2
    # Overlap needs |center - gt| < half sizes: cell centers (j + 0.5) cell in (x0 - half_w, x1 + half_w); +-1 cell
    # of margin absorbs float32 rounding (IoUs are computed exactly below, zeros dropped).
    cols_lo = np.clip(np.floor((gx0 - half_w) / lv.cell_w - 0.5).astype(int) - 1, 0, lv.w - 1)
    cols_hi = np.clip(np.ceil((gx1 + half_w) / lv.cell_w - 0.5).astype(int) + 1, 0, lv.w - 1)
    rows_lo = np.clip(np.floor((gy0 - half_h) / lv.cell_h - 0.5).astype(int) - 1, 0, lv.h - 1)
    rows_hi = np.clip(np.ceil((gy1 + half_h) / lv.cell_h - 0.5).astype(int) + 1, 0, lv.h - 1)
    g, a = window_pairs(anchors, gt_xyxy, rows_lo, rows_hi, cols_lo, cols_hi, lv)
    out_g.append(g)
    out_a.append(a)
  g, a = np.concatenate(out_g), np.concatenate(out_a)
  keep = anchor_valid[a]
  g, a = g[keep], a[keep]
  iou = iou_pairs(anchors.xyxy[a], anchors.area[a], gt_xyxy, g)
  keep = iou > 0
  return g[keep], a[keep], iou[keep]


def first_per_key(key, *sort_keys):
  """Indices of the first element of each `key` run after sorting by (key, *sort_keys) (lexicographic)."""
  order = np.lexsort(tuple(reversed((key,) + sort_keys)))
  k = key[order]
  return order[np.concatenate([[True], k[1:] != k[:-1]])] if len(order) else order


# ------------------------------------------------------------------------------------------------------------
# Assigners (sparse): each returns positives as (gt [P], anchor [P], iou [P]), one entry per positive anchor.

def assign_iah(g, a, iou, thresholds):
  """iou_aware_head.assign_anchors on the overlapping pairs (no pair with IoU 0 can be positive or a best)."""
  if len(g) == 0:
    return g, a, iou, np.zeros(0, bool)
  best = first_per_key(g, -iou, a)                       # every gt's best anchor (lowest index on ties)
  forced = np.zeros(len(g), bool)
  forced[best] = True
  forced_anchor = np.zeros(a.max() + 1, bool)
  forced_anchor[a[best]] = True
  # A forced anchor goes to its best-claiming gt with the highest IoU; other anchors to their candidate gt with
  # the highest IoU (lowest gt index on ties, as argmax).
  wanted = np.where(forced_anchor[a], forced, iou > thresholds[g])
  g, a, iou, forced = g[wanted], a[wanted], iou[wanted], forced[wanted]
  win = first_per_key(a, -iou, g)
  return g[win], a[win], iou[win], forced[win]


def atss_candidates(anchors, gt_xyxy, anchor_valid, topk=9):
  """Per gt and level the `topk` valid anchors with the closest centers: (gt, anchor) pairs (mmdet ATSS)."""
  canvas_h, canvas_w = anchors.canvas_hw
  gcx = (gt_xyxy[:, 0] + gt_xyxy[:, 2]) / 2 * canvas_w
  gcy = (gt_xyxy[:, 1] + gt_xyxy[:, 3]) / 2 * canvas_h
  out_g, out_a = [], []
  # The 9 nearest valid lattice points lie within 3.6 cells of the center (worst case: a 3x3 corner block);
  # every point outside a +-5 cell window is >= 4.5 cells away, so the window holds them.
  radius = 5
  for lv in anchors.levels:
    if lv.r != 1:
      raise ValueError('ATSS here uses one anchor per location')
    r0 = np.floor(gcy / lv.cell_h).astype(int)
    c0 = np.floor(gcx / lv.cell_w).astype(int)
    g, a = window_pairs(anchors, gt_xyxy, np.clip(r0 - radius, 0, lv.h - 1), np.clip(r0 + radius, 0, lv.h - 1),
                        np.clip(c0 - radius, 0, lv.w - 1), np.clip(c0 + radius, 0, lv.w - 1), lv)
    keep = anchor_valid[a]
    g, a = g[keep], a[keep]
    cx, cy = anchors.cxcywh[a, 0] * canvas_w, anchors.cxcywh[a, 1] * canvas_h
    dist = np.sqrt((cx - gcx[g]) ** 2 + (cy - gcy[g]) ** 2)
    order = np.lexsort((a, dist, g))
    g, a = g[order], a[order]
    start = np.searchsorted(g, np.arange(len(gt_xyxy)))
    rank = np.arange(len(g)) - start[g]
    keep = rank < topk
    out_g.append(g[keep])
    out_a.append(a[keep])
  return np.concatenate(out_g), np.concatenate(out_a)


def assign_atss(anchors, gt_xyxy, anchor_valid, topk=9):
  """mmdet ATSSAssigner (v2.x) on the candidates; returns positives and the per-gt thresholds."""
  canvas_h, canvas_w = anchors.canvas_hw
  num_gt = len(gt_xyxy)
  g, a = atss_candidates(anchors, gt_xyxy, anchor_valid, topk)
  iou = iou_pairs(anchors.xyxy[a], anchors.area[a], gt_xyxy, g)
  count = np.bincount(g, minlength=num_gt)
  mean = np.bincount(g, iou.astype(np.float64), minlength=num_gt) / np.maximum(count, 1)
  var = np.bincount(g, (iou - mean[g]) ** 2, minlength=num_gt) / np.maximum(count - 1, 1)
  thr = (mean + np.sqrt(var)).astype(np.float32)
  cx, cy = anchors.cxcywh[a, 0] * canvas_w, anchors.cxcywh[a, 1] * canvas_h
  b = gt_xyxy[g] * np.asarray([canvas_w, canvas_h, canvas_w, canvas_h], np.float32)
  inside = np.minimum.reduce([cx - b[:, 0], cy - b[:, 1], b[:, 2] - cx, b[:, 3] - cy]) > 0.01
  pos = (iou >= thr[g]) & inside
  g, a, iou = g[pos], a[pos], iou[pos]
  win = first_per_key(a, -iou, g)
  return g[win], a[win], iou[win], thr


def assign_maxiou(g, a, iou, num_gt, pos_thr=0.7, min_pos_iou=0.3):
  """mmdet MaxIoUAssigner (pos_thr, min_pos_iou, match_low_quality, gt_max_assign_all) on overlapping pairs."""
  if len(g) == 0:
    return g, a, iou
  top = first_per_key(a, -iou, g)                       # each anchor's max-IoU gt (first gt on ties)
  assigned = {}                                         # anchor -> pair index
  for p in top[iou[top] >= pos_thr]:
    assigned[a[p]] = p
  gt_max = np.zeros(num_gt, np.float32)
  np.maximum.at(gt_max, g, iou)
  low = (iou == gt_max[g]) & (gt_max[g] >= min_pos_iou)
  # Later gts overwrite earlier ones (mmdet loops over gts in order).
  for p in np.flatnonzero(low)[np.argsort(g[low], kind='stable')]:
    assigned[a[p]] = p
  idx = np.fromiter(assigned.values(), int, len(assigned))
  return g[idx], a[idx], iou[idx]


def select_round_robin(g, a, iou, max_pos):
  """iou_aware_head.select_positives on a positives list: anchor indices of the kept ones, in its order."""
  if len(g) == 0:
    return a[:0]
  order = np.lexsort((a, -iou, g))
  gs = g[order]
  start = np.concatenate([[True], gs[1:] != gs[:-1]])
  pos_in = np.arange(len(gs))
  rank = np.empty(len(gs), int)
  rank[order] = pos_in - np.maximum.accumulate(np.where(start, pos_in, 0))
  final = np.lexsort((a, -iou, rank))
  return final[:max_pos]


# ------------------------------------------------------------------------------------------------------------
# Dense references for --check

def dense_iou(anchors, gt_xyxy):
  """[A, G] IoU of every anchor with every gt (one gt at a time: bounded memory)."""
  every = np.arange(anchors.num)
  return np.stack([iou_pairs(anchors.xyxy, anchors.area, gt_xyxy, np.full(anchors.num, j))
                   for j in range(len(gt_xyxy))], axis=1) if len(gt_xyxy) else np.zeros((len(every), 0), np.float32)


def dense_atss(anchors, gt_xyxy, anchor_valid, topk=9):
  """mmdet ATSSAssigner.assign transcribed densely (anchors filtered by validity, as mmdet's inside_flags)."""
  canvas_h, canvas_w = anchors.canvas_hw
  overlaps = dense_iou(anchors, gt_xyxy)                     # [A, G]
  cx, cy = anchors.cxcywh[:, 0] * canvas_w, anchors.cxcywh[:, 1] * canvas_h
  gcx = (gt_xyxy[:, 0] + gt_xyxy[:, 2]) / 2 * canvas_w
  gcy = (gt_xyxy[:, 1] + gt_xyxy[:, 3]) / 2 * canvas_h
  dist = np.sqrt((cx[:, None] - gcx[None]) ** 2 + (cy[:, None] - gcy[None]) ** 2)
  dist[~anchor_valid] = np.inf
  cands = []
  for lv in anchors.levels:
    d = dist[lv.offset:lv.offset + lv.size]
    cands.append(lv.offset + np.argsort(d, axis=0, kind='stable')[:topk])
  cand = np.concatenate(cands)                                # [L*topk, G]
  cols = np.arange(len(gt_xyxy))[None, :]
  cand_iou = overlaps[cand, cols]
  thr = (cand_iou.astype(np.float64).mean(0) + cand_iou.astype(np.float64).std(0, ddof=1)).astype(np.float32)
  b = gt_xyxy * np.asarray([canvas_w, canvas_h, canvas_w, canvas_h], np.float32)
  inside = np.minimum.reduce([cx[cand] - b[None, :, 0], cy[cand] - b[None, :, 1],
                              b[None, :, 2] - cx[cand], b[None, :, 3] - cy[cand]]) > 0.01
  is_pos = (cand_iou >= thr[None]) & inside
  masked = np.full(overlaps.shape, -np.inf, np.float32)
  masked[cand[is_pos], np.broadcast_to(cols, cand.shape)[is_pos]] = overlaps[cand[is_pos],
                                                                             np.broadcast_to(cols, cand.shape)[is_pos]]
  best = masked.max(1)
  assigned = np.where(best > -np.inf, masked.argmax(1), -1)
  return assigned


def dense_maxiou(anchors, gt_xyxy, anchor_valid, pos_thr=0.7, min_pos_iou=0.3):
  overlaps = dense_iou(anchors, gt_xyxy)
  overlaps[~anchor_valid] = -1.0
  max_ov, argmax = overlaps.max(1), overlaps.argmax(1)
  assigned = np.where(max_ov >= pos_thr, argmax, -1)
  gt_max = overlaps.max(0)
  for i in range(len(gt_xyxy)):
    if gt_max[i] >= min_pos_iou:
      assigned[overlaps[:, i] == gt_max[i]] = i
  return assigned


def to_dense(g, a, num):
  out = np.full(num, -1, np.int64)
  out[a] = g
  return out


# ------------------------------------------------------------------------------------------------------------

def image_geometry(record, canvas_hw):
  canvas_h, canvas_w = canvas_hw
  scale = min(canvas_h / record.height, canvas_w / record.width)
  b = record.boxes.astype(np.float64) * scale
  cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2 / canvas_w, (b[:, 1] + b[:, 3]) / 2 / canvas_h,
                     (b[:, 2] - b[:, 0]) / canvas_w, (b[:, 3] - b[:, 1]) / canvas_h], axis=1).astype(np.float32)
  xyxy = np.concatenate([cxcywh[:, :2] - np.float32(0.5) * cxcywh[:, 2:],
                         cxcywh[:, :2] + np.float32(0.5) * cxcywh[:, 2:]], axis=1)
  return cxcywh, xyxy.astype(np.float32), record.height * scale, record.width * scale


class Stats:
  def __init__(self):
    self.acc = {b: dict(n=0, pos=0, above=0, iou=0.0, q=0, t=0.0, none=0, hq=0) for b, _, _ in BANDS}

  def add(self, band_masks, num_gt, g, iou, above_mask, kept_g, thr, hq_iou):
    pos = np.bincount(g, minlength=num_gt)
    hq = np.bincount(g[iou >= hq_iou], minlength=num_gt)
    iou_sum = np.bincount(g, iou.astype(np.float64), minlength=num_gt)
    above = np.bincount(g[above_mask], minlength=num_gt) > 0
    q = np.bincount(kept_g, minlength=num_gt)
    for band, sel in band_masks.items():
      acc = self.acc[band]
      acc['n'] += int(sel.sum())
      acc['pos'] += int(pos[sel].sum())
      acc['above'] += int(above[sel].sum())
      acc['iou'] += float(iou_sum[sel].sum())
      acc['q'] += int(q[sel].sum())
      acc['t'] += float(np.asarray(thr, np.float64)[sel].sum())
      acc['none'] += int((pos[sel] == 0).sum())
      acc['hq'] += int(hq[sel].sum())

  def row(self, name, width):
    out = f'{name:<{width}}'
    for band, _, _ in BANDS:
      acc = self.acc[band]
      n = max(acc['n'], 1)
      out += (f'| {acc["pos"] / n:7.2f} {100 * acc["above"] / n:4.0f}% {acc["iou"] / max(acc["pos"], 1):5.2f} '
              f'{acc["hq"] / n:5.2f} {acc["q"] / n:5.2f} {acc["t"] / n:5.2f} {100 * acc["none"] / n:4.0f}% ')
    return out


def header(width):
  h = f'{"":<{width}}' + ''.join(f'| {b + " band":<47}' for b, _, _ in BANDS)
  h2 = f'{"head / setting":<{width}}' + ''.join(
      f'| {"pos/obj":>7} {">thr":>5} {"IoU":>5} {"hq":>5} {"q/obj":>5} {"T":>5} {"none":>5} ' for _ in BANDS)
  return h + '\n' + h2 + '\n' + '-' * len(h2)


def a_s_label(v):
  return {3.0: 'A_s=3 (literal)', round(math.sqrt(3), 3): 'A_s=1.732 (side)'}.get(round(v, 3), f'A_s={v:g}')


def main():
  args = parse_args()
  config = visdrone_config.get_config()
  canvas_hw = tuple(int(v) for v in config.input.image_size)
  t_b, k, p, max_pos = config.iah.t_b, config.iah.k, config.iah.p, config.iah.max_pos
  heads = [h for h in args.heads.split(',') if h]
  if set(heads) - {'atss', 'rpn', 'iah'}:
    print(f'error: --heads must be a comma list of atss, rpn, iah; got {args.heads!r}', file=sys.stderr)
    sys.exit(2)
  try:
    a_s_values = [float(v) for v in args.a_s.split(',') if v]
    fixed_values = [float(v) for v in args.fixed.split(',') if v]
    schemes = [(s, parse_scheme(s)) for s in args.schemes.split(',') if s]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if any(v <= 0 for v in a_s_values):
    print('error: --a_s values must be positive', file=sys.stderr)
    sys.exit(2)
  try:
    records, report = visdrone.read_split(args.data)
  except (FileNotFoundError, NotADirectoryError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if args.max_images > 0:
    records = records[:args.max_images]
  print(report.summary() if hasattr(report, 'summary') else report)
  settings = [(a_s_label(v), v, None) for v in a_s_values] + [(f'fixed {t:g}', None, t) for t in fixed_values]

  atss_anchors = Anchors(canvas_hw, *SCHEMES['atss']) if 'atss' in heads else None
  rpn_anchors = Anchors(canvas_hw, *SCHEMES['rpn']) if 'rpn' in heads else None
  iah_anchors = [(name, Anchors(canvas_hw, *spec)) for name, spec in schemes] if 'iah' in heads else []
  base_stats = {'ATSS top-9': Stats(), 'RPN MaxIoU 0.7': Stats()}
  iah_stats = {name: [Stats() for _ in settings] for name, _ in iah_anchors}
  times = {}
  check_failures = []

  grids = [(-(-canvas_hw[0] // st), -(-canvas_hw[1] // st)) for st in AUX_STRIDES]
  print(f'canvas {canvas_hw[0]}x{canvas_hw[1]}, aux strides {AUX_STRIDES}, grids {grids}'
        f'; T_b={t_b} k={k} p={p} (eq. 8 in original px); K={max_pos}; {len(records)} images')
  for i, record in enumerate(records):
    n = len(record.boxes)
    if n == 0:
      continue
    cxcywh, gt_xyxy, img_h, img_w = image_geometry(record, canvas_hw)
    w0 = record.boxes[:, 2] - record.boxes[:, 0]
    h0 = record.boxes[:, 3] - record.boxes[:, 1]
    area0 = w0 * h0
    bands = {b: (area0 > lo) & (area0 <= hi) for b, lo, hi in BANDS}
    check = args.check and i < 2

    if atss_anchors is not None:
      t0 = time.time()
      valid = atss_anchors.valid(img_h, img_w)
      g, a, iou, thr = assign_atss(atss_anchors, gt_xyxy, valid)
      kept = select_round_robin(g, a, iou, max_pos)
      base_stats['ATSS top-9'].add(bands, n, g, iou, np.ones(len(g), bool), g[kept], thr, t_b)
      times['ATSS'] = times.get('ATSS', 0) + time.time() - t0
      if check:
        sub = gt_xyxy[:CHECK_GTS]
        ref = dense_atss(atss_anchors, sub, valid)
        g2, a2, _, _ = assign_atss(atss_anchors, sub, valid)
        diff = int((ref != to_dense(g2, a2, atss_anchors.num)).sum())
        print(f'check image {i}: ATSS sparse vs dense mmdet transcription (first {len(sub)} gts): {diff} '
              f'differing anchors ({(ref >= 0).sum()} positives)')
        if diff:
          check_failures.append(f'ATSS image {i}')
    if rpn_anchors is not None:
      t0 = time.time()
      valid = rpn_anchors.valid(img_h, img_w)
      g_all, a_all, iou_all = overlapping_pairs(rpn_anchors, gt_xyxy, valid)
      g, a, iou = assign_maxiou(g_all, a_all, iou_all, n)
      kept = select_round_robin(g, a, iou, max_pos)
      base_stats['RPN MaxIoU 0.7'].add(bands, n, g, iou, iou >= 0.7, g[kept], np.full(n, 0.7), t_b)
      times['RPN'] = times.get('RPN', 0) + time.time() - t0
      if check:
        sub = gt_xyxy[:CHECK_GTS]
        ref = dense_maxiou(rpn_anchors, sub, valid)
        g2, a2, _ = assign_maxiou(*overlapping_pairs(rpn_anchors, sub, valid), len(sub))
        diff = int((ref != to_dense(g2, a2, rpn_anchors.num)).sum())
        print(f'check image {i}: RPN sparse vs dense mmdet transcription (first {len(sub)} gts): {diff} '
              f'differing anchors ({(ref >= 0).sum()} positives)')
        if diff:
          check_failures.append(f'RPN image {i}')
    for name, anchors in iah_anchors:
      t0 = time.time()
      valid = anchors.valid(img_h, img_w)
      g_all, a_all, iou_all = overlapping_pairs(anchors, gt_xyxy, valid)
      for s_i, (label, a_s, fixed) in enumerate(settings):
        if fixed is None:
          thr = np.asarray(iah.dynamic_iou_threshold(w0, h0, t_b=t_b, k=k, p=p, a_s=a_s), np.float32)
        else:
          thr = np.full(n, fixed, np.float32)
        g, a, iou, forced = assign_iah(g_all, a_all, iou_all, thr)
        kept = select_round_robin(g, a, iou, max_pos)
        iah_stats[name][s_i].add(bands, n, g, iou, iou > thr[g], g[kept], thr, t_b)
        if check and s_i in (0, len(settings) - 1):
          check_failures += check_against_jax(i, name, anchors, cxcywh, thr, valid, g, a, iou, kept, max_pos)
      times[name] = times.get(name, 0) + time.time() - t0

  width = 26
  counts = {b: base_stats['ATSS top-9'].acc[b]['n'] for b, _, _ in BANDS} if atss_anchors else {}
  if atss_anchors is not None or rpn_anchors is not None:
    print('\nCo-DINO auxiliary heads (their own anchors and assigners)')
    print(header(width))
    if atss_anchors is not None:
      print(base_stats['ATSS top-9'].row('ATSS top-9 (8s, 1/loc)', width))
    if rpn_anchors is not None:
      print(base_stats['RPN MaxIoU 0.7'].row('RPN MaxIoU 0.7 (9/loc)', width))
  for name, anchors in iah_anchors:
    mult, scales, ratios = parse_scheme(name)
    print(f'\nIAH, anchor scheme {name!r}: base {mult:g} x stride = {tuple(round(s, 1) for s in anchors.sizes)} px '
          f'(canvas), scales {tuple(round(v, 3) for v in scales)}, h/w ratios {tuple(round(v, 3) for v in ratios)}; '
          f'{anchors.per_location}/location, {anchors.num} anchors')
    print(header(width))
    for (label, _, _), stats in zip(settings, iah_stats[name]):
      print(stats.row(label, width))
    counts = {b: stats.acc[b]['n'] for b, _, _ in BANDS}
  print(f'\nobjects per band: {counts}; seconds: ' + ', '.join(f'{k_} {v:.0f}' for k_, v in times.items()))
  if args.check:
    if check_failures:
      print(f'CHECK FAILED: {check_failures}')
      sys.exit(1)
    print('check passed: the sparse assignments equal the dense references')


def check_against_jax(i, name, anchors, cxcywh, thr, valid, g, a, iou, kept, max_pos):
  import jax.numpy as jnp  # only for --check: the dense head is slow on CPU
  n = len(cxcywh)
  assigned, ref_iou = iah.assign_anchors(jnp.asarray(anchors.cxcywh), jnp.asarray(cxcywh), jnp.ones(n, bool),
                                         jnp.asarray(thr), anchor_valid=jnp.asarray(valid))
  assigned, ref_iou = np.asarray(assigned), np.asarray(ref_iou)
  idx, pos_valid = iah.select_positives(jnp.asarray(assigned), jnp.asarray(ref_iou), max_pos)
  idx, pos_valid = np.asarray(idx), np.asarray(pos_valid)
  mine = to_dense(g, a, anchors.num)
  diff = int((mine != assigned).sum())
  iou_diff = float(np.abs(ref_iou[a] - iou).max()) if len(a) else 0.0
  sel_equal = np.array_equal(idx[pos_valid], a[kept])
  print(f'check image {i} {name} thr[{thr.min():.3f}..{thr.max():.3f}]: IAH sparse vs iou_aware_head.assign_anchors: '
        f'{diff} differing anchors of {(assigned >= 0).sum()} positives, max IoU diff {iou_diff:.2g}; '
        f'select_positives equal: {sel_equal}')
  return [] if diff == 0 and sel_equal and iou_diff == 0 else [f'IAH {name} image {i}']


if __name__ == '__main__':
  main()
