"""Guards that stop a run before anything compiles: splits that resolve to the same data, a training set
without boxes, a finished workdir asked for fewer steps, an unwritable workdir; evaluate_files matching no
result file. Each is one line (a UsageError) and none writes anything."""

import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
from PIL import Image
import pytest

from input_pipeline import readers
from mrqm_jax import checkpointing, datasets, errors, evaluate_files, main, train
from tests.conftest import REPO

sys.path.insert(0, str(REPO))
from configs import smoke  # noqa: E402  pylint: disable=g-import-not-at-top

BOX = '2,3,10,8,1,4,0,0\n'   # x, y, w, h, score, category 4 (car), truncation, occlusion


def _split(folder, annotations):
  """folder/images/NAME.jpg + folder/annotations/NAME.txt."""
  os.makedirs(folder / 'images', exist_ok=True)
  os.makedirs(folder / 'annotations', exist_ok=True)
  for name, text in annotations.items():
    Image.new('RGB', (40, 30), (90, 120, 30)).save(folder / 'images' / f'{name}.jpg')
    (folder / 'annotations' / f'{name}.txt').write_text(text)
  return folder


def _config(root, **train):
  c = ml_collections.ConfigDict(smoke.get_config().to_dict())
  c.dataset.root = str(root)
  for k, v in train.items():
    c.train[k] = v
  return c


def test_a_root_holding_one_split_is_not_used_for_both_train_and_eval(tmp_path):
  _split(tmp_path, {'a': BOX, 'b': BOX})
  c = _config(tmp_path)
  with pytest.raises(ValueError, match=r"train_split='train' and config.dataset.eval_split='val' both resolve to"):
    readers.check_distinct_splits(c.dataset)
  with pytest.raises(errors.ConfigError, match='eval_split=train to evaluate on the training images on purpose'):
    datasets.prepare_data(c, str(tmp_path / 'work'))
  c.dataset.eval_split = 'train'   # the user's explicit choice
  data = datasets.prepare_data(c, str(tmp_path / 'work'))
  assert len(data.train_records) == len(data.eval_records) == 2


def test_separate_split_folders_pass(tmp_path):
  _split(tmp_path / 'train', {'a': BOX})
  _split(tmp_path / 'val', {'b': BOX})
  readers.check_distinct_splits(_config(tmp_path).dataset)
  data = datasets.prepare_data(_config(tmp_path), str(tmp_path / 'work'))
  assert [r.name for r in data.train_records] == ['a'] and [r.name for r in data.eval_records] == ['b']


def test_num_classes_disagreeing_with_the_data_is_a_config_error(tmp_path):
  _split(tmp_path / 'train', {'a': BOX})
  _split(tmp_path / 'val', {'b': BOX})
  c = _config(tmp_path)
  c.dataset.num_classes = 3
  with pytest.raises(errors.ConfigError, match='config.dataset.num_classes=3 but the visdrone dataset'):
    datasets.prepare_data(c, str(tmp_path / 'work'))


def test_a_training_set_without_boxes_is_one_line(tmp_path):
  _split(tmp_path / 'train', {'a': '', 'b': ''})
  _split(tmp_path / 'val', {'c': BOX})
  with pytest.raises(errors.UsageError, match=r'no box in the 2 training images'):
    train.train_and_evaluate(_config(tmp_path), str(tmp_path / 'work'))
  assert not (tmp_path / 'work' / 'checkpoints').exists()


def test_a_finished_workdir_asked_for_fewer_steps_writes_nothing(tmp_path):
  _split(tmp_path / 'train', {'a': BOX})
  _split(tmp_path / 'val', {'b': BOX})
  work = tmp_path / 'work'
  ckpt = checkpointing.Checkpointer(str(work))
  ckpt.save(10, {'w': jnp.ones(3)}, _config(tmp_path), data_step=10)
  ckpt.close()
  before = sorted(os.listdir(work / 'checkpoints'))
  with pytest.raises(errors.UsageError, match=r'already holds step 10 > train.num_steps=4: nothing to train'):
    train.train_and_evaluate(_config(tmp_path, num_steps=4), str(work))
  assert sorted(os.listdir(work / 'checkpoints')) == before == ['10']
  assert not (work / 'tensorboard').exists()
  # The same num_steps: nothing to do, said so, nothing compiled or written.
  assert train.train_and_evaluate(_config(tmp_path, num_steps=10), str(work)) == {}
  assert sorted(os.listdir(work / 'checkpoints')) == ['10'] and not (work / 'tensorboard').exists()


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(errors.UsageError, match=r'--workdir .*a_file/sub is not writable'):
    main.check_writable(str(blocker / 'sub'), '--workdir')
  main.check_writable(str(tmp_path / 'new' / 'dir'), '--workdir')
  assert os.listdir(tmp_path / 'new' / 'dir') == []   # the probe is removed


def test_evaluate_files_with_no_matching_result_file_is_an_error(tmp_path):
  data = _split(tmp_path / 'data', {'a': BOX, 'b': BOX})
  results = tmp_path / 'results'
  results.mkdir()
  with pytest.raises(errors.UsageError, match=r'none of the 0 result files .* no .txt file at all'):
    evaluate_files.evaluate_folder('visdrone', str(data), str(results))
  (results / 'zzz.txt').write_text('2,3,10,8,0.9,4,-1,-1\n')
  with pytest.raises(errors.UsageError, match=r'none of the 1 result files'):
    evaluate_files.evaluate_folder('visdrone', str(data), str(results))
  # NAME.jpg.txt (predict's name for images sharing a stem) is read as NAME's result.
  (results / 'a.jpg.txt').write_text('2,3,10,8,0.9,4,-1,-1\n')
  (results / 'b.jpg.txt').write_text('2,3,10,8,0.9,4,-1,-1\n')
  metrics = evaluate_files.evaluate_folder('visdrone', str(data), str(results))
  assert max(metrics.values()) == pytest.approx(100.0)   # a perfect detection, whatever the metric keys


@pytest.mark.parametrize('line, match', [('2,3,10,8,0.9,1e300,-1,-1', 'category .1e300. is out of range'),
                                         ('1e308,3,1e308,8,0.9,4,-1,-1', 'x . w or y . h is too large')])
def test_evaluate_files_numbers_beyond_range_are_one_line(tmp_path, line, match):
  """Used to escape as OverflowError / ValueError tracebacks from the metrics."""
  data = _split(tmp_path / 'data', {'a': BOX})
  results = tmp_path / 'results'
  results.mkdir()
  (results / 'a.txt').write_text(line + '\n')
  with pytest.raises(errors.UsageError, match=match):
    evaluate_files.evaluate_folder('visdrone', str(data), str(results))


def test_evaluate_files_cli_empty_results_exit_2(tmp_path):
  data = _split(tmp_path / 'data', {'a': BOX})
  (tmp_path / 'results').mkdir()
  result = subprocess.run([sys.executable, '-m', 'mrqm_jax.evaluate_files', f'--dataset={data}',
                           f'--results={tmp_path / "results"}'], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if 'evaluate_files' in l]
  assert lines and lines[-1].startswith('evaluate_files: error: none of the 0 result files')
  assert 'Traceback' not in result.stderr


def _stub_model_and_step(monkeypatch, eval_fn):
  """The loop without a model: 2 parameters, a step that returns them unchanged, eval = `eval_fn`. Nothing
  of the detector compiles; the data, the loop, the checkpoints and the signal handling are the real ones."""
  import jax  # pylint: disable=g-import-not-at-top
  from mrqm_jax import evaluate, model_lib, train_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(model_lib, 'make_model', lambda config: None)
  monkeypatch.setattr(model_lib, 'init_variables', lambda model, config, rng: {'params': {'w': jnp.zeros(2)}})
  monkeypatch.setattr(train_lib, 'make_train_step',
                      lambda *a, **k: jax.jit(lambda state, batch: (state, {'loss': jnp.float32(1.0)})))
  monkeypatch.setattr(evaluate, 'make_predict_fn', lambda *a, **k: None)
  monkeypatch.setattr(evaluate, 'evaluate_params', eval_fn)


def _two_image_run(tmp_path, num_steps):
  _split(tmp_path / 'train', {'a': BOX, 'b': BOX})
  _split(tmp_path / 'val', {'c': BOX})
  c = _config(tmp_path, num_steps=num_steps, eval_every_epochs=100, checkpoint_every_steps=100)
  return c, str(tmp_path / 'work')


def test_a_failing_final_eval_never_loses_the_trained_step(tmp_path, monkeypatch):
  def failing_eval(*args, **kwargs):
    raise RuntimeError('the eval broke')

  _stub_model_and_step(monkeypatch, failing_eval)
  config, work = _two_image_run(tmp_path, num_steps=3)
  with pytest.raises(RuntimeError, match='the eval broke'):
    train.train_and_evaluate(config, work)
  ckpt = checkpointing.Checkpointer(work, read_only=True)
  assert ckpt.all_steps() == [3]   # saved before the eval
  ckpt.close()


def test_the_final_eval_ap_still_ranks_the_step_saved_before_it(tmp_path, monkeypatch):
  _stub_model_and_step(monkeypatch, lambda *a, **k: {'AP': 12.5})
  config, work = _two_image_run(tmp_path, num_steps=2)
  assert train.train_and_evaluate(config, work) == {'AP': 12.5}
  ckpt = checkpointing.Checkpointer(work, read_only=True)
  assert ckpt.all_steps() == [2] and ckpt.best_step() == 2
  ckpt.close()


def test_two_eval_images_of_one_stem_stop_training_before_anything_compiles(tmp_path):
  """Used to pass the reader, train to the end and fail in the final eval ('duplicate record names')."""
  _split(tmp_path / 'train', {'a': BOX})
  _split(tmp_path / 'val', {'x': BOX})
  Image.new('RGB', (40, 30)).save(tmp_path / 'val' / 'images' / 'x.png')
  with pytest.raises(errors.DataError, match=r"two images share the name 'x' \(.*x.jpg and .*x.png\)"):
    train.train_and_evaluate(_config(tmp_path), str(tmp_path / 'work'))
  assert not (tmp_path / 'work' / 'checkpoints').exists()


def test_eval_mode_reads_a_root_that_holds_only_the_eval_split(tmp_path, monkeypatch):
  from mrqm_jax import evaluate, model_lib  # pylint: disable=g-import-not-at-top

  class Reached(Exception):
    pass

  def restore(*args, **kwargs):
    raise Reached()   # the data was read; the model is not needed to show it

  _split(tmp_path / 'val', {'x': BOX})
  monkeypatch.setattr(model_lib, 'inference_config', lambda config, *a, **k: config)
  monkeypatch.setattr(model_lib, 'restore_for_inference', restore)
  with pytest.raises(Reached):
    evaluate.evaluate_checkpoint(_config(tmp_path), str(tmp_path / 'work'))
  with pytest.raises(FileNotFoundError, match="VisDrone split 'train' not found"):   # training still needs it
    datasets.prepare_data(_config(tmp_path), str(tmp_path / 'work'))


def test_ctrl_c_in_training_saves_the_step_and_raises_interrupted(tmp_path, monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  from mrqm_jax import train_lib  # pylint: disable=g-import-not-at-top
  _stub_model_and_step(monkeypatch, lambda *a, **k: pytest.fail('evaluated'))
  calls = []

  def step(state, batch):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C during the second step
    return state, {'loss': jnp.float32(1.0)}

  monkeypatch.setattr(train_lib, 'make_train_step', lambda *a, **k: step)
  config, work = _two_image_run(tmp_path, num_steps=50)
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(errors.Interrupted, match=r'Ctrl-C: saved step 2 to .*checkpoints; the same command resumes') as e:
    train.train_and_evaluate(config, work)
  assert e.value.exit_code == 130 and len(calls) == 2
  ckpt = checkpointing.Checkpointer(work, read_only=True)
  assert ckpt.all_steps() == [2]
  ckpt.close()
  assert signal.getsignal(signal.SIGINT) == before   # the caller's handler is back


@pytest.mark.parametrize('damaged', [1, 2])   # one of the batch's two images, or both
def test_a_batch_with_an_undecodable_image_is_skipped_and_counted_not_trained(tmp_path, monkeypatch, capsys,
                                                                              damaged):
  """Blank stand-ins of undecodable images gave a NaN gradient ('non-finite loss at step 1'), also next to a real
  image."""
  from mrqm_jax import train_lib  # pylint: disable=g-import-not-at-top
  _stub_model_and_step(monkeypatch, lambda *a, **k: {'AP': 0.0})
  batches = []

  def step(state, batch):
    batches.append(batch)
    return state, {'loss': jnp.float32(1.0)}

  monkeypatch.setattr(train_lib, 'make_train_step', lambda *a, **k: step)
  read = datasets.prepare_data

  def read_then_damage(config, workdir, **kwargs):
    data = read(config, workdir, **kwargs)
    for record in data.train_records[:damaged]:   # damaged after the reader checked them, as on a flaky disk
      with open(record.file_name, 'wb') as f:
        f.write(b'\xff\xd8 no longer a jpeg \xff\xd9')
    return data

  monkeypatch.setattr(datasets, 'prepare_data', read_then_damage)
  config, work = _two_image_run(tmp_path, num_steps=2)
  train.train_and_evaluate(config, work)
  assert batches == []   # never trained on blanks
  assert '2 step(s) skipped because an image of their batch could not be decoded (steps 1, 2' in capsys.readouterr().out
  ckpt = checkpointing.Checkpointer(work, read_only=True)
  assert ckpt.all_steps() == [2]
  ckpt.close()
