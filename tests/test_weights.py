"""weights: a torchvision-named ResNet state dict (names/shapes generated here from torchvision's scheme,
random values) imports completely, reports what it must, and the imported network computes what a NumPy
PyTorch-semantics (OIHW, symmetric padding) reference computes for the stem and a strided bottleneck."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mrqm_jax import errors, pretrained, weights
from mrqm_jax.models import backbone
from mrqm_jax.models import layers

BN_SUFFIXES = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def torchvision_resnet_shapes(depth, width=64):
  """{state-dict name: shape} following torchvision.models.resnet naming (fc for 1000 classes included)."""
  blocks, bottleneck = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False),
                        50: ((3, 4, 6, 3), True), 101: ((3, 4, 23, 3), True)}[depth]
  expansion = 4 if bottleneck else 1
  shapes = {}

  def bn(prefix, c):
    for s in BN_SUFFIXES:
      shapes[f'{prefix}.{s}'] = () if s == 'num_batches_tracked' else (c,)

  shapes['conv1.weight'] = (width, 3, 7, 7)
  bn('bn1', width)
  inplanes = width
  for stage, n in enumerate(blocks, start=1):
    planes = width * 2**(stage - 1)
    for b in range(n):
      p = f'layer{stage}.{b}'
      if bottleneck:
        convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
      else:
        convs = [(planes, inplanes, 3), (planes, planes, 3)]
      for i, (o, c, k) in enumerate(convs, start=1):
        shapes[f'{p}.conv{i}.weight'] = (o, c, k, k)
        bn(f'{p}.bn{i}', o)
      if b == 0 and (stage > 1 or inplanes != planes * expansion):
        shapes[f'{p}.downsample.0.weight'] = (planes * expansion, inplanes, 1, 1)
        bn(f'{p}.downsample.1', planes * expansion)
      inplanes = planes * expansion
  shapes['fc.weight'] = (1000, inplanes)
  shapes['fc.bias'] = (1000,)
  return shapes


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    if name.endswith('num_batches_tracked'):
      out[name] = np.array(7, np.int64)
    elif name.endswith('running_var') or (name.split('.')[-2].startswith(('bn', '1')) and
                                          name.endswith('weight')):
      out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif len(shape) == 4:
      out[name] = (rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
    else:
      out[name] = (0.1 * rng.normal(size=shape)).astype(np.float32)
  return out


def torch_conv(x, w, stride, padding):
  """PyTorch Conv2d(bias=False) semantics on NHWC input with an OIHW weight, in float64."""
  xp = np.pad(x.astype(np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  o, _, kh, kw = w.shape
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, o))
  for y in range(ho):
    for z in range(wo):
      win = xp[:, y * stride:y * stride + kh, z * stride:z * stride + kw, :]
      out[:, y, z, :] = np.einsum('bijc,ocij->bo', win, w)
  return out


def torch_bn(x, sd, prefix):
  return ((x - sd[f'{prefix}.running_mean']) / np.sqrt(sd[f'{prefix}.running_var'] + 1e-5)
          * sd[f'{prefix}.weight'] + sd[f'{prefix}.bias'])


def relu(x):
  return np.maximum(x, 0)


@pytest.fixture(scope='module')
def resnet50_import():
  shapes = torchvision_resnet_shapes(50)
  sd = random_state_dict(shapes)
  model = backbone.ResNet(depth=50, width=64, frozen_stages=0)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  new_vars, report = weights.import_torch_state_dict(template, sd, module_path=())
  return model, sd, new_vars, report


def test_name_generator_matches_torchvision_counts():
  # torchvision resnet50().state_dict() has 320 entries (161 parameters + 159 BN buffers); resnet18 has 122.
  assert len(torchvision_resnet_shapes(50)) == 320
  assert len(torchvision_resnet_shapes(18)) == 122


def test_resnet50_import_is_complete_and_reports_fc(resnet50_import):
  _, sd, new_vars, report = resnet50_import
  assert report.complete, report.summary()
  assert report.unused == ['fc.bias', 'fc.weight']
  assert len(report.ignored) == 53 and all(n.endswith('num_batches_tracked') for n in report.ignored)
  assert len(report.loaded) == 320 - 2 - 53
  assert not report.missing and not report.shape_mismatch
  # Layouts: OIHW -> HWIO, BN weight -> scale.
  np.testing.assert_array_equal(new_vars['params']['layer2']['0']['conv2']['kernel'],
                                sd['layer2.0.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(new_vars[layers.FROZEN_COLLECTION]['layer1']['0']['downsample']['1']['scale'],
                                sd['layer1.0.downsample.1.weight'])
  assert all(isinstance(v, np.ndarray) for v in jax.tree.leaves(new_vars))


def test_imported_stem_and_bottleneck_match_numpy_reference(resnet50_import):
  model, sd, new_vars, _ = resnet50_import
  image = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
  _, inter = model.apply(new_vars, image, capture_intermediates=True)
  inter = inter['intermediates']

  # Stem: conv 7x7/2 pad 3 -> BN -> (ReLU, max-pool 3x3/2 pad 1 are checked through layer1's input below).
  stem = torch_bn(torch_conv(image, sd['conv1.weight'], 2, 3), sd, 'bn1')
  np.testing.assert_allclose(np.asarray(inter['bn1']['__call__'][0]), stem, rtol=1e-4, atol=1e-4)

  # layer2.0: strided bottleneck (stride on the 3x3) with a projection shortcut, from layer1's output.
  x = np.asarray(inter['layer1']['__call__'][0], np.float64)
  y = relu(torch_bn(torch_conv(x, sd['layer2.0.conv1.weight'], 1, 0), sd, 'layer2.0.bn1'))
  y = relu(torch_bn(torch_conv(y, sd['layer2.0.conv2.weight'], 2, 1), sd, 'layer2.0.bn2'))
  y = torch_bn(torch_conv(y, sd['layer2.0.conv3.weight'], 1, 0), sd, 'layer2.0.bn3')
  shortcut = torch_bn(torch_conv(x, sd['layer2.0.downsample.0.weight'], 2, 0), sd, 'layer2.0.downsample.1')
  expected = relu(y + shortcut)
  got = np.asarray(inter['layer2']['0']['__call__'][0])
  assert got.shape == (1, 4, 4, 512)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_mismatches_and_missing_are_reported():
  model = backbone.ResNet(depth=18, width=8)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  wrapped = {c: {'backbone': t} for c, t in template.items()}
  sd = random_state_dict(torchvision_resnet_shapes(18, width=16))  # twice as wide: every tensor mismatches
  _, report = weights.import_torch_state_dict(wrapped, sd, module_path=('backbone',))
  assert not report.complete and not report.loaded
  assert ('conv1.weight', (7, 7, 3, 16), (7, 7, 3, 8)) in report.shape_mismatch
  assert 'params/backbone/conv1/kernel' in report.missing
  assert 'mismatch: conv1.weight' in report.summary()

  sd = random_state_dict(torchvision_resnet_shapes(18, width=8))
  del sd['layer3.1.bn2.running_var']
  sd['backbone_extra.weight'] = np.zeros(3, np.float32)
  _, report = weights.import_torch_state_dict(wrapped, sd, module_path=('backbone',))
  assert report.missing == [f'{layers.FROZEN_COLLECTION}/backbone/layer3/1/bn2/var']
  assert set(report.unused) == {'fc.weight', 'fc.bias', 'backbone_extra.weight'}
  assert not report.shape_mismatch


@pytest.mark.parametrize('ext', ['npz', 'safetensors'])
def test_load_pretrained_from_file(tmp_path, ext):
  model = backbone.ResNet(depth=18, width=8)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  wrapped = {c: {'backbone': t} for c, t in template.items()}
  # An mmdet-style checkpoint: every name under 'backbone.'.
  sd = {f'backbone.{k}': v for k, v in random_state_dict(torchvision_resnet_shapes(18, width=8)).items()}
  path = str(tmp_path / f'r18.{ext}')
  if ext == 'npz':
    np.savez(path, **sd)
  else:
    from safetensors.numpy import save_file
    save_file(sd, path)
  config = ml_collections.ConfigDict({'model': {'pretrained': path, 'backbone': 'resnet18',
                                                'backbone_width': 8}})
  new_vars, report = weights.load_pretrained(config, wrapped, source_prefix='backbone.')
  assert report.complete and len(report.unused) == 2
  np.testing.assert_array_equal(new_vars['params']['backbone']['layer4']['1']['conv2']['kernel'],
                                sd['backbone.layer4.1.conv2.weight'].transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match='do not fit'):  # strict: wrong prefix leaves everything missing
    weights.load_pretrained(config, wrapped)
  config.model.pretrained = ''
  assert weights.load_pretrained(config, wrapped) == (wrapped, None)


def test_bad_paths_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    weights.load_state_dict(str(tmp_path / 'nope.npz'))
  pth = tmp_path / 'r50.pth'
  pth.write_bytes(b'x')
  with pytest.raises(ValueError, match='r50.pth'):
    weights.load_state_dict(str(pth))


def _fake_hf_cache(cache, repo_id, filename, state_dict):
  """huggingface_hub's cache layout, as a download leaves it: refs/main -> snapshot folder -> file (blob link)."""
  from safetensors.numpy import save_file
  commit = '0123456789abcdef0123456789abcdef01234567'
  repo = cache / ('models--' + repo_id.replace('/', '--'))
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(commit)
  (repo / 'blobs').mkdir()
  blob = repo / 'blobs' / 'f00d'
  save_file(state_dict, str(blob))
  snapshot = repo / 'snapshots' / commit
  snapshot.mkdir(parents=True)
  (snapshot / filename).symlink_to(blob)
  return snapshot / filename


@pytest.fixture
def offline_hf_cache(tmp_path, monkeypatch):
  """An empty huggingface_hub cache in tmp_path with HF_HUB_OFFLINE on: nothing may touch the network."""
  from huggingface_hub import constants
  cache = tmp_path / 'hf_cache'
  cache.mkdir()
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  return cache


def test_hf_spec_loads_timm_names_from_the_huggingface_cache_offline(offline_hf_cache):
  """model.pretrained='hf://timm/...' runs the real hf_hub_download against a prepared cache (no network)."""
  model = backbone.ResNet(depth=18, width=8)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  wrapped = {c: {'backbone': t} for c, t in template.items()}
  sd = random_state_dict(torchvision_resnet_shapes(18, width=8), seed=3)   # timm's plain ResNet names
  cached = _fake_hf_cache(offline_hf_cache, 'timm/resnet18.tv_in1k', 'model.safetensors', sd)
  assert pretrained.resolve('hf://timm/resnet18.tv_in1k') == str(cached)
  assert pretrained.resolve('hf://timm/resnet18.tv_in1k/model.safetensors') == str(cached)
  config = ml_collections.ConfigDict({'model': {'pretrained': 'hf://timm/resnet18.tv_in1k', 'backbone': 'resnet18',
                                                'backbone_width': 8}})
  new_vars, report = weights.load_pretrained(config, wrapped)
  assert report.complete and set(report.unused) == {'fc.weight', 'fc.bias'}
  np.testing.assert_array_equal(new_vars['params']['backbone']['conv1']['kernel'],
                                sd['conv1.weight'].transpose(2, 3, 1, 0))
  for spec in ('none', ''):
    config.model.pretrained = spec
    assert weights.load_pretrained(config, wrapped) == (wrapped, None)


def test_hf_spec_missing_from_the_offline_cache_is_one_line_saying_how_to_fetch_it(offline_hf_cache):
  with pytest.raises(errors.ConfigError) as e:
    pretrained.resolve(pretrained.TORCHVISION_RESNET50)
  message = str(e.value)
  assert message.startswith("config.model.pretrained='hf://timm/resnet50.tv_in1k': HF_HUB_OFFLINE is set")
  assert 'hf download timm/resnet50.tv_in1k model.safetensors' in message and '\n' not in message


@pytest.mark.parametrize('spec, parsed', [
    ('hf://timm/resnet50.tv_in1k', ('timm/resnet50.tv_in1k', 'model.safetensors')),
    ('hf://me/weights/sub/r50.npz', ('me/weights', 'sub/r50.npz')),
    ('hf://timm', None), ('hf://timm/', None), ('hf://timm/r50/pytorch_model.bin', None), ('/x/r50.npz', None)])
def test_hf_spec_parsing(spec, parsed):
  assert pretrained.parse_hf_spec(spec) == parsed
