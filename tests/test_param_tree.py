"""The model's variable tree (names, shapes, dtypes) is the checkpoint layout: refactors of the modules must
keep it, or checkpoints of the previous layout stop restoring. The golden file was written from the code of
commit c8c4dd0 (before the explicit module fields and the shared FFN / conv-norm blocks); each variant covers
a different set of modules (BiFPN + SAE + IAH + R-CNN; ChannelMapper + deformable encoder + all three heads;
FPN + plain DINO)."""

import pathlib

import flax
import pytest

from configs import co_dino, visdrone
from mrqm_jax import model_lib

GOLDEN = pathlib.Path(__file__).parent / 'data' / 'param_tree_c8c4dd0.txt'


def _variants():
  c = visdrone.get_config()
  yield 'visdrone', c
  c = co_dino.get_config()
  c.model.aux_heads = ('iah', 'atss', 'rcnn')
  yield 'co_dino_all_heads', c
  c = visdrone.get_config()
  c.model.neck = 'fpn'
  c.encoder.type = 'deformable'
  c.model.aux_heads = ()
  yield 'fpn_plain_dino', c


def _golden() -> dict[str, list[str]]:
  out, name = {}, None
  for line in GOLDEN.read_text().splitlines():
    if line.startswith('# ') and ' ' not in line[2:]:
      name = line[2:]
      out[name] = []
    elif name is not None and line:
      out[name].append(line)
  return out


def tree_lines(config) -> list[str]:
  """'collection/path/to/leaf HxW dtype' for every variable of make_model(config) (jax.eval_shape: no compute)."""
  model = model_lib.make_model(config)
  abstract = model_lib.abstract_variables(model, config)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract), sep='/')
  return [f'{k} {"x".join(map(str, v.shape)) or "()"} {v.dtype}' for k, v in sorted(flat.items())]


@pytest.mark.parametrize('name', ['visdrone', 'co_dino_all_heads', 'fpn_plain_dino'])
def test_variable_tree_matches_previous_layout(name):
  config = dict(_variants())[name]
  config.input.image_size = (256, 256)   # shapes of the variables do not depend on the canvas
  config.model.aux_downsample_bias = False   # the layout of the golden file (v0.3); see the test below
  want = _golden()[name]
  assert len(want) > 100   # the golden file was read
  got = tree_lines(config)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  assert not missing and not extra, f'missing {missing[:10]} ... extra {extra[:10]} ...'
  assert got == want


def test_codino_downsample_bias_adds_exactly_one_variable():
  """Co-DINO's aux extra level is nn.Conv2d (with a bias) + GroupNorm; `model.aux_downsample_bias` (default) adds
  that bias and nothing else, and a checkpoint whose stored config lacks the key builds the old layout."""
  from mrqm_jax import config_validation
  config = dict(_variants())['visdrone']
  config.input.image_size = (256, 256)
  assert config.model.aux_downsample_bias
  new = tree_lines(config)
  config.model.aux_downsample_bias = False
  old = tree_lines(config)
  assert sorted(set(new) - set(old)) == ['params/aux_levels/downsample/conv/bias 256 float32']
  assert not set(old) - set(new)
  stored = {k: v for k, v in config.to_dict().items()}
  stored['model'] = {k: v for k, v in stored['model'].items() if k != 'aux_downsample_bias'}
  fresh = dict(_variants())['visdrone']
  merged, changed = config_validation.merge_stored_model_config(fresh, stored)
  assert merged.model.aux_downsample_bias is False and 'model.aux_downsample_bias' in changed
