"""The data-parallel step: 4 devices == 1 device, gradient accumulation == one big batch, optimizer groups."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pytest

from mrqm_jax import errors, parallel, train_lib
from tests.conftest import REPO
from configs import co_dino, smoke, sodad, visdrone


@pytest.mark.parametrize('recipe', [visdrone, sodad, co_dino])
@pytest.mark.parametrize('devices', [1, 2])
def test_recipe_global_batch_is_fixed_whatever_the_device_count(recipe, devices):
  """The paper's batch is 2: a recipe must not become batch 16 on 8 devices at the same learning rate."""
  config = recipe.get_config()
  assert parallel.global_batch_size(config, device_count=devices, process_count=1) == 2
  assert 'fixed whatever the device count' in parallel.describe_global_batch(config, device_count=devices)


def test_minus_one_global_batch_grows_with_devices_and_says_so():
  config = smoke.get_config()
  config.train.global_batch_size = -1
  assert [parallel.global_batch_size(config, device_count=n, process_count=1) for n in (1, 4)] == [2, 8]
  line = parallel.describe_global_batch(config, device_count=4)
  assert line.startswith('global batch 8 (train.global_batch_size=-1: per_device_batch_size 2 x 4 device(s)')
  assert 'grows with the device count' in line


def test_global_batch_the_devices_cannot_split_is_one_line_saying_what_to_set():
  config = visdrone.get_config()
  with pytest.raises(errors.ConfigError) as e:
    parallel.global_batch_size(config, device_count=8, process_count=1)
  message = str(e.value)
  assert message.startswith('config.train.global_batch_size=2 is not divisible by the 8 devices')
  assert 'multiple of 8' in message and '\n' not in message and e.value.exit_code == 2
  config.train.grad_accum_steps = 4
  with pytest.raises(errors.ConfigError, match='grad_accum_steps=4'):
    parallel.global_batch_size(config, device_count=1, process_count=1)


def test_param_labels_by_path():
  params = {'backbone': {'stem': {'kernel': 1.0}, 'layer2': {'kernel': 2.0}}, 'decoder': {'w': 3.0}}
  labels = train_lib.param_labels(params, frozen=lambda names: names[:2] == ('backbone', 'stem'))
  assert labels == {'backbone': {'stem': {'kernel': 'frozen'}, 'layer2': {'kernel': 'backbone'}},
                    'decoder': {'w': 'rest'}}


def test_optimizer_freezes_scales_backbone_lr_and_drops_at_epoch():
  config = smoke.get_config()
  config.train.learning_rate = 0.1
  config.train.backbone_lr_mult = 0.1
  config.train.weight_decay = 0.0
  config.train.grad_clip_norm = 1e9
  config.train.lr_drop_epochs = (2,)
  params = {'backbone': {'stem': jnp.ones(2), 'layer2': jnp.ones(2)}, 'head': jnp.ones(2)}
  tx = train_lib.make_optimizer(config, params, steps_per_epoch=3,
                                frozen=lambda n: n[:2] == ('backbone', 'stem'))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  sizes = []
  for _ in range(8):
    updates, state = tx.update(grads, state, params)
    sizes.append({k: float(jnp.abs(v).max()) for k, v in
                  {'stem': updates['backbone']['stem'], 'layer2': updates['backbone']['layer2'],
                   'head': updates['head']}.items()})
  assert all(s['stem'] == 0.0 for s in sizes)
  # Adam's first step has |update| = lr exactly.
  np.testing.assert_allclose(sizes[0]['head'], 0.1, rtol=1e-5)
  np.testing.assert_allclose(sizes[0]['layer2'], 0.01, rtol=1e-5)
  # Epoch 2 starts at step 6: lr x 0.1 from there on (constant gradients keep Adam's ratio at 1).
  np.testing.assert_allclose(sizes[5]['head'], 0.1, rtol=1e-4)
  np.testing.assert_allclose(sizes[6]['head'], 0.01, rtol=1e-4)


def _toy_loss(params, model_state, batch, rng):
  del model_state, rng
  pred = jnp.tanh(batch['x'] @ params['w1']) @ params['w2']
  err = ((pred - batch['y']) ** 2).sum(-1)
  loss = err.mean()
  return loss, {'max_err': err.max()}


def test_grad_accumulation_equals_one_big_batch():
  mesh = parallel.create_mesh()
  rng = np.random.default_rng(0)
  params = {'w1': jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
            'w2': jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}
  batch = {'x': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
           'y': jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
  tx = optax.sgd(0.1)
  results = []
  for accum in (1, 4):
    state = train_lib.create_train_state(params, {}, tx, jax.random.PRNGKey(0))
    step = train_lib.make_train_step(_toy_loss, tx, mesh, grad_accum_steps=accum, donate=False)
    new_state, metrics = step(state, batch)
    results.append((new_state.params, metrics))
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results[0][1]['loss'], results[1][1]['loss'], rtol=1e-5)


_FOUR_DEVICES = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh
    from mrqm_jax import train_lib
    from tests.test_train_lib import _toy_loss
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    params = {'w1': jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
              'w2': jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}
    batch = {'x': rng.normal(size=(8, 3)).astype(np.float32), 'y': rng.normal(size=(8, 2)).astype(np.float32)}
    tx = optax.adamw(1e-2)
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = Mesh(np.asarray(devices), ('data',))
      state = train_lib.create_train_state(params, {}, tx, jax.random.PRNGKey(0))
      step = train_lib.make_train_step(_toy_loss, tx, mesh, donate=False)
      for _ in range(3):
        state, metrics = step(state, batch)
      out.append(jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    print('EQUAL')
''')


def test_step_on_four_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _FOUR_DEVICES], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'EQUAL' in result.stdout


_TWO_PROCESS_WORKER = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from mrqm_jax import parallel, train_lib
    from tests.test_train_lib import _toy_loss
    parallel.initialize_distributed()
    mesh = parallel.create_mesh()
    rng = np.random.default_rng(0)
    params = {'w1': jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
              'w2': jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}
    batch = {'x': rng.normal(size=(8, 3)).astype(np.float32), 'y': rng.normal(size=(8, 2)).astype(np.float32)}
    # Each host feeds only its own contiguous share of the global batch.
    share = 8 // jax.process_count()
    lo = jax.process_index() * share
    local = {k: v[lo:lo + share] for k, v in batch.items()}
    tx = optax.adamw(1e-2)
    state = train_lib.create_train_state(params, {}, tx, jax.random.PRNGKey(0))
    step = train_lib.make_train_step(_toy_loss, tx, mesh, donate=False)
    for _ in range(3):
      state, metrics = step(state, parallel.host_to_global(local, mesh))
    w = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(jax.device_get(state.params))])
    print('PARAMS', ' '.join(f'{v:.7e}' for v in w), 'LOSS', float(metrics['loss']))
''')


def _params_line(stdout):
  line = [l for l in stdout.splitlines() if l.startswith('PARAMS')][0]
  values = line.split()[1:]
  return np.asarray([float(v) for v in values if v != 'LOSS'])


def test_two_processes_equal_one_process():
  """jax.distributed over localhost with CPU (gloo) collectives: 2 hosts x 1 device == 1 host x 1 device."""
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  base_env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  single = subprocess.run([sys.executable, '-c', _TWO_PROCESS_WORKER], cwd=REPO, env=base_env,
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  procs = []
  for pid in range(2):
    env = dict(base_env, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_WORKER], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  want = _params_line(single.stdout)
  for out, _ in outs:
    np.testing.assert_allclose(_params_line(out), want, rtol=1e-5, atol=1e-6)
