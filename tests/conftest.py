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

jax.config.update('jax_compilation_cache_dir', str(REPO / '.pytest_cache' / 'jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

try:  # TF must not grab all host threads/memory next to XLA.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
except Exception:  # pragma: no cover - TF absent or already initialised
  pass


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
