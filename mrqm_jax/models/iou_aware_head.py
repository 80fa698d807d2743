"""IoU-Aware Head (IAH, paper section 3.2): a dense auxiliary head on the encoder output with a size-dependent
IoU threshold for one-to-many anchor assignment, and the top-K positives that become the auxiliary queries Q_a.

Pipeline (all static-shaped, jittable):
  1. `generate_anchors`: per-location anchors on every aux level, normalized cxcywh on the padded canvas.
  2. `dynamic_iou_threshold`: T_I = max(T_b, T_b + k * (sqrt(w h) / A_s) ** p) per ground truth (eq. 8), with
     w, h and A_s in original-image pixels (`gt_thresholds`).
  3. `assign_anchors`: an anchor is positive for a gt when IoU > T_I(gt); every valid gt also keeps its best-IoU
     anchor; conflicts go to the highest IoU.
  4. `select_positives`: at most K = `iah.max_pos` positive anchors per image for the auxiliary decoder branch.
  5. `IoUAwareHead`: Co-DINO's dense head structure (`aux_heads.DenseHead`) in the ATSS head's place plus 1-4;
     returns what the detector needs to build Q_a = Dense(PE(C_pos)) + Dense(F''_pos) (eq. 9) and what
     `ops.losses` needs for the dense loss.

Anchors (`config.iah.anchor_sizes` / `anchor_scales` / `anchor_ratios`) and the reading of A_s were chosen from
`benchmarks/iah_positives.py` on real VisDrone annotations (the table and the reasoning are in docs/DESIGN.md).
Why small anchors with scales over more than an octave: the IoU of a centred w x w box with an s x s anchor is
(w / s)^2 for w < s, so an anchor only passes T_I >= T_b for objects close to its own size, and scales spanning
1.5 octaves let two pyramid levels cover every small size. Eq. 8 never lowers a threshold below T_b; with A_s =
the smallest instance area (a few px^2) T_I is far above T_b for every object, so most objects keep only their
best-anchor fallback — hence the recipes' reading of A_s as the bound of the smallest evaluated size class.

Positive selection (step 4) deliberately differs from Co-DETR: Co-DETR keeps a uniformly random subset of
max_pos_coords positives (in anchor order otherwise), which hands most auxiliary queries to the large objects
that own many positive anchors. We rank positives round-robin over objects — every object's best anchor first
(by IoU), then every object's second best, ... — so each small object gets an auxiliary query before any object
gets a second one, which is the point of the paper. Deterministic, so no RNG stream is needed.

Reference boxes C_pos: like Co-DETR (its ATSS head returns the positive *anchors* as `pos_coords`, and the
auxiliary decoder starts from them), `pos_ref_boxes` are the positive anchors, not the head's decoded boxes.
They are constants (no gradient). `pos_feat` is the encoder token F''_pos at that anchor's location and keeps its
gradient: the auxiliary branch is meant to supervise the encoder output through it.

Padding slots of the query group (`query_padding`, config model.aux_query_padding): 'negatives' (default, as
Co-DETR's `use_zero_padding=False`, which MRQM inherits from Co-DINO) pads every image's group to K = max(9, most
positives of an image in the batch) slots with random negative anchors of the image, classified as background,
their query's feature term being the aux-map feature at the negative's location (Co-DETR gathers the features of
padding too); 'masked' (mrqm_jax <= 0.3) leaves the slots empty (`query_live=False`, as `use_zero_padding=True`).
See `aux_heads.query_group`.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrqm_jax.models import aux_heads
from mrqm_jax.ops import box_coder
from mrqm_jax.ops import boxes as box_ops

# Anchors processed per step in `assign_anchors`: bounds the IoU block to [chunk, M] instead of [A, M]
# (at 800x1344 with 6 anchors per location A = 535,500; with M = 1000 that is 2 GB per image otherwise).
# 16384 x 1000 floats = 64 MB per intermediate, and only ~33 sequential steps per pass at full size.
ASSIGN_CHUNK = 16384


def dynamic_iou_threshold(w, h, *, t_b: float, k: float, p: float, a_s: float):
  """Paper eq. (8), elementwise: T_I = max(T_b, T_b + k * (sqrt(w * h) / A_s) ** p).

  Args:
    w, h: [...] object width and height in pixels (broadcastable; negative sizes count as 0).
    t_b: base IoU threshold T_b.  k, p: growth constant and exponent.  a_s: A_s, the dataset's smallest
      instance area (px^2), > 0 (`iah.a_s = -1`, auto, is resolved from the dataset by `datasets.resolve_a_s`).

  Returns:
    [...] thresholds, >= t_b.
  """
  if isinstance(a_s, str) or a_s is None or not a_s > 0:
    raise ValueError(f'iah.a_s must be a positive number (resolve -1 = auto from the dataset first: '
                     f'datasets.resolve_a_s), got {a_s!r}')
  side = jnp.sqrt(jnp.maximum(w, 0.0) * jnp.maximum(h, 0.0))
  return jnp.maximum(t_b, t_b + k * (side / a_s) ** p)


@dataclasses.dataclass(frozen=True)
class IoUThreshold:
  """The per-gt IoU threshold rule (`config.iah`): eq. 8 with T_b, k, p, A_s (px^2, original image) when
  `dynamic`, else the fixed T_b (Table 3 baseline)."""
  dynamic: bool = True
  t_b: float = 0.55
  k: float = 0.15
  p: float = 0.2
  a_s: float = -1.0


def gt_thresholds(gt_boxes, canvas_hw: Sequence[int], rule: IoUThreshold, scale=None):
  """Per-gt IoU threshold: gt_boxes [..., M, 4] normalized cxcywh -> [..., M].

  Eq. 8 is evaluated in ORIGINAL-image pixels, the frame of A_s (the smallest instance area of the dataset):
  w, h are the boxes' canvas sizes divided by `scale` [...] (canvas px per original px, the batch's `scale`;
  None = 1, i.e. images at their original size).
  """
  if not rule.dynamic:
    return jnp.full(gt_boxes.shape[:-1], rule.t_b, jnp.float32)
  canvas_h, canvas_w = canvas_hw
  to_orig = 1.0 if scale is None else 1.0 / jnp.maximum(jnp.asarray(scale, jnp.float32), 1e-6)[..., None]
  return dynamic_iou_threshold(gt_boxes[..., 2] * canvas_w * to_orig, gt_boxes[..., 3] * canvas_h * to_orig,
                               t_b=rule.t_b, k=rule.k, p=rule.p, a_s=rule.a_s)


ANCHOR_GRIDS = ('mmdet', 'cell_centers')


def generate_anchors(spatial_shapes: Sequence[Sequence[int]], canvas_hw: Sequence[int],
                     sizes: Sequence[float], ratios: Sequence[float],
                     scales: Sequence[float] = (1.0,), *, grid: str = 'cell_centers',
                     strides: Sequence[float] | None = None, pixel_xyxy: bool = False) -> np.ndarray:
  """Anchors for every location of every level, in the encoder's token order.

  Args:
    spatial_shapes: L static (H_l, W_l) pairs, the levels of the flattened encoder memory.
    canvas_hw: (H, W) of the padded canvas in pixels; level l has stride H / H_l, W / W_l.
    sizes: L base sizes in pixels (one per level).
    ratios: height/width ratios (mmdet convention); each anchor has area (size * scale)^2.
    scales: multipliers of each level's base size (mmdet's octave scales).
    grid: where anchor centres sit (config.model.anchor_grid): 'mmdet' at (j, i) x the level's nominal stride
      (`strides`, px; mmdet's AnchorGenerator, center_offset 0: Co-DETR's ATSS, RPN and so the IAH built on them);
      'cell_centers' at the centres of the level's cells, ((j + 0.5) / W_l, (i + 0.5) / H_l) of the canvas
      (mrqm_jax <= 0.3). They differ by half a stride, and more on a level whose H_l does not divide the canvas
      (800 / 13 = 61.5 px cells for the nominal 64).
    strides: L nominal strides in px; needed by grid='mmdet'.
    pixel_xyxy: return canvas-pixel xyxy instead, converted in float64 before the one rounding to float32. With
      grid='mmdet' these do not depend on the canvas, so the assignments that compare IoUs of anchors (ties:
      a small gt inside several anchors of one size) decide alike however far the canvas is padded; converting
      the float32 normalized anchors back to pixels leaves errors of ~1e-6 px that differ per canvas and flip
      such ties.

  Returns:
    [A, 4] float32 normalized cxcywh (NumPy, a trace-time constant), A = R * sum_l H_l W_l with
    R = len(scales) * len(ratios), ordered (level, row, column, scale, ratio): anchor a sits on token a // R.
    With pixel_xyxy: [A, 4] float32 canvas-pixel xyxy, same order.
  """
  shapes = [tuple(int(v) for v in s) for s in np.asarray(spatial_shapes).reshape(-1, 2)]
  if len(sizes) != len(shapes):
    raise ValueError(f'iah.anchor_sizes has {len(sizes)} entries but the encoder has {len(shapes)} levels '
                     f'{shapes}: give one base size per level')
  if not ratios or any(r <= 0 for r in ratios):
    raise ValueError(f'iah.anchor_ratios must be positive h/w ratios, got {tuple(ratios)}')
  if not scales or any(v <= 0 for v in scales):
    raise ValueError(f'iah.anchor_scales must be positive multipliers, got {tuple(scales)}')
  if grid not in ANCHOR_GRIDS:
    raise ValueError(f'config.model.anchor_grid must be one of {ANCHOR_GRIDS}, got {grid!r}')
  if grid == 'mmdet' and (strides is None or len(strides) != len(shapes)):
    raise ValueError(f'generate_anchors: grid=\'mmdet\' needs one nominal stride per level ({len(shapes)}), got '
                     f'{strides}')
  canvas_h, canvas_w = (float(v) for v in canvas_hw)
  scale_of = np.repeat(np.asarray(scales, np.float64), len(ratios))      # [R], scale-major
  ratio_of = np.tile(np.asarray(ratios, np.float64), len(scales))
  per_level = []
  for level, ((height, width), size) in enumerate(zip(shapes, sizes)):
    if grid == 'mmdet':
      cy = np.arange(height) * float(strides[level]) / canvas_h
      cx = np.arange(width) * float(strides[level]) / canvas_w
    else:
      cy = (np.arange(height) + 0.5) / height
      cx = (np.arange(width) + 0.5) / width
    anchor_w = size * scale_of / np.sqrt(ratio_of) / canvas_w    # [R]
    anchor_h = size * scale_of * np.sqrt(ratio_of) / canvas_h
    grid_y, grid_x, r = np.meshgrid(cy, cx, np.arange(len(scale_of)), indexing='ij')   # [H, W, R]
    per_level.append(np.stack([grid_x, grid_y, anchor_w[r], anchor_h[r]], axis=-1).reshape(-1, 4))
  anchors = np.concatenate(per_level, axis=0)
  if pixel_xyxy:
    centre, size = anchors[:, :2], anchors[:, 2:]
    anchors = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * [canvas_w, canvas_h, canvas_w, canvas_h]
  return anchors.astype(np.float32)


def assign_anchors(anchors, gt_boxes, gt_valid, thresholds, *, anchor_valid=None,
                   chunk_size: int = ASSIGN_CHUNK, box_format: str = 'cxcywh'):
  """One-to-many assignment with a per-gt IoU threshold (one image; vmap for a batch).

  Rules: anchor a is a candidate of gt g when IoU(a, g) > thresholds[g]. Every valid gt whose best IoU is > 0
  also claims its best-IoU anchor (lowest index on ties), so objects too small for any threshold still get a
  positive. An anchor claimed as some gt's best goes to the claiming gt with the highest IoU (the guarantee
  wins over plain candidates, as mmdet's low-quality matching); otherwise to the candidate gt with the highest
  IoU (lowest gt index on ties). Invalid gts and invalid anchors take part in nothing.

  Args:
    anchors: [A, 4] normalized cxcywh.
    gt_boxes: [M, 4] normalized cxcywh (same normalization; any values in invalid rows, NaN included).
    gt_valid: [M] bool.
    thresholds: [M] IoU thresholds (e.g. `gt_thresholds`).
    anchor_valid: optional [A] bool (False: anchor on a padding token, never positive).
    chunk_size: anchors per block of the IoU computation (memory [chunk_size, M]).
    box_format: 'cxcywh' (anchors and gt_boxes as above) or 'xyxy': both xyxy in one frame of any scale, e.g.
      canvas pixels (the head's: an IoU computed there does not depend on the canvas, see `generate_anchors`).

  Returns:
    assigned_gt [A] int32 (gt index, -1 negative), iou [A] float32 (IoU with the assigned gt, 0 if negative).
    No gradient flows through either.
  """
  anchors, gt_boxes, thresholds = (jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
                                   for x in (anchors, gt_boxes, thresholds))
  gt_valid = jnp.asarray(gt_valid, bool)
  num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
  if num_gt == 0 or num_anchors == 0:
    return jnp.full((num_anchors,), -1, jnp.int32), jnp.zeros((num_anchors,), jnp.float32)
  if anchor_valid is None:
    anchor_valid = jnp.ones((num_anchors,), bool)
  if box_format not in ('cxcywh', 'xyxy'):
    raise ValueError(f"assign_anchors: box_format must be 'cxcywh' or 'xyxy', got {box_format!r}")
  to_xyxy = box_ops.cxcywh_to_xyxy if box_format == 'cxcywh' else (lambda boxes: boxes)
  gt_xyxy = to_xyxy(jnp.where(gt_valid[:, None], gt_boxes, 0.0))
  thresholds = jnp.where(gt_valid, thresholds, jnp.inf)

  chunk = max(1, min(int(chunk_size), num_anchors))
  num_chunks = -(-num_anchors // chunk)
  pad = num_chunks * chunk - num_anchors
  # Padding anchors have zero size and are marked invalid: they never win anything.
  anchor_chunks = jnp.pad(to_xyxy(anchors), ((0, pad), (0, 0))).reshape(num_chunks, chunk, 4)
  valid_chunks = jnp.pad(jnp.asarray(anchor_valid, bool), (0, pad)).reshape(num_chunks, chunk)
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk

  def chunk_iou(anchor_xyxy, valid):  # [chunk, M]; -1 where the pair takes part in nothing
    iou = box_ops.pairwise_iou(anchor_xyxy, gt_xyxy)
    return jnp.where(valid[:, None] & gt_valid[None, :], iou, -1.0)

  # Pass 1: the best anchor of every gt.
  def best_in_chunk(args):
    anchor_xyxy, valid = args
    iou = chunk_iou(anchor_xyxy, valid)
    return iou.max(axis=0), iou.argmax(axis=0).astype(jnp.int32)
  chunk_best_iou, chunk_best_idx = jax.lax.map(best_in_chunk, (anchor_chunks, valid_chunks))   # [n, M]
  best_chunk = jnp.argmax(chunk_best_iou, axis=0)                                              # [M]
  gt_columns = jnp.arange(num_gt)
  gt_best_iou = chunk_best_iou[best_chunk, gt_columns]
  gt_best_anchor = best_chunk.astype(jnp.int32) * chunk + chunk_best_idx[best_chunk, gt_columns]
  claims_best = gt_valid & (gt_best_iou > 0.0)

  # Pass 2: per-anchor decision.
  def assign_chunk(args):
    anchor_xyxy, valid, start = args
    iou = chunk_iou(anchor_xyxy, valid)                                          # [chunk, M]
    index = start + jnp.arange(chunk, dtype=jnp.int32)
    forced = (index[:, None] == gt_best_anchor[None, :]) & claims_best[None, :]
    candidate = iou > thresholds[None, :]
    any_forced = forced.any(axis=1)
    wanted = jnp.where(any_forced[:, None], forced, candidate)
    score = jnp.where(wanted, iou, -jnp.inf)
    gt = jnp.argmax(score, axis=1).astype(jnp.int32)
    positive = wanted.any(axis=1)
    gt_iou = jnp.take_along_axis(iou, gt[:, None], axis=1)[:, 0]
    return jnp.where(positive, gt, -1), jnp.where(positive, gt_iou, 0.0)
  assigned, iou = jax.lax.map(assign_chunk, (anchor_chunks, valid_chunks, starts))
  return assigned.reshape(-1)[:num_anchors], iou.reshape(-1)[:num_anchors]


def select_positives(assigned_gt, iou, max_pos: int):
  """Up to `max_pos` positive anchors of one image, round-robin over objects (see module docstring).

  Order: by rank of the anchor among its gt's positives (0 = that gt's best IoU), then by IoU (descending),
  then by anchor index.

  Args:
    assigned_gt: [A] int32 (-1 negative).  iou: [A] IoU with the assigned gt.  max_pos: K, static.

  Returns:
    anchor_index [K] int32 (0 in empty slots), valid [K] bool (valid slots first).
  """
  num_anchors = assigned_gt.shape[0]
  positive = assigned_gt >= 0
  neg_iou = -jnp.where(positive, iou, -1.0)
  index = jnp.arange(num_anchors, dtype=jnp.int32)
  # Sort by (gt, -iou): each gt's positives become a contiguous run, best first. Negatives go last.
  gt_key = jnp.where(positive, assigned_gt, jnp.iinfo(jnp.int32).max)
  _, _, by_gt = jax.lax.sort((gt_key, neg_iou, index), num_keys=2)
  sorted_gt = gt_key[by_gt]
  run_start = jnp.concatenate([jnp.ones((1,), bool), sorted_gt[1:] != sorted_gt[:-1]])
  rank_sorted = index - jax.lax.cummax(jnp.where(run_start, index, 0))
  rank = jnp.zeros_like(index).at[by_gt].set(rank_sorted)
  rank = jnp.where(positive, rank, num_anchors)
  _, _, order = jax.lax.sort((rank, neg_iou, index), num_keys=2)
  take = min(max_pos, num_anchors)
  anchor_index = order[:take]
  valid = positive[anchor_index]
  anchor_index = jnp.where(valid, anchor_index, 0)
  if take < max_pos:
    anchor_index = jnp.pad(anchor_index, (0, max_pos - take))
    valid = jnp.pad(valid, (0, max_pos - take))
  return anchor_index, valid


class IoUAwareHead(nn.Module):
  """IoU-aware head in the place of Co-DINO's ATSS head: the same dense head (`aux_heads.DenseHead`, no
  centerness) on the aux levels, anchors `anchor_sizes[l] x anchor_scales x anchor_ratios` per location,
  assignment by IoU > T_I(gt) (eq. 8, `gt_thresholds`) plus each gt's best anchor, top-K positives.

  Attributes: num_classes, canvas_hw (H, W), anchor_sizes (one per aux level, canvas px), anchor_ratios,
    anchor_scales, threshold (the IoU threshold rule; its A_s must be resolved, > 0, for a training call — init
    assigns nothing and reads none of it), max_pos (positives per image in the query group), stacked_convs, norm,
    conv_impl, dtype, query_padding ('negatives' | 'masked', `aux_heads.query_group`). RNG stream 'aux' (the
    negatives' draw, with 'negatives' in training).

  Call: (maps: L aux maps [B, H_l, W_l, D], level_pad: L masks [B, H_l, W_l] bool (True = padding),
  targets {'boxes' [B, M, 4] cxcywh, 'box_valid' [B, M], optional 'scale' [B]}, norm_region: None or
  [B | 1, H, W] bool, the GroupNorm statistics region at the image's resolution, `aux_heads.DenseHead`) -> dict,
  A = R * sum H_l W_l:
    cls_logits [B, A, C]   pred_boxes [B, A, 4] (anchor + deltas)   anchors [A, 4]   anchor_valid [B, A]
    assigned_gt [B, A] int32 (-1 negative)   assigned_iou [B, A]
    pos_anchor_index [B, P]   pos_ref_boxes [B, P, 4] (C_pos, the positive anchors; no gradient)   pos_feat
    [B, P, D] (F''_pos, the aux map feature at the positive's location; with gradient)   pos_gt [B, P] int32
    pos_valid [B, P]   (the chosen positives, P = max_pos)
    query_index [B, K] (anchor of each slot)  query_live [B, K]  query_ref_boxes [B, K, 4]  query_feat [B, K, D]
    (as pos_ref_boxes / pos_feat, for every slot)  query_gt [B, K] (-1: background or dead)   the query group,
    K = query_group_slots(max_pos); targets['iah_query_index'] [B, K] (-1 = dead slot), when given, pins its
    anchors (nothing is drawn)
  """
  num_classes: int
  canvas_hw: tuple[int, int]
  anchor_sizes: tuple[float, ...]
  anchor_ratios: tuple[float, ...]
  anchor_scales: tuple[float, ...]
  threshold: IoUThreshold = IoUThreshold()
  max_pos: int = 300
  stacked_convs: int = 1
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None
  anchor_grid: str = 'cell_centers'   # config.model.anchor_grid (`generate_anchors`)
  strides: tuple[int, ...] = ()       # nominal stride of each aux level (px), for anchor_grid='mmdet'
  query_padding: str = 'negatives'

  @nn.compact
  def __call__(self, maps, level_pad, targets: dict, norm_region=None) -> dict:
    shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in maps)
    per_location = len(self.anchor_scales) * len(self.anchor_ratios)
    anchor_args = (shapes, self.canvas_hw, self.anchor_sizes, self.anchor_ratios, self.anchor_scales)
    anchor_kwargs = dict(grid=self.anchor_grid, strides=self.strides or None)
    anchors = jnp.asarray(generate_anchors(*anchor_args, **anchor_kwargs))
    anchors_px = jnp.asarray(generate_anchors(*anchor_args, **anchor_kwargs, pixel_xyxy=True))
    dense = aux_heads.DenseHead(per_location, self.num_classes, self.stacked_convs, False, self.norm,
                                self.conv_impl, self.dtype, name='dense')(maps, norm_region)
    pred_boxes = box_coder.decode_deltas(anchors[None], dense['deltas'], box_coder.DELTA_STDS)
    anchor_valid = aux_heads.anchor_valid_mask(level_pad, per_location)                            # [B, A]
    gt_boxes = jnp.asarray(targets['boxes'], jnp.float32)
    gt_valid = jnp.asarray(targets['box_valid'], bool)
    if self.is_initializing():   # parameters only: skip compiling the assignment, which holds none
      assigned_gt = jnp.full(anchor_valid.shape, -1, jnp.int32)
      assigned_iou = jnp.zeros(anchor_valid.shape, jnp.float32)
    else:
      thresholds = gt_thresholds(gt_boxes, self.canvas_hw, self.threshold, scale=targets.get('scale'))
      assigned_gt, assigned_iou = jax.vmap(
          lambda g, v, t, av: assign_anchors(anchors_px, g, v, t, anchor_valid=av, box_format='xyxy'))(
              box_ops.cxcywh_to_pixel_xyxy(gt_boxes, self.canvas_hw), gt_valid, thresholds, anchor_valid)
    pos_anchor_index, pos_valid = jax.vmap(lambda g, i: select_positives(g, i, self.max_pos))(
        assigned_gt, assigned_iou)
    tokens = aux_heads.flatten_anchor_maps(maps, maps[0].shape[-1])                          # [B, T, D]
    pos_feat = jnp.take_along_axis(tokens, (pos_anchor_index // per_location)[..., None], axis=1)
    pos_gt = jnp.where(pos_valid, jnp.take_along_axis(assigned_gt, pos_anchor_index, axis=1), 0)
    group = aux_heads.anchor_query_group(pos_anchor_index, pos_valid, assigned_gt, anchor_valid,
                                         **aux_heads.query_group_settings(self, self.max_pos, targets))
    return {
        'cls_logits': dense['cls_logits'],
        'pred_boxes': pred_boxes,
        'anchors': anchors,
        'anchor_valid': anchor_valid,
        'assigned_gt': assigned_gt,
        'assigned_iou': assigned_iou,
        'pos_anchor_index': pos_anchor_index,
        'pos_ref_boxes': jax.lax.stop_gradient(anchors[pos_anchor_index]),
        'pos_feat': pos_feat,
        'pos_gt': pos_gt.astype(jnp.int32),
        'pos_valid': pos_valid,
        **group,
        'query_ref_boxes': jax.lax.stop_gradient(anchors[group['query_index']]),
        'query_feat': jnp.take_along_axis(tokens, (group['query_index'] // per_location)[..., None], axis=1),
    }
