"""Test-wide settings: CPU only, persistent compilation cache, paths to the real data in ../shared."""

import os
import pathlib

# Must be set before jax is imported anywhere.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'

# Starts empty on a fresh CI machine; shared by the tests of one run (both xdist workers) and, through the
# environment, by every subprocess a test starts (CLI runs, notebook kernels), which then load what another test
# compiled. (Executables with host callbacks, e.g. the SciPy matcher's step, are never stored.)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(REPO / '.pytest_cache' / 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))

try:  # TF must not grab all host threads/memory next to XLA.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
except Exception:  # pragma: no cover - TF absent or already initialised
  pass


def pytest_configure(config):
  # `-n 2 --dist loadfile` (README's, CI's command): pytest-xdist by default queues the files by their number of
  # tests, which puts the one-test end-to-end files (minutes each) last, where one worker runs them while the other
  # idles. Keep the collection order below instead.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """Files holding `slow` tests (the compiles and training runs) first, so the many short files fill in behind
  them on whichever worker is free (longest first); test order inside a file is kept (module fixtures)."""
  del config
  slow_files = {item.path for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.path not in slow_files)   # stable


@pytest.fixture(scope='session')
def visdrone_val_dev():
  """../shared/data/visdrone/val_dev (142 real VisDrone val images); skipped, naming the path, if absent."""
  path = SHARED_DATA / 'visdrone' / 'val_dev'
  if not path.is_dir():
    pytest.skip(f'real VisDrone data not found at {path}')
  return path


@pytest.fixture(scope='session')
def visdrone_train_sample():
  path = SHARED_DATA / 'visdrone' / 'train_sample'
  if not path.is_dir():
    pytest.skip(f'real VisDrone data not found at {path}')
  return path


@pytest.fixture(scope='session')
def visdrone_train_annotations():
  path = SHARED_DATA / 'visdrone' / 'train_annotations'
  if not path.is_dir():
    pytest.skip(f'real VisDrone annotations not found at {path}')
  return path
