r"""Co-DETR (Co-DINO) checkpoints -> mrqm_jax checkpoints. Every name mapping between the two lives here.

  python -m mrqm_jax.convert --from=codetr --checkpoint=co_dino_r50.pth --config=configs/co_dino.py --out=DIR

reads a Co-DINO checkpoint — mmdetection 3 `projects/CO-DETR` names, or Sense-X/Co-DETR's mmdet-2 names (which
differ in the denoising label embedding: `query_head.label_embedding` there, `query_head.dn_generator.
label_embedding` in mmdet 3; mmdet 3 ships no mapping, mmdetection#11043) — from `.pth` (PyTorch's zip format,
read WITHOUT torch by a restricted unpickler that rebuilds tensors only and never runs code from the file),
`.safetensors` or `.npz`, and writes DIR in the layout of an export folder: `DIR/params` (Orbax: params and
model_state, auxiliary heads included) and `DIR/config.json`, which `--mode=eval|predict|export
--checkpoint=DIR` read like any checkpoint, and from which training starts with `train.init_from=DIR`
(parameters only: the step, optimizer and data position start afresh — fine-tuning).

Every checkpoint key is used or named in the report (`DIR/conversion_report.txt`), every variable of the model
is filled or named, every shape is checked; the last line printed is `used=N unused=U filled=M unfilled=F`.
Keys without meaning for a JAX model (BatchNorm's `num_batches_tracked`) are listed as skipped, not counted as
unused. Exit 2 with one line when the file cannot be read or nothing of the model could be filled.

Layout differences handled here (torch -> flax): conv OIHW -> HWIO; linear [out, in] -> [in, out]; the decoder's
`nn.MultiheadAttention` packed q/k/v projection -> flax's per-head query/key/value kernels [in, heads, head_dim];
the RoI head's first FC (torch flattens RoI features channel-major, [C, 7, 7]; ours row-major [7, 7, C]); the
RPN's anchors per location (mmdet: ratio-major; ours: scale-major, `iou_aware_head.generate_anchors`).
Co-DINO's query groups are indexed by head: 0 = the R-CNN branch (roi_head), 1 = the ATSS head (bbox_head), which
the IoU-aware head replaces in MRQM (`aux_query_iah` takes index 1; its feature projection has no Co-DINO
counterpart and is named unfilled). The query groups' box embedding: Co-DINO orders its sine features
(x, y, w, h), ours (y, x, w, h): the projection's input rows are swapped to match (`_xy_first_pe`).
"""

import collections
from collections.abc import Callable, Mapping
import dataclasses
import os
import pickle
import re
import sys
import zipfile
from typing import Any

from absl import app
from absl import flags
from flax import traverse_util
import jax
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file

from mrqm_jax import checkpointing, errors, model_lib, weights

SKIPPED_LEAVES = ('num_batches_tracked',)
# Sense-X/Co-DETR (mmdet 2) name -> mmdetection 3 name.
SENSEX_ALIASES = {'query_head.label_embedding.weight': 'query_head.dn_generator.label_embedding.weight'}
# Co-DINO's aux query-group index of each of our heads (codetr.py: roi heads first, then bbox heads).
CODINO_HEAD_INDEX = {'rcnn': 0, 'atss': 1, 'iah': 1}


class ConversionError(Exception):
  """A checkpoint that cannot be read or converted (the CLI prints it as one line)."""


# --------------------------------------------------------------------------- reading checkpoints (no torch)
_DTYPES = {'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
           'BFloat16Storage': None, 'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
           'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}


class _Opaque:
  """Stands in for any object of a checkpoint that is not a tensor or a container (mmengine's message hub,
  optimizer bookkeeping...): built from its pickled state without running its code, then ignored."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __call__(self, *args, **kwargs):
    return _Opaque()


def _storage_dtype(name: str):
  if name not in _DTYPES:
    raise ConversionError(f'unsupported tensor storage type {name}')
  return _DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  data, dtype_name = storage
  if dtype_name == 'BFloat16Storage':   # NumPy has no bfloat16: widen the 16 bits to float32
    flat = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
  else:
    flat = np.frombuffer(data, _storage_dtype(dtype_name))
  if not size:   # a 0-d tensor stays a (0-d) array
    return np.array(flat[offset])
  itemsize = flat.dtype.itemsize
  return np.lib.stride_tricks.as_strided(flat[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _Unpickler(pickle.Unpickler):
  """Rebuilds tensors as NumPy arrays from PyTorch's zip format; every other class becomes `_Opaque`."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name.endswith('Storage'):
      return name
    return _Opaque

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, numel): the bytes live in PREFIX/data/KEY.
    kind, storage_type, key = pid[0], pid[1], pid[2]
    if kind != 'storage':
      raise ConversionError(f'unsupported persistent id {kind!r}')
    dtype_name = storage_type if isinstance(storage_type, str) else getattr(storage_type, '__name__', '')
    return self._archive.read(f'{self._prefix}/data/{key}'), dtype_name


def read_torch_zip(path: str) -> Any:
  """The object a PyTorch (>= 1.6, zip format) `torch.save` wrote, tensors as NumPy arrays, without torch."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise ConversionError(f'{path} is not a PyTorch zip checkpoint (saved by torch < 1.6? re-save it with '
                          f'torch.save(torch.load(f), f) or export .safetensors)') from None
  with archive:
    pkl = [n for n in archive.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
    if not pkl:
      raise ConversionError(f'{path}: no data.pkl in the archive')
    prefix = pkl[0][:-len('/data.pkl')] if '/' in pkl[0] else ''
    with archive.open(pkl[0]) as f:
      return _Unpickler(f, archive, prefix).load()


def flatten_state_dict(obj: Any, path: str = '') -> dict[str, np.ndarray]:
  """{dotted name: array} of every array in nested dicts (a checkpoint's 'state_dict' / 'model' first)."""
  if isinstance(obj, Mapping):
    for wrapper in ('state_dict', 'model'):
      if not path and wrapper in obj and isinstance(obj[wrapper], Mapping):
        return flatten_state_dict(obj[wrapper])
    out = {}
    for k, v in obj.items():
      out.update(flatten_state_dict(v, f'{path}.{k}' if path else str(k)))
    return out
  if isinstance(obj, np.ndarray):
    return {path: obj}
  return {}


def load_checkpoint(path: str) -> dict[str, np.ndarray]:
  """{torch name: array} of a checkpoint file (.pth/.pt zip, .safetensors, .npz); DDP's 'module.' removed."""
  if not os.path.isfile(path):
    raise ConversionError(f'checkpoint file not found: {path}')
  if path.endswith(('.pth', '.pt', '.bin', '.ckpt')):
    state = flatten_state_dict(read_torch_zip(path))
  elif path.endswith('.safetensors'):
    state = dict(load_file(path))
  elif path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      state = {k: data[k] for k in data.files}
  else:
    raise ConversionError(f'{path}: expected a .pth/.pt (PyTorch), .safetensors or .npz checkpoint')
  if not state:
    raise ConversionError(f'{path}: no tensors found')
  if all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  return state


# ------------------------------------------------------------------------------------------- the name table
def _conv(w):          # OIHW -> HWIO
  return w.transpose(2, 3, 1, 0)


def _dense(w):         # [out, in] -> [in, out]
  return w.T


def _copy(w):
  return w


def _qkv_kernel(part: int, heads: int):
  def take(w):         # in_proj_weight [3D, D] -> rows of q/k/v -> [D_in, heads, head_dim]
    d = w.shape[1]
    return w[part * d:(part + 1) * d].T.reshape(d, heads, d // heads)
  return take


def _qkv_bias(part: int, heads: int):
  def take(b):
    d = b.shape[0] // 3
    return b[part * d:(part + 1) * d].reshape(heads, d // heads)
  return take


def _attn_out_kernel(heads: int):
  def take(w):         # out_proj.weight [D_out, D_in] -> [heads, head_dim, D_out]
    return w.T.reshape(heads, w.shape[1] // heads, w.shape[0])
  return take


def _xy_first_pe(w):
  """aux_pos_trans [D, 4F] -> kernel [4F, D] for our PE order. Co-DINO embeds a positive's box with
  `get_proposal_pos_embed`: sine features of (cx, cy, w, h) in that order; ours (`box_sine_embedding`, as
  DINO's query positions) puts y before x. Swapping the first two F-row blocks makes the same projection."""
  k = w.T
  f = k.shape[0] // 4
  return np.concatenate([k[f:2 * f], k[:f], k[2 * f:]], axis=0)


def _roi_fc0(feat_dim: int):
  def take(w):         # [O, C * S * S] (channel-major) -> [S * S * C, O] (row-major, channels last)
    o, n = w.shape
    s = int(round((n / feat_dim) ** 0.5))
    if s * s * feat_dim != n:
      return w.T       # shape check reports it
    return w.reshape(o, feat_dim, s, s).transpose(2, 3, 1, 0).reshape(n, o)
  return take


def _anchor_major(num_scales: int, num_ratios: int, per_anchor: int, conv: bool):
  """RPN outputs: mmdet orders a location's anchors ratio-major, ours scale-major."""
  def take(w):
    out = w.shape[0]
    if out != num_scales * num_ratios * per_anchor:
      return _conv(w) if conv else w
    rest = w.shape[1:]
    w = w.reshape((num_ratios, num_scales, per_anchor) + rest).swapaxes(0, 1).reshape((out,) + rest)
    return _conv(w) if conv else w
  return take


Rule = tuple[str, Callable[[re.Match], str], Callable[..., Callable[[np.ndarray], np.ndarray]]]


def _codino_rules(num_heads: int, roi_feat_dim: int, rpn_scales: int, rpn_ratios: int,
                  num_decoder_layers: int) -> list[tuple[re.Pattern, Callable[[re.Match], str], Callable]]:
  """(pattern on our variable path, the Co-DINO name for a match, transform) — first match wins."""
  qh, tr = 'query_head', 'query_head.transformer'
  norm_leaf = {'scale': 'weight', 'bias': 'bias'}
  dense_leaf = {'kernel': ('weight', _dense), 'bias': ('bias', _copy)}
  conv_leaf = {'kernel': ('weight', _conv), 'bias': ('bias', _copy)}
  mha = {'query': 0, 'key': 1, 'value': 2}
  ffn = {'linear1': 'ffns.0.layers.0.0', 'linear2': 'ffns.0.layers.1', 'ffn_in': 'ffns.0.layers.0.0',
         'ffn_out': 'ffns.0.layers.1'}
  rules: list[tuple[str, Callable, Callable]] = []

  def add(pattern, name, transform):
    rules.append((re.compile('^' + pattern + '$'), name, transform))

  # Neck (ChannelMapper): convs.i (ConvModule: conv + gn), extra_convs.k on the level after the inputs.
  add(r'params/neck/input_proj_(\d+)/conv/kernel', lambda m: f'neck.convs.{m[1]}.conv.weight', _conv)
  add(r'params/neck/input_proj_(\d+)/norm/gn/(scale|bias)',
      lambda m: f'neck.convs.{m[1]}.gn.{norm_leaf[m[2]]}', _copy)
  add(r'params/neck/extra_(\d+)/conv/kernel', lambda m: f'neck.extra_convs.{int(m[1]) - 4}.conv.weight', _conv)
  add(r'params/neck/extra_(\d+)/norm/gn/(scale|bias)',
      lambda m: f'neck.extra_convs.{int(m[1]) - 4}.gn.{norm_leaf[m[2]]}', _copy)
  # Encoder (plain deformable) layers and level embedding.
  add(r'params/encoder/layers_(\d+)/self_attn/(\w+)/(kernel|bias)',
      lambda m: f'{tr}.encoder.layers.{m[1]}.attentions.0.{m[2]}.{dense_leaf[m[3]][0]}',
      lambda m: dense_leaf[m[3]][1])
  add(r'params/encoder/layers_(\d+)/(linear1|linear2)/(kernel|bias)',
      lambda m: f'{tr}.encoder.layers.{m[1]}.{ffn[m[2]]}.{dense_leaf[m[3]][0]}', lambda m: dense_leaf[m[3]][1])
  add(r'params/encoder/layers_(\d+)/norm(\d)/(scale|bias)',
      lambda m: f'{tr}.encoder.layers.{m[1]}.norms.{int(m[2]) - 1}.{norm_leaf[m[3]]}', _copy)
  add(r'params/encoder/level_embed', lambda m: f'{tr}.level_embeds', _copy)
  # Two-stage selection and queries.
  add(r'params/enc_output/(kernel|bias)', lambda m: f'{tr}.enc_output.{dense_leaf[m[1]][0]}',
      lambda m: dense_leaf[m[1]][1])
  add(r'params/enc_output_norm/(scale|bias)', lambda m: f'{tr}.enc_output_norm.{norm_leaf[m[1]]}', _copy)
  add(r'params/query_embed', lambda m: f'{tr}.query_embed.weight', _copy)
  add(r'params/label_embedding', lambda m: f'{qh}.dn_generator.label_embedding.weight', _copy)
  add(r'params/enc_class_head/(kernel|bias)',
      lambda m: f'{qh}.cls_branches.{num_decoder_layers}.{dense_leaf[m[1]][0]}', lambda m: dense_leaf[m[1]][1])
  add(r'params/enc_box_head/layers_(\d)/(kernel|bias)',
      lambda m: f'{qh}.reg_branches.{num_decoder_layers}.{2 * int(m[1])}.{dense_leaf[m[2]][0]}',
      lambda m: dense_leaf[m[2]][1])
  # Decoder.
  add(r'params/decoder/class_heads_(\d+)/(kernel|bias)',
      lambda m: f'{qh}.cls_branches.{m[1]}.{dense_leaf[m[2]][0]}', lambda m: dense_leaf[m[2]][1])
  add(r'params/decoder/box_heads_(\d+)/layers_(\d)/(kernel|bias)',
      lambda m: f'{qh}.reg_branches.{m[1]}.{2 * int(m[2])}.{dense_leaf[m[3]][0]}', lambda m: dense_leaf[m[3]][1])
  add(r'params/decoder/final_norm/(scale|bias)', lambda m: f'{tr}.decoder.norm.{norm_leaf[m[1]]}', _copy)
  add(r'params/decoder/ref_point_head/layers_(\d)/(kernel|bias)',
      lambda m: f'{tr}.decoder.ref_point_head.{2 * int(m[1])}.{dense_leaf[m[2]][0]}', lambda m: dense_leaf[m[2]][1])
  add(r'params/decoder/layers_(\d+)/self_attn/(query|key|value)/kernel',
      lambda m: f'{tr}.decoder.layers.{m[1]}.attentions.0.attn.in_proj_weight',
      lambda m: _qkv_kernel(mha[m[2]], num_heads))
  add(r'params/decoder/layers_(\d+)/self_attn/(query|key|value)/bias',
      lambda m: f'{tr}.decoder.layers.{m[1]}.attentions.0.attn.in_proj_bias',
      lambda m: _qkv_bias(mha[m[2]], num_heads))
  add(r'params/decoder/layers_(\d+)/self_attn/out/kernel',
      lambda m: f'{tr}.decoder.layers.{m[1]}.attentions.0.attn.out_proj.weight', lambda m: _attn_out_kernel(num_heads))
  add(r'params/decoder/layers_(\d+)/self_attn/out/bias',
      lambda m: f'{tr}.decoder.layers.{m[1]}.attentions.0.attn.out_proj.bias', _copy)
  add(r'params/decoder/layers_(\d+)/cross_attn/(\w+)/(kernel|bias)',
      lambda m: f'{tr}.decoder.layers.{m[1]}.attentions.1.{m[2]}.{dense_leaf[m[3]][0]}',
      lambda m: dense_leaf[m[3]][1])
  add(r'params/decoder/layers_(\d+)/(ffn_in|ffn_out)/(kernel|bias)',
      lambda m: f'{tr}.decoder.layers.{m[1]}.{ffn[m[2]]}.{dense_leaf[m[3]][0]}', lambda m: dense_leaf[m[3]][1])
  add(r'params/decoder/layers_(\d+)/norm(\d)/(scale|bias)',
      lambda m: f'{tr}.decoder.layers.{m[1]}.norms.{int(m[2]) - 1}.{norm_leaf[m[3]]}', _copy)
  # Auxiliary levels and query groups.
  add(r'params/aux_levels/downsample/conv/(kernel|bias)',
      lambda m: f'{qh}.downsample.0.{conv_leaf[m[1]][0]}', lambda m: conv_leaf[m[1]][1])
  add(r'params/aux_levels/downsample/norm/gn/(scale|bias)', lambda m: f'{qh}.downsample.1.{norm_leaf[m[1]]}', _copy)
  add(r'params/aux_query_(\w+)/pos_proj/(kernel|bias)',
      lambda m: f'{tr}.aux_pos_trans.{CODINO_HEAD_INDEX.get(m[1], -1)}.{dense_leaf[m[2]][0]}',
      lambda m: _xy_first_pe if m[2] == 'kernel' else _copy)
  add(r'params/aux_query_(\w+)/pos_norm/(scale|bias)',
      lambda m: f'{tr}.aux_pos_trans_norm.{CODINO_HEAD_INDEX.get(m[1], -1)}.{norm_leaf[m[2]]}', _copy)
  add(r'params/aux_query_(\w+)/feat_proj/(kernel|bias)',
      lambda m: f'{tr}.pos_feats_trans.{CODINO_HEAD_INDEX.get(m[1], -1)}.{dense_leaf[m[2]][0]}',
      lambda m: dense_leaf[m[2]][1])
  add(r'params/aux_query_(\w+)/feat_norm/(scale|bias)',
      lambda m: f'{tr}.pos_feats_norm.{CODINO_HEAD_INDEX.get(m[1], -1)}.{norm_leaf[m[2]]}', _copy)
  # ATSS head (bbox_head.0).
  tower = {'cls_tower': 'cls_convs', 'reg_tower': 'reg_convs'}
  atss_out = {'cls_out': 'atss_cls', 'reg_out': 'atss_reg', 'centerness_out': 'atss_centerness'}
  add(r'params/atss/dense/(cls_tower|reg_tower)_(\d+)/conv/kernel',
      lambda m: f'bbox_head.0.{tower[m[1]]}.{m[2]}.conv.weight', _conv)
  add(r'params/atss/dense/(cls_tower|reg_tower)_(\d+)/norm/gn/(scale|bias)',
      lambda m: f'bbox_head.0.{tower[m[1]]}.{m[2]}.gn.{norm_leaf[m[3]]}', _copy)
  add(r'params/atss/dense/(cls_out|reg_out|centerness_out)/(kernel|bias)',
      lambda m: f'bbox_head.0.{atss_out[m[1]]}.{conv_leaf[m[2]][0]}', lambda m: conv_leaf[m[2]][1])
  add(r'params/atss/dense/reg_scale_(\d+)', lambda m: f'bbox_head.0.scales.{m[1]}.scale', _copy)
  # Faster R-CNN branch: RPN head and the RoI head's Shared2FC box head (roi_head.0).
  add(r'params/rcnn/rpn/rpn_conv/(kernel|bias)', lambda m: f'rpn_head.rpn_conv.{conv_leaf[m[1]][0]}',
      lambda m: conv_leaf[m[1]][1])
  add(r'params/rcnn/rpn/(rpn_cls|rpn_reg)/(kernel|bias)', lambda m: f'rpn_head.{m[1]}.{conv_leaf[m[2]][0]}',
      lambda m: _anchor_major(rpn_scales, rpn_ratios, 1 if m[1] == 'rpn_cls' else 4, m[2] == 'kernel'))
  add(r'params/rcnn/bbox_head/shared_fc_0/kernel', lambda m: 'roi_head.0.bbox_head.shared_fcs.0.weight',
      lambda m: _roi_fc0(roi_feat_dim))
  add(r'params/rcnn/bbox_head/shared_fc_(\d)/bias', lambda m: f'roi_head.0.bbox_head.shared_fcs.{m[1]}.bias', _copy)
  add(r'params/rcnn/bbox_head/shared_fc_(\d)/kernel',
      lambda m: f'roi_head.0.bbox_head.shared_fcs.{m[1]}.weight', lambda m: _dense)
  add(r'params/rcnn/bbox_head/(fc_cls|fc_reg)/(kernel|bias)',
      lambda m: f'roi_head.0.bbox_head.{m[1]}.{dense_leaf[m[2]][0]}', lambda m: dense_leaf[m[2]][1])
  return rules


def _resolve(rules, path: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
  for pattern, name, transform in rules:
    match = pattern.match(path)
    if match:
      fn = transform
      # A transform given as a factory of the match (lambda m: ...) returns the array transform.
      if fn not in (_conv, _dense, _copy):
        fn = fn(match)
      return name(match), fn
  return None


# ------------------------------------------------------------------------------------------- the conversion
@dataclasses.dataclass
class ConversionReport:
  """Key by key: used / unused / skipped source keys, filled / unfilled variables, shape mismatches."""
  used: list[str] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  renamed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  filled: list[str] = dataclasses.field(default_factory=list)
  unfilled: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (variable, why)
  shape_mismatch: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)

  def counts(self) -> str:
    return (f'used={len(self.used)} unused={len(self.unused)} filled={len(self.filled)} '
            f'unfilled={len(self.unfilled)}')

  def text(self) -> str:
    lines = [f'checkpoint keys used: {len(self.used)}; unused: {len(self.unused)}; skipped on purpose: '
             f'{len(self.skipped)}; model variables filled: {len(self.filled)}; unfilled: {len(self.unfilled)}; '
             f'shape mismatches: {len(self.shape_mismatch)}']
    lines += [f'  renamed (Sense-X -> mmdet 3): {a} -> {b}' for a, b in self.renamed]
    lines += [f'  shape mismatch: {var} <- {key}: checkpoint {src} (after layout change) vs model {dst}'
              for var, key, src, dst in self.shape_mismatch]
    lines += [f'  unfilled (left at init): {var} ({why})' for var, why in self.unfilled]
    lines += [f'  unused checkpoint key: {key}' for key in self.unused]
    lines += [f'  skipped on purpose: {key}' for key in self.skipped]
    return '\n'.join(lines)


def _flatten(tree) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(tree, keep_empty_nodes=False)


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat))


def convert_codetr(state_dict: Mapping[str, np.ndarray], abstract_variables: Mapping[str, Any], config
                   ) -> tuple[dict, ConversionReport]:
  """Co-DETR state dict -> (variables {'params', 'batch_stats'...} as NumPy, report). Variables that no key
  fills keep None (the caller fills them from an init)."""
  report = ConversionReport()
  state = {}
  for name, value in state_dict.items():
    if name in SENSEX_ALIASES:
      report.renamed.append((name, SENSEX_ALIASES[name]))
      name = SENSEX_ALIASES[name]
    state[name] = np.asarray(value)
  for name in sorted(state):
    if name.rsplit('.', 1)[-1] in SKIPPED_LEAVES:
      report.skipped.append(name)
  state = {k: v for k, v in state.items() if k.rsplit('.', 1)[-1] not in SKIPPED_LEAVES}

  flat_vars = _flatten(abstract_variables)
  out: dict[tuple[str, ...], Any] = {path: None for path in flat_vars}
  used: set[str] = set()

  # Backbone: flax paths equal torch module paths (weights.py).
  backbone_state = {k: v for k, v in state.items() if k.startswith('backbone.')}
  if any(p[1] == 'backbone' for p in flat_vars if len(p) > 1):
    new_vars, bb = weights.import_torch_state_dict(abstract_variables, backbone_state, ('backbone',), 'backbone.')
    new_flat = _flatten(new_vars)
    for path in flat_vars:
      if len(path) > 1 and path[1] == 'backbone' and isinstance(new_flat[path], np.ndarray):
        out[path] = new_flat[path]
        report.filled.append('/'.join(path))
    used.update(bb.loaded)
    for name, src, dst in bb.shape_mismatch:
      report.shape_mismatch.append((name, name, src, dst))
      used.add(name)
    for path in bb.missing:
      report.unfilled.append((path, 'no backbone key'))

  m = config.model
  rpn_scales = int(config.rcnn.rpn_scales_per_octave)
  rpn_ratios = len(config.rcnn.rpn_ratios)
  rules = _codino_rules(int(config.decoder.num_heads), int(m.hidden_dim), rpn_scales, rpn_ratios,
                        int(config.decoder.num_layers))
  for path, abstract in flat_vars.items():
    joined = '/'.join(path)
    if len(path) > 1 and path[1] == 'backbone':
      continue
    found = _resolve(rules, joined)
    if found is None:
      report.unfilled.append((joined, 'no Co-DINO counterpart'))
      continue
    name, transform = found
    if name not in state:
      report.unfilled.append((joined, f'checkpoint has no {name}'))
      continue
    value = transform(state[name])
    used.add(name)
    if tuple(value.shape) != tuple(abstract.shape):
      report.shape_mismatch.append((joined, name, tuple(value.shape), tuple(abstract.shape)))
      report.unfilled.append((joined, f'shape {tuple(value.shape)} != {tuple(abstract.shape)}'))
      continue
    out[path] = np.asarray(value, dtype=abstract.dtype)
    report.filled.append(joined)
  report.used = sorted(used)
  report.unused = sorted(set(state) - used)
  return _unflatten(out), report


# -------------------------------------------------------------------------------------------------- the CLI
def write_converted(out_dir: str, variables: dict, config) -> None:
  """DIR/params (Orbax: {'params', 'model_state'}) and DIR/config.json: the layout of an export folder."""
  params, model_state = model_lib.split_variables(variables)
  out = checkpointing.to_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out / 'params', {'params': params, 'model_state': model_state}, force=True)
  (out / checkpointing.EXPORT_CONFIG_FILE).write_text(config.to_json_best_effort(indent=1))


def fill_from_init(converted: dict, model, config, seed: int = 0) -> dict:
  """Variables left None by the conversion take the model's own initialisation (named in the report)."""
  flat = _flatten(converted)
  if all(v is not None for v in flat.values()):
    return converted
  init = _flatten(jax.device_get(jax.jit(lambda r: model_lib.init_variables(model, config, r))(
      jax.random.PRNGKey(seed))))
  return _unflatten({k: (np.asarray(init[k]) if v is None else v) for k, v in flat.items()})


def run(checkpoint: str, config, out_dir: str) -> ConversionReport:
  """Converts CHECKPOINT for CONFIG into OUT_DIR; returns the report (also written to OUT_DIR)."""
  state = load_checkpoint(checkpoint)
  model = model_lib.make_model(config)
  abstract = model_lib.abstract_variables(model, config)
  converted, report = convert_codetr(state, abstract, config)
  if not report.filled:
    raise ConversionError(f'{checkpoint}: no variable of the model could be filled (is it a Co-DETR checkpoint?)')
  variables = fill_from_init(converted, model, config)
  out = checkpointing.to_path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise ConversionError(f'--out={out_dir} exists and is not empty (never written over)')
  write_converted(out_dir, variables, config)
  (out / 'conversion_report.txt').write_text(report.text() + '\n' + report.counts() + '\n')
  return report


def main(argv=None) -> int:
  config_flag = config_flags.DEFINE_config_file('config', None, 'configs/*.py of the model to fill.')
  flags.DEFINE_enum('from', 'codetr', ['codetr'], 'Checkpoint family.')
  checkpoint = flags.DEFINE_string('checkpoint', None, 'Co-DETR checkpoint (.pth, .safetensors or .npz).')
  out = flags.DEFINE_string('out', None, 'Output folder (must not exist or be empty).')

  def _main(_):
    try:
      if not checkpoint.value or not out.value or config_flag.value is None:
        raise errors.UsageError('--checkpoint, --config and --out are required')
      report = run(checkpoint.value, config_flag.value, out.value)
    except (ConversionError, errors.UsageError) as e:
      errors.fail('convert', e)
    print(report.text())
    print(f'convert: wrote {out.value} (report: {os.path.join(out.value, "conversion_report.txt")})')
    print(report.counts())
    return 0

  app.run(_main, argv=argv)
  return 0


if __name__ == '__main__':
  sys.exit(main())
