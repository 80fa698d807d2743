"""The CLI's usage errors: one line naming the problem, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'mrqm_jax.main', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize('args, expected', [
    (['--config.no_such_key=1'], "unknown config key 'no_such_key'"),
    (['--config.dataset.nokey=1'], "unknown config key 'dataset.nokey'"),
    (['--mode=bogus'], "--mode='bogus' is not one of"),
    (['--config.dataset.root=/no/such/folder'], "dataset folder not found: config.dataset.root='/no/such/folder'"),
    (['--config.train.num_steps=abc'], 'config.train.num_steps=abc'),
    (['--mode=predict'], '--mode=predict needs --input'),
    (['--mode=predict', '--input=/no/such/image.jpg'], "--input not found: '/no/such/image.jpg'"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, expected):
  result = _run('--config=configs/smoke.py', f'--workdir={tmp_path}', *args)
  assert result.returncode == 2, result.stderr
  assert expected in result.stderr
  assert 'Traceback' not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_config_file_is_named(tmp_path):
  result = _run('--config=configs/no_such_config.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert 'configs/no_such_config.py' in result.stderr
  assert 'Traceback' not in result.stderr


def test_recipes_load_and_lock():
  """The recipes carry the paper's numbers and reject unknown keys."""
  sys.path.insert(0, str(REPO))
  from configs import smoke, sodad, visdrone  # pylint: disable=g-import-not-at-top
  for module in (visdrone, sodad):
    c = module.get_config()
    assert c.model.backbone == 'resnet50' and c.model.neck == 'bifpn'
    assert c.encoder.num_layers == 6 and c.decoder.num_layers == 6 and c.decoder.num_queries == 900
    assert c.model.hidden_dim == 256 and c.encoder.num_heads == 8 and c.encoder.num_points == 4
    assert c.train.learning_rate == 2e-4 and c.train.weight_decay == 1e-4 and c.train.grad_clip_norm == 0.1
    assert c.train.num_epochs == 12 and tuple(c.train.lr_drop_epochs) == (11,)
    assert (c.iah.t_b, c.iah.k, c.iah.p) == (0.55, 0.15, 0.2)
  for module in (visdrone, sodad, smoke):
    with pytest.raises(AttributeError):
      module.get_config().train.no_such_key = 1
