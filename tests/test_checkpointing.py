"""Checkpointer: exact round trip, keep-last-K plus best-by-AP, clear errors for unreadable checkpoints."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mrqm_jax import checkpointing


def _state(seed):
  k = jax.random.PRNGKey(seed)
  return {'params': {'w': jax.random.normal(k, (3, 4)), 'b': jnp.arange(4.0)},
          'opt': {'mu': jnp.ones((3, 4)) * seed}, 'step': jnp.asarray(seed, jnp.int32)}


def _config():
  c = ml_collections.ConfigDict({'train': {'seed': 3, 'lr_drop_epochs': (11,)}})
  c.lock()
  return c


def test_round_trip_is_exact_and_stores_config_and_data_position(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  state = _state(7)
  ckpt.save(10, state, _config(), data_step=10)
  restored, data_step, config = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  assert data_step == 10
  assert config['train']['seed'] == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.close()


def test_keeps_last_k_and_best_ap(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  aps = {1: 10.0, 2: 50.0, 3: 20.0, 4: 30.0, 5: 25.0}
  for step, ap in aps.items():
    ckpt.save(step, _state(step), _config(), data_step=step, metrics={'AP': ap})
  ckpt.wait()
  assert sorted(ckpt.all_steps()) == [2, 4, 5]   # best (AP 50) + the latest two
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
  ckpt.close()
  # A resumed run (new manager over the same folder) still knows and keeps the best.
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  for step in (6, 7):
    ckpt.save(step, _state(step), _config(), data_step=step, metrics={'AP': 1.0})
  ckpt.wait()
  assert sorted(ckpt.all_steps()) == [2, 6, 7]
  assert ckpt.best_step() == 2
  ckpt.close()


def test_unreadable_checkpoint_names_the_folder(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  state = _state(1)
  ckpt.save(1, state, _config(), data_step=1)
  ckpt.close()
  # Corrupt every array file of the saved state.
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '1' / 'state'):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  with pytest.raises(checkpointing.CheckpointError, match='checkpoints/1'):
    ckpt.restore(jax.tree.map(jnp.zeros_like, state))


def test_no_checkpoint_is_a_clear_error(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError, match='no checkpoint'):
    ckpt.restore(_state(0))
