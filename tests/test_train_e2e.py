"""End to end through the CLI on the smoke config: kill -9 and resume == uninterrupted; eval, predict, export.

Each run is a subprocess (the CLI as users call it) sharing the test compilation cache, so the model compiles
once for the whole file.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STEPS = 6
# matcher.backend=jax: JAX never writes an executable with a host callback (the SciPy matcher's) to the persistent
# compilation cache, so with 'auto' (SciPy on CPU) every training run below compiled the train step again (about
# 2 CPU-minutes each, four runs); the device solver's step compiles once for the file. The SciPy matcher through
# training and resuming stays covered end to end by tests/test_notebooks.py and tests/test_smoke_learning.py.
COMMON = [f'--config.train.num_steps={STEPS}', '--config.train.checkpoint_every_steps=3',
          '--config.train.eval_every_epochs=1000', '--config.train.log_every_steps=1',
          '--config.eval.num_images=8', '--config.matcher.backend=jax']


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             JAX_COMPILATION_CACHE_DIR=str(REPO / '.pytest_cache' / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1')
  env.update(extra)
  return env


def _cli(workdir, *args, env=None, check=True):
  result = subprocess.run([sys.executable, '-m', 'mrqm_jax.main', '--config=configs/smoke.py',
                           f'--workdir={workdir}', *args], cwd=REPO, env=env or _env(), capture_output=True,
                          text=True, timeout=900)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


# The CLI with a hook that SIGKILLs the process (no cleanup) right after the checkpoint of step 3 is written.
_KILLED_AFTER_STEP_3 = '''
import os, signal, sys
from mrqm_jax import main, train

def kill_after_step_3(step, ckpt):
  if step == 3:
    ckpt.wait()
    os.kill(os.getpid(), signal.SIGKILL)

train.AFTER_SAVE_HOOKS.append(kill_after_step_3)
sys.argv[0] = 'mrqm_jax.main'
main.run()
'''


def _final_params(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ocp.PyTreeCheckpointer().restore(str(workdir / 'checkpoints' / str(STEPS) / 'state'))
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_leaves_with_path(restored['params'])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """An uninterrupted smoke run (also the checkpoint that eval/predict/export use)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = _cli(workdir, *COMMON)
  return workdir, result


def test_training_prints_mesh_progress_and_writes_events(trained):
  workdir, result = trained
  assert 'mesh' in result.stdout and 'global batch 2' in result.stdout
  assert 'train' in result.stderr and f'{STEPS}/{STEPS}' in result.stderr   # tqdm bar with step counts
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir / 'tensorboard'))
  assert sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()) == [3, 6]


def test_sigkill_then_resume_equals_uninterrupted(trained, tmp_path):
  workdir, _ = trained
  killed = subprocess.run([sys.executable, '-c', _KILLED_AFTER_STEP_3, '--config=configs/smoke.py',
                           f'--workdir={tmp_path}', *COMMON], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert not (tmp_path / 'checkpoints' / str(STEPS)).exists()
  resumed = _cli(tmp_path, *COMMON)
  assert 'resumed from' in resumed.stdout and '(step 3)' in resumed.stdout
  want, got = _final_params(workdir), _final_params(tmp_path)
  assert [p for p, _ in want] == [p for p, _ in got]
  for (path, a), (_, b) in zip(want, got):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_eval_mode_prints_metrics_json(trained):
  workdir, _ = trained
  # With Co-DINO's test-time soft-NMS in the jitted predict function.
  result = _cli(workdir, '--mode=eval', '--config.eval.num_images=8', '--config.eval.soft_nms=True')
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  # visdrone: the paper's COCO-style columns, and the toolkit's numbers under their own prefix.
  assert {'AP', 'AP50', 'AP75', 'AP_S', 'AP_M', 'AP_L', 'toolkit_AP', 'toolkit_AR100', 'toolkit_AR500'} <= set(metrics)
  assert json.loads((workdir / 'eval_metrics.json').read_text()) == metrics


def test_predict_writes_txt_json_png(trained, tmp_path):
  workdir, _ = trained
  images = workdir / 'data' / 'val' / 'images'
  out = tmp_path / 'pred'
  _cli(workdir, '--mode=predict', f'--input={images}', f'--output={out}', '--heatmaps')
  names = sorted(p.stem for p in images.iterdir())
  assert sorted(p.stem for p in out.glob('*.txt')) == names
  assert len(list(out.glob('*_heatmap.png'))) == len(names)
  lines = (out / f'{names[0]}.txt').read_text().splitlines()
  assert lines, 'no detections written'
  x, y, w, h, score, category, a, b = lines[0].split(',')
  assert float(w) >= 0 and float(h) >= 0 and 0 <= float(score) <= 1 and 1 <= int(category) <= 10
  assert (a, b) == ('-1', '-1')
  coco = json.loads((out / 'detections.json').read_text())
  assert len(coco) == sum(len((out / f'{n}.txt').read_text().splitlines()) for n in names)


def test_unreadable_checkpoint_is_one_line(trained, tmp_path):
  bad = tmp_path / 'bad_checkpoint'
  (bad / 'state').mkdir(parents=True)
  (bad / 'state' / 'garbage').write_text('not a checkpoint')
  workdir, _ = trained
  result = _cli(workdir, '--mode=eval', f'--checkpoint={bad}', check=False)
  assert result.returncode == 2
  assert 'cannot read checkpoint' in result.stderr and 'Traceback' not in result.stderr


def test_export_reloads_in_fresh_process_with_same_detections(trained, tmp_path):
  workdir, _ = trained
  out = tmp_path / 'export'
  _cli(workdir, '--mode=export', f'--output={out}')
  script = f'''
import json, sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {str(REPO)!r})
from mrqm_jax import export
call, config = export.load_exported({str(out)!r})
h, w = config['input']['image_size']
rng = np.random.default_rng(0)
image = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
pad = jnp.zeros((2, h, w), bool).at[1, :, w // 2:].set(True)
boxes, scores, labels = call(image, pad)
np.savez({str(tmp_path / 'exported.npz')!r}, boxes=boxes, scores=scores, labels=labels)
'''
  subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=_env(), check=True, timeout=600,
                 capture_output=True)
  exported = np.load(tmp_path / 'exported.npz')
  # The same image through the training code's model and checkpoint.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO))
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from mrqm_jax import export, model_lib  # pylint: disable=g-import-not-at-top
  model, config, variables = model_lib.restore_for_inference(smoke.get_config(), str(workdir))
  params, model_state = model_lib.split_variables(variables)
  h, w = config.input.image_size
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
  pad = jnp.zeros((2, h, w), bool).at[1, :, w // 2:].set(True)
  boxes, scores, labels = jax.jit(export.inference_fn(model, config.eval.max_detections))(
      {'params': params, **model_state}, image, pad)
  np.testing.assert_allclose(exported['scores'], np.asarray(scores), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(exported['boxes'], np.asarray(boxes), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(exported['labels'], np.asarray(labels))


def test_sigterm_saves_and_exits_cleanly(trained, tmp_path):
  """Cloud TPU preemption sends SIGTERM: the run saves the step it reached and exits with code 0."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  args = [a for a in COMMON if 'num_steps' not in a] + ['--config.train.num_steps=100000']
  proc = subprocess.Popen([sys.executable, '-m', 'mrqm_jax.main', '--config=configs/smoke.py',
                           f'--workdir={tmp_path}', *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not (tmp_path / 'checkpoints' / '3').exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'preempted; saved step' in out
  saved = int(out.split('preempted; saved step ')[1].split()[0])
  assert saved >= 3 and (tmp_path / 'checkpoints' / str(saved)).is_dir()


def test_model_override_disagreeing_with_the_checkpoint_is_one_line_before_compiling(trained):
  import time  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  start = time.time()
  result = _cli(workdir, '--mode=eval', '--config.model.hidden_dim=64', check=False)
  assert result.returncode == 2
  assert ('config.model.hidden_dim=64 disagrees with the checkpoint, which was trained with model.hidden_dim=32'
          in result.stderr)
  assert 'Traceback' not in result.stderr
  assert time.time() - start < 60   # no model was compiled


def test_another_recipe_predicts_with_the_model_stored_in_the_checkpoint(trained, tmp_path):
  """configs/visdrone.py describes a ResNet-50 model; the smoke checkpoint's stored config builds the tiny one."""
  workdir, _ = trained
  image = sorted((workdir / 'data' / 'val' / 'images').iterdir())[0]
  result = subprocess.run([sys.executable, '-m', 'mrqm_jax.main', '--config=configs/visdrone.py',
                           f'--workdir={workdir}', '--mode=predict', f'--input={image}', f'--output={tmp_path}',
                           '--config.eval.max_detections=100'], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len((tmp_path / f'{image.stem}.txt').read_text().splitlines()) > 0


def test_a_finished_run_asked_for_fewer_steps_writes_nothing(trained):
  workdir, _ = trained
  before = sorted(os.listdir(workdir / 'checkpoints'))
  result = _cli(workdir, *COMMON[1:], '--config.train.num_steps=4', check=False)
  assert result.returncode == 2
  assert f'already holds step {STEPS} > train.num_steps=4' in result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == before
