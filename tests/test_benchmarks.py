"""benchmarks/train_step.py: the MFU table lookup, the attribution of HLO ops to parts, the profile parsing, and one
real run of the benchmark on the smoke config at a tiny canvas (its table adds up; its last line is the contract).
No timing is asserted."""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import REPO

_SPEC = importlib.util.spec_from_file_location('train_step_benchmark', REPO / 'benchmarks' / 'train_step.py')
ts = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ts)


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
  # TFLOP/s = XLA's FLOPs of the step / the median step time; no peak for a CPU.
  assert result['flops'] > 0
  assert result['tflops'] == pytest.approx(result['flops'] / result['step_s'] / 1e12)
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


def test_bad_flag_is_one_line_and_exit_2():
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run([sys.executable, 'benchmarks/train_step.py', '--config=configs/smoke.py', '--steps=0'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert '--steps' in result.stderr.strip().splitlines()[-1]
