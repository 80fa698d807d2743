"""ResNet-18/34/50/101 backbone with frozen BatchNorm, returning C2..C5 (strides 4, 8, 16, 32).

Variable paths mirror torchvision's state-dict names one-to-one, so `mrqm_jax.weights` maps a name by
splitting on '.' and renaming only the leaf:

  torchvision                          flax
  conv1.weight        [O, I, 7, 7]     params/conv1/kernel              [7, 7, I, O]
  bn1.weight / .bias                   batch_stats/bn1/scale / bias
  bn1.running_mean / .running_var      batch_stats/bn1/mean / var
  layer1.0.conv2.weight                params/layer1/0/conv2/kernel
  layer1.0.downsample.0.weight         params/layer1/0/downsample/0/kernel
  layer1.0.downsample.1.running_var    batch_stats/layer1/0/downsample/1/var

Padding is PyTorch's symmetric `k // 2` (not 'SAME', which pads stride-2 layers asymmetrically) so imported
ImageNet weights see exactly the pixels they were trained on. Bottleneck blocks put the stride on the 3x3
convolution (torchvision's "v1.5").

Freezing (`frozen_stages = k`): for k >= 1 the stem and stages 1..k are frozen, as mmdet's `frozen_stages=k`:
their outputs pass through `stop_gradient` (so no gradient reaches them and their backward pass is skipped).
k = 0 (or negative) freezes nothing — unlike mmdet, where 0 freezes the stem alone. All BatchNorms are frozen
regardless (their tensors live in the 'batch_stats' collection, see layers.FrozenBatchNorm). Because decoupled
weight decay would still shrink zero-gradient weights, the optimizer gives the params named by
`frozen_prefixes(k)` no update at all (`train_lib.make_optimizer`, 'frozen' label).
"""

from typing import Any

import flax.linen as nn
import jax
from jax import lax

from mrqm_jax.models import layers

# depth -> (block type, blocks per stage)
RESNET_SPECS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
}
BOTTLENECK_EXPANSION = 4


def resnet_out_channels(depth: int, width: int = 64) -> tuple[int, int, int, int]:
  """Channels of C2..C5 for a ResNet of this depth and stem width (e.g. 50, 64 -> (256, 512, 1024, 2048))."""
  if depth not in RESNET_SPECS:
    raise ValueError(f'ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}')
  expansion = BOTTLENECK_EXPANSION if RESNET_SPECS[depth][0] == 'bottleneck' else 1
  return tuple(width * 2**i * expansion for i in range(4))


def _conv(features, kernel, stride, impl, dtype, name):
  return layers.Conv2D(features, kernel_size=kernel, strides=stride, padding=kernel // 2, use_bias=False,
                       impl=impl, dtype=dtype, kernel_init=layers.conv_fan_out_init(), name=name)


class Downsample(nn.Module):
  """Projection shortcut, torchvision's `downsample = Sequential(conv1x1, bn)`: `[B,H,W,Cin] -> [B,H/s,W/s,C]`."""
  features: int
  stride: int
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _conv(self.features, 1, self.stride, self.conv_impl, self.dtype, '0')(x)
    return layers.FrozenBatchNorm(dtype=self.dtype, name='1')(x)


def block_convs(block: str, width: int, stride: int) -> tuple[tuple[int, int, int], ...]:
  """(features, kernel, stride) of each conv of a residual block: 'basic' (ResNet-18/34) two 3x3; 'bottleneck'
  (ResNet-50/101) 1x1 -> 3x3 (strided, torchvision's v1.5) -> 1x1 x4."""
  if block == 'bottleneck':
    return ((width, 1, 1), (width, 3, stride), (width * BOTTLENECK_EXPANSION, 1, 1))
  return ((width, 3, stride), (width, 3, 1))


class ResidualBlock(nn.Module):
  """torchvision's BasicBlock / Bottleneck: `[B,H,W,Cin] -> [B,H/stride,W/stride,C]` with C = width (basic) or
  4 * width (bottleneck). Parameters 'conv{i}' with frozen 'bn{i}' (i = 1..) and, when the shape changes,
  'downsample'."""
  block: str
  width: int
  stride: int = 1
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
    convs = block_convs(self.block, self.width, self.stride)
    y = x
    for i, (features, kernel, stride) in enumerate(convs, start=1):
      y = _conv(features, kernel, stride, self.conv_impl, self.dtype, f'conv{i}')(y, extent)
      y = layers.FrozenBatchNorm(dtype=self.dtype, name=f'bn{i}')(y)
      if i < len(convs):
        y = nn.relu(y)
    out_features = convs[-1][0]
    if self.stride != 1 or x.shape[-1] != out_features:
      x = Downsample(out_features, self.stride, self.conv_impl, self.dtype, name='downsample')(x)
    return nn.relu(x + y)


class Stage(nn.Module):
  """torchvision's `layerN`: blocks named '0', '1', ...; the first one carries the stride.

  `[B,H,W,Cin] -> [B,H/stride,W/stride,C]`.
  """
  block: str
  num_blocks: int
  width: int
  stride: int
  conv_impl: str = 'auto'
  dtype: Any = None
  remat: bool = False   # recompute each block's activations in the backward pass (config.model.remat)

  @nn.compact
  def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
    block_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    for i in range(self.num_blocks):
      x = block_cls(self.block, self.width, self.stride if i == 0 else 1, self.conv_impl, self.dtype,
                    name=str(i))(x, extent)
    return x


class ResNet(nn.Module):
  """ResNet feature extractor: image `[B, H, W, 3]` (normalized) -> [C2, C3, C4, C5].

  C_l is `[B, ceil(H / 2^l), ceil(W / 2^l), resnet_out_channels(depth, width)[l - 2]]`. `width` is the stem's
  channel count (64 = torchvision); every stage scales with it. No classifier head (torchvision's `fc` is
  not created; the weight importer reports it as unused).
  """
  depth: int = 50
  width: int = 64
  frozen_stages: int = 1
  conv_impl: str = 'auto'
  dtype: Any = None
  remat: bool = False   # per block, in the trained stages (frozen ones keep no activations for backward)

  @nn.compact
  def __call__(self, image: jax.Array, extent: jax.Array | None = None) -> list[jax.Array]:
    """image [B, H, W, 3]; extent: optional [B | 1, H, W] bool (config.model.norm_region='batch': the batch's
    extent, `layers.batch_extent`): every conv larger than 1x1 and the stem's max-pool read zeros outside it
    (`layers.zero_outside`; the pool's inputs are post-ReLU, >= 0, so a zero never wins over the window's
    centre), so that C2..C5 inside the extent equal the backbone's on the batch cropped to the extent."""

    if self.depth not in RESNET_SPECS:
      raise ValueError(f'ResNet depth must be one of {sorted(RESNET_SPECS)} (config.model.backbone), '
                       f'got {self.depth}')
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f'ResNet expects images [B, H, W, 3], got shape {image.shape}')
    block, blocks_per_stage = RESNET_SPECS[self.depth]
    x = _conv(self.width, 7, 2, self.conv_impl, self.dtype, 'conv1')(image, extent)
    x = nn.relu(layers.FrozenBatchNorm(dtype=self.dtype, name='bn1')(x))
    x = layers.max_pool_2x(x if extent is None else layers.zero_outside(x, extent), padding=1)
    if self.frozen_stages >= 1:
      x = lax.stop_gradient(x)
    features = []
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
      x = Stage(block, num_blocks, self.width * 2**(stage - 1), 1 if stage == 1 else 2, self.conv_impl,
                self.dtype, self.remat and stage > self.frozen_stages, name=f'layer{stage}')(x, extent)
      if stage <= self.frozen_stages:
        x = lax.stop_gradient(x)
      features.append(x)
    return features


def parse_backbone_name(name: str) -> int:
  """'resnet50' -> 50, with an error naming config.model.backbone for anything else."""
  if not name.startswith('resnet') or not name[len('resnet'):].isdigit() or \
      int(name[len('resnet'):]) not in RESNET_SPECS:
    raise ValueError(f'config.model.backbone must be one of '
                     f'{[f"resnet{d}" for d in sorted(RESNET_SPECS)]}, got {name!r}')
  return int(name[len('resnet'):])


def frozen_prefixes(frozen_stages: int) -> tuple[str, ...]:
  """Top-level backbone parameter names that `frozen_stages` freezes: ('conv1', 'layer1', ...)."""
  if frozen_stages < 1:
    return ()
  return ('conv1',) + tuple(f'layer{i}' for i in range(1, min(frozen_stages, 4) + 1))
