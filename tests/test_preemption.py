"""Preemption on a multi-host job: SIGTERM to ONE of two processes makes BOTH stop at the same step (Orbax's
reached_preemption over JAX's preemption sync service), so every host saves the same checkpoint."""

import os
import re
import signal
import socket
import subprocess
import sys

from tests.conftest import REPO

_WORKER = '''
import sys, time
from mrqm_jax import checkpointing, parallel, train
parallel.initialize_distributed()
import jax
ckpt = checkpointing.Checkpointer(sys.argv[1])
with train._Preemption(ckpt) as preemption:
  for step in range(1, 600):
    time.sleep(0.05)
    print(f'step {step}', flush=True)
    if preemption.should_stop(step):
      print(f'stop {step} process {jax.process_index()}', flush=True)
      break
  else:
    print('ran to the end', flush=True)
'''


def test_sigterm_to_one_host_stops_both_at_the_same_step(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i), JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=str(REPO))
    procs.append(subprocess.Popen([sys.executable, '-c', _WORKER, str(tmp_path)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    seen = []
    for line in procs[1].stdout:
      seen.append(line)
      if line.startswith('step 10'):
        procs[1].send_signal(signal.SIGTERM)   # only host 1 is told
        break
    outputs = [procs[0].communicate(timeout=240)[0], ''.join(seen) + procs[1].communicate(timeout=240)[0]]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  stops = [re.findall(r'stop (\d+) process (\d)', out) for out in outputs]
  assert all(p.returncode == 0 for p in procs), outputs
  assert stops[0] and stops[1], outputs
  assert stops[0][0][0] == stops[1][0][0], stops   # the same step on both hosts
  assert int(stops[0][0][0]) >= 10


_SINGLE_WORKER = '''
import sys, time
from mrqm_jax import train
with train._Preemption() as preemption:
  for step in range(1, 600):
    time.sleep(0.05)
    print(f'step {step}', flush=True)
    if preemption.should_stop(step):
      print(f'stop {step} interrupted {preemption.interrupted}', flush=True)
      time.sleep(float(sys.argv[1]))   # the save
      print('saved', flush=True)
      break
  else:
    print('ran to the end', flush=True)
'''


def _single(second_signal: bool):
  """Runs the worker, Ctrl-C after step 10 and, with `second_signal`, again during its (long) save."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=str(REPO))
  proc = subprocess.Popen([sys.executable, '-c', _SINGLE_WORKER, '60' if second_signal else '0'], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    seen = []
    for line in proc.stdout:
      seen.append(line)
      if line.startswith('step 10'):
        proc.send_signal(signal.SIGINT)
      if line.startswith('stop') and second_signal:
        proc.send_signal(signal.SIGINT)
        break
    out, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, ''.join(seen) + out, err


def test_ctrl_c_stops_the_loop_at_the_next_step_like_sigterm():
  code, out, err = _single(second_signal=False)
  assert code == 0 and 'Traceback' not in err, err
  assert re.search(r'stop 1[01] interrupted True', out) and 'saved' in out, out
  assert 'Ctrl-C: saving the current step' in err


def test_a_second_ctrl_c_exits_at_once_with_130_and_one_line():
  code, out, err = _single(second_signal=True)
  assert code == 130, (out, err)
  assert 'saved' not in out   # did not wait for the 60 s "save"
  assert err.strip().splitlines()[-1] == 'mrqm_jax: interrupted: Ctrl-C again: exiting at once, without saving'
  assert 'Traceback' not in err
