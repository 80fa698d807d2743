"""The real detector's train step on 4 (virtual) devices equals the same step on 1 device."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

_SCRIPT = textwrap.dedent('''
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from configs import smoke
    from mrqm_jax import model_lib, parallel, train, train_lib
    assert jax.device_count() == 4, jax.devices()
    config = smoke.get_config()
    config.iah.a_s = 16.0
    model = model_lib.make_model(config)
    variables = model_lib.init_variables(model, config, jax.random.PRNGKey(0))
    params, model_state = model_lib.split_variables(variables)
    # Plain SGD with lr 1: the update IS the gradient. (Adam's first step is ~lr*sign(g), which turns harmless
    # float-summation-order differences of near-zero gradients into full-size update differences.)
    import optax
    tx = optax.sgd(1.0)
    rng = np.random.default_rng(0)
    B, (H, W), M = 4, config.input.image_size, config.dataset.max_boxes
    boxes = np.zeros((B, M, 4), np.float32)
    valid = np.zeros((B, M), bool)
    for b in range(B):
      n = 3 + 2 * b
      boxes[b, :n] = np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.03, 0.2, (n, 2))], 1)
      valid[b, :n] = True
    batch = {'image': rng.normal(size=(B, H, W, 3)).astype(np.float32), 'pad_mask': np.zeros((B, H, W), bool),
             'boxes': boxes, 'labels': rng.integers(0, 10, (B, M)).astype(np.int32), 'box_valid': valid,
             'scale': np.full((B,), 0.5, np.float32)}
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = Mesh(np.asarray(devices), ('data',))
      state = jax.jit(functools.partial(train_lib.create_train_state, tx=tx),
                      out_shardings=parallel.replicated(mesh))(params, model_state, rng=jax.random.PRNGKey(1))
      step = train_lib.make_train_step(train.make_loss_fn(model, config), tx, mesh, donate=False)
      state, metrics = step(state, batch)
      out.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = out
    for k in m1:
      np.testing.assert_allclose(m1[k], m4[k], rtol=2e-4, atol=1e-5, err_msg=k)
    grads1 = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), p1, params)
    grads4 = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), p4, params)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads4)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    print('EQUAL loss', float(m1['loss']), float(m4['loss']))
''')


def test_detector_step_on_four_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(REPO / '.pytest_cache' / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1')
  result = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'EQUAL' in result.stdout
