"""mrqm_jax.convert: Co-DETR checkpoints -> our variables, without torch.

The reader is checked against a file that PyTorch 2.1 itself wrote (tests/data/torch21_checkpoint.pth, with the
values torch reported in torch21_checkpoint_expected.npz: float64/16, bfloat16, int, bool, strided and offset
views, a 0-d tensor, a Parameter, and non-tensor objects beside the state dict). The layout changes are checked
numerically against NumPy re-statements of what the torch modules compute (nn.MultiheadAttention, the RoI head's
channel-major flatten, mmdet's ratio-major anchor order). The name table is checked against the full list of
Co-DINO R50 state-dict keys and shapes that the reference (mmdetection 3.3.0 projects/CO-DETR) builds
(tests/data/codino_r50_state_dict.txt): every key used, every variable of configs/co_dino.py filled.
"""

import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import co_dino
from mrqm_jax import checkpointing, convert, model_lib

DATA = pathlib.Path(__file__).parent / 'data'
ROOT = pathlib.Path(__file__).parent.parent


def test_reads_a_pytorch_zip_checkpoint_without_torch():
  state = convert.load_checkpoint(str(DATA / 'torch21_checkpoint.pth'))
  with np.load(DATA / 'torch21_checkpoint_expected.npz') as expected:
    want = {k: expected[k] for k in expected.files}
  # Only the state dict is taken (meta and optimizer entries are not weights).
  assert sorted(state) == sorted(want)
  for name, value in want.items():
    assert state[name].shape == value.shape, name
    np.testing.assert_array_equal(state[name], value, err_msg=name)
  assert state['x.double'].dtype == np.float64 and state['x.half'].dtype == np.float16
  assert state['x.int'].dtype == np.int32 and state['x.bool'].dtype == np.bool_


def test_unreadable_checkpoint_is_a_conversion_error(tmp_path):
  bad = tmp_path / 'x.pth'
  bad.write_bytes(b'not a zip')
  with pytest.raises(convert.ConversionError, match='not a PyTorch zip checkpoint'):
    convert.load_checkpoint(str(bad))
  with pytest.raises(convert.ConversionError, match='not found'):
    convert.load_checkpoint(str(tmp_path / 'missing.pth'))


def _torch_mha(x, in_w, in_b, out_w, out_b, heads):
  """NumPy nn.MultiheadAttention (batch_first, no mask): x [B, N, D]."""
  b, n, d = x.shape
  q, k, v = (x @ in_w[i * d:(i + 1) * d].T + in_b[i * d:(i + 1) * d] for i in range(3))
  split = lambda t: t.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
  q, k, v = split(q), split(k), split(v)
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  return out @ out_w.T + out_b


def test_packed_attention_projection_computes_what_torch_computes():
  rng = np.random.default_rng(0)
  d, heads = 16, 4
  x = rng.standard_normal((2, 5, d)).astype(np.float32)
  in_w, in_b = rng.standard_normal((3 * d, d)).astype(np.float32), rng.standard_normal(3 * d).astype(np.float32)
  out_w, out_b = rng.standard_normal((d, d)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
  params = {name: {'kernel': convert._qkv_kernel(i, heads)(in_w), 'bias': convert._qkv_bias(i, heads)(in_b)}
            for i, name in enumerate(('query', 'key', 'value'))}
  params['out'] = {'kernel': convert._attn_out_kernel(heads)(out_w), 'bias': out_b}
  ours = nn.MultiHeadDotProductAttention(num_heads=heads).apply({'params': params}, x, x, x)
  np.testing.assert_allclose(ours, _torch_mha(x, in_w, in_b, out_w, out_b, heads), rtol=1e-4, atol=1e-4)


def _codino_proposal_pos_embed(boxes, num_feats=128, temperature=10000.0):
  """NumPy restatement of Co-DINO's get_proposal_pos_embed on sigmoid-space boxes [N, 4]: (x, y, w, h) order."""
  dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)
  pos = boxes[:, :, None] * 2 * np.pi / dim_t                       # [N, 4, F]
  out = np.stack([np.sin(pos[:, :, 0::2]), np.cos(pos[:, :, 1::2])], axis=3)   # [N, 4, F/2, 2]
  return out.reshape(len(boxes), -1)


def test_query_group_projection_sees_codino_box_embedding():
  from mrqm_jax.models import aux_heads
  rng = np.random.default_rng(2)
  d = 16
  boxes = rng.uniform(0.1, 0.9, (1, 5, 4)).astype(np.float32)
  boxes[0, 0] = [0.0, 0.5, 2.7, 1.3]     # an anchor on the border, wider than the image (coarse aux levels)
  w, b = rng.standard_normal((d, 4 * d // 2)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
  # Co-DINO's forward_aux: get_proposal_pos_embed(inverse_sigmoid(anchors)), which applies sigmoid again.
  x = np.clip(boxes[0].astype(np.float64), 0.0, 1.0)
  seen = 1.0 / (1.0 + np.exp(-np.log(np.maximum(x, 1e-5) / np.maximum(1.0 - x, 1e-5))))
  torch_proj = _codino_proposal_pos_embed(seen, d // 2) @ w.T + b
  params = {'pos_proj': {'kernel': convert._xy_first_pe(w), 'bias': b},
            'pos_norm': {'scale': np.ones(d, np.float32), 'bias': np.zeros(d, np.float32)}}
  ours = aux_heads.AuxQueryGroup(d).apply({'params': params}, jnp.asarray(boxes))[0]
  want = (torch_proj - torch_proj.mean(-1, keepdims=True)) / np.sqrt(torch_proj.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(ours, want, rtol=1e-3, atol=1e-3)


def test_roi_head_first_fc_takes_channel_major_features():
  rng = np.random.default_rng(1)
  c, s, o = 6, 7, 5
  w = rng.standard_normal((o, c * s * s))
  feats = rng.standard_normal((s, s, c))                       # ours: [S, S, C]
  torch_out = w @ feats.transpose(2, 0, 1).reshape(-1)         # torch: [C, S, S] flattened
  ours_out = feats.reshape(-1) @ convert._roi_fc0(c)(w)
  np.testing.assert_allclose(ours_out, torch_out, rtol=1e-12)


def test_rpn_outputs_follow_our_anchor_order():
  # mmdet's AnchorGenerator: a location's anchors ratio-major (ratio r, scale s) -> r * S + s; ours scale-major.
  num_scales, num_ratios = 3, 3
  for per_anchor in (1, 4):
    out = num_scales * num_ratios * per_anchor
    tag = np.zeros((out, 2, 1, 1))
    for r in range(num_ratios):
      for s in range(num_scales):
        for k in range(per_anchor):
          tag[(r * num_scales + s) * per_anchor + k] = np.array([r, s]).reshape(2, 1, 1) * 10 + k
    kernel = convert._anchor_major(num_scales, num_ratios, per_anchor, conv=True)(tag)   # [1, 1, 2, out]
    for s in range(num_scales):
      for r in range(num_ratios):
        for k in range(per_anchor):
          np.testing.assert_array_equal(kernel[0, 0, :, (s * num_ratios + r) * per_anchor + k],
                                        np.array([r, s]) * 10 + k)


def _codino_state_dict(seed=0) -> dict[str, np.ndarray]:
  """Random arrays under the reference's Co-DINO R50 key names and shapes (10 classes)."""
  rng = np.random.default_rng(seed)
  state = {}
  for line in (DATA / 'codino_r50_state_dict.txt').read_text().splitlines():
    if not line or line.startswith('#'):
      continue
    name, shape, dtype = line.split()
    shape = tuple(int(v) for v in shape.split('x')) if shape != '()' else ()
    state[name] = (rng.standard_normal(shape).astype(dtype) if dtype.startswith('float')
                   else np.zeros(shape, dtype))
  return state


def _codino_config():
  c = co_dino.get_config()
  c.input.image_size = (256, 256)   # variable shapes do not depend on it
  c.model.pretrained = ''
  return c


def test_every_codino_r50_key_fills_every_variable():
  config = _codino_config()
  state = _codino_state_dict()
  assert len(state) == 674   # the whole key list was read
  abstract = model_lib.abstract_variables(model_lib.make_model(config), config)
  converted, report = convert.convert_codetr(state, abstract, config)
  assert not report.shape_mismatch, report.text()
  assert not report.unfilled, report.text()
  assert not report.unused, report.text()
  assert sorted(report.skipped) == sorted(k for k in state if k.endswith('num_batches_tracked'))
  assert len(report.used) + len(report.skipped) == len(state)
  flat = jax.tree.leaves(converted)
  assert all(isinstance(v, np.ndarray) for v in flat)
  # Spot checks of the layout changes on the real names.
  p = converted['params']
  in_w = state['query_head.transformer.decoder.layers.2.attentions.0.attn.in_proj_weight']
  np.testing.assert_array_equal(p['decoder']['layers_2']['self_attn']['key']['kernel'],
                                in_w[256:512].T.reshape(256, 8, 32))
  np.testing.assert_array_equal(p['enc_class_head']['kernel'], state['query_head.cls_branches.6.weight'].T)
  np.testing.assert_array_equal(p['aux_query_rcnn']['pos_proj']['bias'],
                                state['query_head.transformer.aux_pos_trans.0.bias'])
  np.testing.assert_array_equal(p['aux_query_atss']['pos_proj']['bias'],
                                state['query_head.transformer.aux_pos_trans.1.bias'])
  np.testing.assert_array_equal(converted['batch_stats']['backbone']['layer3']['2']['bn1']['var'],
                                state['backbone.layer3.2.bn1.running_var'])


def test_sensex_names_convert_too():
  config = _codino_config()
  state = _codino_state_dict()
  state['query_head.label_embedding.weight'] = state.pop('query_head.dn_generator.label_embedding.weight')
  abstract = model_lib.abstract_variables(model_lib.make_model(config), config)
  converted, report = convert.convert_codetr(state, abstract, config)
  assert not report.unfilled and not report.unused
  assert report.renamed == [('query_head.label_embedding.weight',
                             'query_head.dn_generator.label_embedding.weight')]
  np.testing.assert_array_equal(converted['params']['label_embedding'], state['query_head.label_embedding.weight'])


def test_wrong_class_count_is_named_not_silently_dropped():
  config = _codino_config()
  config.dataset.num_classes = 7    # e.g. fine-tuning COCO weights on another class list
  state = _codino_state_dict()
  abstract = model_lib.abstract_variables(model_lib.make_model(config), config)
  _, report = convert.convert_codetr(state, abstract, config)
  unfilled = {var for var, _ in report.unfilled}
  assert 'params/enc_class_head/kernel' in unfilled and 'params/label_embedding' in unfilled
  assert any(var == 'params/decoder/class_heads_0/bias' for var, _, _, _ in report.shape_mismatch)
  assert 'params/backbone/conv1/kernel' not in unfilled


def test_cli_writes_a_checkpoint_the_restore_path_reads(tmp_path):
  state = _codino_state_dict(seed=3)
  source = tmp_path / 'codino.npz'
  np.savez(source, **state)
  out = tmp_path / 'converted'
  result = subprocess.run(
      [sys.executable, '-m', 'mrqm_jax.convert', '--from=codetr', f'--checkpoint={source}',
       '--config=configs/co_dino.py', '--config.input.image_size=256,256', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  last = result.stdout.strip().splitlines()[-1]
  skipped = sum(k.endswith('num_batches_tracked') for k in state)
  num_vars = len(jax.tree.leaves(model_lib.abstract_variables(model_lib.make_model(_codino_config()),
                                                              _codino_config())))
  assert last == f'used={len(state) - skipped} unused=0 filled={num_vars} unfilled=0'
  assert (out / 'conversion_report.txt').exists()
  config = _codino_config()
  abstract = model_lib.abstract_variables(model_lib.make_model(config), config)
  params, model_state, _ = checkpointing.restore_params_from_path(str(out), abstract['params'])
  np.testing.assert_array_equal(params['query_embed'], state['query_head.transformer.query_embed.weight'])
  np.testing.assert_array_equal(model_state['batch_stats']['backbone']['bn1']['mean'],
                                state['backbone.bn1.running_mean'])
  # Never written over.
  again = subprocess.run(
      [sys.executable, '-m', 'mrqm_jax.convert', '--from=codetr', f'--checkpoint={source}',
       '--config=configs/co_dino.py', f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 2 and 'not empty' in again.stderr and 'Traceback' not in again.stderr


def test_train_init_from_takes_the_parameters_of_a_converted_folder(tmp_path):
  """`train.init_from=DIR` (a folder `convert` wrote): training starts from its params and model_state."""
  from configs import smoke
  from mrqm_jax import parallel, train
  config = smoke.get_config()
  model = model_lib.make_model(config)
  fresh = jax.device_get(jax.jit(lambda r: model_lib.init_variables(model, config, r))(jax.random.PRNGKey(0)))
  marked = jax.tree.map(lambda x: np.full(x.shape, 0.25, x.dtype), fresh)
  convert.write_converted(str(tmp_path / 'converted'), marked, config)
  mesh = parallel.create_mesh()
  got = train.init_from_checkpoint(str(tmp_path / 'converted'), fresh, mesh)
  assert jax.tree.structure(got) == jax.tree.structure(fresh)
  for leaf in jax.tree.leaves(got):
    np.testing.assert_array_equal(np.asarray(leaf), 0.25)
  other = smoke.get_config()
  other.model.hidden_dim = 2 * config.model.hidden_dim   # a checkpoint of another model is an error, not a crash
  wrong = jax.device_get(jax.jit(lambda r: model_lib.init_variables(model_lib.make_model(other), other, r))(
      jax.random.PRNGKey(0)))
  with pytest.raises(checkpointing.CheckpointError, match='does not match'):
    train.init_from_checkpoint(str(tmp_path / 'converted'), wrong, mesh)
