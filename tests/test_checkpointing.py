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


def test_metrics_set_after_the_save_rank_the_best_as_saved_with_them(tmp_path):
  """Training saves a step before its eval and adds the AP afterwards: the same keep-last-K + best-by-AP."""
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  for step, ap in {1: 10.0, 2: 50.0, 3: 20.0, 4: 30.0}.items():
    ckpt.save(step, _state(step), _config(), data_step=step)
    ckpt.set_metrics(step, {'AP': ap})
  assert sorted(ckpt.all_steps()) == [2, 3, 4] and ckpt.best_step() == 2
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)   # a resumed run reads them back
  assert ckpt.best_step() == 2
  ckpt.save(5, _state(5), _config(), data_step=5)
  ckpt.set_metrics(5, {'AP': 1.0})
  assert sorted(ckpt.all_steps()) == [2, 4, 5] and ckpt.best_step() == 2
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


def _two_checkpoints(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, _state(1), _config(), data_step=1)
  ckpt.save(2, _state(2), _config(), data_step=2)
  ckpt.close()
  return tmp_path / 'checkpoints' / '2'


def _truncate_data_files(step_dir):
  for root, _, files in os.walk(step_dir / 'state'):
    for f in files:
      if os.path.basename(root) == 'd':   # the array data (OCDBT), not the metadata
        with open(os.path.join(root, f), 'r+b') as fh:
          fh.truncate(5)


@pytest.mark.parametrize('damage', ['truncated_data', 'missing_metadata', 'truncated_config'])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
  newest = _two_checkpoints(tmp_path)
  if damage == 'truncated_data':
    _truncate_data_files(newest)
  elif damage == 'missing_metadata':
    os.remove(newest / 'state' / '_METADATA')
    os.remove(newest / 'state' / 'manifest.ocdbt')
  else:
    (newest / 'config' / 'metadata').write_text('{"tra')
  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  restored, data_step, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, _state(0)))
  assert data_step == 1
  np.testing.assert_array_equal(np.asarray(restored['opt']['mu']), np.ones((3, 4)))
  out = capsys.readouterr().out
  assert 'checkpoints/2' in out and 'using step 1' in out
  assert 'TensorStore' not in out and '{' not in out and len(out.strip().splitlines()) == 1
  assert newest.is_dir()   # nothing deleted


def test_training_moves_a_damaged_checkpoint_aside_so_its_step_can_be_saved_again(tmp_path):
  newest = _two_checkpoints(tmp_path)
  _truncate_data_files(newest)
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
  _, data_step, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, _state(0)), move_damaged=True)
  assert data_step == 1 and ckpt.all_steps() == [1]
  moved = list((tmp_path / checkpointing.DAMAGED_DIR).iterdir())
  assert len(moved) == 1 and moved[0].name.startswith('2-') and (moved[0] / 'state').is_dir()
  ckpt.save(2, _state(5), _config(), data_step=2)
  ckpt.close()
  assert sorted(checkpointing.Checkpointer(str(tmp_path), read_only=True).all_steps()) == [1, 2]


def test_every_checkpoint_damaged_is_one_line_naming_each(tmp_path):
  newest = _two_checkpoints(tmp_path)
  _truncate_data_files(newest)
  _truncate_data_files(tmp_path / 'checkpoints' / '1')
  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore(jax.tree.map(jnp.zeros_like, _state(0)))
  message = str(e.value)
  assert 'checkpoints/2' in message and 'checkpoints/1' in message and 'truncated or corrupt' in message
  assert '\n' not in message and 'driver' not in message


def test_restore_params_from_path_falls_back_and_reads_the_stored_config(tmp_path, capsys):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
  for step in (1, 2):
    state = {'params': {'w': jnp.full((2, 3), float(step))}, 'model_state': {}}
    ckpt.save(step, state, _config(), data_step=step)
  ckpt.close()
  _truncate_data_files(tmp_path / 'checkpoints' / '2')
  abstract = {'w': jax.ShapeDtypeStruct((2, 3), jnp.float32)}
  for path in (tmp_path, tmp_path / 'checkpoints'):   # a workdir or its checkpoints/ folder
    params, _, folder = checkpointing.restore_params_from_path(str(path), abstract)
    assert folder.name == '1' and float(np.asarray(params['w'])[0, 0]) == 1.0
  assert 'using' in capsys.readouterr().out
  assert checkpointing.read_stored_config(tmp_path / 'checkpoints' / '2')['train']['seed'] == 3
  with pytest.raises(checkpointing.CheckpointError, match=r'differ in shape'):
    checkpointing.restore_params_from_path(str(tmp_path / 'checkpoints' / '1'),
                                           {'w': jax.ShapeDtypeStruct((4, 3), jnp.float32)})
  with pytest.raises(checkpointing.CheckpointError, match='checkpoint folder not found'):
    checkpointing.checkpoint_candidates(str(tmp_path / 'nope'))


def test_a_file_url_workdir_saves_and_restores(tmp_path):
  """Workdirs given as URLs go through etils.epath; file:// is the local one."""
  url = f'file://{tmp_path}'
  ckpt = checkpointing.Checkpointer(url, keep=2)
  ckpt.save(3, _state(3), _config(), data_step=3)
  ckpt.close()
  assert (tmp_path / 'checkpoints' / '3' / 'state').is_dir()
  restored, data_step, _ = checkpointing.Checkpointer(url, read_only=True).restore(
      jax.tree.map(jnp.zeros_like, _state(0)))
  assert data_step == 3
  np.testing.assert_array_equal(np.asarray(restored['opt']['mu']), np.full((3, 4), 3.0))
  assert [p.name for p in checkpointing.checkpoint_candidates(url)] == ['3']
  assert checkpointing.read_stored_config(checkpointing.checkpoint_candidates(url)[0])['train']['seed'] == 3
