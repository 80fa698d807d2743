"""Import ImageNet backbone weights from a torchvision or timm ResNet state dict (.safetensors or .npz).

torchvision's `resnet18/34/50/101` and timm's plain `resnet*` models (7x7 stem, the default '' stem_type:
`resnet50.a1_in1k`, `resnet50.tv_in1k`, ...) use the same state-dict names — conv1, bn1,
layer{1-4}.{block}.conv{1,2,3}, bn{1,2,3}, downsample.0 (conv) / downsample.1 (BN), fc — so one mapping
serves both. timm's deep-stem variants (resnet50d: conv1.0, conv1.1, ...) do not match and are reported.

The backbone's flax variable paths equal the torch module paths (see models/backbone.py), so a name maps by
splitting on '.' and renaming only the leaf, found by where the module lives in the model:
  module in 'params' (a convolution):   weight [O, I, kh, kw] -> kernel [kh, kw, I, O];  bias -> bias
  module in 'batch_stats' (frozen BN):  weight -> scale, bias -> bias, running_mean -> mean, running_var -> var
`num_batches_tracked` is BN bookkeeping with no counterpart (listed as ignored); `fc.*` has no counterpart
(the detector has no classifier) and is listed as unused.

Making a file from PyTorch (where torch is installed):
  import torchvision, safetensors.torch
  sd = torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict()
  safetensors.torch.save_file(sd, 'resnet50.safetensors')      # or numpy.savez('r50.npz', **{k: v.numpy()})
then set `config.model.pretrained = 'resnet50.safetensors'`. Or let huggingface_hub fetch torchvision's ImageNet
ResNet-50 (the weights mmdet's `torchvision://resnet50` means) once into its cache:
`config.model.pretrained = 'hf://timm/resnet50.tv_in1k'` (HF_HUB_OFFLINE=1 then reads the cache only).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import os
from typing import Any

from absl import logging
from flax import traverse_util
import numpy as np

from mrqm_jax import pretrained
from mrqm_jax.models import layers

_BN_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
_IGNORED_LEAVES = ('num_batches_tracked',)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a flat {name: array} state dict from `.safetensors` or `.npz`; errors name the path."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'pretrained weights file not found: {path} (config.model.pretrained)')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      return {name: data[name] for name in data.files}
  raise ValueError(f'pretrained weights must be .safetensors or .npz, got {path} (a PyTorch .pth must be '
                   f'converted first: see mrqm_jax/weights.py)')


@dataclasses.dataclass
class ImportReport:
  """What an import did, key by key.

  loaded: source names copied into the model. unused: source names with no model variable (e.g. fc.weight).
  missing: model variables (flax paths 'collection/a/b/leaf') no source entry filled (left at init).
  shape_mismatch: (source name, source shape in flax layout, model shape) — not copied.
  ignored: source names without meaning for inference (BN num_batches_tracked).
  """
  loaded: list[str] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)

  @property
  def complete(self) -> bool:
    """Every model variable was filled with a correctly shaped tensor."""
    return not self.missing and not self.shape_mismatch

  def summary(self) -> str:
    lines = [f'loaded {len(self.loaded)} tensors; {len(self.missing)} missing, '
             f'{len(self.shape_mismatch)} shape mismatches, {len(self.unused)} unused, '
             f'{len(self.ignored)} ignored']
    lines += [f'  missing (left at init): {name}' for name in self.missing]
    lines += [f'  shape mismatch: {name} file {src} vs model {dst}' for name, src, dst in self.shape_mismatch]
    lines += [f'  unused (no model variable): {name}' for name in self.unused]
    return '\n'.join(lines)


def _subtree(tree: Mapping[str, Any] | None, path: Sequence[str]):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _to_mutable(tree):
  if isinstance(tree, Mapping):
    return {k: _to_mutable(v) for k, v in tree.items()}
  return tree


def import_torch_state_dict(variables: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                            module_path: Sequence[str] = ('backbone',), source_prefix: str = ''
                            ) -> tuple[dict[str, Any], ImportReport]:
  """Copies a torch-named state dict into the module at `module_path` of a flax variables dict.

  variables: {'params': ..., 'batch_stats': ...} of the whole model (leaves may be arrays or
    jax.ShapeDtypeStruct from `jax.eval_shape(model.init, ...)`; only shapes/dtypes are read).
  state_dict: {torch name: array}; names must start with `source_prefix` (e.g. 'backbone.' for an mmdet
    checkpoint; others are unused). module_path: where the ResNet sits in the model, () for a bare ResNet.
  Returns a new (plain dict) variables tree and the ImportReport. Values are cast to the model's dtype.
  """
  module_path = tuple(module_path)
  frozen = layers.FROZEN_COLLECTION
  new_vars = _to_mutable(variables)
  report = ImportReport()
  filled = set()

  for name in sorted(state_dict):
    value = np.asarray(state_dict[name])
    if not name.startswith(source_prefix):
      report.unused.append(name)
      continue
    parts = tuple(name[len(source_prefix):].split('.'))
    module, leaf = module_path + parts[:-1], parts[-1]
    if leaf in _IGNORED_LEAVES:
      report.ignored.append(name)
      continue
    conv = _subtree(new_vars.get('params'), module)
    norm = _subtree(new_vars.get(frozen), module)
    if isinstance(conv, Mapping) and leaf in ('weight', 'bias') and \
        ('kernel' if leaf == 'weight' else 'bias') in conv:
      collection, target = 'params', ('kernel' if leaf == 'weight' else 'bias')
      if leaf == 'weight':
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T  # OIHW -> HWIO; [O, I] -> [I, O]
      container = conv
    elif isinstance(norm, Mapping) and leaf in _BN_LEAVES and _BN_LEAVES[leaf] in norm:
      collection, target, container = frozen, _BN_LEAVES[leaf], norm
    else:
      report.unused.append(name)
      continue
    current = container[target]
    if tuple(value.shape) != tuple(current.shape):
      report.shape_mismatch.append((name, tuple(value.shape), tuple(current.shape)))
      continue
    container[target] = np.asarray(value, dtype=current.dtype)
    filled.add((collection,) + module + (target,))
    report.loaded.append(name)

  for collection in ('params', frozen):
    subtree = _subtree(new_vars.get(collection), module_path)
    if subtree is None:
      continue
    for path in traverse_util.flatten_dict(subtree):
      path = (collection,) + module_path + path
      if path not in filled:
        report.missing.append('/'.join(path))
  return new_vars, report


def load_pretrained(config, variables: Mapping[str, Any], module_path: Sequence[str] = ('backbone',),
                    source_prefix: str = '', strict: bool = True) -> tuple[Any, ImportReport | None]:
  """Imports `config.model.pretrained` (if set) into the backbone at `module_path`; logs the report.

  strict: raise ValueError (with the full report) if any backbone variable is missing or mis-shaped — a
  silently half-initialized pretrained backbone trains, but badly. Returns (variables, report); with no
  pretrained weights ('' or 'none'), the variables unchanged and None. hf:// specs: see `pretrained.resolve`.
  """
  path = pretrained.resolve(config.model.pretrained)
  if path is None:
    return variables, None
  new_vars, report = import_torch_state_dict(variables, load_state_dict(path), module_path, source_prefix)
  logging.info('pretrained backbone from %s: %s', path, report.summary())
  if strict and not report.complete:
    raise ValueError(f'pretrained weights {path} do not fit config.model.backbone='
                     f'{config.model.backbone!r} (width {config.model.backbone_width}):\n{report.summary()}')
  return new_vars, report
