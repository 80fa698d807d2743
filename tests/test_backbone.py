"""ResNet backbone: C2..C5 shapes/strides, torchvision-style names, frozen stages, conv impls agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mrqm_jax.models import backbone
from mrqm_jax.models import layers
from mrqm_jax.models import detector


def random_variables(model, x, seed=0):
  """Variables with random values (He-scaled kernels, non-trivial BN statistics) without running `init`.

  Filling shapes from `eval_shape` with NumPy avoids compiling the random initializers (slow on 2 cores).
  """
  return random_values(jax.eval_shape(model.init, jax.random.key(0), x), seed)


def random_values(shapes, seed=0):
  """A tree of jax.ShapeDtypeStruct (variables) -> random values as `random_variables` (any model's tree)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _init(model, hw=(32, 32)):
  x = jax.random.normal(jax.random.key(0), (2, *hw, 3))
  return x, random_variables(model, x)


@pytest.fixture(scope='module')
def resnet18():
  """(images [2, 32, 32, 3], variables) of a width-8 ResNet-18, shared by the tests that run it."""
  return _init(backbone.ResNet(depth=18, width=8))


@pytest.mark.parametrize('depth', [18, 50])
def test_feature_shapes_and_strides(depth):
  model = backbone.ResNet(depth=depth, width=8, frozen_stages=0)
  x = jax.ShapeDtypeStruct((2, 33, 46, 3), jnp.float32)  # odd sizes: each stride-2 step rounds up, as PyTorch
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  feats = jax.eval_shape(model.apply, variables, x)
  channels = backbone.resnet_out_channels(depth, 8)
  assert channels == ((8, 16, 32, 64) if depth == 18 else (32, 64, 128, 256))
  expected_hw = [(9, 12), (5, 6), (3, 3), (2, 2)]  # ceil(33 / 2^l), ceil(46 / 2^l), l = 2..5
  assert [f.shape for f in feats] == [(2, h, w, c) for (h, w), c in zip(expected_hw, channels)]
  assert set(variables) == {'params', layers.FROZEN_COLLECTION}


def test_resnet50_channels_and_torchvision_style_paths():
  assert backbone.resnet_out_channels(50) == (256, 512, 1024, 2048)
  assert backbone.resnet_out_channels(34) == (64, 128, 256, 512)
  model = backbone.ResNet(depth=50, width=64)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  params, stats = shapes['params'], shapes[layers.FROZEN_COLLECTION]
  assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert params['layer1']['0']['downsample']['0']['kernel'].shape == (1, 1, 64, 256)
  assert params['layer2']['0']['conv2']['kernel'].shape == (3, 3, 128, 128)  # stride on the 3x3 (v1.5)
  assert params['layer4']['2']['conv3']['kernel'].shape == (1, 1, 512, 2048)
  assert sorted(stats['layer3']['5']['bn3']) == ['bias', 'mean', 'scale', 'var']
  assert len(params['layer3']) == 6 and 'downsample' not in params['layer3']['1']
  assert 'bias' not in params['conv1']  # torchvision convs have no bias


def test_frozen_stages_stop_gradients_and_mask(resnet18):
  model = backbone.ResNet(depth=18, width=8, frozen_stages=1)
  x, variables = resnet18

  def loss(params):
    return sum(jnp.sum(f**2) for f in model.apply({**variables, 'params': params}, x))

  grads = jax.jit(jax.grad(loss))(variables['params'])
  norms = {k: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(v))) for k, v in grads.items()}
  assert norms['conv1'] == 0 and norms['layer1'] == 0  # C2 is returned, but frozen: no gradient
  assert all(norms[k] > 0 for k in ('layer2', 'layer3', 'layer4'))
  # The names the optimizer freezes are exactly the ones that got no gradient.
  assert backbone.frozen_prefixes(1) == tuple(k for k, v in norms.items() if v == 0)

  unfrozen = backbone.ResNet(depth=18, width=8, frozen_stages=0)
  grads = jax.jit(jax.grad(
      lambda p: sum(jnp.sum(f**2) for f in unfrozen.apply({**variables, 'params': p}, x))))(variables['params'])
  assert float(jnp.abs(grads['conv1']['kernel']).sum()) > 0
  assert backbone.frozen_prefixes(0) == ()


def test_conv_impls_give_the_same_features(resnet18):
  x, variables = resnet18
  outs = {impl: jax.jit(backbone.ResNet(depth=18, width=8, conv_impl=impl).apply)(variables, x)
          for impl in ('lax', 'matmul')}
  for impl in ('matmul',):
    for a, b in zip(outs['lax'], outs[impl]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_build_backbone_from_config_and_errors():
  config = smoke.get_config()
  model = detector.build_backbone(config)
  assert (model.depth, model.width, model.frozen_stages) == (18, 8, config.model.frozen_stages)
  with pytest.raises(ValueError, match='config.model.backbone'):
    backbone.parse_backbone_name('resnet152')
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    backbone.ResNet(depth=18, width=8).init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)))


def test_bfloat16_activations(resnet18):
  x, variables = resnet18
  feats = jax.eval_shape(backbone.ResNet(depth=18, width=8, dtype='bfloat16').apply, variables, x)
  assert all(f.dtype == jnp.bfloat16 for f in feats)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
