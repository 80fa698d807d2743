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
