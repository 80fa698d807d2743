"""WORKDIR/lock: a second training on a live workdir is one line naming the first (pid, host); the lock a
killed run leaves behind is taken over with a warning; the CLI's paths (`~`, `file://`, `gs://`) read one way."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from mrqm_jax import errors, paths, train
from tests.conftest import REPO
from tests.test_run_guards import BOX, _config, _split


def test_a_second_holder_gets_one_line_naming_the_first(tmp_path):
  with paths.WorkdirLock(str(tmp_path)):
    with pytest.raises(errors.WorkdirBusyError,
                       match=rf'--workdir {tmp_path} is in use by another run \(pid {os.getpid()} on host '
                             rf'{socket.gethostname()}, started '):
      with paths.WorkdirLock(str(tmp_path)):
        pass
  with paths.WorkdirLock(str(tmp_path)) as lock:   # released: free again, and not called stale
    assert lock.taken_over == {}


def test_training_on_a_locked_workdir_stops_before_reading_or_writing_anything(tmp_path):
  _split(tmp_path / 'train', {'a': BOX})
  _split(tmp_path / 'val', {'b': BOX})
  work = tmp_path / 'work'
  with paths.WorkdirLock(str(work)):
    with pytest.raises(errors.WorkdirBusyError, match=f'pid {os.getpid()}'):
      train.train_and_evaluate(_config(tmp_path, num_steps=2), str(work))
  assert sorted(os.listdir(work)) == ['lock']   # no checkpoints, no tensorboard


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, capsys):
  code = ('import os, signal, sys; from mrqm_jax import paths; lock = paths.WorkdirLock(sys.argv[1]).__enter__(); '
          'print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)')
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == -signal.SIGKILL, out.stderr
  dead_pid = int(out.stdout.split()[0])
  with paths.WorkdirLock(str(tmp_path)) as lock:
    assert lock.taken_over['pid'] == dead_pid
  assert f'named a run that has ended without releasing it (pid {dead_pid} on host' in capsys.readouterr().err


def test_user_path_expands_home_strips_file_urls_and_keeps_buckets(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert paths.user_path('~/W') == str(tmp_path / 'W')
  assert paths.user_path('file:///data/x') == '/data/x'
  assert paths.user_path('file://~/x') == str(tmp_path / 'x')
  assert paths.user_path('gs://bucket/run') == 'gs://bucket/run'
  assert paths.user_path('runs/a') == 'runs/a' and paths.user_path('') == '' and paths.user_path(None) is None
