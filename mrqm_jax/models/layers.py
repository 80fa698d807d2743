"""Building blocks shared by the model: a 2-D convolution with a CPU-friendly implementation, frozen
BatchNorm, the neck's normalization choice, the conv-norm unit, the transformer FFN block, and a small MLP.

Why a custom convolution: on XLA:CPU (jax 0.10.2) the gradients of `lax.conv_general_dilated` (and so of
`flax.linen.Conv`) are slow for 1x1 and depthwise convolutions — several times slower than the same function
written as a matmul over channels (1x1) or as per-channel shifted multiply-adds (depthwise) — while XLA's
native kxk dense convolution is the fastest option there. So:
  impl='lax'     native convolution everywhere (GPU/TPU);
  impl='matmul'  every convolution as a sum over kernel taps of shifted-slice matmuls (im2col for the
                 few-channel stem), depthwise as shifted multiply-adds;
  impl='auto'    'lax' off CPU; on CPU per layer: 'matmul' for 1x1 and grouped/depthwise kernels, 'lax'
                 for dense kxk kernels (the fastest mix measured: ResNet-50 fwd+bwd, see the benchmark).
All implementations compute the same function with the same parameters (`kernel [kh, kw, Cin/groups, Cout]`,
HWIO as `nn.Conv`), so a checkpoint trained with one runs with any other. `benchmarks/conv_cpu.py` prints the
timings behind these choices.

Frozen BatchNorm keeps its four tensors in the `'batch_stats'` collection (FROZEN_COLLECTION), never in
`'params'`: an optimizer built over `variables['params']` cannot touch them, and `apply` reads them without
`mutable=`. Import torchvision/timm statistics into that collection with `mrqm_jax.weights`.
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

# Collection holding frozen BatchNorm scale/bias/mean/var (non-trainable by construction).
FROZEN_COLLECTION = 'batch_stats'

CONV_IMPLS = ('lax', 'matmul', 'auto')

Padding = str | int | Sequence[tuple[int, int]]


# PyTorch's nn.LayerNorm default (flax's is 1e-6): the reference Co-DINO's every LayerNorm, so converted
# weights compute the same (benchmarks/codetr_parity.py).
LAYER_NORM_EPSILON = 1e-5

def resolve_conv_impl(impl: str, kernel_hw: tuple[int, int] = (3, 3), feature_group_count: int = 1) -> str:
  """The implementation one convolution uses: 'lax' or 'matmul' (see the module docstring for 'auto')."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS} (config.model.conv_impl), got {impl!r}")
  if impl != 'auto':
    return impl
  if jax.default_backend() != 'cpu':
    return 'lax'
  pointwise = kernel_hw[0] * kernel_hw[1] == 1
  return 'matmul' if pointwise or feature_group_count > 1 else 'lax'


# Below this many input channels a dense conv's per-tap matmuls (contraction size Cin) starve the CPU; the
# taps are concatenated along channels into one matmul instead (the RGB stem: 49 taps x 3 channels).
_IM2COL_MAX_CHANNELS = 16


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(v)
  if len(v) != 2 or not all(isinstance(i, int) for i in v):
    raise ValueError(f'{name} must be an int or a pair of ints, got {v!r}')
  return v


def resolve_padding(padding: Padding, in_hw: tuple[int, int], kernel_hw: tuple[int, int],
                    strides: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit ((top, bottom), (left, right)) padding.

  'SAME' follows XLA/TF (output = ceil(in / stride), the odd pixel padded at the bottom/right); 'VALID' is
  no padding; an int p pads p on every side (PyTorch `padding=p`, which is what torchvision weights expect —
  for stride 2 it differs from 'SAME').
  """
  if isinstance(padding, str):
    if padding.upper() == 'VALID':
      return ((0, 0), (0, 0))
    if padding.upper() != 'SAME':
      raise ValueError(f"padding must be 'SAME', 'VALID', an int or ((t, b), (l, r)), got {padding!r}")
    pads = []
    for size, k, s in zip(in_hw, kernel_hw, strides):
      out = -(-size // s)
      total = max((out - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    return tuple(pads)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(tuple(int(p) for p in pair) for pair in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f'explicit padding must be ((top, bottom), (left, right)), got {padding!r}')
  return pads


def conv2d_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                  padding: tuple[tuple[int, int], tuple[int, int]], feature_group_count: int = 1,
                  precision: Any = None) -> jax.Array:
  """Convolution as a sum over kernel taps of shifted (strided) slices times the tap's weight matrix.

  x: [B, H, W, Cin]; kernel: [kh, kw, Cin / groups, Cout] (HWIO); returns [B, Ho, Wo, Cout], the same
  function as `lax.conv_general_dilated(..., ('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)`.
  Depthwise convolutions (Cin / groups == 1, Cout == groups) become per-channel multiply-adds; dense
  convolutions with fewer than 16 input channels become one im2col matmul.
  """
  b, _, _, cin = x.shape
  kh, kw, cin_per_group, cout = kernel.shape
  groups = feature_group_count
  if cin != cin_per_group * groups or cout % groups:
    raise ValueError(f'conv: input channels {cin} / kernel {kernel.shape} / groups {groups} do not agree')
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  hp, wp = x.shape[1], x.shape[2]
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  if ho <= 0 or wo <= 0:
    raise ValueError(f'conv: padded input {hp}x{wp} is smaller than the kernel {kh}x{kw}')

  def tap(i, j):  # [B, Ho, Wo, Cin]: the input pixels that kernel tap (i, j) sees
    return lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))

  if groups == 1 and cin < _IM2COL_MAX_CHANNELS and kh * kw > 1:
    columns = jnp.concatenate([tap(i, j) for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum('bhwk,ko->bhwo', columns, kernel.reshape(kh * kw * cin, cout), precision=precision)

  out = None
  for i in range(kh):
    for j in range(kw):
      w = kernel[i, j]  # [Cin/groups, Cout]
      if groups == 1:
        term = jnp.einsum('bhwc,co->bhwo', tap(i, j), w, precision=precision)
      elif cin_per_group == 1 and cout == groups:  # depthwise: one weight per channel
        term = tap(i, j) * w[0]
      else:  # general grouped conv: block-diagonal matmul, output channels grouped like lax
        xg = tap(i, j).reshape(b, ho, wo, groups, cin_per_group)
        wg = w.reshape(cin_per_group, groups, cout // groups)
        term = jnp.einsum('bhwgc,cgo->bhwgo', xg, wg, precision=precision).reshape(b, ho, wo, cout)
      out = term if out is None else out + term
  return out


def conv2d_lax(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
               padding: tuple[tuple[int, int], tuple[int, int]], feature_group_count: int = 1,
               precision: Any = None) -> jax.Array:
  """The native XLA convolution; same signature and result as `conv2d_matmul`."""
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=feature_group_count, precision=precision)


class Conv2D(nn.Module):
  """2-D convolution, NHWC, `[B, H, W, Cin] -> [B, Ho, Wo, features]`.

  Parameters: 'kernel' `[kh, kw, Cin / feature_group_count, features]` and 'bias' `[features]` (if
  use_bias) — the layout and names of `flax.linen.Conv`. Depthwise: `feature_group_count = Cin`.
  impl: 'lax' (native conv), 'matmul' (shifted-slice matmuls) or 'auto' (per backend and kernel shape).
  padding: 'SAME' | 'VALID' | int (PyTorch-style symmetric) | ((top, bottom), (left, right)).
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Padding = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = True
  impl: str = 'auto'
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, Cin]; extent: optional [B | 1, H0, W0] bool at the image's resolution (`region_at`): a kernel
    larger than 1x1 reads its input as zero outside it (`zero_outside`), as a conv on the batch cropped to it
    reads its zero padding there."""
    if x.ndim != 4:
      raise ValueError(f'Conv2D expects [B, H, W, C], got shape {x.shape}')
    kh, kw = _pair(self.kernel_size, 'kernel_size')
    if extent is not None and kh * kw > 1:
      x = zero_outside(x, extent)
    strides = _pair(self.strides, 'strides')
    cin = x.shape[-1]
    if cin % self.feature_group_count or self.features % self.feature_group_count:
      raise ValueError(f'Conv2D {self.name}: channels in={cin} out={self.features} not divisible by '
                       f'feature_group_count={self.feature_group_count}')
    kernel = self.param('kernel', self.kernel_init, (kh, kw, cin // self.feature_group_count, self.features),
                        self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = resolve_padding(self.padding, x.shape[1:3], (kh, kw), strides)
    impl = resolve_conv_impl(self.impl, (kh, kw), self.feature_group_count)
    conv = conv2d_matmul if impl == 'matmul' else conv2d_lax
    y = conv(x, kernel, strides, pads, self.feature_group_count, self.precision)
    if bias is not None:
      y = y + bias
    return y


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm with fixed statistics: `[..., C] -> [..., C]`.

  y = (x - mean) / sqrt(var + epsilon) * scale + bias, with scale/bias/mean/var `[C]` stored in the
  FROZEN_COLLECTION ('batch_stats') collection — not 'params', so no optimizer ever updates them (mmdet's
  `norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True`). Defaults to the identity (scale 1,
  bias 0, mean 0, var 1) until ImageNet statistics are imported. epsilon 1e-5 as torchvision.
  """
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.variable(FROZEN_COLLECTION, 'scale', lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable(FROZEN_COLLECTION, 'bias', lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable(FROZEN_COLLECTION, 'mean', lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable(FROZEN_COLLECTION, 'var', lambda: jnp.ones((c,), jnp.float32)).value
    # Fold into one multiply-add; stop_gradient documents (and enforces) that these are constants.
    mult = lax.stop_gradient(scale * lax.rsqrt(var + self.epsilon))
    shift = lax.stop_gradient(bias - mean * mult)
    x, mult, shift = nn.dtypes.promote_dtype(x, mult, shift, dtype=self.dtype)
    return x * mult + shift


NECK_NORMS = ('group', 'none')

# Where GroupNorm takes its statistics (config.model.norm_region): 'batch' = the batch's extent, what a mmdet
# batch tensor padded to its largest image holds (Co-DETR); 'canvas' = the whole static canvas (mrqm_jax <= 0.3).
NORM_REGIONS = ('batch', 'canvas')


def batch_extent(pad_mask: jax.Array) -> jax.Array:
  """The batch's extent: pad_mask [B, H, W] bool (True = padding; images at the top left) -> [1, H, W] bool,
  True at rows < the largest valid height and columns < the largest valid width over the batch.

  What mmdet's DetDataPreprocessor (pad_size_divisor 1) makes of the batch: one tensor padded to its largest
  image, the padding of the smaller images inside it included. A batch without any valid pixel gives the whole
  canvas (statistics over nothing are undefined).
  """
  valid = ~jnp.asarray(pad_mask, bool)
  h, w = valid.shape[1:]
  rows = jnp.max(jnp.where(valid.any(axis=(0, 2)), jnp.arange(1, h + 1), 0))   # extent height, px
  cols = jnp.max(jnp.where(valid.any(axis=(0, 1)), jnp.arange(1, w + 1), 0))
  extent = (jnp.arange(h) < rows)[:, None] & (jnp.arange(w) < cols)[None, :]
  return jnp.where(rows > 0, extent, True)[None]


def region_at(region: jax.Array, hw: Sequence[int]) -> jax.Array:
  """A full-resolution region [B, H, W] bool -> [B, h, w] at the feature level of size hw: every s-th row and
  column, s = the power of two with ceil(H / s) = h and ceil(W / s) = w (s = 1: the region itself).

  Why this matches a conv chain: every stride-2 step of ours (ResNet's 7x7 / 3x3 / 1x1 convs and 3x3 max-pool,
  the necks' and the aux level's 3x3 stride-2 convs, all PyTorch-style padding k // 2) maps n pixels to ceil(n / 2),
  so a level at stride s of a tensor of E rows has ceil(E / s) rows — and for a region of the first E rows, row
  i * s of it is inside iff i < ceil(E / s). So a top-left extent of E x F px gives exactly the ceil(E / s) x
  ceil(F / s) feature map that mmdet's batch tensor of E x F px has at that level (tests/test_layers.py checks
  it against the convs).
  """
  big_h, big_w = region.shape[-2:]
  h, w = int(hw[0]), int(hw[1])
  s = 1
  while -(-big_h // s) > h or -(-big_w // s) > w:
    s *= 2
  if -(-big_h // s) != h or -(-big_w // s) != w:
    raise ValueError(f'region_at: a {big_h}x{big_w} region has no power-of-two stride giving a {h}x{w} level')
  return region[..., ::s, ::s]


def region_extent_hw(region: jax.Array, hw: Sequence[int]) -> jax.Array:
  """The rows and columns of a top-left region ([B | 1, H, W] bool, e.g. `batch_extent`) at a level of size hw
  (`region_at`): -> [2] int32 (h, w), of the first image's region."""
  at = region_at(region, hw)[0]
  return jnp.stack([jnp.sum(at[:, 0]), jnp.sum(at[0, :])]).astype(jnp.int32)


def zero_outside(x: jax.Array, region: jax.Array) -> jax.Array:
  """x [B, h, w, C] with zeros at the positions outside `region` ([B | 1, H, W] bool at the image's resolution,
  taken at x's level by `region_at`); unchanged inside.

  Why: every op that reads neighbours (a k > 1 conv, a max-pool of inputs >= 0) then sees past the batch's extent
  what it sees past mmdet's batch tensor — zero padding — so its output inside the extent equals the op's on the
  batch cropped to the extent. A select, not a multiply: non-finite values outside stay out."""
  inside = region_at(region, x.shape[1:3])[..., None]
  return jnp.where(inside, x, jnp.zeros((), x.dtype))


def num_groups_for(channels: int, max_groups: int = 32) -> int:
  """Largest divisor of `channels` that is <= max_groups (32 groups as Deformable DETR's GroupNorm(32, 256))."""
  return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


class NeckNorm(nn.Module):
  """The neck's normalization, `x [B, H, W, C]`, `norm_region [B | 1, H', W'] bool or None -> [B, H, W, C]`
  (config.model.neck_norm).

  'group': GroupNorm with num_groups_for(C) groups and trainable affine — batch-size independent, as the
  DETR family normalizes its neck features (EfficientDet's BatchNorm needs large per-device batches and
  mutable running statistics in the train step; DETR recipes run 2 images per device). 'none': identity.
  norm_region (config.model.norm_region): None takes each image's group statistics over the whole map; a region
  (True = inside; at this map's resolution or any power-of-two multiple of it, `region_at`) takes them over the
  region's positions only, and normalizes every position with them (flax's masked GroupNorm: statistics in
  float32 for bf16 inputs, the same epsilon and parameters).
  """
  kind: str = 'group'
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, norm_region: jax.Array | None = None) -> jax.Array:
    if self.kind == 'none':
      return x
    if self.kind == 'group':
      mask = None
      if norm_region is not None:
        mask = jnp.broadcast_to(region_at(norm_region, x.shape[1:3])[..., None], x.shape)
      return nn.GroupNorm(num_groups=num_groups_for(x.shape[-1]), epsilon=self.epsilon, dtype=self.dtype,
                          name='gn')(x, mask=mask)
    raise ValueError(f'neck norm must be one of {NECK_NORMS} (config.model.neck_norm), got {self.kind!r}')


# Prior probability of every sigmoid classifier at initialization (RetinaNet / DETR family): logits start at -4.6.
CLS_PRIOR_PROB = 0.01


def prior_bias_init() -> Callable[..., jax.Array]:
  """Bias init giving sigmoid(bias) = CLS_PRIOR_PROB (the class-bias init of every sigmoid classifier)."""
  return nn.initializers.constant(-math.log((1.0 - CLS_PRIOR_PROB) / CLS_PRIOR_PROB))


class ConvNorm(nn.Module):
  """Conv k x k -> NeckNorm -> optional activation: `[B, H, W, C] -> [B, H', W', features]` (optional
  `norm_region`: NeckNorm's).

  The conv-norm(-act) unit of the neck and the dense heads (mmcv's ConvModule with GN). The conv has no bias
  when a norm follows, as ConvModule's bias='auto' (`use_bias=True` adds one anyway, as a plain nn.Conv2d +
  nn.GroupNorm has: GroupNorm subtracts a mean per group of channels, not per channel, so a per-channel bias
  does not cancel). `kernel_init` defaults to normal(0.01), the
  init of mmdet's dense heads. Parameters: `conv_name` ('conv') and `norm_name` ('norm'); a caller that
  shares its scope with the block (`nn.share_scope`) names them to keep its own parameter layout.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  norm: str = 'group'
  activation: Callable[[jax.Array], jax.Array] | None = None
  conv_impl: str = 'auto'
  dtype: Any = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.normal(0.01)
  conv_name: str = 'conv'
  norm_name: str = 'norm'
  use_bias: bool | None = None   # None: a bias only without a norm (mmcv ConvModule's bias='auto')

  @nn.compact
  def __call__(self, x: jax.Array, norm_region: jax.Array | None = None) -> jax.Array:
    x = Conv2D(self.features, self.kernel_size, self.strides, padding=self.kernel_size // 2,
               use_bias=self.norm == 'none' if self.use_bias is None else self.use_bias, impl=self.conv_impl, dtype=self.dtype, kernel_init=self.kernel_init,
               name=self.conv_name)(x, norm_region)
    x = NeckNorm(self.norm, dtype=self.dtype, name=self.norm_name)(x, norm_region)
    return x if self.activation is None else self.activation(x)


def map_over_chunks(fn: Callable[..., jax.Array], arrays: Sequence[jax.Array], chunk_size: int) -> jax.Array:
  """`fn` applied to chunks of `chunk_size` rows along axis 1 of every array in `arrays` ([B, Q, ...] each), one
  chunk after another (`lax.map`): -> [B, Q, ...], the chunks' outputs ([B, chunk_size, ...] each) concatenated.

  `fn` must be row-wise along axis 1 (output row q depends only on input rows q), so chunking does not change
  the result; Q is padded with zeros to a multiple of chunk_size and the padded rows' outputs are dropped.
  Why chunks: only one chunk's intermediates are live at a time (with `fn` under `jax.checkpoint`, also in
  the backward pass)."""
  if chunk_size < 1:
    raise ValueError(f'map_over_chunks: chunk_size must be >= 1, got {chunk_size}')
  b, q = arrays[0].shape[:2]
  chunks = -(-q // chunk_size)
  pad = chunks * chunk_size - q

  def to_chunks(x):  # [B, Q, ...] -> [chunks, B, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(b, chunks, chunk_size, *x.shape[2:]), 0, 1)

  out = lax.map(lambda xs: fn(*xs), tuple(to_chunks(x) for x in arrays))
  return jnp.swapaxes(out, 0, 1).reshape(b, chunks * chunk_size, *out.shape[3:])[:, :q]


class PostNormFFN(nn.Module):
  """The transformer feed-forward block with its residual and post-norm: `[B, Q, D] -> [B, Q, D]`,

    out = LN(x + Drop(Dense_D(Drop(relu(Dense_ffn_dim(x))))))

  shared by the encoder and decoder layers (Deformable DETR / DINO). Parameters `in_name`, `out_name` (the two
  Dense layers) and `norm_name` (the LayerNorm): the layers share their scope with this block
  (`nn.share_scope`), so the parameters sit beside the layer's own under the names its checkpoints have
  (encoder 'linear1', 'linear2', 'norm2'; decoder 'ffn_in', 'ffn_out', 'norm3'). Dropout draws from 'dropout'.
  token_chunk_size: if set and smaller than Q, the block runs over chunks of that many tokens, each
  rematerialized (`map_over_chunks`; same result): the SAE's F2 update has 67k tokens per image at 800x1344,
  whose [B, Q, ffn_dim] activations would otherwise be live whole in the backward pass. Not at init, nor with
  training dropout (no RNG plumbing in the loop).
  """
  ffn_dim: int
  dropout: float = 0.0
  dtype: Any = None
  in_name: str = 'ffn_in'
  out_name: str = 'ffn_out'
  norm_name: str = 'ffn_norm'
  token_chunk_size: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    chunk = self.token_chunk_size
    if (chunk is not None and x.ndim == 3 and chunk < x.shape[1] and not self.is_initializing()
        and (deterministic or not self.dropout)):
      params = self.variables['params']
      whole = PostNormFFN(self.ffn_dim, self.dropout, self.dtype, self.in_name, self.out_name, self.norm_name,
                          parent=None)
      own = {'params': {k: params[k] for k in (self.in_name, self.out_name, self.norm_name)}}
      return map_over_chunks(jax.checkpoint(lambda xc: whole.apply(own, xc)), (x,), chunk)
    # Named dropouts: in a shared scope an auto-name could collide with the layer's own.
    y = nn.Dense(self.ffn_dim, dtype=self.dtype, name=self.in_name)(x)
    y = nn.Dropout(self.dropout, name=f'{self.in_name}_dropout')(nn.relu(y), deterministic=deterministic)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name=self.out_name)(y)
    y = nn.Dropout(self.dropout, name=f'{self.out_name}_dropout')(y, deterministic=deterministic)
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name=self.norm_name)(x + y)


class MLP(nn.Module):
  """`num_layers` Dense layers with `activation` between them (none after the last): `[..., Din] -> [..., output_dim]`.

  The DETR box/query MLP. Layers are named 'layers_0' ... 'layers_{num_layers-1}'. `last_kernel_init` /
  `last_bias_init` override the final layer's initializers (e.g. zeros for DINO's box-refinement head).
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  last_kernel_init: Callable[..., jax.Array] | None = None
  last_bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.num_layers < 1:
      raise ValueError(f'MLP needs num_layers >= 1, got {self.num_layers}')
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype,
                   kernel_init=(self.last_kernel_init or self.kernel_init) if last else self.kernel_init,
                   bias_init=self.last_bias_init if last else nn.initializers.zeros_init(),
                   name=f'layers_{i}')(x)
      if not last:
        x = self.activation(x)
    return x


def max_pool_2x(x: jax.Array, padding: Padding = 1, extent: jax.Array | None = None) -> jax.Array:
  """3x3 max-pool, stride 2: `[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]` (padding=1 as torchvision's stem).

  Padding is with -inf, so padded pixels never win. extent: optional [B | 1, H0, W0] bool at the image's
  resolution (`region_at`): positions outside it are -inf too (absent, as past mmdet's batch tensor), and the
  output is zero outside the extent's positions at its own level (so nothing non-finite leaves the pool; an
  output inside always has its window's centre inside).
  """
  if extent is not None:
    x = jnp.where(region_at(extent, x.shape[1:3])[..., None], x, jnp.asarray(-jnp.inf, x.dtype))
  pads = resolve_padding(padding, x.shape[1:3], (3, 3), (2, 2))
  out = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                          ((0, 0), pads[0], pads[1], (0, 0)))
  return out if extent is None else zero_outside(out, extent)


def conv_fan_out_init() -> Callable[..., jax.Array]:
  """He-normal with fan_out, torchvision ResNet's `kaiming_normal_(mode='fan_out', nonlinearity='relu')`."""
  return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
