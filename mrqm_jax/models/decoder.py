"""DINO / Co-DINO deformable decoder with iterative box refinement and look-forward-twice.

One call decodes one set of queries (any group: DN + matching queries with their attention mask, or the IAH
auxiliary queries in a separate call with the same weights):

  queries [B, N, D] (content part), reference boxes [B, N, 4] (normalized cxcywh, treated as constants),
  self-attention mask [N, N] or [B, N, N] (True = query i MAY attend key j), valid ratios [B, L, 2] or None
  -> per-layer class logits [L, B, N, C] and boxes [L, B, N, 4].

Box frames (detector.BOX_FRAMES): without valid ratios ('canvas') the boxes are normalized as the padded maps
are, so the memory is read at ref_l itself; with them ('image': boxes normalized by each image's own size)
level l' is read at ref_l x (r_l', r_l') = `level_reference_boxes` (mmdet DINO decoder / Co-DINO's
`reference_points_input`) and the position embedding takes level 0's scaled box, as there.

Layer l (mmdet `DetrTransformerDecoderLayer`, post-norm, as Co-DINO's config
`operation_order=('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')`):
  pos   = ref_point_head(box_sine_embedding(ref_l))            (DINO's ref_point_head, shared by all layers;
                                                                'image': of level 0's scaled ref_l)
  x     = LN(x + MHA(q = k = x + pos, v = x, mask))
  x     = LN(x + MSDeformAttn(x + pos, ref_l, memory))         ('image': the per-level scaled ref_l)
  x     = LN(x + FFN(x))
Outputs and refinement follow DINO / Co-DINO exactly, including which tensor each head sees:
  h_l        = final_norm(x_l)                                 (one LayerNorm shared by all layers)
  logits_l   = class_head_l(h_l)
  new_ref_l  = sigmoid(box_head_l(x_l) + inverse_sigmoid(ref_l))  (the un-normed x_l, as DINO's decoder)
  ref_{l+1}  = stop_gradient(new_ref_l)                        (references are detached between layers)
  boxes_l    = sigmoid(box_head_l(h_l) + inverse_sigmoid(new_ref_{l-1}))   look-forward-twice: the UN-detached
               refined box of layer l-1 (so layer l's box loss also trains layer l-1's box head); for l = 0
               and with look_forward_twice=False it is ref_l itself (Deformable DETR).
Heads are per layer (mmdet `with_box_refine`: deep copies, not shared): class Dense(C) with bias
-log((1 - 0.01) / 0.01), box MLP(D, D, 4) whose last layer starts at zero.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrqm_jax.models import layers
from mrqm_jax.models.deformable_attention import MSDeformAttn, SpatialShapes
from mrqm_jax.models.position_encoding import box_sine_embedding

# Co-DINO clamps to 1e-3 wherever a reference box re-enters logit space (decoder refinement and head).
INVERSE_SIGMOID_EPS = 1e-3


def inverse_sigmoid(x: jax.Array, eps: float = INVERSE_SIGMOID_EPS) -> jax.Array:
  """log(x / (1 - x)) with x clipped to [0, 1] and both x and 1 - x floored at eps: `[...] -> [...]`."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def level_reference_boxes(ref_boxes: jax.Array, valid_ratios: jax.Array) -> jax.Array:
  """Image-frame reference boxes -> where each level is read: ref_boxes [B, N, 4] cxcywh, valid_ratios [B, L, 2]
  (x, y) -> [B, N, L, 4] = ref x (r_x, r_y, r_x, r_y) of each level (mmdet's `reference_points_input`)."""
  ratios = jnp.concatenate([valid_ratios, valid_ratios], axis=-1).astype(ref_boxes.dtype)   # [B, L, 4]
  return ref_boxes[:, :, None, :] * ratios[:, None, :, :]


def box_head(hidden_dim: int, dtype: Any = None, **module_kwargs) -> layers.MLP:
  """The DETR box MLP `[..., D] -> [..., 4]` deltas in logit space, last layer zero-initialized.
  module_kwargs: `name` or `parent` (e.g. parent=None for an unbound template)."""
  return layers.MLP(hidden_dim, 4, 3, dtype=dtype, last_kernel_init=nn.initializers.zeros_init(), **module_kwargs)


def _attention_mask(mask: jax.Array | None, batch: int, n: int) -> jax.Array | None:
  """[N, N] or [B, N, N] bool (True = may attend) -> [B, 1, N, N] for flax attention."""
  if mask is None:
    return None
  mask = jnp.asarray(mask, bool)
  if mask.ndim == 2:
    mask = mask[None]
  if mask.shape[1:] != (n, n) or mask.shape[0] not in (1, batch):
    raise ValueError(f'decoder self_attn_mask must be [N, N] or [B, N, N] with N = {n}, B = {batch}, '
                     f'got {mask.shape}')
  return jnp.broadcast_to(mask, (batch, n, n))[:, None]


class DecoderLayer(nn.Module):
  """One DINO decoder layer (post-norm): `x [B, N, D]` -> `[B, N, D]` (see module doc).

  query_pos [B, N, D]; ref_boxes [B, N, 4] cxcywh (every level) or [B, N, L, 4] (per level); memory [B, S, D];
  memory_pad_mask [B, S] (True = pad); attn_mask [B, 1, N, N] (True = may attend) or None.
  """
  hidden_dim: int = 256
  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4
  ffn_dim: int = 2048
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, query_pos, ref_boxes, memory, memory_pad_mask, spatial_shapes: SpatialShapes,
               attn_mask, deterministic: bool = True):
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)  # noqa: E731
    qk = x + query_pos
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.hidden_dim, out_features=self.hidden_dim,
        dropout_rate=self.dropout, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        force_fp32_for_softmax=True, name='self_attn')(qk, qk, x, mask=attn_mask, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=self.dtype, name='norm1')(x + drop(y))
    y = MSDeformAttn(self.hidden_dim, self.num_heads, self.num_levels, self.num_points, dtype=self.dtype,
                     name='cross_attn')(x + query_pos, ref_boxes, memory, spatial_shapes, memory_pad_mask)
    x = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=self.dtype, name='norm2')(x + drop(y))
    ffn = layers.PostNormFFN(self.ffn_dim, self.dropout, self.dtype, 'ffn_in', 'ffn_out', 'norm3')
    nn.share_scope(self, ffn)   # params stay 'ffn_in', 'ffn_out', 'norm3' of this layer
    return ffn(x, deterministic)


class DINODecoder(nn.Module):
  """DINO decoder + per-layer class/box heads (module doc). Parameters: 'layers_{l}', 'ref_point_head',
  'final_norm', 'class_heads_{l}', 'box_heads_{l}'.

  Call: (queries [B, N, D], ref_boxes [B, N, 4] cxcywh in [0, 1] (no gradient flows into them),
  memory [B, S, D], memory_pad_mask [B, S] bool (True = padding token), spatial_shapes static ((H, W), ...),
  self_attn_mask None | [N, N] | [B, N, N] bool (True = may attend; every row needs one True, e.g. the
  diagonal), train, valid_ratios None ('canvas' box frame) | [B, L, 2] (x, y; 'image' frame, module doc),
  position_ratios None | [B, 2] (x, y): level 0's valid ratio for the position embedding only, where it differs
  from valid_ratios[:, 0] (the detector's norm_region='batch': mmdet's ratio to its batch tensor's level 0,
  while the memory is read on the canvas' levels))
  -> {'pred_logits': [L, B, N, C] f32, 'pred_boxes': [L, B, N, 4] f32 cxcywh, in the frame of ref_boxes}.
  Dropout (config.decoder.dropout) draws from the 'dropout' rng stream when train=True.
  """
  num_classes: int
  num_layers: int = 6
  hidden_dim: int = 256
  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4
  ffn_dim: int = 2048
  dropout: float = 0.0
  look_forward_twice: bool = True
  dtype: Any = None
  remat: bool = False   # recompute layer activations in the backward pass (config.model.remat)

  @nn.compact
  def __call__(self, queries: jax.Array, ref_boxes: jax.Array, memory: jax.Array, memory_pad_mask: jax.Array,
               spatial_shapes: SpatialShapes, self_attn_mask: jax.Array | None = None,
               train: bool = False, valid_ratios: jax.Array | None = None,
               position_ratios: jax.Array | None = None) -> dict[str, jax.Array]:
    b, n, d = queries.shape
    if d != self.hidden_dim or ref_boxes.shape != (b, n, 4):
      raise ValueError(f'DINODecoder: queries must be [B, N, {self.hidden_dim}] and ref_boxes [B, N, 4], got '
                       f'{queries.shape} and {ref_boxes.shape}')
    if self.hidden_dim % 2:
      raise ValueError(f'DINODecoder: hidden_dim must be even (sine embedding), got {self.hidden_dim}')
    mask = _attention_mask(self_attn_mask, b, n)
    ref_point_head = layers.MLP(self.hidden_dim, self.hidden_dim, 2, dtype=self.dtype, name='ref_point_head')
    final_norm = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=self.dtype, name='final_norm')

    x = queries if self.dtype is None else queries.astype(self.dtype)
    ref = jax.lax.stop_gradient(ref_boxes.astype(jnp.float32))   # input to layer l (detached)
    if self.remat and not self.is_initializing() and self.num_layers > 1 and (not train or not self.dropout):
      return self._scan_layers(x, ref, memory, memory_pad_mask, spatial_shapes, mask, valid_ratios,
                               position_ratios)
    ref_for_pred = ref                                             # what layer l's boxes are refined from
    all_logits, all_boxes = [], []
    for lid in range(self.num_layers):
      # static: spatial_shapes (arg 6) and deterministic (arg 8), counting `self` as 0 as flax does.
      layer_cls = nn.remat(DecoderLayer, static_argnums=(6, 8)) if self.remat else DecoderLayer
      x, ref, ref_for_pred, logits, boxes = self._layer_step(
          layer_cls(name=f'layers_{lid}', **self._layer_fields()), ref_point_head, final_norm,
          nn.Dense(self.num_classes, dtype=self.dtype, bias_init=layers.prior_bias_init(), name=f'class_heads_{lid}'),
          box_head(self.hidden_dim, self.dtype, name=f'box_heads_{lid}'),
          x, ref, ref_for_pred, memory, memory_pad_mask, spatial_shapes, mask, not train, valid_ratios,
          position_ratios)
      all_logits.append(logits)
      all_boxes.append(boxes)
    return {'pred_logits': jnp.stack(all_logits), 'pred_boxes': jnp.stack(all_boxes)}

  def _layer_fields(self) -> dict[str, Any]:
    return dict(hidden_dim=self.hidden_dim, num_heads=self.num_heads, num_levels=self.num_levels,
                num_points=self.num_points, ffn_dim=self.ffn_dim, dropout=self.dropout, dtype=self.dtype)

  def _layer_step(self, layer, ref_point_head, final_norm, class_head, bbox_head, x, ref, ref_for_pred, memory,
                  memory_pad_mask, spatial_shapes, mask, deterministic, valid_ratios, position_ratios=None):
    """Layer l and its heads (module doc): -> (x_{l+1}, ref_{l+1}, ref_for_pred_{l+1}, logits_l, boxes_l)."""
    if valid_ratios is None:   # 'canvas' frame: every level is read at ref itself
      attn_ref, pos_ref = ref, ref
    else:                      # 'image' frame: per-level scaled boxes, the position embedding of level 0's
      attn_ref = level_reference_boxes(ref, valid_ratios)
      pos_ref = attn_ref[:, :, 0]
      if position_ratios is not None:   # level 0's ratio to another map than the memory's (call doc)
        pos_ref = ref * jnp.concatenate([position_ratios, position_ratios], axis=-1)[:, None].astype(ref.dtype)
    # hidden_dim / 2 frequencies per coordinate -> [B, N, 2D], as DINO's gen_sineembed_for_position.
    query_pos = ref_point_head(box_sine_embedding(pos_ref, self.hidden_dim // 2).astype(x.dtype))
    x = layer(x, query_pos, attn_ref, memory, memory_pad_mask, spatial_shapes, mask, deterministic)
    head_in = final_norm(x)
    logits = class_head(head_in).astype(jnp.float32)
    boxes = jax.nn.sigmoid(bbox_head(head_in).astype(jnp.float32) + inverse_sigmoid(ref_for_pred))
    # Refinement for the next layer from the un-normed output, as DINO's decoder does.
    new_ref = jax.nn.sigmoid(bbox_head(x).astype(jnp.float32) + inverse_sigmoid(ref))
    next_ref = jax.lax.stop_gradient(new_ref)
    return x, next_ref, new_ref if self.look_forward_twice else next_ref, logits, boxes

  def _scan_layers(self, x, ref, memory, memory_pad_mask, spatial_shapes: SpatialShapes, mask, valid_ratios,
                   position_ratios=None):
    """The layers as one loop (lax.scan) over their parameters, stacked at call time so that the variable tree
    keeps one entry per layer; the body is rematerialized. Why: the backward pass then recomputes ONE layer at a
    time on any scheduler (XLA:CPU's runs every unrolled layer's recomputation first, all live together).
    Same computation as the unrolled loop (deterministic layers: no dropout RNG plumbing in the loop)."""
    params = self.variables['params']
    per_layer = {kind: jax.tree.map(lambda *xs: jnp.stack(xs),
                                    *[params[f'{kind}_{lid}'] for lid in range(self.num_layers)])
                 for kind in ('layers', 'class_heads', 'box_heads')}
    templates = {
        'layers': DecoderLayer(**self._layer_fields(), parent=None),
        'class_heads': nn.Dense(self.num_classes, dtype=self.dtype, parent=None),
        'box_heads': box_head(self.hidden_dim, self.dtype, parent=None),
    }
    ref_point_head = functools.partial(
        layers.MLP(self.hidden_dim, self.hidden_dim, 2, dtype=self.dtype, parent=None).apply,
        {'params': params['ref_point_head']})
    final_norm = functools.partial(nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=self.dtype, parent=None).apply,
                                   {'params': params['final_norm']})

    def body(carry, layer_params):
      bound = {kind: functools.partial(templates[kind].apply, {'params': layer_params[kind]}) for kind in templates}
      x, ref, ref_for_pred, logits, boxes = self._layer_step(
          bound['layers'], ref_point_head, final_norm, bound['class_heads'], bound['box_heads'],
          *carry, memory, memory_pad_mask, spatial_shapes, mask, True, valid_ratios, position_ratios)
      return (x, ref, ref_for_pred), (logits, boxes)

    _, (logits, boxes) = jax.lax.scan(jax.checkpoint(body), (x, ref, ref), per_layer)
    return {'pred_logits': logits, 'pred_boxes': boxes}
