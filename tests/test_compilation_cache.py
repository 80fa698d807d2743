"""Why the train step was never served from JAX's persistent compilation cache, and that the smoke config's is:
JAX does not write an executable that holds a host callback (the SciPy matcher's pure_callback) to the cache."""

import os
import subprocess
import sys

import pytest

from mrqm_jax.ops import matching
from tests.conftest import REPO

sys.path.insert(0, str(REPO))
from configs import smoke  # noqa: E402  pylint: disable=g-import-not-at-top

_COMPILE = '''
import os, sys
import jax, jax.numpy as jnp
jax.config.update('jax_compilation_cache_dir', sys.argv[1])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
from mrqm_jax.ops import matching
cost = jnp.arange(12.0).reshape(1, 4, 3)
fn = jax.jit(lambda c: matching.hungarian_match_many([(c, jnp.ones((1, 3), bool))], backend=sys.argv[2])[0][0])
fn(cost).block_until_ready()
print(' '.join(sorted(os.listdir(sys.argv[1]))))
'''


def _cached_programs(tmp_path, backend):
  cache = tmp_path / backend
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  out = subprocess.run([sys.executable, '-c', _COMPILE, str(cache), backend], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return [name for name in out.stdout.split() if name.startswith('jit__lambda')]


@pytest.mark.parametrize('backend, cached', [('jax', True), ('scipy', False)])
def test_a_matching_with_a_host_callback_is_never_cached(tmp_path, backend, cached):
  assert bool(_cached_programs(tmp_path, backend)) == cached


def test_the_smoke_config_matches_on_device_so_its_train_step_can_be_cached():
  assert matching.resolve_backend(smoke.get_config().matcher.backend, 'cpu') == 'jax'
