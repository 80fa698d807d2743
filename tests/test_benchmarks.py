"""benchmarks/model_cost.py's jaxpr FLOP counter against closed forms, brute-force counts and XLA's cost analysis;
benchmarks/train_step.py: the MFU table lookup, the attribution of HLO ops to parts, the profile parsing, and one
real run of the benchmark on the smoke config at a tiny canvas (its table adds up; its last line is the contract).
No timing is asserted."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO

from benchmarks import model_cost as mc

_SPEC = importlib.util.spec_from_file_location('train_step_benchmark', REPO / 'benchmarks' / 'train_step.py')
ts = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ts)


# ------------------------------------------------------------------------------------ jaxpr FLOP counter
def test_dot_general_flops_closed_form():
  a, b = jnp.ones((3, 5)), jnp.ones((5, 7))
  assert mc.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(a, b)) == 2 * 3 * 7 * 5
  x, y = jnp.ones((4, 3, 6, 5)), jnp.ones((4, 5, 6, 2))   # batch b, contract j and k
  assert mc.jaxpr_flops(jax.make_jaxpr(lambda x, y: jnp.einsum('bikj,bjkl->bil', x, y))(x, y)) == 2 * 4 * 3 * 2 * 5 * 6


def _conv(strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1), groups=1):
  return lambda x, k: jax.lax.conv_general_dilated(x, k, strides, padding, lhs_dilation, rhs_dilation,
                                                   ('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def test_conv_flops_closed_form_without_padding():
  x, k = jnp.ones((2, 11, 9, 6)), jnp.ones((3, 2, 3, 8))   # 2 groups of 3 input features
  out = jax.eval_shape(_conv((1, 1), 'VALID', groups=2), x, k).shape
  assert out == (2, 9, 8, 8)
  assert mc.jaxpr_flops(jax.make_jaxpr(_conv((1, 1), 'VALID', groups=2))(x, k)) == 2 * np.prod(out) * 3 * 2 * 3


def _brute_force_conv_flops(x_shape, k_shape, out_shape, strides, padding, lhs_dilation, rhs_dilation):
  """Multiply-adds that read a real input element, by walking every output position and kernel tap over an
  explicit padded, dilated indicator image (NHWC / HWIO, one group)."""
  _, h, w, cin = x_shape
  kh, kw, _, cout = k_shape
  real = np.zeros(((h - 1) * lhs_dilation[0] + 1, (w - 1) * lhs_dilation[1] + 1), bool)
  real[::lhs_dilation[0], ::lhs_dilation[1]] = True
  (pt, pb), (pl, pr) = padding
  real = np.pad(real, ((pt, pb), (pl, pr)))
  taps = 0
  for oy in range(out_shape[1]):
    for ox in range(out_shape[2]):
      for ky in range(kh):
        for kx in range(kw):
          taps += real[oy * strides[0] + ky * rhs_dilation[0], ox * strides[1] + kx * rhs_dilation[1]]
  return 2 * x_shape[0] * cout * cin * taps


@pytest.mark.parametrize('strides,padding,lhs_dilation,rhs_dilation', [
    ((2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ((1, 1), ((2, 1), (0, 2)), (2, 2), (1, 1)),    # the input gradient of a strided conv (lhs-dilated)
    ((1, 2), ((1, 2), (3, 0)), (1, 1), (2, 3)),    # dilated kernel, uneven padding
])
def test_conv_flops_skip_padding_and_dilation_holes(strides, padding, lhs_dilation, rhs_dilation):
  x, k = jnp.ones((2, 7, 8, 3)), jnp.ones((3, 2, 3, 4))
  conv = _conv(strides, padding, lhs_dilation, rhs_dilation)
  out = jax.eval_shape(conv, x, k).shape
  expected = _brute_force_conv_flops(x.shape, k.shape, out, strides, padding, lhs_dilation, rhs_dilation)
  assert mc.jaxpr_flops(jax.make_jaxpr(conv)(x, k)) == expected
  assert expected < 2 * np.prod(out) * 3 * 2 * 3   # the padding / holes were skipped
  # XLA's cost analysis counts a convolution the same way.
  assert mc.flops_of(jax.jit(conv).lower(x, k).compile()) == expected


def _mlp_body(w, x):
  return jnp.tanh(x @ w) @ w


def test_scan_counts_body_times_length_like_the_unrolled_loop():
  w, x = jnp.ones((16, 16)), jnp.ones((8, 16))
  body = mc.jaxpr_flops(jax.make_jaxpr(_mlp_body)(w, x))
  assert body == 2 * 2 * 8 * 16 * 16

  def scanned(w, x):
    return jax.lax.scan(lambda c, _: (_mlp_body(w, c), None), x, None, length=5)[0]

  def unrolled(w, x):
    for _ in range(5):
      x = _mlp_body(w, x)
    return x

  assert mc.jaxpr_flops(jax.make_jaxpr(scanned)(w, x)) == 5 * body
  assert mc.jaxpr_flops(jax.make_jaxpr(unrolled)(w, x)) == 5 * body
  # lax.map (a scan) and fori_loop with static bounds (a scan too) likewise; their gradients: 3x the forward
  # (each matmul's two transposes), scanned or not.
  xs = jnp.ones((5, 8, 16))
  assert mc.jaxpr_flops(jax.make_jaxpr(lambda w, xs: jax.lax.map(lambda x: _mlp_body(w, x), xs))(w, xs)) == 5 * body
  fori = lambda w, x: jax.lax.fori_loop(0, 5, lambda i, c: _mlp_body(w, c), x)
  assert mc.jaxpr_flops(jax.make_jaxpr(fori)(w, x)) == 5 * body
  # (value_and_grad: with grad alone the unrolled loop's last matmul is dead code, dropped, the scan's is not)
  grad = lambda f: jax.make_jaxpr(jax.value_and_grad(lambda w, x: jnp.sum(f(w, x)), argnums=(0, 1)))(w, x)
  assert mc.jaxpr_flops(grad(scanned)) == mc.jaxpr_flops(grad(unrolled)) == 3 * 5 * body
  # XLA's cost analysis counts the loop's body once.
  assert mc.flops_of(jax.jit(scanned).lower(w, x).compile()) < 2 * body


def test_while_loop_counted_once_and_flagged_cond_takes_the_largest_branch():
  w, x = jnp.ones((16, 16)), jnp.ones((8, 16))
  body = 2 * 2 * 8 * 16 * 16
  loop = lambda n, w, x: jax.lax.fori_loop(0, n, lambda i, c: _mlp_body(w, c), x)   # traced bound: a while
  cost = mc.jaxpr_cost(jax.make_jaxpr(loop)(3, w, x))
  assert cost.executed == body and cost.while_loops == 1
  assert mc.jaxpr_cost(jax.make_jaxpr(lambda n, x: jax.lax.fori_loop(0, n, lambda i, c: c + 1, x))(3, x)) \
      == mc.JaxprFlops()   # no matmul in the body: not flagged
  branches = lambda p, w, x: jax.lax.cond(p, lambda: _mlp_body(w, x), lambda: x @ w)
  assert mc.jaxpr_flops(jax.make_jaxpr(branches)(True, w, x)) == body


def test_checkpoint_recomputation_is_executed_not_model():
  """The gradient of a rematerialized function runs the recomputed forward (here the first matmul: the
  backward needs tanh(x @ w), not the second product): executed = plain gradient + that matmul; model =
  the plain gradient's count. Known only with the cotangent as an input (loss_and_grad_cost)."""
  w, x = jnp.ones((16, 16)), jnp.ones((8, 16))
  matmul = 2 * 8 * 16 * 16
  plain = lambda w, x: (jnp.sum(_mlp_body(w, x) ** 2), {})
  remat = lambda w, x: (jnp.sum(jax.checkpoint(_mlp_body)(w, x) ** 2), {})
  p, r = mc.loss_and_grad_cost(plain, w, x), mc.loss_and_grad_cost(remat, w, x)
  assert p == mc.JaxprFlops(executed=5 * matmul)   # forward: 2; backward: dW of both matmuls, dX of the second
  assert r.executed == p.executed + matmul and r.recompute == matmul and r.model == p.model
  grad = lambda f: jax.make_jaxpr(jax.grad(lambda w, x: f(w, x)[0]))(w, x)
  assert mc.jaxpr_flops(grad(remat)) == r.executed
  assert mc.jaxpr_cost(grad(remat)).recompute == 0   # no cotangent input: nothing is told apart

  # Rematerialized scan body (the decoder's / SAE's layer loop): the carry also gets its gradient (dX of both
  # matmuls; a scan's body is the same in every iteration, the first's included).
  def scanned(fn):
    return lambda w, x: (jnp.sum(jax.lax.scan(lambda c, _: (fn(w, c), None), x, None, length=5)[0] ** 2), {})

  p, r = mc.loss_and_grad_cost(scanned(_mlp_body), w, x), mc.loss_and_grad_cost(scanned(jax.checkpoint(_mlp_body)),
                                                                                 w, x)
  assert p.executed == 5 * 6 * matmul and p.recompute == 0
  assert r.executed == 5 * 7 * matmul and r.recompute == 5 * matmul and r.model == p.executed


def test_agrees_with_xla_on_a_loop_free_mlp_and_conv_forward_and_backward():
  """A matmul-dominated step (XLA also counts the elementwise ops, a few % here; no loops)."""
  rng = np.random.default_rng(0)
  params = {'k': jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32),
            'w1': jnp.asarray(rng.normal(size=(32, 256)), jnp.float32),
            'w2': jnp.asarray(rng.normal(size=(256, 10)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 16)), jnp.float32)

  def loss(p, x):
    y = jax.nn.relu(_conv((2, 2), 'SAME')(x, p['k']))             # [4, 8, 8, 32]
    h = jax.nn.relu(y.reshape(-1, 32) @ p['w1'])
    return jnp.mean((h @ p['w2']) ** 2)

  fn = jax.value_and_grad(loss, argnums=(0, 1))
  ours = mc.jaxpr_flops(jax.make_jaxpr(fn)(params, x))
  xla = mc.flops_of(jax.jit(fn).lower(params, x).compile())
  assert ours == pytest.approx(xla, rel=0.05) and ours < xla


@pytest.mark.parametrize('kind,dtype,expected', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', ('H100 SXM', 989.4)),
    ('NVIDIA H100 80GB HBM3', 'float32', ('H100 SXM', 494.7)),
    ('NVIDIA H100 PCIe', 'bfloat16', ('H100 PCIe', 756.5)),
    ('NVIDIA H200', 'bfloat16', ('H200 SXM', 989.4)),
    ('NVIDIA A100-SXM4-40GB', 'float32', ('A100', 156.0)),
    ('NVIDIA GeForce RTX 3090', 'bfloat16', ('RTX 3090', 71.0)),
    ('TPU v4', 'float32', ('TPU v4', 275.0)),
    ('TPU v5 lite', 'bfloat16', ('TPU v5e', 197.0)),
    ('TPU v5', 'bfloat16', ('TPU v5p', 459.0)),
    ('TPU v6 lite', 'bfloat16', ('TPU v6e', 918.0)),
    ('cpu', 'float32', None),
    ('NVIDIA GeForce RTX 3090 Ti', 'bfloat16', None),   # a different card: no guessed peak
])
def test_device_peak_lookup(kind, dtype, expected):
  assert ts.device_peak(kind, dtype) == expected


def test_throughput_and_mfu():
  tflops, mfu = ts.throughput(3e12, 2.0, 'NVIDIA A100-SXM4-80GB', 'bfloat16')
  assert tflops == pytest.approx(1.5)
  assert mfu == pytest.approx(1.5 / 312.0)
  tflops, mfu = ts.throughput(3e12, 2.0, 'cpu', 'float32')
  assert tflops == pytest.approx(1.5) and mfu is None


@pytest.mark.parametrize('op_name,files,part', [
    ('jit(step)/transpose(jvp(bench_loss_fn))/MRQM/backbone/layer1_0/conv/conv_general_dilated', (), 'backbone'),
    ('jit(step)/jvp(bench_loss_fn)/MRQM/neck/add', (), 'neck'),
    ('jit(step)/jvp(bench_loss_fn)/MRQM/encoder/layers_0/dot_general', (), 'encoder'),
    ('jit(step)/jvp(bench_loss_fn)/MRQM/decoder/layers_1/dot_general', (), 'decoder (+ query selection)'),
    ('jit(step)/jvp(bench_loss_fn)/MRQM/enc_class_head/dot_general', (), 'decoder (+ query selection)'),
    ('jit(step)/jvp(bench_loss_fn)/MRQM/top_k', (), 'decoder (+ query selection)'),
    ('jit(step)/transpose(jvp(bench_loss_fn))/MRQM/decoder/bench_aux_query_group/layers_0/add', (),
     'auxiliary heads'),
    ('jit(step)/jvp(bench_loss_fn)/MRQM/aux_query_iah/pos_proj/dot_general', (), 'auxiliary heads'),
    ('jit(step)/jvp(bench_loss_fn)/MRQM/rcnn/rpn/conv', (), 'auxiliary heads'),
    ('jit(step)/jvp(bench_loss_fn)/MRQM/iah.assign/gather', (), 'auxiliary heads'),
    ('jit(step)/jvp(bench_loss_fn)/while', ('/x/mrqm_jax/ops/matching.py', '/x/mrqm_jax/ops/losses.py'),
     'matching'),
    ('jit(step)/jvp(bench_loss_fn)/log1p', ('/x/mrqm_jax/ops/losses.py',), 'losses'),
    ('jit(step)/sqrt', ('/x/optax/_src/transform.py',), 'optimizer'),
    ('', (), 'other'),
])
def test_classify(op_name, files, part):
  assert ts.classify(op_name, files, 'MRQM') == part


def test_op_events_counts_nested_ops_once_and_prefers_device_events():
  op = lambda name, ts_, dur, pid=1, tid=1: {'ph': 'X', 'name': name, 'ts': ts_, 'dur': dur, 'pid': pid,
                                              'tid': tid, 'args': {'hlo_op': name, 'hlo_module': 'jit_step'}}
  host = [op('while.1', 0, 100), op('fusion.1', 10, 20), op('fusion.2', 40, 30), op('dot.1', 100, 5),
          op('dot.2', 0, 50, tid=2)]
  assert sorted(e['name'] for e in ts.op_events(host)) == ['dot.1', 'dot.2', 'while.1']
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 7, 'args': {'name': '/device:GPU:0'}}]
  trace = {'traceEvents': meta + host + [op('fusion.9', 0, 8, pid=7)]}
  assert [e['name'] for e in ts.op_events(trace)] == ['fusion.9']


def test_hlo_metadata_and_parts_of_a_real_profile():
  """A tiny 'step' with the benchmark's loss scope and a while loop: its ops are attributed to 'losses' (inside
  the loss scope, no model scope here) and 'optimizer' (the update outside it), the while body's ops inherit
  the loop's scope, and a profile of one run finds time in exactly those parts."""
  def loss(w, x):
    with jax.named_scope(ts.LOSS_SCOPE):
      y = jax.lax.fori_loop(0, 4, lambda i, c: jnp.tanh(c @ w), x)
      return jnp.sum(y ** 2)

  def step(w, x):
    value, grad = jax.value_and_grad(loss)(w, x)
    return w - 0.1 * grad, {'loss': value}

  w, x = jnp.eye(256) * 0.5, jnp.ones((512, 256))
  compiled = jax.jit(step).lower(w, x).compile()
  metadata = ts.hlo_op_metadata(compiled.as_text())
  body_ops = [name for name, (op, _) in metadata.items() if '/while/body' in op]
  assert body_ops and all(ts.classify(*metadata[n]) == 'losses' for n in body_ops)
  assert any(ts.classify(*m) == 'optimizer' for m in metadata.values())
  compiled(w, x)
  _, split, wall, _ = ts.profile_parts(compiled, w, x, 'MRQM')
  assert split['losses'] > 0 and wall > 0
  assert all(split[p] == 0 for p in ts.PARTS if p not in ('losses', 'optimizer', 'other')), split


@pytest.fixture(scope='module')
def smoke_run():
  """One real run: the smoke model at 64x64 with one auxiliary head (the IAH) and one encoder layer, to keep the
  compile short; with model.remat as in the recipes (the decoder's layers run as a loop)."""
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.input.image_size = (64, 64)
  config.model.aux_heads = ('iah',)
  config.model.remat = True
  config.encoder.num_layers = 1
  lines = []
  result = ts.run(config, steps=1, warmup=0, num_boxes=6, parts=True, print_fn=lines.append)
  return config, result, lines


@pytest.mark.slow
def test_train_step_benchmark_table_adds_up(smoke_run):
  config, result, lines = smoke_run
  table = {line[:28].strip(): line[28:].split() for line in lines if len(line) > 28}
  # TFLOP/s = the step's model FLOPs (jaxpr count) / the median step time; no peak for a CPU.
  assert result['flops'] > 0
  assert result['tflops'] == pytest.approx(result['flops'] / result['step_s'] / 1e12)
  # Process CPU seconds of the same steps (the figure compared with the PyTorch reference's step).
  assert result['step_cpu_s'] > 0 and float(table['step CPU, median (s)'][0]) == pytest.approx(
      result['step_cpu_s'], abs=6e-4)
  assert result['tflops_executed'] == pytest.approx(result['flops_executed'] / result['step_s'] / 1e12)
  # The optimizer has no matmul: the step's jaxpr counts what the loss-and-gradient trace counts; model =
  # executed - recompute; XLA counts the elementwise ops too (and this smoke step has no loop with matmuls).
  assert result['flops_executed'] == result['flops_loss_and_grad']
  assert result['flops'] == result['flops_executed'] - result['flops_recompute'] <= result['flops_executed']
  assert result['while_loops'] == 0 and result['flops_xla'] > result['flops_executed']
  for row, key in (('step GFLOPs, model', 'flops'), ('step GFLOPs, executed', 'flops_executed'),
                   ('step GFLOPs (XLA)', 'flops_xla')):
    assert float(table[row][0]) == pytest.approx(result[key] / 1e9, abs=0.06)
  assert float(table['TFLOP/s'][0]) == pytest.approx(result['tflops'], abs=1e-3)
  assert table['MFU'][0] == 'n/a' and result['mfu'] is None
  # Every part of the step shows up, the table's sum is the sum of its rows, the residual is wall - sum.
  parts = result['parts']
  assert list(parts) == list(ts.PARTS)
  for name in ('backbone', 'neck', 'encoder', 'decoder (+ query selection)', 'auxiliary heads', 'matching',
               'losses', 'optimizer'):
    assert parts[name] > 0, (name, parts)
  rows = {name: float(table[name][0]) for name in ts.PARTS}
  assert float(table['sum of parts'][0]) == pytest.approx(sum(rows.values()), abs=0.002 * len(rows))
  assert float(table['sum of parts'][0]) == pytest.approx(sum(parts.values()), abs=1e-3)
  wall = result['profiled_step_s']
  assert float(table['residual (wall - sum)'][0]) == pytest.approx(wall - sum(parts.values()), abs=1e-3)
  assert 0.2 * wall < sum(parts.values()) < 3 * wall   # the profile saw the step (threads may overlap)
  # One decoder call per auxiliary head's query group was scoped apart from the main decoder call.
  assert result['aux_group_calls'] == len(config.model.aux_heads)


@pytest.mark.slow
def test_train_step_benchmark_last_lines(smoke_run):
  _, result, lines = smoke_run
  last = ts.LAST_LINE.match(lines[-1])
  assert last, lines[-1]
  assert float(last.group(1)) == pytest.approx(result['temp_gib'], abs=1e-3)
  assert float(last.group(2)) == pytest.approx(result['peak_gib'], abs=1e-3)
  assert result['temp_gib'] > 0 and result['peak_gib'] >= result['temp_gib']
  assert lines[-2].startswith('benchmark wall time (s)')
  assert float(lines[-2].split()[-1]) == pytest.approx(result['wall_s'], abs=0.1)
  assert not math.isnan(result['step_s'])


@pytest.mark.slow
def test_flops_only_counts_the_same_from_abstract_shapes(smoke_run):
  """--flops-only traces the step with shapes only (no init computation, no compile) and counts the same."""
  config, result, _ = smoke_run
  lines = []
  traced = ts.run(config, num_boxes=6, flops_only=True, print_fn=lines.append)
  for key in ('flops', 'flops_executed', 'flops_recompute', 'while_loops'):
    assert traced[key] == result[key], key
  assert math.isnan(traced['flops_xla']) and math.isnan(traced['compile_s']) and 'step_s' not in traced
  assert ts.LAST_LINE.match(lines[-1]) and lines[-1] == 'temp_gib=nan peak_gib=nan'
  assert not any(line.startswith('step, median') for line in lines)


def test_bad_flag_is_one_line_and_exit_2():
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run([sys.executable, 'benchmarks/train_step.py', '--config=configs/smoke.py', '--steps=0'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert '--steps' in result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------ benchmarks/device_check.sh
def _device_check(tmp_path, *args, nvidia_smi=None, env_extra=None):
  """Runs device_check.sh with a fake `nvidia-smi` first on PATH (`nvidia_smi`: its output, or None for one
  that finds no GPU)."""
  fake = tmp_path / 'bin'
  fake.mkdir(exist_ok=True)
  script = fake / 'nvidia-smi'
  script.write_text('#!/bin/sh\n' + (f'echo "{nvidia_smi}"\n' if nvidia_smi else 'echo "No devices were found"; exit 6\n'))
  script.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != 'TPU_ACCELERATOR_TYPE'}
  env.update(PATH=f'{fake}{os.pathsep}{os.environ["PATH"]}', PYTHON=sys.executable, **(env_extra or {}))
  return subprocess.run(['bash', str(REPO / 'benchmarks' / 'device_check.sh'), *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=60)


def test_device_check_dry_run_plans_the_extra_and_two_dtypes_at_full_size(tmp_path):
  import re  # pylint: disable=g-import-not-at-top
  from configs import visdrone  # pylint: disable=g-import-not-at-top
  gpu = _device_check(tmp_path, '--dry-run', '--steps', '3', nvidia_smi='GPU 0: NVIDIA H100 (UUID: x)')
  assert gpu.returncode == 0, gpu.stderr
  lines = gpu.stdout.splitlines()
  assert 'accelerator cuda' in lines[0]
  assert lines[1] == f'would run: {sys.executable} -m pip install -e {REPO}[cuda]'
  runs = [line for line in lines if 'train_step.py' in line]
  assert [re.search(r'--config.model.dtype=(\w+)', r).group(1) for r in runs] == ['float32', 'bfloat16']
  config = visdrone.get_config()
  defined = set(re.findall(r"DEFINE_\w+\('([\w-]+)'", (REPO / 'benchmarks' / 'train_step.py').read_text()))
  for run in runs:   # every flag is one train_step.py defines, every config key exists in the recipe
    for flag in re.findall(r' --([\w.-]+)', run):
      if flag.startswith('config.'):
        section, key = flag.split('.')[1:]
        assert key in config[section], flag
      else:
        assert flag in defined | {'config'}, flag
    assert '--config.input.image_size=800,1344' in run and '--config.train.per_device_batch_size=2' in run
    assert '--steps=3' in run
  tpu = _device_check(tmp_path, '--dry-run', env_extra={'TPU_ACCELERATOR_TYPE': 'v5litepod-1'})
  assert tpu.returncode == 0 and f'{REPO}[tpu]' in tpu.stdout, tpu.stdout + tpu.stderr
  assert 'pip' not in _device_check(tmp_path, '--dry-run', '--no-install', '--accelerator=cuda').stdout


@pytest.mark.parametrize('args, message', [((), 'no GPU'), (('--steps', '0'), '--steps'),
                                           (('--accelerator', 'rocm'), '--accelerator'), (('--bogus',), '--bogus')])
def test_device_check_bad_input_is_one_line_exit_2(tmp_path, args, message):
  import glob  # pylint: disable=g-import-not-at-top
  if not args and (glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
    pytest.skip('this machine has a TPU: the no-accelerator case cannot be shown here')
  result = _device_check(tmp_path, *args)
  assert result.returncode == 2 and result.stdout == ''
  assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


@pytest.mark.slow
def test_device_check_summarizes_a_train_step_log(smoke_run, tmp_path):
  config, result, lines = smoke_run
  log = tmp_path / 'float32.log'
  log.write_text('\n'.join(['some pip output'] + lines) + '\n')
  out = _device_check(tmp_path, '--summarize', str(log))
  assert out.returncode == 0, out.stderr
  header, row = out.stdout.splitlines()
  cells = dict(zip(header.split(), row.split()))
  assert cells['dtype'] == config.model.dtype == 'float32'
  assert row.split(maxsplit=len(cells) - 1)[-1] == f"{result['backend']} ({result['device_kind']})"
  assert float(cells['compile_s']) == pytest.approx(result['compile_s'], abs=0.06)
  assert float(cells['step_s']) == pytest.approx(result['step_s'], abs=6e-4)
  assert float(cells['images/s']) == pytest.approx(result['images_per_s'], abs=6e-4)
  assert cells['MFU'] == 'n/a' and cells['dev_peak_GiB'] == '-'   # CPU: no peak FLOP/s, no memory_stats
  assert float(cells['xla_peak']) == pytest.approx(result['peak_gib'], abs=6e-4)
  bad = tmp_path / 'empty.log'
  bad.write_text('no table\n')
  failed = _device_check(tmp_path, '--summarize', str(bad))
  assert failed.returncode == 2 and 'no train_step.py table' in failed.stderr


def test_startup_benchmark_times_one_process():
  """benchmarks/startup.py's per-process numbers: CPU time and peak RSS of that child. Linux folds the memory a
  forked child inherits into its peak RSS, so timed_run runs here from a small parent, as the script does."""
  burn = 'import numpy as np, time\nx = np.ones(64 * 2 ** 20 // 8)\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass'
  probe = ('import importlib.util, json, os, sys\n'
           f'spec = importlib.util.spec_from_file_location("startup", {str(REPO / "benchmarks" / "startup.py")!r})\n'
           'startup = importlib.util.module_from_spec(spec); spec.loader.exec_module(startup)\n'
           f'print(json.dumps([startup.timed_run([sys.executable, "-c", {burn!r}], os.devnull),\n'
           '                   startup.timed_run([sys.executable, "-c", "raise SystemExit(3)"], os.devnull)]))')
  result, failing = json.loads(subprocess.run([sys.executable, '-c', probe], check=True, capture_output=True,
                                              text=True).stdout.splitlines()[-1])
  assert result['rc'] == 0 and failing['rc'] == 3
  assert result['cpu'] >= 0.3 and result['wall'] >= result['cpu'] * 0.5
  assert 0.064 < result['rss_gb'] < 0.5      # the child's 64 MB array and interpreter, not a big parent's memory
