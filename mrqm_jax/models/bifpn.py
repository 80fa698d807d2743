"""Necks: BiFPN (the paper's) and a plain FPN (ablation), both mapping backbone C2..C5 to `hidden_dim`-channel
P2..P5 at the same resolutions.

BiFPN (EfficientDet, Tan et al. 2020) over L levels (here 4: P2..P5):
  input   P_l^in  = norm(conv1x1(C_l))                                       (projection to hidden_dim)
  top-down, l = L-2 .. 0:
          P_l^td  = block(fuse(P_l^in, up(P_{l+1}^td)))                      (P_{L-1}^td = P_{L-1}^in)
  bottom-up, l = 1 .. L-1:
          P_l^out = block(fuse(P_l^in, P_l^td, down(P_{l-1}^out)))           middle levels: three inputs
          P_{L-1}^out = block(fuse(P_{L-1}^in, down(P_{L-2}^out)))           top level: two inputs
          P_0^out = P_0^td
  fuse = fast normalized fusion  sum_i relu(w_i) x_i / (sum_j relu(w_j) + 1e-4), one weight per input, init 1
  block = swish -> depthwise 3x3 -> pointwise 1x1 -> norm   (EfficientDet's order: activation first, so the
          outputs, like Deformable DETR's input projections, are normalized but not rectified)
The layer repeats `config.model.bifpn_repeats` times (the projection only once: later layers already see
hidden_dim channels; EfficientDet additionally re-projects C_l separately for the bottom-up inputs of its
first layer, which we skip).

Resampling: `up` is nearest-neighbour 2x (as EfficientDet); `down` is 3x3 max-pool stride 2 (as EfficientDet)
but with symmetric padding 1 instead of EfficientDet's TF 'SAME' (bottom/right only), so output pixel i is
centred on input pixel 2i — the same grid as the backbone's stride-2 convolutions. Odd sizes are cropped to
the target level's size, so any input size works.

Normalization (`config.model.neck_norm`): GroupNorm by default (EfficientDet uses BatchNorm, which needs large
per-device batches and mutable statistics in the train step; DETR recipes train 2 images/device and
normalize their neck with GroupNorm), or none. Every neck takes an optional `norm_region` [B | 1, H, W] bool at
the image's resolution (config.model.norm_region='batch': the batch's extent): the GroupNorm statistics of each
level come from the region's positions at that level only (`layers.NeckNorm`), and every op that reads
neighbours sees nothing outside it: k > 1 convs (the depthwise ones included) read zeros there, the BiFPN's
max-pool -inf (`layers.zero_outside`, `layers.max_pool_2x`), so each level inside the region equals the neck's on
the batch cropped to it. Nearest upsampling reads row i // 2 of the coarser level, inside the region for every
row i inside it.

FPN (Lin et al. 2017, mmdet's FPN without extra levels): lateral 1x1 -> top-down sum with nearest 2x
upsampling -> 3x3 output conv -> norm.

ChannelMapper (Co-DINO's neck, Table 3 rows I and III): conv 1x1 + GroupNorm per input level, and with
`config.model.num_levels` above the inputs, extra levels by conv 3x3 stride 2 + GroupNorm, the first on the
coarsest INPUT (C5, as mmdet's ChannelMapper), the next ones on the previous extra level; no activation.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrqm_jax.models import layers

NECKS = ('bifpn', 'fpn', 'channel_mapper')


def upsample_to(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Nearest 2x upsampling cropped to `hw`: `[B, h, w, D] -> [B, H, W, D]` with H <= 2h, W <= 2w."""
  h, w = hw
  if h > 2 * x.shape[1] or w > 2 * x.shape[2]:
    raise ValueError(f'cannot upsample {x.shape[1:3]} by 2 to {hw}: pyramid levels must halve in size')
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, :h, :w]


def downsample_to(x: jax.Array, hw: tuple[int, int], extent: jax.Array | None = None) -> jax.Array:
  """3x3 max-pool stride 2 (padding 1) cropped to `hw`: `[B, H, W, D] -> [B, h, w, D]`, h <= ceil(H/2)
  (extent: `layers.max_pool_2x`'s, -inf outside it)."""
  x = layers.max_pool_2x(x, padding=1, extent=extent)
  if hw[0] > x.shape[1] or hw[1] > x.shape[2]:
    raise ValueError(f'cannot downsample to {hw} from {x.shape[1:3]}: pyramid levels must halve in size')
  return x[:, :hw[0], :hw[1]]


class FastNormalizedFusion(nn.Module):
  """EfficientDet's fast normalized fusion: n maps `[B, H, W, D]` -> `[B, H, W, D]`.

  out = sum_i relu(w_i) * x_i / (sum_j relu(w_j) + epsilon), learnable `weights [n]` initialised to 1.
  """
  epsilon: float = 1e-4

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    shapes = {x.shape for x in inputs}
    if len(shapes) != 1:
      raise ValueError(f'fusion inputs must have one shape, got {sorted(shapes)}')
    w = nn.relu(self.param('weights', nn.initializers.ones_init(), (len(inputs),), jnp.float32))
    w = w / (jnp.sum(w) + self.epsilon)
    out = inputs[0] * w[0].astype(inputs[0].dtype)
    for i in range(1, len(inputs)):
      out = out + inputs[i] * w[i].astype(inputs[i].dtype)
    return out


class SeparableConvBlock(nn.Module):
  """swish -> depthwise 3x3 -> pointwise 1x1 -> norm: `[B, H, W, D] -> [B, H, W, features]` (norm_region: NeckNorm's)."""
  features: int
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, norm_region: jax.Array | None = None) -> jax.Array:
    x = nn.swish(x)
    x = layers.Conv2D(x.shape[-1], 3, padding=1, feature_group_count=x.shape[-1], use_bias=False,
                      impl=self.conv_impl, dtype=self.dtype, name='depthwise')(x, norm_region)
    pointwise = layers.ConvNorm(self.features, 1, 1, self.norm, None, self.conv_impl, self.dtype,
                                kernel_init=nn.initializers.lecun_normal(), conv_name='pointwise')
    nn.share_scope(self, pointwise)   # params stay 'pointwise', 'norm' of this block
    return pointwise(x, norm_region)


class BiFPNLayer(nn.Module):
  """One top-down + bottom-up pass: L maps `[B, H_l, W_l, D]` (finest first) -> L maps of the same shapes
  (norm_region: NeckNorm's)."""
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], norm_region: jax.Array | None = None) -> list[jax.Array]:
    num = len(feats)
    dim = feats[0].shape[-1]
    block = lambda name: SeparableConvBlock(dim, self.norm, self.conv_impl, self.dtype, name=name)  # noqa: E731

    top_down = [None] * num
    top_down[-1] = feats[-1]
    for l in range(num - 2, -1, -1):
      hw = feats[l].shape[1:3]
      fused = FastNormalizedFusion(name=f'td_fuse_{l}')([feats[l], upsample_to(top_down[l + 1], hw)])
      top_down[l] = block(f'td_conv_{l}')(fused, norm_region)

    out = [None] * num
    out[0] = top_down[0]
    for l in range(1, num):
      down = downsample_to(out[l - 1], feats[l].shape[1:3], norm_region)
      inputs = [feats[l], top_down[l], down] if l < num - 1 else [feats[l], down]
      out[l] = block(f'bu_conv_{l}')(FastNormalizedFusion(name=f'bu_fuse_{l}')(inputs), norm_region)
    return out


def input_projection(features: int, norm: str, conv_impl: str, dtype: Any, name: str) -> layers.ConvNorm:
  """conv1x1 -> norm to `features` channels: `[B, H, W, C] -> [B, H, W, features]` (params 'conv', 'norm')."""
  return layers.ConvNorm(features, 1, 1, norm, None, conv_impl, dtype, kernel_init=nn.initializers.lecun_normal(),
                         name=name)


def _check_pyramid(features: Sequence[jax.Array]) -> None:
  if len(features) < 2:
    raise ValueError(f'a neck needs at least 2 pyramid levels, got {len(features)}')
  for f in features:
    if f.ndim != 4:
      raise ValueError(f'neck inputs must be [B, H, W, C], got {[x.shape for x in features]}')


def project_pyramid(features: Sequence[jax.Array], hidden_dim: int, norm: str, conv_impl: str,
                    dtype: Any, norm_region: jax.Array | None = None) -> list[jax.Array]:
  """Checked C_l -> `input_projection` each (params 'input_proj_{l}' of the calling neck)."""
  _check_pyramid(features)
  return [input_projection(hidden_dim, norm, conv_impl, dtype, f'input_proj_{l}')(c, norm_region)
          for l, c in enumerate(features)]


class BiFPN(nn.Module):
  """[C2..C5] with C_l `[B, H_l, W_l, C_l]` (+ optional norm_region, module doc) -> [P2..P5] with P_l
  `[B, H_l, W_l, hidden_dim]`."""
  hidden_dim: int = 256
  repeats: int = 1
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None
  remat: bool = False   # recompute each layer's activations in the backward pass (config.model.remat)

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], norm_region: jax.Array | None = None) -> list[jax.Array]:
    if self.repeats < 1:
      raise ValueError(f'config.model.bifpn_repeats must be >= 1, got {self.repeats}')
    feats = project_pyramid(features, self.hidden_dim, self.norm, self.conv_impl, self.dtype, norm_region)
    layer_cls = nn.remat(BiFPNLayer) if self.remat else BiFPNLayer
    for r in range(self.repeats):
      feats = layer_cls(self.norm, self.conv_impl, self.dtype, name=f'layer_{r}')(feats, norm_region)
    return feats


class FPN(nn.Module):
  """Plain top-down FPN: [C2..C5] (+ optional norm_region, module doc) -> [P2..P5], P_l `[B, H_l, W_l, hidden_dim]`."""
  hidden_dim: int = 256
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], norm_region: jax.Array | None = None) -> list[jax.Array]:
    _check_pyramid(features)
    lateral = [layers.Conv2D(self.hidden_dim, 1, impl=self.conv_impl, dtype=self.dtype, name=f'lateral_{l}')(c)
               for l, c in enumerate(features)]
    merged = [None] * len(lateral)
    merged[-1] = lateral[-1]
    for l in range(len(lateral) - 2, -1, -1):
      merged[l] = lateral[l] + upsample_to(merged[l + 1], lateral[l].shape[1:3])
    outs = []
    for l, m in enumerate(merged):
      output = layers.ConvNorm(self.hidden_dim, 3, 1, self.norm, None, self.conv_impl, self.dtype,
                               kernel_init=nn.initializers.lecun_normal(), conv_name=f'output_{l}',
                               norm_name=f'norm_{l}')
      nn.share_scope(self, output)   # params stay 'output_{l}', 'norm_{l}' of the FPN
      outs.append(output(m, norm_region))
    return outs


class ChannelMapper(nn.Module):
  """[C2..C5] (+ optional norm_region) -> `num_levels` maps `[B, H_l, W_l, hidden_dim]` (module doc); levels
  past the inputs by stride 2."""
  hidden_dim: int = 256
  num_levels: int = 5
  norm: str = 'group'
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], norm_region: jax.Array | None = None) -> list[jax.Array]:
    if self.num_levels < len(features):
      raise ValueError(f'ChannelMapper: config.model.num_levels={self.num_levels} is below the '
                       f'{len(features)} backbone levels')
    outs = project_pyramid(features, self.hidden_dim, self.norm, self.conv_impl, self.dtype, norm_region)
    x = features[-1]
    for l in range(len(features), self.num_levels):
      x = layers.ConvNorm(self.hidden_dim, 3, 2, self.norm, None, self.conv_impl, self.dtype,
                          kernel_init=nn.initializers.lecun_normal(), name=f'extra_{l}')(x, norm_region)
      outs.append(x)
    return outs
