r"""Startup of a short training run: the README's 4-step smoke command, first vs cached, in one table.

  python benchmarks/startup.py [--config=configs/smoke.py] [--steps=4] [--cached_runs=2] [--keep=DIR]

Runs `python -m mrqm_jax.main --config=CONFIG --workdir=NEW --config.train.num_steps=STEPS
--config.compilation_cache_dir=C` as separate processes, each in a new workdir holding the same data (made by the
first run; copying it is not timed), in this order:
  first        C empty: every program traced, compiled, written to C
  no-traced    C's executables kept, its traced programs (C/traced, mrqm_jax.traced_cache) removed: each program
               traced and lowered again before the compilation cache answers (what every cached run did before
               traced_cache), and the traced entry written again
  cached x N   both kept: the train step reloaded without tracing
and prints wall seconds, the process's CPU seconds (user + system) and peak RSS per run (wait4's ru_maxrss: Linux
counts in it the memory a forked child inherits, so this script's own small size is included). Quiet machine
wanted: wall time counts whatever else runs.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(command: list[str], log_path: str) -> dict:
  """Runs `command` in ROOT -> {'wall', 'cpu', 'rss_gb', 'rc'} of that one process."""
  with open(log_path, 'w') as log:
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
  process.returncode = os.waitstatus_to_exitcode(status)
  return {'wall': wall, 'cpu': usage.ru_utime + usage.ru_stime, 'rss_gb': usage.ru_maxrss / 2 ** 20,
          'rc': process.returncode}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/smoke.py')
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--cached_runs', type=int, default=2)
  parser.add_argument('--keep', default='', help='folder for the workdirs, cache and logs (default: a temp dir, '
                      'removed at the end)')
  args = parser.parse_args(argv)
  base = args.keep or tempfile.mkdtemp(prefix='mrqm_startup_')
  os.makedirs(base, exist_ok=True)
  cache = os.path.join(base, 'cache')
  data = None
  rows = []
  plan = ['first', 'no-traced'] + [f'cached {i + 1}' for i in range(args.cached_runs)]
  try:
    for i, name in enumerate(plan):
      workdir = os.path.join(base, f'w{i}')
      shutil.rmtree(workdir, ignore_errors=True)
      os.makedirs(workdir)
      if data:
        shutil.copytree(data, os.path.join(workdir, 'data'))
      if name == 'no-traced':
        shutil.rmtree(os.path.join(cache, 'traced'), ignore_errors=True)
      command = [sys.executable, '-m', 'mrqm_jax.main', f'--config={args.config}', f'--workdir={workdir}',
                 f'--config.train.num_steps={args.steps}', f'--config.compilation_cache_dir={cache}']
      result = timed_run(command, os.path.join(base, f'{i}_{name.replace(" ", "_")}.log'))
      rows.append((name, result))
      print(f'{name}: {result["wall"]:.1f} s wall, rc {result["rc"]}', file=sys.stderr, flush=True)
      if result['rc'] != 0:
        print(f'startup: {name} run failed (rc {result["rc"]}); log in {base}', file=sys.stderr)
        args.keep = args.keep or base
        return 1
      if data is None:
        data = os.path.join(workdir, 'data')
  finally:
    if not args.keep:
      shutil.rmtree(base, ignore_errors=True)
  load = os.getloadavg()[0]
  print(f'\n{args.steps}-step run of {args.config}, one process each; load average {load:.2f} at the end')
  print('| run | wall (s) | CPU user+sys (s) | peak RSS (GB) |')
  print('|---|---|---|---|')
  for name, r in rows:
    print(f'| {name} | {r["wall"]:.1f} | {r["cpu"]:.1f} | {r["rss_gb"]:.2f} |')
  cached = [r['wall'] for name, r in rows if name.startswith('cached')]
  print(f'first_s={rows[0][1]["wall"]:.1f} no_traced_s={rows[1][1]["wall"]:.1f} cached_s={min(cached):.1f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
