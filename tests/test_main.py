"""The CLI's usage errors: one line naming the problem, exit code 2, no traceback."""

import os
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
    # Values the parser accepts but the code cannot use: named with what the key accepts, before any compile.
    (['--config.input.image_size=abc'], "config.input.image_size=('abc',): expected a tuple of 2 integers"),
    (['--config.dataset.format=bogus'], "config.dataset.format='bogus': expected one of"),
    (['--config.model.backbone=resnet999'], "config.model.backbone='resnet999': expected one of 'resnet18'"),
    (['--config.train.per_device_batch_size=0'], 'config.train.per_device_batch_size=0: expected an integer >= 1'),
    (['--config.model.pretrained=x.pth'], "config.model.pretrained='x.pth': expected ImageNet weights"),
    (['--config.iah.a_s=0'], 'config.iah.a_s=0.0: expected a positive number (px^2) or -1 (auto'),
    (['--config.iah.a_s=auto', '--config.iah.t_b=1.5'], 'config.iah.t_b=1.5'),   # 'auto' itself is accepted
    (['--mode=eval', '--checkpoint=/nonexistent'], "--checkpoint not found: '/nonexistent'"),
    (['--mode=eval'], 'no checkpoint in'),
    (['--mode=export'], 'train first or pass --checkpoint'),
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
  from configs import co_dino, smoke, sodad, visdrone  # pylint: disable=g-import-not-at-top
  for module in (visdrone, sodad):
    c = module.get_config()
    assert c.model.backbone == 'resnet50' and c.model.neck == 'bifpn'
    assert c.encoder.num_layers == 6 and c.decoder.num_layers == 6 and c.decoder.num_queries == 900
    assert c.model.hidden_dim == 256 and c.encoder.num_heads == 8 and c.encoder.num_points == 4
    assert c.train.learning_rate == 2e-4 and c.train.weight_decay == 1e-4 and c.train.grad_clip_norm == 0.1
    assert c.train.num_epochs == 12 and tuple(c.train.lr_drop_epochs) == (11,)
    assert (c.iah.t_b, c.iah.k, c.iah.p) == (0.55, 0.15, 0.2)
  for module in (visdrone, sodad, co_dino):   # Co-DINO's behaviour by default (docs/DESIGN.md, v0.4)
    c = module.get_config()
    assert c.train.global_batch_size == 2 and c.model.pretrained == '' and c.dn.group_rule == 'batch'
    assert c.input.resize_rule == 'mmdet'
  for module in (visdrone, sodad, smoke):
    with pytest.raises(AttributeError):
      module.get_config().train.no_such_key = 1


def test_predict_refuses_to_write_into_its_input_folder(tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  (images / 'a.png').write_bytes(b'not decoded before the check')
  for output in (images, images / 'out'):
    result = _run('--config=configs/smoke.py', f'--workdir={tmp_path / "w"}', '--mode=predict', f'--input={images}',
                  f'--output={output}')
    assert result.returncode == 2 and 'input folder' in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert sorted(p.name for p in images.iterdir()) == ['a.png']   # nothing created in the input folder


def test_unwritable_workdir_is_one_line_before_any_compile(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  result = _run('--config=configs/smoke.py', f'--workdir={blocker / "run"}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'mrqm_jax: error: --workdir {blocker / "run"} is not writable '
                                                '(Not a directory)']


def test_compilation_cache_is_on_by_default_in_the_user_cache_dir_and_switchable(tmp_path):
  code = ('import jax; from mrqm_jax import main; print(main.enable_compilation_cache({!r})); '
          'print(jax.config.jax_compilation_cache_dir)')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS='cpu')

  def run(setting):
    out = subprocess.run([sys.executable, '-c', code.format(setting)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()

  expected = str(tmp_path / 'mrqm_jax' / 'jax')
  assert run('auto') == [expected, expected] and os.path.isdir(expected)
  assert run('') == ['None', 'None']
  assert run(str(tmp_path / 'mine')) == [str(tmp_path / 'mine')] * 2


def test_predict_into_a_folder_of_annotations_is_refused_naming_a_file(tmp_path):
  """The issue's case: --output=DATASET/val/annotations replaced the ground truth with predictions."""
  images, annotations = tmp_path / 'val' / 'images', tmp_path / 'val' / 'annotations'
  images.mkdir(parents=True)
  annotations.mkdir()
  for name in ('a', 'b'):
    (images / f'{name}.jpg').write_bytes(b'not decoded before the check')
    (annotations / f'{name}.txt').write_text('1,2,3,4,1,4,0,0\n')
  result = _run('--config=configs/smoke.py', f'--workdir={tmp_path / "w"}', '--mode=predict', f'--input={images}',
                f'--output={annotations}')
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      f'mrqm_jax: error: --output={annotations} already holds {annotations / "a.txt"} (and 1 more of the files it '
      'would write): predict never replaces a file; choose an empty folder or pass --overwrite']
  assert all((annotations / f'{n}.txt').read_text() == '1,2,3,4,1,4,0,0\n' for n in 'ab')


def _run_in(cwd, env_updates, *args):
  env = dict(os.environ, PYTHONPATH=str(REPO), **env_updates)   # this checkout, from any folder
  return subprocess.run([sys.executable, '-m', 'mrqm_jax.main', f'--config={REPO / "configs" / "smoke.py"}', *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_home_and_file_url_workdirs_mean_one_folder_everywhere(tmp_path):
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir()
  cwd.mkdir()
  result = _run_in(cwd, {'HOME': str(home)}, '--workdir=~/W', '--mode=eval')
  assert result.returncode == 2 and f'no checkpoint in {home / "W"}' in result.stderr, result.stderr
  assert (home / 'W').is_dir() and not (cwd / '~').exists()   # no literal ./~ folder
  result = _run_in(cwd, {}, f'--workdir=file://{tmp_path / "F"}', '--mode=eval')   # was KeyError: 'file://'
  assert result.returncode == 2 and f'no checkpoint in {tmp_path / "F"}' in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and (tmp_path / 'F').is_dir()


_PATCHED_MAIN = '''
import sys
from mrqm_jax import errors, main, model_lib
def boom(*args, **kwargs):
  raise {exception}
model_lib.inference_config = boom
sys.argv = ['mrqm_jax', '--config=configs/smoke.py', '--workdir=' + sys.argv[1], '--mode=eval']
main.run()
'''


@pytest.mark.parametrize('exception, code, line', [
    ("TypeError('a bug deep inside')", 1,
     'mrqm_jax: error: unexpected TypeError: a bug deep inside (a bug; traceback in {log})'),
    ('KeyboardInterrupt()', 130, 'mrqm_jax: interrupted: stopped by Ctrl-C (SIGINT)'),
    ("errors.Interrupted('Ctrl-C: saved step 7 to X')", 130, 'mrqm_jax: interrupted: Ctrl-C: saved step 7 to X'),
])
def test_an_unexpected_exception_is_one_line_naming_the_log_with_the_traceback(tmp_path, exception, code, line):
  result = subprocess.run([sys.executable, '-c', _PATCHED_MAIN.format(exception=exception), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == code, result.stderr
  log = tmp_path / 'error.log'
  assert result.stderr.strip().splitlines()[0].startswith(line.format(log=log)), result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and 'Traceback' not in result.stderr
  if code == 1:
    text = log.read_text()
    assert 'Traceback (most recent call last)' in text and "TypeError: a bug deep inside" in text
    assert '--mode=eval' in text
