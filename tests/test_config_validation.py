"""config_validation: every key of configs/base.py has a check; bad values are one line naming key and range;
eval/predict/export take the model keys from the checkpoint's stored config."""

import sys

import ml_collections
import pytest

from mrqm_jax import config_validation as cv
from mrqm_jax import errors
from tests.conftest import REPO

sys.path.insert(0, str(REPO))
from configs import base, co_dino, co_dino_coco, smoke, sodad, visdrone  # noqa: E402  pylint: disable=g-import-not-at-top


def test_every_config_key_has_a_check():
  """A key added to configs/base.py needs one line in CHECKS (else its bad values reach the code)."""
  keys = set(cv.flatten(base.get_config()))
  assert keys - set(cv.CHECKS) == set(), 'add these keys to config_validation.CHECKS'
  assert set(cv.CHECKS) - keys == set(), 'CHECKS names keys the config does not have'


@pytest.mark.parametrize('module', [base, smoke, visdrone, sodad, co_dino, co_dino_coco])
def test_recipes_are_valid(module):
  config = module.get_config()
  if module is not smoke:   # the recipes name no weights: a training command must (see the next test)
    config.model.pretrained = 'hf://timm/resnet50.tv_in1k'
  assert cv.problems(config) == []


@pytest.mark.parametrize('module', [visdrone, sodad, co_dino, co_dino_coco])
def test_recipes_refuse_to_train_from_a_random_backbone_unless_told(module):
  """Co-DINO starts from ImageNet weights; a recipe run without them says how to get them (one line, exit 2)."""
  config = module.get_config()
  with pytest.raises(errors.ConfigError) as e:
    cv.validate(config, mode='train')
  message = str(e.value)
  assert message.startswith("config.model.pretrained='': expected ImageNet weights for the backbone: "
                            "'hf://timm/resnet50.tv_in1k'")
  assert "or 'none' to train from a random backbone on purpose" in message and '\n' not in message
  assert e.value.exit_code == 2
  assert cv.problems(config, mode='eval') == []   # eval/predict/export take the weights from the checkpoint
  config.model.pretrained = 'none'
  assert cv.problems(config, mode='train') == []


def test_fine_tuning_from_a_checkpoint_needs_no_imagenet_weights(tmp_path):
  """train.init_from's checkpoint (e.g. converted Co-DINO weights) holds the backbone: '' is fine then."""
  config = visdrone.get_config()
  config.train.init_from = str(tmp_path)
  assert cv.problems(config, mode='train') == []


def test_checkpoints_without_the_v04_keys_keep_the_rules_they_were_trained_with():
  stored = _with().to_dict()
  del (stored['input']['resize_rule'], stored['dn']['group_rule'], stored['model']['norm_region'],
       stored['model']['box_frame'])
  merged, changed = cv.merge_stored_model_config(visdrone.get_config(), stored)
  assert merged.input.resize_rule == 'fit_canvas' and merged.dn.group_rule == 'image'
  assert merged.model.norm_region == 'canvas'
  assert merged.model.box_frame == 'canvas'   # v0.3 boxes were canvas-normalized
  assert {'input.resize_rule', 'dn.group_rule', 'model.norm_region', 'model.box_frame'} <= set(changed)


@pytest.mark.parametrize('module', [base, visdrone, sodad, co_dino, co_dino_coco, smoke])
def test_recipes_use_co_dinos_image_frame_and_stored_frames_win(module):
  """Co-DINO's 1x recipe normalizes boxes by each image's size; a checkpoint's stored frame is kept."""
  assert module.get_config().model.box_frame == 'image'
  stored = _with(model__box_frame='canvas').to_dict()
  merged, changed = cv.merge_stored_model_config(module.get_config(), stored)
  assert merged.model.box_frame == 'canvas' and 'model.box_frame' in changed


def _with(**values):
  c = ml_collections.ConfigDict(smoke.get_config().to_dict())
  for key, value in values.items():
    *parents, leaf = key.split('__')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize('key, value, expected', [
    ('input__image_size', ('abc',), "config.input.image_size=('abc',): expected a tuple of 2 integers"),
    ('input__image_size', (64, 0), 'config.input.image_size=(64, 0)'),
    ('dataset__format', 'bogus', "config.dataset.format='bogus': expected one of 'visdrone', 'soda_d', 'coco'"),
    ('model__backbone', 'resnet999', "config.model.backbone='resnet999': expected one of 'resnet18'"),
    ('train__per_device_batch_size', 0, 'config.train.per_device_batch_size=0: expected an integer >= 1'),
    ('train__num_steps', 0, 'config.train.num_steps=0: expected an integer >= 1 or -1'),
    ('model__pretrained', 'x.pth', "config.model.pretrained='x.pth': expected ImageNet weights for the backbone"),
    ('model__pretrained', 'hf://timm', "config.model.pretrained='hf://timm': expected ImageNet weights"),
    ('model__pretrained', 'hf://timm/r50/pytorch_model.bin', "config.model.pretrained='hf://timm/r50/pytorch_model"),
    ('model__pretrained', '/no/such.npz', "config.model.pretrained='/no/such.npz'"),
    ('iah__a_s', 0.0, 'config.iah.a_s=0.0: expected a positive number (px^2) or -1 (auto'),
    ('iah__a_s', -3.0, 'config.iah.a_s=-3.0'),
    ('eval__protocol', 'voc', "config.eval.protocol='voc'"),
    ('iah__t_b', 1.5, 'config.iah.t_b=1.5: expected a number >= 0 and <= 1'),
    ('train__learning_rate', 0.0, 'config.train.learning_rate=0.0: expected a number > 0'),
    ('model__frozen_stages', 7, 'config.model.frozen_stages=7: expected an integer in [0, 4]'),
    ('model__dtype', 'float16', "config.model.dtype='float16'"),
    ('model__box_frame', 'padded', "config.model.box_frame='padded': expected one of 'image', 'canvas'"),
    ('model__norm_region', 'image', "config.model.norm_region='image': expected one of 'batch', 'canvas'"),
    ('encoder__num_heads', 5, 'config.encoder.num_heads=5: must divide config.model.hidden_dim=32'),
    ('dataset__slicing__overlap', 900, 'config.dataset.slicing.overlap=900: must be smaller than'),
])
def test_bad_values_are_one_line_naming_the_key(key, value, expected):
  with pytest.raises(errors.ConfigError) as e:
    cv.validate(_with(**{key: value}), mode='train')
  assert expected in str(e.value)
  assert '\n' not in str(e.value)
  assert e.value.exit_code == 2


def test_file_checks_apply_only_in_the_modes_that_read_the_file():
  c = _with(model__pretrained='/no/such.npz')
  assert cv.problems(c, mode='eval') == []
  assert len(cv.problems(c, mode='train')) == 1


def test_existing_pretrained_file_passes(tmp_path):
  f = tmp_path / 'w.npz'
  f.write_bytes(b'')
  assert cv.problems(_with(model__pretrained=str(f))) == []


def test_stored_model_keys_win_and_disagreeing_overrides_are_errors():
  stored = _with(model__hidden_dim=64, encoder__ffn_dim=128, train__learning_rate=0.5).to_dict()
  stored['input']['image_size'] = [96, 160]   # JSON stores tuples as lists
  stored['model']['no_longer_a_key'] = 1
  merged, changed = cv.merge_stored_model_config(smoke.get_config(), stored, overrides=set())
  assert merged.model.hidden_dim == 64 and merged.encoder.ffn_dim == 128
  assert tuple(merged.input.image_size) == (96, 160)
  assert merged.train.learning_rate == smoke.get_config().train.learning_rate   # not a model key
  assert set(changed) == {'model.hidden_dim', 'encoder.ffn_dim', 'input.image_size'}
  # An override that agrees with the checkpoint is fine; one that disagrees names both values.
  cv.merge_stored_model_config(_with(model__hidden_dim=64), stored, overrides={'model.hidden_dim'})
  with pytest.raises(errors.ConfigError, match=r'config.model.hidden_dim=32 disagrees with the checkpoint, '
                                               r'which was trained with model.hidden_dim=64'):
    cv.merge_stored_model_config(smoke.get_config(), stored, overrides={'model.hidden_dim'})


@pytest.mark.parametrize('key, value', [('hidden_dim', 'wide'), ('hidden_dim', [32]), ('backbone', 5)])
def test_a_stored_model_value_of_the_wrong_type_is_one_checkpoint_error(key, value):
  stored = smoke.get_config().to_dict()
  stored['model'][key] = value
  with pytest.raises(errors.CheckpointError, match=rf'the config stored with the checkpoint has model.{key}='):
    cv.merge_stored_model_config(smoke.get_config(), stored, overrides=set())


@pytest.mark.parametrize('stored_a_s, want', [('auto', -1.0), ('1024', 1024.0), (144.0, 144.0), (-1.0, -1.0)])
def test_stored_a_s_of_the_string_layout_becomes_a_float(stored_a_s, want):
  """Checkpoints written while iah.a_s was a string ('auto' or a number) restore into the float key."""
  stored = smoke.get_config().to_dict()
  stored['iah']['a_s'] = stored_a_s
  merged, _ = cv.merge_stored_model_config(smoke.get_config(), stored, overrides=set())
  assert isinstance(merged.iah.a_s, float) and merged.iah.a_s == want
  assert cv.problems(merged, mode='eval') == []


def test_overridden_keys_from_argv():
  assert cv.overridden_keys(['--config=c.py', '--config.model.hidden_dim=64', '--mode=eval',
                             '--config.train.seed', '3']) == {'model.hidden_dim', 'train.seed'}
