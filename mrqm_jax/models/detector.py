"""MRQM: backbone -> BiFPN -> encoder (SAE) -> two-stage mixed query selection + contrastive denoising -> DINO
decoder, plus Co-DINO's collaborative auxiliary heads and their query groups in training (`model.aux_heads`:
'iah' the IoU-aware head, 'atss', 'rcnn'; the same class builds Co-DINO with a ChannelMapper neck and the plain
encoder, configs/co_dino.py).

    build_model(config)(images [B, H, W, 3], pad_mask [B, H, W] bool (True = padding), targets=None, train=False)

returns the output dict of the shared contract (L decoder layers, Q = decoder.num_queries, C classes):
  box_frame [B, 4]                                 (w, h, w, h) of each image's frame in canvas-normalized units:
                                                   every *pred_boxes / query_boxes below is cxcywh in that frame
                                                   (canvas-normalized = box x box_frame); ones for 'canvas'
  pred_logits [B, Q, C], pred_boxes [B, Q, 4]      last decoder layer, matching queries
  aux_outputs {pred_logits [L-1, B, Q, C], pred_boxes [L-1, B, Q, 4]}
  enc_outputs {pred_logits [B, Q, C], pred_boxes [B, Q, 4]}     the selected encoder proposals
  dn_outputs  {pred_logits [L, B, D, C], pred_boxes [L, B, D, 4], gt_index [B, D] i32 (-1 = no gt),
               positive [B, D], valid [B, D] (in use: background unless positive)}
                                                                only when train, targets given, dn.enabled
  {head}_outputs for each head of model.aux_heads ('iah_outputs', 'atss_outputs', 'rcnn_outputs'): everything
               the head returns (see IoUAwareHead, ATSSHead, RCNNBranch), plus its query group decoded by the
               shared decoder: query_logits [L, B, K, C], query_boxes [L, B, K, 4], query_gt [B, K] i32
               (-1 = background or dead slot), query_valid [B, K] (live: in the loss)
                                                                          only when train, targets given
RNG streams: 'dn' (label flips and box jitter of the denoising queries), 'aux' (the R-CNN branch's anchor and RoI
sampling, the query groups' negatives) and 'dropout' (only when a dropout rate is > 0), all only with train=True.
`init` with train=False creates every parameter (the DN label embedding, the auxiliary heads and their query
projections included), so a train-mode apply needs nothing more; inference reads none of the auxiliary parameters
(`inference_params`).
Targets: boxes [B, M, 4] cxcywh canvas-normalized (the batch's frame), labels [B, M], box_valid [B, M], and scale [B]
(canvas px per original px; eq. 8 of the IoU-aware head works in original pixels).
Everything is static-shaped: one compilation per input shape.

Box frame (`box_frame` field, config model.box_frame; `BOX_FRAMES`): 'image' (Co-DINO's 1x recipe, mmdet without
LSJ) normalizes every box by the image's own resized size before padding (its unpadded extent in pad_mask,
`image_box_frame`): level masks are PyTorch's nearest resize of pad_mask, each level's valid ratio is its
unpadded fraction (`valid_ratios`), the encoder's reference points and proposals and the decoder's per-level
references use them (`encoder.encoder_reference_points`, `image_frame_proposals`,
`decoder.level_reference_boxes`), the DN queries and the aux query groups start from gts / anchors divided by
the frame (`to_box_frame`), and losses / postprocess convert with `box_frame`. 'canvas' (Co-DINO's LSJ variant,
mrqm_jax <= 0.3) normalizes by the padded canvas: no valid ratios, static proposals. An image that fills the
canvas gets the same outputs in both.

Two-stage mixed query selection (DINO / Co-DINO, mmdet `gen_encoder_output_proposals`):
  every encoder token gets an anchor proposal centred on its pixel with side 0.05 * 2^level (in the box
  frame: normalized by the level's unpadded extent, or by the padded canvas); tokens on padding and proposals
  not inside (0.01, 0.99) on every coordinate are invalid and their memory is zeroed; enc_output =
  LN(Dense(memory)); per-token class logits (enc class head) and boxes sigmoid(enc box head + logit(proposal));
  the top-Q tokens by max class logit give the reference boxes (DETACHED) of the matching queries, whose content
  is a LEARNED embedding [Q, D].
  Invalid tokens compete in the top-k as in Co-DINO (`exclude_invalid_proposals=False`, the default): their
  zeroed memory gives them one constant class logit, and their box logit is Co-DINO's +inf, written as the
  finite INVALID_PROPOSAL_LOGIT (sigmoid 1.0 exactly in float32, zero gradient, no inf in JAX's gradients), so
  a selected one becomes a query at box (1, 1, 1, 1). `exclude_invalid_proposals=True` (config
  model.exclude_invalid_proposals; mrqm_jax <= 0.3) keeps them out of the top-k.

Contrastive denoising (Co-DINO `CdnQueryGenerator`, label noise 0.5, box noise 1.0), made static:
  each image denoises n = min(#gts, dn.max_gt) of its gts (all of them, in file order, when it has at most
  dn.max_gt; else a random dn.max_gt each step, drawn from the 'dn' stream). `dn.group_rule='batch'` (Co-DINO):
  the groups are w = the largest n of the batch wide and there are G = max(1, dn.num_queries // w) of them; each
  group holds w positive then w negative queries, and an image with n < w fills the rest of each half with
  padding queries (zero content, reference box sigmoid(0)) that attend their group and are classified as
  background, as Co-DINO's zero-padded queries are (label_weights 1, label = background). 'image': w = the
  image's own n (G per image, no padding), so an image's queries do not depend on which images share its batch.
  The groups sit in a fixed number of DN slots D = `dn_num_slots(dn.num_queries, cap)` (the largest 2 * G * w
  any w can need, cap = min(dn.max_gt, dataset.max_boxes)); slots past 2 * G * w are not in use (`valid`
  False: no loss, attended by none). Denoising queries: content = label_embedding(label, flipped to a uniform
  random class with probability label_noise / 2), reference = the gt box with each xyxy corner moved by
  sign * u * (w/2 | h/2) * box_noise, u ~ U[0, 1) for positives and U[1, 2) for negatives, clipped to [0, 1];
  every draw comes from `draw_dn_noise` (a caller may pass its own). Self-attention mask
  (`dn_self_attention_mask`): matching queries see only matching queries; a DN query sees the in-use queries
  of its own group (padding included, as Co-DINO) and all matching queries (as DINO); every query sees itself.

Collaborative auxiliary heads (Co-DINO `forward_train` + `forward_aux`): every head runs on the aux levels (the
encoder memory as maps + one stride-2 level, `aux_heads.AuxLevels`) and returns its query group: its positives,
then (model.aux_query_padding='negatives', Co-DETR) random negatives of the image labelled background up to K =
max(9, most positives of an image in the batch) slots, or ('masked', mrqm_jax <= 0.3) nothing
(`aux_heads.query_group`). Each head's group Q = LN(Dense(PE(C_pos))) [+ LN(Dense(F''_pos)) for the IoU-aware
head, paper eq. 9] with reference boxes C_pos is decoded by the SAME decoder in its own call, each live query
seeing every live query of its image's group (Co-DETR's group is unmasked) and no dead slot
(`aux_query_attention_mask`), one group per head as Co-DINO's `num_co_heads`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrqm_jax.models import backbone as backbone_lib
from mrqm_jax.models import bifpn
from mrqm_jax.models import decoder as decoder_lib
from mrqm_jax.models import deformable_attention
from mrqm_jax.models import encoder as encoder_lib
from mrqm_jax.models import atss_head
from mrqm_jax.models import aux_heads
from mrqm_jax.models import iou_aware_head
from mrqm_jax.models import layers
from mrqm_jax.models import rcnn
from mrqm_jax.ops import boxes as box_ops

# DINO's proposal side on the finest level (doubling per level) and the valid range of proposal coordinates.
PROPOSAL_BASE_SIZE = 0.05
PROPOSAL_VALID_RANGE = (0.01, 0.99)
# Reference box of empty DN slots: Co-DINO pads them with zeros in logit space, i.e. sigmoid(0) = 0.5.
EMPTY_SLOT_BOX = (0.5, 0.5, 0.5, 0.5)
# Box logit of an invalid encoder token (Co-DINO: +inf): finite, yet sigmoid() is exactly 1.0 in float32.
INVALID_PROPOSAL_LOGIT = 1e4


# ------------------------------------------------------------------------------------------ query selection
def level_pad_masks(pad_mask: jax.Array, spatial_shapes, torch_nearest: bool = False) -> list[jax.Array]:
  """Image pad mask [B, H, W] -> [[B, H_l, W_l]] by nearest sampling (PyTorch `F.interpolate(size=...)`:
  source index floor(i * H / H_l)), as DETR derives its feature masks.

  torch_nearest: compute the source index as PyTorch's nearest kernel does, floor(i * float32(H / H_l)) in float32
  (mmdet's masks, the 'image' box frame); False computes it in float64 (mrqm_jax <= 0.3, the 'canvas' frame). The
  two differ for a few sizes (e.g. 106 rows -> 26: row 13 reads source row 52 in PyTorch, 53 in float64).
  """
  _, h, w = pad_mask.shape
  out = []
  for hl, wl in spatial_shapes:
    if torch_nearest:
      rows = np.minimum(np.floor(np.arange(hl, dtype=np.float32) * (np.float32(h) / np.float32(hl))), h - 1)
      cols = np.minimum(np.floor(np.arange(wl, dtype=np.float32) * (np.float32(w) / np.float32(wl))), w - 1)
      rows, cols = rows.astype(np.int32), cols.astype(np.int32)
    else:
      rows = np.floor(np.arange(hl) * (h / hl)).astype(np.int32)
      cols = np.floor(np.arange(wl) * (w / wl)).astype(np.int32)
    out.append(pad_mask[:, rows][:, :, cols])
  return out


def extent_level_pad_masks(pad_mask: jax.Array, extent: jax.Array, spatial_shapes) -> list[jax.Array]:
  """The level masks mmdet derives from its batch tensor: pad_mask [B, H, W] (True = padding), extent [1, H, W]
  bool (`layers.batch_extent`), static level shapes -> [[B, H_l, W_l]] bool, True = padding.

  mmdet resizes the batch tensor's mask (E x F px, the extent) to each level's map of ceil(E / s) x ceil(F / s)
  (`layers.region_at`) with PyTorch's nearest rule (`level_pad_masks`' torch_nearest, on the extent's sizes, which
  are data: computed here in float32 as PyTorch does); positions past the extent at a level are padding (no such
  token exists in mmdet). A batch that fills the canvas gives `level_pad_masks(..., torch_nearest=True)`."""
  big_h, big_w = pad_mask.shape[1:]
  full = layers.region_extent_hw(extent, (big_h, big_w)).astype(jnp.float32)
  out = []
  for hl, wl in spatial_shapes:
    level = layers.region_extent_hw(extent, (hl, wl))
    index = []
    for axis, n in enumerate((hl, wl)):
      i = jnp.arange(n)
      scale = full[axis] / level[axis].astype(jnp.float32)
      src = jnp.minimum(jnp.floor(i.astype(jnp.float32) * scale).astype(jnp.int32), full[axis].astype(jnp.int32) - 1)
      index.append((jnp.where(i < level[axis], src, 0), i < level[axis]))
    (rows, row_in), (cols, col_in) = index
    sampled = jnp.take(jnp.take(pad_mask, rows, axis=1), cols, axis=2)
    out.append(sampled | ~(row_in[:, None] & col_in[None, :])[None])
  return out


def anchor_pad_masks(pad_mask: jax.Array, level_shapes, strides) -> list[jax.Array]:
  """mmdet's anchor valid flags as padding masks: pad_mask [B, H, W] (True = padding), static level shapes and
  nominal strides (px) -> [[B, H_l, W_l]] bool, True (padding) unless row < ceil(image height / stride) and
  column < ceil(image width / stride) (`AnchorGenerator.valid_flags` on img_meta['pad_shape'], which
  DetDataPreprocessor sets to each image's own size at pad_size_divisor 1). Equal to `level_pad_masks` (nearest
  sampling of pad_mask) where the canvas is a multiple of the stride; on a level that does not divide the canvas
  (800 / 128 -> 7 rows) the nearest rule drifts, and on a map of the batch's extent it depends on the extent."""
  valid_w, valid_h = valid_extent(pad_mask)
  out = []
  for (h, w), stride in zip(level_shapes, strides):
    rows = jnp.ceil(valid_h / stride)[:, None, None]
    cols = jnp.ceil(valid_w / stride)[:, None, None]
    out.append(~((jnp.arange(h)[None, :, None] < rows) & (jnp.arange(w)[None, None, :] < cols)))
  return out


# ------------------------------------------------------------------------------------------------ box frames
# What boxes inside the model are normalized by (config model.box_frame): 'image' = each image's own resized
# size before padding (Co-DETR without LSJ: img_meta['img_shape']), mapped onto the padded feature maps by
# per-level valid ratios; 'canvas' = the padded static canvas (Co-DETR's LSJ variant; mrqm_jax <= 0.3).
BOX_FRAMES = ('image', 'canvas')


def valid_extent(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Unpadded extent of padded maps, as mmdet counts it: mask [B, H, W] (True = padding) -> (valid_W [B],
  valid_H [B]) f32 = unpadded columns of row 0, unpadded rows of column 0; at least 1 (a fully padded map keeps
  finite coordinates; mmdet would divide by zero there)."""
  valid_w = jnp.sum(~mask[:, 0, :], axis=1).astype(jnp.float32)
  valid_h = jnp.sum(~mask[:, :, 0], axis=1).astype(jnp.float32)
  return jnp.maximum(valid_w, 1.0), jnp.maximum(valid_h, 1.0)


def valid_ratios(level_masks) -> jax.Array:
  """mmdet `get_valid_ratio` of every level: [[B, H_l, W_l]] pad masks -> [B, L, 2] (x, y) = (valid_W / W_l,
  valid_H / H_l) (`valid_extent`)."""
  ratios = []
  for mask in level_masks:
    valid_w, valid_h = valid_extent(mask)
    ratios.append(jnp.stack([valid_w / mask.shape[2], valid_h / mask.shape[1]], axis=-1))
  return jnp.stack(ratios, axis=1)


def image_box_frame(pad_mask: jax.Array) -> jax.Array:
  """Each image's frame in canvas-normalized units: pad_mask [B, H, W] -> [B, 4] (w, h, w, h) = its valid width
  / W and valid height / H at full resolution (mmdet's img_shape over the padded batch shape). A canvas-normalized
  cxcywh box / this = the box in the image frame; an image-frame box * this = canvas-normalized."""
  valid_w, valid_h = valid_extent(pad_mask)
  _, h, w = pad_mask.shape
  return jnp.stack([valid_w / w, valid_h / h, valid_w / w, valid_h / h], axis=-1)


to_box_frame = box_ops.to_box_frame   # (`image_box_frame`, or ones in the 'canvas' frame)


def encoder_proposals(spatial_shapes) -> tuple[np.ndarray, np.ndarray]:
  """Per-token anchor proposals in the 'canvas' frame (static): (proposals_logit [S, 4] f32, in_range [S] bool).

  Token (i, j) of level l (level-major, row-major) proposes the box ((j + 0.5) / W_l, (i + 0.5) / H_l,
  0.05 * 2^l, 0.05 * 2^l) in canvas-normalized cxcywh; `in_range` is False when any coordinate is outside
  (0.01, 0.99) (then proposals_logit holds 0, never used). Returned in logit space (inverse sigmoid).
  """
  boxes = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    cy, cx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing='ij')
    side = np.full(h * w, PROPOSAL_BASE_SIZE * 2.0**lvl)
    boxes.append(np.stack([cx.reshape(-1), cy.reshape(-1), side, side], axis=-1))
  boxes = np.concatenate(boxes, axis=0)
  lo, hi = PROPOSAL_VALID_RANGE
  in_range = np.all((boxes > lo) & (boxes < hi), axis=-1)
  safe = np.where(in_range[:, None], boxes, 0.5)
  return np.log(safe / (1.0 - safe)).astype(np.float32), in_range


def image_frame_proposals(level_masks) -> tuple[jax.Array, jax.Array]:
  """Per-token anchor proposals in the 'image' frame (mmdet `gen_encoder_output_proposals`), per image:
  level_masks [[B, H_l, W_l]] -> (proposals_logit [B, S, 4] f32, in_range [B, S] bool).

  Token (i, j) of level l proposes ((j + 0.5) / valid_W_l, (i + 0.5) / valid_H_l, 0.05 * 2^l, 0.05 * 2^l) with
  the level's unpadded extent (`valid_extent`); in_range and the logits as `encoder_proposals` (so a token on
  padding, whose centre is > 1, is out of range).
  """
  boxes = []
  for lvl, mask in enumerate(level_masks):
    b, h, w = mask.shape
    valid_w, valid_h = valid_extent(mask)
    cx = (jnp.arange(w, dtype=jnp.float32) + 0.5)[None, None, :] / valid_w[:, None, None]   # [B, 1, W]
    cy = (jnp.arange(h, dtype=jnp.float32) + 0.5)[None, :, None] / valid_h[:, None, None]   # [B, H, 1]
    side = jnp.full((b, h, w), PROPOSAL_BASE_SIZE * 2.0**lvl, jnp.float32)
    boxes.append(jnp.stack([jnp.broadcast_to(cx, (b, h, w)), jnp.broadcast_to(cy, (b, h, w)), side, side],
                           axis=-1).reshape(b, h * w, 4))
  boxes = jnp.concatenate(boxes, axis=1)
  lo, hi = PROPOSAL_VALID_RANGE
  in_range = jnp.all((boxes > lo) & (boxes < hi), axis=-1)
  safe = jnp.where(in_range[..., None], boxes, 0.5)
  return jnp.log(safe / (1.0 - safe)), in_range


def selectable_proposals(enc_boxes_logit: jax.Array, token_valid: jax.Array, exclude_invalid: bool
                         ) -> tuple[jax.Array, jax.Array]:
  """Which tokens may enter the top-k, and their box logits: enc_boxes_logit [B, S, 4], token_valid [B, S] ->
  (box logits [B, S, 4], selectable [B, S]). Co-DINO (exclude_invalid=False): every token, an invalid one with
  box logit INVALID_PROPOSAL_LOGIT (its +inf); exclude_invalid: valid tokens only, box logits unchanged."""
  if exclude_invalid:
    return enc_boxes_logit, token_valid
  return (jnp.where(token_valid[..., None], enc_boxes_logit, INVALID_PROPOSAL_LOGIT),
          jnp.ones_like(token_valid))


def select_top_proposals(enc_logits: jax.Array, enc_boxes_logit: jax.Array, token_valid: jax.Array,
                         num_queries: int) -> tuple[jax.Array, jax.Array]:
  """Top-`num_queries` tokens by max class logit among valid tokens.

  enc_logits [B, S, C], enc_boxes_logit [B, S, 4] (box logits), token_valid [B, S] ->
  (logits [B, Q, C], box logits [B, Q, 4]) of the selected tokens, best first (gradients flow to both).
  """
  if num_queries > enc_logits.shape[1]:
    raise ValueError(f'decoder.num_queries = {num_queries} exceeds the {enc_logits.shape[1]} encoder tokens')
  score = jnp.where(token_valid, enc_logits.max(axis=-1), -jnp.inf)
  _, index = jax.lax.top_k(jax.lax.stop_gradient(score), num_queries)
  return (jnp.take_along_axis(enc_logits, index[..., None], axis=1),
          jnp.take_along_axis(enc_boxes_logit, index[..., None], axis=1))


# ------------------------------------------------------------------------------------------------ denoising
DN_GROUP_RULES = ('batch', 'image')


def dn_groups(num_gts, num_dn_queries: int):
  """Co-DINO's dynamic group count for n gts: max(1, num_dn_queries // n) (1 when n = 0). Works on ints/arrays."""
  return jnp.maximum(1, num_dn_queries // jnp.maximum(num_gts, 1))


def dn_num_slots(num_dn_queries: int, max_gt: int) -> int:
  """Static DN query count D: the largest 2 * groups(n) * n over n = 1..max_gt (so any image fits)."""
  if max_gt < 1:
    raise ValueError(f'dn.max_gt must be >= 1, got {max_gt}')
  return 2 * max(max(1, num_dn_queries // n) * n for n in range(1, max_gt + 1))


def dn_layout(num_gts: jax.Array, num_dn_queries: int, max_gt: int, num_slots: int, *,
              group_rule: str) -> dict[str, jax.Array]:
  """Where each DN slot sits: num_gts [B] i32 (valid gts per image) -> per slot [B, D].

  Each image denoises n = min(num_gts, max_gt) gts in groups of width w: group_rule 'batch' (Co-DINO) w = the
  largest n of the batch, 'image' w = the image's own n. G = dn_groups(w) groups; slot s belongs to group
  s // (2w); inside a group the first w slots are positives and the next w negatives of gt ranks 0..w-1
  (`gt_rank`, the rank among the image's denoised gts). Returns {'group' (-1 = slot not in use), 'gt_rank',
  'positive' (the slot's kind), 'valid' (in use: group < G and w > 0; such a slot attends its group and gets
  a classification loss), 'real' (in use and gt_rank < n: it carries a gt; the others of a group pad it with
  a background query, as Co-DINO pads images with fewer gts than the densest)}.
  """
  if group_rule not in DN_GROUP_RULES:
    raise ValueError(f'dn.group_rule must be one of {DN_GROUP_RULES}, got {group_rule!r}')
  n = jnp.minimum(jnp.asarray(num_gts, jnp.int32), max_gt)[:, None]     # [B, 1]
  width = jnp.broadcast_to(n.max(), n.shape) if group_rule == 'batch' else n
  width_safe = jnp.maximum(width, 1)
  slot = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
  group = slot // (2 * width_safe)
  within = slot % (2 * width_safe)
  rank = within % width_safe
  valid = (width > 0) & (group < dn_groups(width, num_dn_queries))
  return {'group': jnp.where(valid, group, -1), 'gt_rank': rank, 'positive': within < width_safe,
          'valid': valid, 'real': valid & (rank < n)}


def dn_self_attention_mask(dn_group: jax.Array, num_matching: int) -> jax.Array:
  """Self-attention mask of [DN queries; matching queries]: dn_group [B, D] (-1 = slot not in use) ->
  [B, D + Q, D + Q] bool, True = row query may attend column query (see module doc)."""
  b, d = dn_group.shape
  n = d + num_matching
  is_dn = jnp.arange(n) < d                                                 # [N]
  group = jnp.concatenate([dn_group, jnp.full((b, num_matching), -1, dn_group.dtype)], axis=1)  # [B, N]
  same_group = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] >= 0)
  dn_rows = is_dn[None, :, None] & (same_group | ~is_dn[None, None, :])    # DN row: own group + matching
  matching_rows = ~is_dn[None, :, None] & ~is_dn[None, None, :]             # matching row: matching only
  return dn_rows | matching_rows | jnp.eye(n, dtype=bool)[None]


def draw_box_noise(rng: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """DINO's box-noise draws for boxes of `shape` [..., 4]: (sign +-1, u ~ U[0, 1)), both [..., 4] f32."""
  sign_rng, mag_rng = jax.random.split(rng)
  sign = jnp.where(jax.random.bernoulli(sign_rng, 0.5, shape), 1.0, -1.0)
  return sign, jax.random.uniform(mag_rng, shape)


def apply_box_noise(boxes: jax.Array, negative: jax.Array, sign: jax.Array, u: jax.Array,
                    box_noise: float) -> jax.Array:
  """DINO's contrastive box noise: boxes [..., 4] cxcywh, negative [...] bool, sign / u [..., 4] (draw_box_noise)
  -> [..., 4] cxcywh in [0, 1].

  Each xyxy corner moves by sign * u' * half the box side * box_noise, u' = u (positives) or u + 1 (negatives,
  so U[1, 2)); the corners are clipped to [0, 1] (a negative box may come out inverted, i.e. with a negative
  side, exactly as in Co-DINO; the decoder's logit clamp then treats the side as ~0).
  """
  magnitude = u + negative[..., None].astype(jnp.float32)
  half = jnp.concatenate([boxes[..., 2:], boxes[..., 2:]], axis=-1) * 0.5
  corners = box_ops.cxcywh_to_xyxy(boxes) + sign * magnitude * half * box_noise
  return box_ops.xyxy_to_cxcywh(jnp.clip(corners, 0.0, 1.0))


def jitter_boxes(rng: jax.Array, boxes: jax.Array, negative: jax.Array, box_noise: float) -> jax.Array:
  """`apply_box_noise` with fresh draws from `rng`: boxes [..., 4] cxcywh, negative [...] -> [..., 4]."""
  sign, u = draw_box_noise(rng, boxes.shape)
  return apply_box_noise(boxes, negative, sign, u, box_noise)


def draw_dn_noise(rng: jax.Array, num_slots: int, num_classes: int, gt_valid: jax.Array) -> dict[str, jax.Array]:
  """Every random draw of one step's denoising queries (the 'dn' stream), in one place so that a caller can
  pass its own instead (`make_dn_queries(noise=...)`, e.g. a reference implementation's draws).

  gt_valid [B, M] -> {'gt_priority' [B, M] U[0, 1) (which gts an image over the cap keeps: the lowest),
  'flip_u' [B, D] U[0, 1) (label flipped when < label_noise / 2), 'random_label' [B, D] i32 in [0, C),
  'box_sign' [B, D, 4] +-1, 'box_u' [B, D, 4] U[0, 1)}.
  """
  b = gt_valid.shape[0]
  label_rng, flip_rng, box_rng = jax.random.split(rng, 3)
  sign, u = draw_box_noise(box_rng, (b, num_slots, 4))
  return {'gt_priority': jax.random.uniform(jax.random.fold_in(rng, 3), gt_valid.shape),
          'flip_u': jax.random.uniform(flip_rng, (b, num_slots)),
          'random_label': jax.random.randint(label_rng, (b, num_slots), 0, num_classes),
          'box_sign': sign, 'box_u': u}


def dn_gt_subset(gt_valid: jax.Array, priority: jax.Array, max_gt: int) -> jax.Array:
  """Which gts denoise: gt_valid [B, M], priority [B, M] -> [B, M] bool, every valid gt of an image with at most
  max_gt, else the max_gt valid ones of lowest priority (a random subset when priority is uniform noise)."""
  key = jnp.where(gt_valid, priority, jnp.inf)
  rank = jnp.argsort(jnp.argsort(key, axis=1, stable=True), axis=1, stable=True)
  return gt_valid & (rank < max_gt)


def make_dn_queries(rng: jax.Array | None, targets: dict, label_embedding: jax.Array, *, num_dn_queries: int,
                    max_gt: int, num_slots: int, label_noise: float, box_noise: float, group_rule: str,
                    noise: dict | None = None) -> dict[str, jax.Array]:
  """Denoising queries of a batch (module doc).

  targets: boxes [B, M, 4] cxcywh, labels [B, M] i32, box_valid [B, M] bool (valid gts anywhere in M); an
  image with more than max_gt valid gts denoises a random max_gt of them (`dn_gt_subset`), in their original
  order; label_embedding [C, D]. noise: `draw_dn_noise`'s dict to use instead of drawing from rng.
  Returns content [B, D, Dm], ref_boxes [B, D, 4], gt_index [B, D] i32 (index into M, -1 = no gt: a padding
  slot of a group, or a slot not in use), positive [B, D] (carries a gt, positive query), valid [B, D] (in use:
  attends its group, classification loss; background unless positive), group [B, D] (-1 = not in use).
  """
  gt_boxes = jnp.asarray(targets['boxes'], jnp.float32)
  gt_labels = jnp.asarray(targets['labels'], jnp.int32)
  gt_valid = jnp.asarray(targets['box_valid'], bool)
  num_classes = label_embedding.shape[0]
  if noise is None:
    noise = draw_dn_noise(rng, num_slots, num_classes, gt_valid)
  used = dn_gt_subset(gt_valid, noise['gt_priority'], max_gt)
  # Denoised gts first, in their original order (stable sort of the "not used" flag).
  order = jnp.argsort(~used, axis=1, stable=True).astype(jnp.int32)
  layout = dn_layout(used.sum(axis=1), num_dn_queries, max_gt, num_slots, group_rule=group_rule)
  gt_index = jnp.take_along_axis(order, layout['gt_rank'], axis=1)                          # [B, D]
  real = layout['real']
  labels = jnp.take_along_axis(gt_labels, gt_index, axis=1)
  boxes = jnp.take_along_axis(gt_boxes, gt_index[..., None], axis=1)

  if label_noise > 0:
    flip = noise['flip_u'] < label_noise * 0.5
    labels = jnp.where(flip, noise['random_label'], labels)
  if box_noise > 0:
    boxes = apply_box_noise(boxes, ~layout['positive'], noise['box_sign'], noise['box_u'], box_noise)
  # Co-DINO feeds inverse_sigmoid(box, eps=1e-3) to the decoder, which takes its sigmoid again.
  boxes = jax.nn.sigmoid(decoder_lib.inverse_sigmoid(boxes))

  # Slots without a gt are Co-DINO's zero padding: zero content, reference box sigmoid(0).
  content = jnp.where(real[..., None], label_embedding[jnp.clip(labels, 0, num_classes - 1)], 0.0)
  boxes = jnp.where(real[..., None], boxes, jnp.asarray(EMPTY_SLOT_BOX, jnp.float32))
  return {'content': content, 'ref_boxes': jax.lax.stop_gradient(boxes),
          'gt_index': jnp.where(real, gt_index, -1), 'positive': layout['positive'] & real,
          'valid': layout['valid'], 'group': layout['group']}


# ------------------------------------------------------------------------------------ auxiliary heads
AUX_HEADS = ('iah', 'atss', 'rcnn')


TRAINING_ONLY_PREFIXES = ('aux_levels', 'aux_query_', 'iah', 'atss', 'rcnn')


def inference_params(params: dict) -> dict:
  """`params` without the training-only auxiliary heads (what inference reads; what an export ships)."""
  return {k: v for k, v in params.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def placeholder_targets(batch: int, max_boxes: int) -> dict:
  """Targets with no valid box (init of the training-only heads)."""
  return {'boxes': jnp.zeros((batch, max_boxes, 4)), 'labels': jnp.zeros((batch, max_boxes), jnp.int32),
          'box_valid': jnp.zeros((batch, max_boxes), bool)}


def aux_query_attention_mask(live: jax.Array) -> jax.Array:
  """Self-attention mask of an aux query group: live [B, K] -> [B, K, K] bool, True = row may attend column.
  Every query sees the live slots of its image's group (all of them: Co-DETR's group is unmasked) and itself;
  no query sees a dead slot (a dead slot's own row, never read, is the same as a live one's)."""
  return live[:, None, :] | jnp.eye(live.shape[1], dtype=bool)[None]


# ------------------------------------------------------------------------------------------------- detector
@dataclasses.dataclass(frozen=True)
class DNSpec:
  """Contrastive denoising (`config.dn`): groups of `num_queries // n` for n gts, capped at `max_gt` gts per image."""
  enabled: bool = True
  num_queries: int = 100
  max_gt: int = 200
  label_noise: float = 0.5
  box_noise: float = 1.0
  group_rule: str = 'batch'   # DN_GROUP_RULES: group width from the batch's densest image (Co-DINO) or per image


class MRQM(nn.Module):
  """The detector (module doc). Built from a config by `build_model`; its parts are built modules:

  backbone (C2..C5), neck (-> P levels of hidden_dim), encoder (EncoderOutput), decoder (DINODecoder: its
  num_classes and hidden_dim are the detector's), num_queries Q, dn (DNSpec), aux_levels (AuxLevels, or None
  without auxiliary heads), aux_heads (built heads, each named 'iah' / 'atss' / 'rcnn'), max_boxes (the target
  count the heads are initialized with), dtype.

  Parameters: 'backbone', 'neck', 'encoder', 'enc_output', 'enc_output_norm', 'enc_class_head', 'enc_box_head',
  'query_embed' [Q, D], 'label_embedding' [C, D], 'decoder', and with auxiliary heads 'aux_levels', one of
  'iah' / 'atss' / 'rcnn' per head and its 'aux_query_{head}'.

  norm_region (config.model.norm_region): 'batch' — the canvas past the batch's extent
  (`layers.batch_extent(pad_mask)`, the union of the batch's images, the padding inside it included) takes no
  part, as nothing exists past mmdet's batch tensor: every GroupNorm (neck, aux level, dense heads) takes its
  statistics over the extent; every k > 1 conv (backbone, neck, aux level, ATSS / IAH / RPN heads) reads zeros
  and the BiFPN's max-pool -inf past it; the encoder's level masks are mmdet's resize of the extent's mask
  (`extent_level_pad_masks`); no token past it enters the top-k; anchor validity is mmdet's valid flags
  (`anchor_pad_masks`), only anchors inside the extent propose RoIs, and RoIAlign clamps at its last row / column. 'canvas' — the whole canvas takes part (<= 0.3). The extent is over the batch
  this call gets (under data parallelism: the global batch, docs/DESIGN.md).
  """
  # Sub-modules passed in keep the names they were built with (the heads' 'iah', 'atss', 'rcnn'); the unnamed
  # ones take their field's name ('backbone', 'neck', 'encoder', 'decoder', 'aux_levels').
  preserve_adopted_names = True

  backbone: nn.Module
  neck: nn.Module
  encoder: nn.Module
  decoder: decoder_lib.DINODecoder
  num_queries: int = 900
  dn: DNSpec = DNSpec()
  aux_levels: aux_heads.AuxLevels | None = None
  aux_heads: tuple[nn.Module, ...] = ()
  max_boxes: int = 1000
  exclude_invalid_proposals: bool = False
  norm_region: str = 'batch'   # layers.NORM_REGIONS: GroupNorm statistics over the batch's extent or the canvas
  box_frame: str = 'image'   # BOX_FRAMES
  dtype: Any = None

  @nn.compact
  def __call__(self, images: jax.Array, pad_mask: jax.Array, targets: dict | None = None,
               train: bool = False) -> dict[str, Any]:
    if images.ndim != 4 or pad_mask.shape != images.shape[:3]:
      raise ValueError(f'MRQM: images must be [B, H, W, 3] and pad_mask [B, H, W], got {images.shape} and '
                       f'{pad_mask.shape}')
    if self.dn.enabled and self.dn.max_gt < 1:
      raise ValueError(f'config.dn.max_gt must be >= 1 when dn.enabled, got {self.dn.max_gt}')
    if self.aux_heads and self.aux_levels is None:
      raise ValueError('MRQM: auxiliary heads need aux_levels')
    dim, num_queries, num_classes = self.decoder.hidden_dim, self.num_queries, self.decoder.num_classes
    dtype = self.dtype
    batch = images.shape[0]

    if self.box_frame not in BOX_FRAMES:
      raise ValueError(f'config.model.box_frame must be one of {BOX_FRAMES}, got {self.box_frame!r}')
    image_frame = self.box_frame == 'image'
    # Every box below (proposals, references, DN, aux groups, predictions) is cxcywh in this frame: canvas-
    # normalized box / box_frame. All ones in the 'canvas' frame, where dividing by it is exact.
    box_frame = image_box_frame(pad_mask) if image_frame else jnp.ones((batch, 4), jnp.float32)

    # Backbone -> neck -> encoder.
    if self.norm_region not in layers.NORM_REGIONS:
      raise ValueError(f'config.model.norm_region must be one of {layers.NORM_REGIONS}, got {self.norm_region!r}')
    # 'batch': nothing past the batch's extent takes part (module doc), as nothing exists past mmdet's batch tensor.
    norm_region = layers.batch_extent(pad_mask) if self.norm_region == 'batch' else None
    feats = self.neck(self.backbone(images.astype(dtype), norm_region), norm_region)
    shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in feats)
    if norm_region is None:
      level_masks = level_pad_masks(pad_mask, shapes, torch_nearest=image_frame)
    else:
      level_masks = extent_level_pad_masks(pad_mask, norm_region, shapes)
    ratios = valid_ratios(level_masks) if image_frame else None   # [B, L, 2]; None: the canvas needs none
    # mmdet's decoder embeds level 0's reference box scaled by the valid ratio to ITS batch tensor's level 0
    # (the extent's), a number that depends on the padding; the memory is read with the canvas' ratios above.
    position_ratios = None
    if image_frame and norm_region is not None:
      extent_w = layers.region_extent_hw(norm_region, shapes[0]).astype(jnp.float32)[::-1]   # (w, h)
      position_ratios = jnp.stack(valid_extent(level_masks[0]), axis=-1) / extent_w
    enc = self.encoder(feats, level_masks, deterministic=not train, valid_ratios=ratios)
    memory, memory_pad_mask = enc.memory, enc.memory_pad_mask

    # Two-stage mixed query selection.
    if image_frame:
      proposals_logit, in_range = image_frame_proposals(level_masks)                 # [B, S, 4], [B, S]
    else:
      proposals_logit, in_range = encoder_proposals(enc.spatial_shapes)
      proposals_logit, in_range = jnp.asarray(proposals_logit)[None], jnp.asarray(in_range)[None]
    token_valid = ~memory_pad_mask & in_range
    out_memory = jnp.where(token_valid[..., None], memory, 0.0)
    out_memory = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=dtype, name='enc_output_norm')(nn.Dense(dim, dtype=dtype,
                                                                             name='enc_output')(out_memory))
    enc_logits = nn.Dense(num_classes, dtype=dtype, bias_init=layers.prior_bias_init(),
                          name='enc_class_head')(out_memory).astype(jnp.float32)
    enc_boxes_logit = (decoder_lib.box_head(dim, dtype, name='enc_box_head')(out_memory).astype(jnp.float32)
                       + proposals_logit)
    enc_boxes_logit, selectable = selectable_proposals(enc_boxes_logit, token_valid,
                                                       self.exclude_invalid_proposals)
    if norm_region is not None:   # tokens past the extent do not exist in mmdet's memory: never selected
      selectable = selectable & encoder_lib.flatten_levels(
          [layers.region_at(norm_region, hw)[..., None] for hw in shapes])[..., 0]
    top_logits, top_boxes_logit = select_top_proposals(enc_logits, enc_boxes_logit, selectable, num_queries)
    top_boxes = jax.nn.sigmoid(top_boxes_logit)
    query_embed = self.param('query_embed', nn.initializers.normal(1.0), (num_queries, dim))
    content = jnp.broadcast_to(query_embed.astype(out_memory.dtype), (batch, num_queries, dim))
    refs = jax.lax.stop_gradient(top_boxes)
    label_embedding = self.param('label_embedding', nn.initializers.normal(1.0), (num_classes, dim))

    decode = lambda q, r, m: self.decoder(q, r, memory, memory_pad_mask, enc.spatial_shapes, m,  # noqa: E731
                                          train=train, valid_ratios=ratios, position_ratios=position_ratios)

    use_targets = train and targets is not None
    outputs: dict[str, Any] = {'enc_outputs': {'pred_logits': top_logits, 'pred_boxes': top_boxes},
                               'box_frame': box_frame}
    if use_targets and self.dn.enabled:
      dn_cfg = self.dn
      cap = min(dn_cfg.max_gt, int(targets['boxes'].shape[1]))
      num_dn = dn_num_slots(dn_cfg.num_queries, cap)
      # Co-DINO's DN generator normalizes the gts by img_shape: the model's frame.
      dn_targets = dict(targets, boxes=to_box_frame(targets['boxes'], box_frame))
      dn = make_dn_queries(self.make_rng('dn'), dn_targets, label_embedding, num_dn_queries=dn_cfg.num_queries,
                           max_gt=cap, num_slots=num_dn, label_noise=dn_cfg.label_noise,
                           box_noise=dn_cfg.box_noise, group_rule=dn_cfg.group_rule)
      dec = decode(jnp.concatenate([dn['content'].astype(content.dtype), content], axis=1),
                   jnp.concatenate([dn['ref_boxes'], refs], axis=1),
                   dn_self_attention_mask(dn['group'], num_queries))
      outputs['dn_outputs'] = {'pred_logits': dec['pred_logits'][:, :, :num_dn],
                               'pred_boxes': dec['pred_boxes'][:, :, :num_dn], 'gt_index': dn['gt_index'],
                               'positive': dn['positive'], 'valid': dn['valid']}
      logits, boxes = dec['pred_logits'][:, :, num_dn:], dec['pred_boxes'][:, :, num_dn:]
    else:
      dec = decode(content, refs, None)
      logits, boxes = dec['pred_logits'], dec['pred_boxes']
    outputs.update({'pred_logits': logits[-1], 'pred_boxes': boxes[-1],
                    'aux_outputs': {'pred_logits': logits[:-1], 'pred_boxes': boxes[:-1]}})

    # Collaborative auxiliary heads and their query groups (training only; also run at init so that their
    # parameters exist).
    if self.aux_heads and (use_targets or self.is_initializing()):
      head_targets = targets if use_targets else placeholder_targets(batch, self.max_boxes)
      # Each image's size in canvas px: the RPN clips its proposals to it (mmdet's img_shape).
      head_targets = dict(head_targets, image_wh=jnp.stack(valid_extent(pad_mask), axis=-1))
      maps = self.aux_levels(memory, enc.spatial_shapes, norm_region)
      if norm_region is None:
        level_pad = level_pad_masks(pad_mask, [m.shape[1:3] for m in maps])
      else:   # mmdet's valid flags: a rule of each image's size alone, so nothing past the extent
        level_pad = anchor_pad_masks(pad_mask, [m.shape[1:3] for m in maps],
                                     aux_heads.aux_level_strides(len(maps) - 1))
      for aux_head in self.aux_heads:
        head = aux_head(maps, level_pad, head_targets, norm_region)
        query_ref_boxes = to_box_frame(head['query_ref_boxes'], box_frame)   # Co-DETR: / img_shape
        queries = aux_heads.AuxQueryGroup(dim, dtype, name=f'aux_query_{aux_head.name}')(
            query_ref_boxes, head.get('query_feat'))
        if use_targets:   # (at init the decoder's parameters exist already)
          live = head['query_live']
          decoded = decode(queries.astype(dtype), query_ref_boxes, aux_query_attention_mask(live))
          outputs[f'{aux_head.name}_outputs'] = dict(
              head, query_logits=decoded['pred_logits'], query_boxes=decoded['pred_boxes'],
              query_gt=jnp.where(live, head['query_gt'], -1).astype(jnp.int32), query_valid=live)
    return outputs


# ------------------------------------------------------------------------------ config -> module fields
# The one place that reads the config to build modules (as scenic's build_flax_model): every module above and
# in the sibling files takes explicit, typed fields.
def build_backbone(config: ml_collections.ConfigDict, name: str | None = None) -> backbone_lib.ResNet:
  """ResNet from `config.model` (backbone, backbone_width, frozen_stages, conv_impl, dtype)."""
  m = config.model
  return backbone_lib.ResNet(depth=backbone_lib.parse_backbone_name(m.backbone), width=m.backbone_width,
                             frozen_stages=m.frozen_stages, conv_impl=m.conv_impl, dtype=m.dtype,
                             remat=m.remat, name=name)


def build_neck(config: ml_collections.ConfigDict, name: str | None = None) -> nn.Module:
  """BiFPN, FPN or ChannelMapper from `config.model` (neck, hidden_dim, bifpn_repeats, num_levels, neck_norm,
  conv_impl, dtype)."""
  m = config.model
  if m.neck not in bifpn.NECKS:
    raise ValueError(f'config.model.neck must be one of {bifpn.NECKS}, got {m.neck!r}')
  if m.neck_norm not in layers.NECK_NORMS:
    raise ValueError(f'config.model.neck_norm must be one of {layers.NECK_NORMS}, got {m.neck_norm!r}')
  if m.neck == 'bifpn':
    return bifpn.BiFPN(m.hidden_dim, m.bifpn_repeats, m.neck_norm, m.conv_impl, m.dtype, m.remat, name=name)
  if m.neck == 'channel_mapper':
    return bifpn.ChannelMapper(m.hidden_dim, m.num_levels, m.neck_norm, m.conv_impl, m.dtype, name=name)
  return bifpn.FPN(m.hidden_dim, m.neck_norm, m.conv_impl, m.dtype, name=name)


def build_encoder(config: ml_collections.ConfigDict, name: str | None = None) -> nn.Module:
  """The encoder chosen by `config.encoder.type` ('sae' | 'deformable'), sized from config.model/encoder."""
  e, m = config.encoder, config.model
  kwargs = dict(hidden_dim=m.hidden_dim, num_layers=e.num_layers, num_heads=e.num_heads,
                num_points=e.num_points, ffn_dim=e.ffn_dim, dropout=e.dropout, num_levels=m.num_levels,
                pe_temperature=e.pe_temperature, pe_offset=e.pe_offset,
                query_chunk_size=e.query_chunk_size if e.query_chunk_size > 0 else None, dtype=m.dtype,
                packed_neighbours=deformable_attention.resolve_sampling_layout(e.sampling_layout) == 'packed',
                remat=m.remat, name=name)
  if e.type == 'sae':
    return encoder_lib.ScaleAwareEncoder(**kwargs)
  if e.type == 'deformable':
    return encoder_lib.DeformableEncoder(**kwargs)
  raise ValueError(f'config.encoder.type must be one of {encoder_lib.ENCODER_TYPES}, got {e.type!r}')


def build_decoder(config: ml_collections.ConfigDict, name: str | None = None) -> decoder_lib.DINODecoder:
  """DINODecoder sized from config.decoder / config.model / config.dataset.num_classes."""
  dc, m = config.decoder, config.model
  return decoder_lib.DINODecoder(
      num_classes=config.dataset.num_classes, num_layers=dc.num_layers, hidden_dim=m.hidden_dim,
      num_heads=dc.num_heads, num_levels=m.num_levels, num_points=dc.num_points, ffn_dim=dc.ffn_dim,
      dropout=dc.dropout, look_forward_twice=dc.look_forward_twice, dtype=m.dtype, remat=m.remat, name=name)


def iou_threshold(config: ml_collections.ConfigDict) -> iou_aware_head.IoUThreshold:
  """The IoU-aware head's threshold rule from `config.iah` (A_s as configured: -1 until resolved)."""
  i = config.iah
  return iou_aware_head.IoUThreshold(dynamic=bool(i.dynamic_threshold), t_b=float(i.t_b), k=float(i.k),
                                     p=float(i.p), a_s=float(i.a_s))


def build_aux_head(config: ml_collections.ConfigDict, head_name: str) -> nn.Module:
  """The auxiliary head `head_name` ('iah' | 'atss' | 'rcnn'), named so, on the model.num_levels + 1 aux levels."""
  canvas = tuple(int(v) for v in config.input.image_size)
  num_aux_levels = config.model.num_levels + 1
  strides = aux_heads.aux_level_strides(num_aux_levels - 1)
  m, num_classes = config.model, config.dataset.num_classes
  if head_name == 'iah':
    i = config.iah
    if len(i.anchor_sizes) != num_aux_levels:
      raise ValueError(f'config.iah.anchor_sizes has {len(i.anchor_sizes)} entries; the aux heads see '
                       f'{num_aux_levels} levels (model.num_levels + 1): give one base size per level')
    return iou_aware_head.IoUAwareHead(
        num_classes, canvas, tuple(i.anchor_sizes), tuple(i.anchor_ratios), tuple(i.anchor_scales),
        iou_threshold(config), max_pos=i.max_pos, stacked_convs=i.stacked_convs, norm=m.neck_norm,
        conv_impl=m.conv_impl, dtype=m.dtype, anchor_grid=m.anchor_grid, strides=strides,
        query_padding=m.aux_query_padding, name='iah')
  if head_name == 'atss':
    a = config.atss
    return atss_head.ATSSHead(num_classes, canvas, strides, a.octave_base_scale, a.topk, a.max_pos,
                              a.stacked_convs, m.neck_norm, m.conv_impl, m.dtype, anchor_grid=m.anchor_grid,
                              query_padding=m.aux_query_padding, name='atss')
  if head_name == 'rcnn':
    r = config.rcnn
    return rcnn.RCNNBranch(
        num_classes, canvas, strides, r.rpn_octave_base_scale, r.rpn_scales_per_octave,
        tuple(r.rpn_ratios), r.rpn_pos_iou, r.rpn_neg_iou, r.rpn_min_pos_iou, r.rpn_num_samples,
        r.rpn_pos_fraction, r.nms_pre, r.nms_iou, r.num_proposals, r.roi_pos_iou, r.roi_num_samples,
        r.roi_pos_fraction, r.num_roi_levels, r.roi_size, r.sampling_ratio, r.finest_scale, r.fc_dim, r.max_pos,
        m.conv_impl, m.dtype, anchor_grid=m.anchor_grid, adaptive_max_samples=r.adaptive_max_samples,
        query_padding=m.aux_query_padding, name='rcnn')
  raise ValueError(f'config.model.aux_heads: unknown head {head_name!r}; choose from {AUX_HEADS}')


def build_model(config: ml_collections.ConfigDict) -> MRQM:
  """The detector of `config` (model, encoder, decoder, dn, dataset.num_classes / max_boxes, input.image_size,
  iah, atss, rcnn)."""
  m = config.model
  if m.hidden_dim % 2:
    raise ValueError(f'config.model.hidden_dim must be even, got {m.hidden_dim}')
  d = config.dn
  heads = tuple(build_aux_head(config, h) for h in m.aux_heads)
  return MRQM(
      backbone=build_backbone(config), neck=build_neck(config), encoder=build_encoder(config),
      decoder=build_decoder(config), num_queries=config.decoder.num_queries,
      dn=DNSpec(bool(d.enabled), int(d.num_queries), int(d.max_gt), float(d.label_noise), float(d.box_noise),
                str(d.group_rule)),
      aux_levels=(aux_heads.AuxLevels(m.neck_norm, m.conv_impl, m.dtype, m.aux_downsample_bias) if heads
                  else None), aux_heads=heads,
      max_boxes=config.dataset.max_boxes, exclude_invalid_proposals=bool(m.exclude_invalid_proposals),
      norm_region=str(m.norm_region), box_frame=str(m.box_frame), dtype=m.dtype)
