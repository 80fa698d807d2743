"""Every config value checked in one place, before anything compiles: one line naming the key, exit code 2.

`CHECKS` maps a key of configs/base.py to a `Check`: a predicate on the value and the words for what the key
accepts. Adding a key to the config adds one line here (tests/test_config_validation.py fails for a key without
one). Checks that relate two keys (heads dividing the width, patch overlap below patch size, backbone weights
named when training) are in `CROSS_CHECKS` (one with a `modes` attribute runs only in those --modes).
`validate(config, mode)` raises `errors.ConfigError` for the first bad value:

  config.train.per_device_batch_size=0: expected an integer >= 1
"""

import dataclasses
import numbers
import os
from typing import Any, Callable

from mrqm_jax import errors
from mrqm_jax import pretrained


@dataclasses.dataclass(frozen=True)
class Check:
  ok: Callable[[Any], bool]   # True when the value is usable
  accepts: str                # what the key accepts, for the message
  modes: tuple[str, ...] = ()  # only in these --modes (files that only training reads); () = always


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None, also: tuple = ()) -> Check:
  words = 'an integer' + (f' >= {lo}' if lo is not None and hi is None else '') + (
      f' in [{lo}, {hi}]' if lo is not None and hi is not None else '') + ''.join(f' or {a}' for a in also)
  return Check(lambda v: _is_int(v) and (v in also or ((lo is None or v >= lo) and (hi is None or v <= hi))), words)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Check:
  words = 'a number' + (f' {">" if lo_open else ">="} {lo:g}' if lo is not None else '') + (
      f' and <= {hi:g}' if hi is not None else '')
  return Check(lambda v: _is_number(v) and (lo is None or (v > lo if lo_open else v >= lo))
               and (hi is None or v <= hi), words)


def choice(*options) -> Check:
  return Check(lambda v: isinstance(v, type(options[0])) and v in options, 'one of ' + ', '.join(map(repr, options)))


def boolean() -> Check:
  return Check(lambda v: isinstance(v, bool), 'True or False')


def string() -> Check:
  return Check(lambda v: isinstance(v, str), 'a string')


def numbers_tuple(length: int | None = None, lo: float | None = None, integers: bool = False,
                  lo_open: bool = False) -> Check:
  kind = 'integers' if integers else 'numbers'
  bound = f' {">" if lo_open else ">="} {lo:g}' if lo is not None else ''
  words = f'a tuple of {length if length is not None else "any number of"} {kind}{bound}, e.g. ' + (
      '(800, 1344)' if length == 2 else '(1.0, 2.0)')

  def ok(v):
    if not isinstance(v, (tuple, list)) or (length is not None and len(v) != length):
      return False
    return all((_is_int(x) if integers else _is_number(x)) and (lo is None or (x > lo if lo_open else x >= lo))
               for x in v)
  return Check(ok, words)


def optional_folder(modes: tuple[str, ...] = ()) -> Check:
  def ok(v):
    return isinstance(v, str) and (v == '' or '://' in v or os.path.isdir(os.path.expanduser(v)))
  return Check(ok, "'' or an existing folder (a workdir, checkpoint or `python -m mrqm_jax.convert` output)",
               modes)


def pretrained_backbone() -> Check:
  """`model.pretrained` when training: 'none' (random backbone, on purpose), hf://OWNER/REPO[/FILE] or a file.

  '' (not given) passes here; `_backbone_weights_named` refuses it when training.
  """
  def ok(v):
    if not isinstance(v, str):
      return False
    if v in ('', pretrained.NO_PRETRAINED) or pretrained.parse_hf_spec(v) is not None:
      return True
    return v.endswith(('.safetensors', '.npz')) and not v.startswith(pretrained.HF_SCHEME) and (
        '://' in v or os.path.isfile(os.path.expanduser(v)))
  return Check(ok, f'ImageNet weights for the backbone: {pretrained.TORCHVISION_RESNET50!r} (torchvision\'s '
               "ResNet-50, fetched once into the Hugging Face cache; hf://OWNER/REPO[/FILE] in general), an existing "
               ".safetensors or .npz state dict, or 'none' to train from a random backbone on purpose",
               modes=('train',))


_PRETRAINED_CHECK = pretrained_backbone()


def _backbone_weights_named(get):
  """Training needs the backbone's ImageNet weights named (or 'none', or train.init_from's checkpoint): the
  recipes are Co-DINO's, which starts from torchvision's ImageNet ResNet-50, and a random frozen stem + stage 1
  would stay random. The message says how to get the weights."""
  if get('model.pretrained') == '' and not get('train.init_from'):
    return (f"config.model.pretrained='': expected {_PRETRAINED_CHECK.accepts} (or train.init_from, a checkpoint "
            'that holds them)')
  return None
_backbone_weights_named.modes = ('train',)


# `iah.a_s` = A_S_AUTO: the smallest training instance area, resolved by `datasets.resolve_a_s` (the one place).
A_S_AUTO = -1.0


def _positive_number_or_auto(v) -> bool:
  return _is_number(v) and (v > 0 or v == A_S_AUTO)


_FRACTION = number(0.0, 1.0)
_NON_NEGATIVE = number(0.0)
_POSITIVE = number(0.0, lo_open=True)
_COUNT = integer(1)

# key -> what it accepts. One line per key of configs/base.py.
CHECKS: dict[str, Check] = {
    'dataset.format': choice('visdrone', 'soda_d', 'coco'),
    'dataset.root': string(),  # existence is checked per mode (main.validate): eval/predict may not read it
    'dataset.train_split': string(),
    'dataset.eval_split': string(),
    'dataset.num_classes': _COUNT,
    'dataset.max_boxes': _COUNT,
    'dataset.max_ignore': _COUNT,
    'dataset.strict_max_boxes': boolean(),
    'dataset.slicing.enabled': boolean(),
    'dataset.slicing.patch_size': integer(32),
    'dataset.slicing.overlap': integer(0),
    'dataset.slicing.ignore_inside_fraction': _FRACTION,
    'dataset.slicing.merge_nms_iou': _FRACTION,
    'input.image_size': numbers_tuple(2, lo=32, integers=True),
    'input.resize_rule': choice('mmdet', 'fit_canvas'),
    'input.resize_scale': numbers_tuple(2, lo=1),
    'input.random_flip': boolean(),
    'input.prefetch': integer(0),
    'input.num_parallel_calls': integer(1, also=(-1,)),
    'input.mean': numbers_tuple(3),
    'input.std': numbers_tuple(3, lo=0.0, lo_open=True),
    'model.backbone': choice('resnet18', 'resnet34', 'resnet50', 'resnet101'),
    'model.backbone_width': _COUNT,
    'model.frozen_stages': integer(0, 4),
    'model.aux_downsample_bias': boolean(),
    'model.exclude_invalid_proposals': boolean(),
    'model.box_frame': choice('image', 'canvas'),
    'model.anchor_grid': choice('mmdet', 'cell_centers'),
    'model.pretrained': _PRETRAINED_CHECK,
    'train.init_from': optional_folder(modes=('train',)),
    'model.neck': choice('bifpn', 'fpn', 'channel_mapper'),
    'model.bifpn_repeats': _COUNT,
    'model.neck_norm': choice('group', 'none'),
    'model.norm_region': choice('batch', 'canvas'),
    'model.hidden_dim': _COUNT,
    'model.num_levels': integer(4, 6),
    'model.aux_heads': Check(lambda v: isinstance(v, (tuple, list)) and len(set(v)) == len(v)
                             and all(h in ('iah', 'atss', 'rcnn') for h in v),
                             "a tuple of distinct names from 'iah', 'atss', 'rcnn', e.g. ('iah', 'rcnn') or ()"),
    'model.aux_query_padding': choice('negatives', 'masked'),
    'model.conv_impl': choice('lax', 'matmul', 'auto'),
    'model.remat': boolean(),
    'model.dtype': choice('float32', 'bfloat16'),
    'encoder.type': choice('sae', 'deformable'),
    'encoder.num_layers': integer(0),
    'encoder.num_heads': _COUNT,
    'encoder.num_points': _COUNT,
    'encoder.ffn_dim': _COUNT,
    'encoder.dropout': _FRACTION,
    'encoder.pe_temperature': _POSITIVE,
    'encoder.pe_offset': number(),
    'encoder.query_chunk_size': integer(0),
    'encoder.sampling_layout': choice('auto', 'flat', 'packed'),
    'decoder.num_layers': _COUNT,
    'decoder.num_queries': _COUNT,
    'decoder.num_heads': _COUNT,
    'decoder.num_points': _COUNT,
    'decoder.ffn_dim': _COUNT,
    'decoder.dropout': _FRACTION,
    'decoder.look_forward_twice': boolean(),
    'dn.enabled': boolean(),
    'dn.label_noise': _FRACTION,
    'dn.box_noise': _NON_NEGATIVE,
    'dn.num_queries': _COUNT,
    'dn.max_gt': _COUNT,
    'dn.group_rule': choice('batch', 'image'),
    'iah.dynamic_threshold': boolean(),
    'iah.t_b': _FRACTION,
    'iah.k': _NON_NEGATIVE,
    'iah.p': _NON_NEGATIVE,
    'iah.a_s': Check(_positive_number_or_auto, 'a positive number (px^2) or -1 (auto: the smallest training '
                     'instance area)'),
    'iah.max_pos': _COUNT,
    'iah.anchor_sizes': numbers_tuple(None, lo=0.0, lo_open=True),
    'iah.anchor_ratios': numbers_tuple(None, lo=0.0, lo_open=True),
    'iah.anchor_scales': numbers_tuple(None, lo=0.0, lo_open=True),
    'iah.stacked_convs': _COUNT,
    'atss.octave_base_scale': _POSITIVE,
    'atss.topk': _COUNT,
    'atss.stacked_convs': _COUNT,
    'atss.max_pos': _COUNT,
    'atss.cls_weight': _NON_NEGATIVE,
    'atss.giou_weight': _NON_NEGATIVE,
    'atss.centerness_weight': _NON_NEGATIVE,
    'rcnn.rpn_octave_base_scale': _POSITIVE,
    'rcnn.rpn_scales_per_octave': _COUNT,
    'rcnn.rpn_ratios': numbers_tuple(None, lo=0.0, lo_open=True),
    'rcnn.rpn_pos_iou': _FRACTION,
    'rcnn.rpn_neg_iou': _FRACTION,
    'rcnn.rpn_min_pos_iou': _FRACTION,
    'rcnn.rpn_num_samples': _COUNT,
    'rcnn.rpn_pos_fraction': _FRACTION,
    'rcnn.nms_pre': _COUNT,
    'rcnn.nms_iou': _FRACTION,
    'rcnn.num_proposals': _COUNT,
    'rcnn.roi_pos_iou': _FRACTION,
    'rcnn.roi_num_samples': _COUNT,
    'rcnn.roi_pos_fraction': _FRACTION,
    'rcnn.num_roi_levels': _COUNT,
    'rcnn.roi_size': _COUNT,
    'rcnn.sampling_ratio': integer(0),
    'rcnn.adaptive_max_samples': _COUNT,
    'rcnn.finest_scale': _POSITIVE,
    'rcnn.fc_dim': _COUNT,
    'rcnn.max_pos': _COUNT,
    'rcnn.rpn_cls_weight': _NON_NEGATIVE,
    'rcnn.rpn_bbox_weight': _NON_NEGATIVE,
    'rcnn.roi_cls_weight': _NON_NEGATIVE,
    'rcnn.roi_giou_weight': _NON_NEGATIVE,
    'loss.cls_type': choice('focal', 'qfl'),
    'loss.focal_alpha': _FRACTION,
    'loss.focal_gamma': _NON_NEGATIVE,
    'loss.qfl_beta': _NON_NEGATIVE,
    'loss.cls_weight': _NON_NEGATIVE,
    'loss.bbox_weight': _NON_NEGATIVE,
    'loss.giou_weight': _NON_NEGATIVE,
    'loss.dn_weight': _NON_NEGATIVE,
    'loss.enc_weight': _NON_NEGATIVE,
    'loss.aux_dense_weight': _NON_NEGATIVE,
    'loss.aux_query_weight': _NON_NEGATIVE,
    'matcher.backend': choice('auto', 'jax', 'scipy'),
    'matcher.cost_class': _NON_NEGATIVE,
    'matcher.cost_bbox': _NON_NEGATIVE,
    'matcher.cost_giou': _NON_NEGATIVE,
    'train.num_epochs': _COUNT,
    'train.num_steps': integer(1, also=(-1,)),
    'train.per_device_batch_size': _COUNT,
    'train.global_batch_size': integer(1, also=(-1,)),
    'train.grad_accum_steps': _COUNT,
    'train.learning_rate': _POSITIVE,
    'train.weight_decay': _NON_NEGATIVE,
    'train.backbone_lr_mult': _NON_NEGATIVE,
    'train.grad_clip_norm': _NON_NEGATIVE,
    'train.lr_drop_epochs': numbers_tuple(None, lo=0, integers=True),
    'train.lr_drop_factor': _POSITIVE,
    'train.warmup_steps': integer(0),
    'train.seed': integer(0),
    'train.checkpoint_every_steps': _COUNT,
    'train.keep_checkpoints': _COUNT,
    'train.log_every_steps': _COUNT,
    'train.eval_every_epochs': _POSITIVE,
    'eval.protocol': choice('coco', 'visdrone', 'soda'),
    'eval.batch_size': _COUNT,
    'eval.max_detections': _COUNT,
    'eval.score_threshold': _FRACTION,
    'eval.num_images': integer(1, also=(-1,)),
    'eval.soft_nms': boolean(),
    'eval.soft_nms_iou': _FRACTION,
    'eval.soft_nms_method': choice('linear', 'gaussian', 'naive'),
    'eval.soft_nms_sigma': _POSITIVE,
    'eval.soft_nms_min_score': _FRACTION,
    'predict.score_threshold': _FRACTION,
    'predict.slice_large_images': boolean(),
    'compilation_cache_dir': string(),
}


def _divides(heads_key: str, width_key: str):
  def check(get):
    heads, width = get(heads_key), get(width_key)
    if width % heads:
      return f'config.{heads_key}={heads}: must divide config.{width_key}={width}'
    return None
  return check


def _levels_match_neck(get):
  if get('model.neck') != 'channel_mapper' and get('model.num_levels') != 4:
    return (f'config.model.num_levels={get("model.num_levels")}: the {get("model.neck")!r} neck gives the '
            "backbone's 4 levels (C2..C5); more levels need model.neck='channel_mapper'")
  return None


def _one_iah_anchor_size_per_aux_level(get):
  if 'iah' in tuple(get('model.aux_heads')) and len(get('iah.anchor_sizes')) != get('model.num_levels') + 1:
    return (f'config.iah.anchor_sizes has {len(get("iah.anchor_sizes"))} entries: the auxiliary heads see '
            f'model.num_levels + 1 = {get("model.num_levels") + 1} levels, give one base size per level')
  return None


def _overlap_below_patch(get):
  if get('dataset.slicing.overlap') >= get('dataset.slicing.patch_size'):
    return (f'config.dataset.slicing.overlap={get("dataset.slicing.overlap")}: must be smaller than '
            f'config.dataset.slicing.patch_size={get("dataset.slicing.patch_size")}')
  return None


CROSS_CHECKS: tuple[Callable, ...] = (
    _divides('encoder.num_heads', 'model.hidden_dim'),
    _divides('decoder.num_heads', 'model.hidden_dim'),
    _overlap_below_patch,
    _levels_match_neck,
    _one_iah_anchor_size_per_aux_level,
    _backbone_weights_named,
)

# Keys that shape the model or its input: eval/predict/export take them from the checkpoint's stored config.
# Model keys added after v0.3 -> the value that builds the layout of a checkpoint whose stored config lacks them
# (and the resize its model was trained with).
LEGACY_MODEL_DEFAULTS = {'model.aux_downsample_bias': False, 'model.exclude_invalid_proposals': True,
                         'model.box_frame': 'canvas',
                         'model.norm_region': 'canvas',
                         'model.anchor_grid': 'cell_centers',
                         'input.resize_rule': 'fit_canvas',
                         'dn.group_rule': 'image', 'model.aux_query_padding': 'masked'}

MODEL_KEY_PREFIXES = ('model.', 'encoder.', 'decoder.', 'dn.', 'iah.', 'atss.', 'rcnn.', 'input.image_size',
                      'input.resize_', 'input.mean', 'input.std', 'dataset.num_classes')


def flatten(config) -> dict[str, Any]:
  """{'a.b.c': value} for every leaf of a ConfigDict or nested dict."""
  out = {}
  items = config.items() if hasattr(config, 'items') else []
  for key, value in items:
    if hasattr(value, 'items'):
      out.update({f'{key}.{k}': v for k, v in flatten(value).items()})
    else:
      out[key] = value
  return out


def _show(value) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def problems(config, mode: str = 'train') -> list[str]:
  """Every problem with `config`'s values, one line each (empty when all are usable)."""
  values = flatten(config)
  found = []
  for key, check in CHECKS.items():
    if key not in values or (check.modes and mode not in check.modes):
      continue
    value = values[key]
    if isinstance(value, list):
      value = tuple(value)
    if not check.ok(value):
      found.append(f'config.{key}={_show(value)}: expected {check.accepts}')
  if not found:  # cross checks assume each value is well-typed
    for cross in CROSS_CHECKS:
      if mode not in getattr(cross, 'modes', (mode,)):   # a cross check of some --modes only
        continue
      message = cross(lambda k: values[k])
      if message:
        found.append(message)
  return found


def validate(config, mode: str = 'train') -> None:
  """Raises `errors.ConfigError` naming the first unusable value (see `problems`)."""
  found = problems(config, mode)
  if found:
    raise errors.ConfigError(found[0] + (f' (and {len(found) - 1} more)' if len(found) > 1 else ''))


def model_key(key: str) -> bool:
  return key.startswith(MODEL_KEY_PREFIXES)


def _same(a, b) -> bool:
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return a == b


def merge_stored_model_config(config, stored: dict, overrides=()) -> tuple[Any, list[str]]:
  """`config` (an unlocked copy) with the model keys of the config stored with a checkpoint.

  The stored values build the model the checkpoint's arrays fit. A key the user overrode on the command line
  (`overrides`, e.g. {'model.hidden_dim'}) to a different value is a ConfigError naming both values.
  Returns (config, [keys taken from the stored config that differed]).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  current = flatten(config)
  changed = []
  stored_flat = flatten(stored)
  if stored_flat:
    stored_flat = {**{k: v for k, v in LEGACY_MODEL_DEFAULTS.items() if k not in stored_flat}, **stored_flat}
  for key, value in stored_flat.items():
    if not model_key(key) or key not in current:
      continue  # keys of older versions, or data/train keys the user may change freely
    mine = current[key]
    if isinstance(mine, tuple) and isinstance(value, list):
      value = tuple(value)
    if key == 'iah.a_s' and isinstance(value, str):   # configs stored before a_s was a float: 'auto' or '1024'
      value = A_S_AUTO if value == 'auto' else float(value)
    if _same(mine, value):
      continue
    if key in overrides:
      raise errors.ConfigError(
          f'config.{key}={_show(mine)} disagrees with the checkpoint, which was trained with {key}={_show(value)} '
          f'(eval/predict/export build the model from the checkpoint\'s config: drop --config.{key})')
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = float(value) if isinstance(mine, float) and _is_number(value) else value
    except (TypeError, ValueError):   # ConfigDict refuses a value of another type
      raise errors.CheckpointError(
          f'the config stored with the checkpoint has {key}={value!r}, which is not a {type(mine).__name__} '
          f'like config.{key}={_show(mine)}: the stored config is damaged or from an incompatible version') from None
    changed.append(key)
  return config, changed


def overridden_keys(argv) -> set[str]:
  """Config keys given on the command line as --config.KEY=VALUE (or --config.KEY VALUE)."""
  keys = set()
  for arg in argv:
    if arg.startswith('--config.'):
      keys.add(arg[len('--config.'):].split('=', 1)[0])
  return keys
