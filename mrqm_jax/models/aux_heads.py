"""Building blocks of Co-DINO's collaborative auxiliary heads (training only).

  AuxLevels        encoder memory -> per-level maps + one extra coarser level (the maps every aux head reads)
  DenseHead        ATSS-style dense head: conv towers -> per-anchor class logits, box deltas, centerness
  RPNHead          Faster R-CNN's region proposal head: conv 3x3 -> objectness logit and deltas per anchor
  Shared2FCHead    Faster R-CNN's RoI box head: two shared FC layers -> (C + 1) class logits, C x 4 deltas
  AuxQueryGroup    the positives of a head -> the query group the shared decoder decodes
  query_group      which candidates (anchors, RoIs) fill a head's query group: its positives, then (Co-DETR's
                   padding) random negatives labelled background, or (mrqm_jax <= 0.3) nothing

Co-DETR (Sense-X/Co-DETR, `co_dino_head.py`) builds the aux levels from the encoder output: the memory
reshaped back to its levels, plus `downsample` = conv 3x3 stride 2 + GroupNorm(32) on the coarsest level, so the
heads see strides 4 .. 2x the coarsest encoder stride. Every dense output is flattened in the order of
`iou_aware_head.generate_anchors`: (level, row, column, anchor).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrqm_jax.models import layers
from mrqm_jax.models.position_encoding import box_sine_embedding
from mrqm_jax.ops import assigners

def aux_level_shapes(spatial_shapes: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
  """The encoder's level shapes plus the extra level: ceil(H / 2), ceil(W / 2) of the coarsest (static)."""
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  h, w = shapes[-1]
  return shapes + ((-(-h // 2), -(-w // 2)),)


def aux_level_strides(num_encoder_levels: int, finest_stride: int = 4) -> tuple[int, ...]:
  """Nominal strides of the aux levels in canvas px: finest_stride * 2^l, one more level than the encoder."""
  return tuple(finest_stride * 2 ** l for l in range(num_encoder_levels + 1))


class AuxLevels(nn.Module):
  """Encoder memory `[B, S, D]` (levels of `spatial_shapes`, level-major) -> L + 1 maps `[B, H_l, W_l, D]`.

  The extra level is conv 3x3 stride 2 + GroupNorm on the coarsest map (Co-DINO's `downsample`, an nn.Conv2d
  WITH a bias: `conv_bias`, config.model.aux_downsample_bias; False is the layout of mrqm_jax <= 0.3), its
  statistics over `norm_region` ([B | 1, H, W] bool at the image's resolution, `layers.NeckNorm`) when given, and
  the conv reading zeros outside it (the memory there is the encoder's output on tokens past the batch's extent,
  which mmdet's batch tensor does not have).
  Parameters: 'downsample'.
  """
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None
  conv_bias: bool = True

  @nn.compact
  def __call__(self, memory: jax.Array, spatial_shapes: Sequence[Sequence[int]],
               norm_region: jax.Array | None = None) -> list[jax.Array]:
    maps, start = [], 0
    for h, w in spatial_shapes:
      maps.append(memory[:, start:start + h * w].reshape(memory.shape[0], h, w, memory.shape[-1]))
      start += h * w
    if start != memory.shape[1]:
      raise ValueError(f'AuxLevels: spatial_shapes {tuple(spatial_shapes)} give {start} tokens, memory has '
                       f'{memory.shape[1]}')
    extra = layers.ConvNorm(memory.shape[-1], 3, 2, self.norm, conv_impl=self.conv_impl, dtype=self.dtype,
                            kernel_init=nn.initializers.lecun_normal(), use_bias=self.conv_bias,
                            name='downsample')(maps[-1], norm_region)
    return maps + [extra]


def flatten_anchor_maps(maps: Sequence[jax.Array], per_anchor: int) -> jax.Array:
  """[[B, H_l, W_l, R * per_anchor], ...] -> [B, sum_l H_l W_l R, per_anchor] in (level, row, col, anchor) order."""
  return jnp.concatenate([m.reshape(m.shape[0], -1, per_anchor) for m in maps], axis=1)


def anchor_valid_mask(level_pad: Sequence[jax.Array], per_location: int) -> jax.Array:
  """L padding masks [B, H_l, W_l] (True = padding) -> [B, A] bool, True for anchors on image pixels (A =
  per_location * sum H_l W_l, the order of `flatten_anchor_maps`)."""
  pad = flatten_anchor_maps([jnp.asarray(p, bool)[..., None] for p in level_pad], 1)[..., 0]
  return jnp.repeat(~pad, per_location, axis=1)


def extent_anchor_valid(extent: jax.Array, level_shapes: Sequence[Sequence[int]], per_location: int,
                        batch: int) -> jax.Array:
  """extent [B | 1, H, W] bool at the image's resolution (`layers.batch_extent`), L static level shapes ->
  [batch, A] bool, True for the anchors at the extent's positions of each level (`layers.region_at`): the
  anchors mmdet's batch tensor has (A = per_location * sum H_l W_l, the order of `flatten_anchor_maps`)."""
  outside = [jnp.broadcast_to(~layers.region_at(extent, hw), (batch, int(hw[0]), int(hw[1])))
             for hw in level_shapes]
  return anchor_valid_mask(outside, per_location)


class DenseHead(nn.Module):
  """ATSS-style dense head shared over levels (mmdet ATSSHead; the IoU-aware head uses it without centerness).

  maps: L maps `[B, H_l, W_l, D]` (norm_region: optional [B | 1, H, W] bool at the image's resolution, the batch's
  extent: the towers' GroupNorm statistics region, `layers.NeckNorm`, outside which every 3x3 conv reads zeros,
  `layers.Conv2D`) -> {'cls_logits' [B, A, C], 'deltas' [B, A, 4], and with
  centerness 'centerness' [B, A]}, A = R * sum_l H_l W_l, R = `num_anchors` per location.
  Structure: `stacked_convs` x (conv 3x3 + GN + ReLU) per branch (class / box), then conv 3x3 to R * C logits,
  R * 4 deltas (x a learnable per-level scale, init 1) and R centerness logits on the box tower.
  Parameters: 'cls_tower_{i}', 'reg_tower_{i}', 'cls_out', 'reg_out', 'reg_scale_{l}', 'centerness_out'.
  """
  num_anchors: int
  num_classes: int
  stacked_convs: int = 1
  with_centerness: bool = False
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], norm_region: jax.Array | None = None) -> dict[str, jax.Array]:
    dim = maps[0].shape[-1]
    conv = lambda n, name, **kw: layers.Conv2D(n, 3, padding=1, impl=self.conv_impl, dtype=self.dtype,  # noqa
                                               kernel_init=nn.initializers.normal(0.01), name=name, **kw)
    cls_tower = [layers.ConvNorm(dim, 3, 1, self.norm, nn.relu, self.conv_impl, self.dtype, name=f'cls_tower_{i}')
                 for i in range(self.stacked_convs)]
    reg_tower = [layers.ConvNorm(dim, 3, 1, self.norm, nn.relu, self.conv_impl, self.dtype, name=f'reg_tower_{i}')
                 for i in range(self.stacked_convs)]
    cls_out = conv(self.num_anchors * self.num_classes, 'cls_out', bias_init=layers.prior_bias_init())
    reg_out = conv(self.num_anchors * 4, 'reg_out')
    ctr_out = conv(self.num_anchors, 'centerness_out') if self.with_centerness else None
    logits, deltas, centerness = [], [], []
    for level, x in enumerate(maps):
      c, r = x, x
      for block in cls_tower:
        c = block(c, norm_region)
      for block in reg_tower:
        r = block(r, norm_region)
      scale = self.param(f'reg_scale_{level}', nn.initializers.ones_init(), (), jnp.float32)
      logits.append(cls_out(c, norm_region))
      deltas.append(reg_out(r, norm_region) * scale.astype(r.dtype))
      if ctr_out is not None:
        centerness.append(ctr_out(r, norm_region))
    out = {'cls_logits': flatten_anchor_maps(logits, self.num_classes).astype(jnp.float32),
           'deltas': flatten_anchor_maps(deltas, 4).astype(jnp.float32)}
    if ctr_out is not None:
      out['centerness'] = flatten_anchor_maps(centerness, 1)[..., 0].astype(jnp.float32)
    return out


class RPNHead(nn.Module):
  """mmdet RPNHead: conv 3x3 + ReLU (shared over levels) -> 1x1 objectness (sigmoid) and 1x1 deltas.

  maps: L maps `[B, H_l, W_l, D]` (extent: optional [B | 1, H, W] bool at the image's resolution; the 3x3 conv
  reads zeros outside it, `layers.Conv2D`) -> {'logits' [B, A], 'deltas' [B, A, 4]}, A = R * sum_l H_l W_l.
  Parameters: 'rpn_conv', 'rpn_cls', 'rpn_reg'.
  """
  num_anchors: int
  feat_channels: int = 256
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], extent: jax.Array | None = None) -> dict[str, jax.Array]:
    init = nn.initializers.normal(0.01)
    shared = layers.Conv2D(self.feat_channels, 3, padding=1, impl=self.conv_impl, dtype=self.dtype,
                           kernel_init=init, name='rpn_conv')
    cls = layers.Conv2D(self.num_anchors, 1, impl=self.conv_impl, dtype=self.dtype, kernel_init=init,
                        name='rpn_cls')
    reg = layers.Conv2D(self.num_anchors * 4, 1, impl=self.conv_impl, dtype=self.dtype, kernel_init=init,
                        name='rpn_reg')
    logits, deltas = [], []
    for x in maps:
      h = nn.relu(shared(x, extent))
      logits.append(cls(h))
      deltas.append(reg(h))
    return {'logits': flatten_anchor_maps(logits, 1)[..., 0].astype(jnp.float32),
            'deltas': flatten_anchor_maps(deltas, 4).astype(jnp.float32)}


class Shared2FCHead(nn.Module):
  """mmdet Shared2FCBBoxHead: RoI features `[B, N, S, S, D]` -> {'cls_logits' [B, N, C + 1] (softmax, index C =
  background), 'deltas' [B, N, C, 4] (class-specific)}. Two FC layers of `fc_dim` + ReLU shared by both outputs.
  Parameters: 'shared_fc_0', 'shared_fc_1', 'fc_cls', 'fc_reg'.
  """
  num_classes: int
  fc_dim: int = 1024
  dtype: Any = None

  @nn.compact
  def __call__(self, roi_feats: jax.Array) -> dict[str, jax.Array]:
    b, n = roi_feats.shape[:2]
    x = roi_feats.reshape(b, n, -1)
    for i in range(2):
      x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, name=f'shared_fc_{i}')(x))
    logits = nn.Dense(self.num_classes + 1, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                      name='fc_cls')(x)
    deltas = nn.Dense(self.num_classes * 4, dtype=self.dtype, kernel_init=nn.initializers.normal(0.001),
                      name='fc_reg')(x)
    return {'cls_logits': logits.astype(jnp.float32),
            'deltas': deltas.reshape(b, n, self.num_classes, 4).astype(jnp.float32)}


QUERY_PADDINGS = ('negatives', 'masked')
# Co-DETR's floor on a query group's size (`get_aux_targets`: max(9, min(max_pos_coords, most positives))).
MIN_QUERY_SLOTS = 9


def query_group_slots(max_pos: int, padding: str) -> int:
  """Static slot count K_max of a query group whose positives are capped at `max_pos` per image: `max_pos`, and
  at least MIN_QUERY_SLOTS with 'negatives' padding (Co-DETR pads every group to at least 9)."""
  if padding not in QUERY_PADDINGS:
    raise ValueError(f'config.model.aux_query_padding must be one of {QUERY_PADDINGS}, got {padding!r}')
  return max(MIN_QUERY_SLOTS, max_pos) if padding == 'negatives' else max_pos


def query_group(rng: jax.Array | None, pos_index: jax.Array, pos_valid: jax.Array, negative: jax.Array, *,
                num_slots: int, padding: str, pinned: jax.Array | None = None,
                dead_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Which candidates fill each slot of a head's query group (Co-DINO `get_aux_targets`), batched.

  Args:
    rng: key of the negatives' draw (the 'aux' stream); read only with padding 'negatives' and no `pinned`.
    pos_index: [B, P] int32 candidate index of each chosen positive, valid ones first (P <= num_slots).
    pos_valid: [B, P] bool.
    negative: [B, A] bool, the candidates that may pad the group as background (on the image, not positive).
    num_slots: K_max, static (`query_group_slots`).
    padding: 'negatives' (Co-DETR, `use_zero_padding=False`): with K = max(9, most positives of an image in
      the batch) (the positives are already capped at max_pos), slots < K hold the image's positives, then
      distinct negatives drawn uniformly at random in random order (Co-DETR's randperm); slots >= K, and slots
      an image has no negative left for (Co-DETR would fail there), are dead. 'masked' (mrqm_jax <= 0.3): the
      positives only, every other slot dead.
    pinned: optional [B, num_slots] int32 candidate of each slot, -1 = dead (e.g. a reference implementation's
      choice): used as given, nothing is drawn.
    dead_index: optional [B, num_slots] int32 index that dead slots hold (default 0: any in-range index; no
      output of a dead slot is read).

  Returns:
    (query_index [B, num_slots] int32 in range, query_live [B, num_slots] bool). Whether a live slot is a
    positive, and of which gt, is the head's assignment of its candidate.
  """
  batch, num_pos_slots = pos_index.shape
  if num_pos_slots > num_slots:
    raise ValueError(f'query_group: {num_pos_slots} positive slots exceed the group\'s {num_slots}')
  slots = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
  if dead_index is None:
    dead_index = jnp.zeros((batch, num_slots), jnp.int32)
  if pinned is not None:
    pinned = jnp.asarray(pinned, jnp.int32)
    if pinned.shape != (batch, num_slots):
      raise ValueError(f'query_group: pinned indices must be [B, K_max] = {(batch, num_slots)}, got '
                       f'{pinned.shape}')
    live = pinned >= 0
    return jnp.where(live, pinned, dead_index), live
  pad = num_slots - num_pos_slots
  pos_index = jnp.pad(jnp.asarray(pos_index, jnp.int32), ((0, 0), (0, pad)))
  pos_valid = jnp.pad(jnp.asarray(pos_valid, bool), ((0, 0), (0, pad)))
  if padding == 'masked':
    return jnp.where(pos_valid, pos_index, dead_index), pos_valid
  if padding != 'negatives':
    raise ValueError(f'config.model.aux_query_padding must be one of {QUERY_PADDINGS}, got {padding!r}')
  num_pos = pos_valid.sum(axis=1, dtype=jnp.int32)[:, None]                                      # [B, 1]
  group_size = jnp.minimum(jnp.maximum(MIN_QUERY_SLOTS, num_pos.max()), num_slots)
  # Up to num_slots distinct negatives per image, a uniform random subset in random order (mmdet's sampler with
  # no positive share draws exactly that).
  negative = jnp.asarray(negative, bool)
  neg_index, _, neg_found = jax.vmap(lambda r, neg: assigners.random_sample(
      r, jnp.where(neg, assigners.NEGATIVE, assigners.IGNORED), num_slots, 0.0, valid=neg))(
          jax.random.split(rng, batch), negative)
  neg_slot = jnp.clip(slots - num_pos, 0, num_slots - 1)
  is_pos = slots < num_pos
  is_neg = ~is_pos & (slots < group_size) & jnp.take_along_axis(neg_found, neg_slot, axis=1)
  index = jnp.where(is_pos, pos_index, jnp.take_along_axis(neg_index, neg_slot, axis=1))
  live = is_pos | is_neg
  return jnp.where(live, index, dead_index), live


def query_group_settings(head: nn.Module, max_pos: int, targets: dict) -> dict:
  """What `query_group` needs from a head module (fields `query_padding`, its name) and its targets: num_slots,
  padding ('masked' at init: parameters only, nothing drawn), the pinned indices targets['{name}_query_index']
  if given, and the draw's key from the 'aux' stream (only when something is drawn)."""
  padding = 'masked' if head.is_initializing() else head.query_padding
  pinned = targets.get(f'{head.name}_query_index')
  draws = padding == 'negatives' and pinned is None
  return {'rng': head.make_rng('aux') if draws else None, 'padding': padding, 'pinned': pinned,
          'num_slots': query_group_slots(max_pos, head.query_padding)}


def anchor_query_group(pos_index: jax.Array, pos_valid: jax.Array, assigned_gt: jax.Array,
                       anchor_valid: jax.Array, **settings) -> dict[str, jax.Array]:
  """The query group of a dense head (ATSS, IoU-aware) whose candidates are its anchors: the chosen positives
  pos_index / pos_valid [B, P], padded with negatives = anchors on the image assigned to no gt (assigned_gt
  [B, A] == -1, anchor_valid [B, A]); settings: `query_group_settings`.
  -> {'query_index' [B, K], 'query_live' [B, K], 'query_gt' [B, K] int32 (-1: background or dead slot)}."""
  index, live = query_group(pos_index=pos_index, pos_valid=pos_valid,
                            negative=(assigned_gt < 0) & anchor_valid, **settings)
  query_gt = jnp.where(live, jnp.take_along_axis(assigned_gt, index, axis=1), -1)
  return {'query_index': index, 'query_live': live, 'query_gt': query_gt.astype(jnp.int32)}


# mmdet's inverse_sigmoid eps: Co-DINO's forward_aux embeds sigmoid(inverse_sigmoid(boxes)), i.e. boxes clipped to it.
QUERY_EMBED_EPS = 1e-5


class AuxQueryGroup(nn.Module):
  """A head's group candidates (its positives; with 'negatives' padding also background negatives, `query_group`)
  -> its queries (Co-DINO `forward_aux`; paper eq. 9 when `pos_feat` is given):

    Q = LN(Dense(PE(C_pos))) [+ LN(Dense(F_pos))]

  ref_boxes [B, K, 4] normalized cxcywh (no gradient), pos_feat [B, K, D] or None -> queries [B, K, D].
  Co-DINO's own heads use the coordinate term only (`with_coord_feat=False`); the IoU-aware head adds the
  encoder features at its positives (eq. 9). Parameters: 'pos_proj', 'pos_norm' (+ 'feat_proj', 'feat_norm').
  PE sees the boxes clipped to [1e-5, 1 - 1e-5]: Co-DINO embeds sigmoid(inverse_sigmoid(C_pos)) (mmdet's eps 1e-5),
  and anchors of the coarse aux levels are wider than the image (an 8 x 128 px ATSS anchor: w > 1).
  """
  hidden_dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, ref_boxes: jax.Array, pos_feat: jax.Array | None = None) -> jax.Array:
    clipped = jnp.clip(ref_boxes, QUERY_EMBED_EPS, 1.0 - QUERY_EMBED_EPS)
    pe = box_sine_embedding(clipped, self.hidden_dim // 2).astype(self.dtype or jnp.float32)
    q = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=self.dtype, name='pos_norm')(nn.Dense(self.hidden_dim, dtype=self.dtype,
                                                                 name='pos_proj')(pe))
    if pos_feat is not None:
      q = q + nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=self.dtype, name='feat_norm')(nn.Dense(self.hidden_dim, dtype=self.dtype,
                                                                        name='feat_proj')(pos_feat))
    return q
