r"""XLA:TPU memory of the training step per chip x model.dtype x per-chip batch, as ONE table (deviceless compiles).

  pip install 'jax[tpu]==0.10.2'      # libtpu: the TPU compiler; no TPU needed (as benchmarks/tpu_aot_memory.py)
  python benchmarks/tpu_memory_table.py [--config=configs/visdrone.py] [--image_size=800,1344]
      [--results=benchmarks/data/tpu_memory_800x1344.jsonl] [--rows=v5e:bfloat16:2,v5e:float32:2,...]
      [--timeout=3600] [--print_only]

Each row is one `benchmarks/tpu_aot_memory.py` run (a compile of the whole step for one chip of that generation,
in its own process, so that host memory is returned between rows), appended as one JSON line to --results when
it ends; rows already measured there are skipped (a failed one, e.g. killed, runs again), so an interrupted
table resumes where it stopped. A row XLA:TPU refuses to compile because the step needs more than the chip's HBM
(RESOURCE_EXHAUSTED) is recorded as not fitting.
The default rows come in priority order: the paper's per-chip batch 2 in bfloat16 on the 16 GiB v5e first.

Columns: temporaries and peak (tpu_aot_memory.py's `temp_gib` / `peak_gib`: arguments + outputs + temporaries -
donated), the chip's HBM (Cloud TPU documentation per chip), fits = peak <= HBM, the compile's wall time and the
host's peak RSS of that compile (this machine's cost of the row).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# HBM per chip in GiB (Cloud TPU system architecture pages: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB).
CHIPS = {'v5e': ('v5e:1x1', 16.0), 'v4': ('v4:1x1x1', 32.0), 'v5p': ('v5p:1x1x1', 95.0), 'v6e': ('v6e:1x1', 32.0)}
DTYPES = ('bfloat16', 'float32')
BATCHES = (2, 1)
# Priority order (the issue): v5e bf16 b2 (the target), v5e f32 b2, v5e bf16 b1, then the rest, chip by chip.
DEFAULT_ROWS = (('v5e', 'bfloat16', 2), ('v5e', 'float32', 2), ('v5e', 'bfloat16', 1), ('v5e', 'float32', 1)) + tuple(
    (chip, dtype, batch) for chip in ('v6e', 'v4', 'v5p') for dtype in DTYPES for batch in BATCHES)
FINISHED = ('ok', 'over_hbm')   # statuses that count as a measured row
_LAST_LINE = re.compile(r'temp_gib=([0-9.]+) peak_gib=([0-9.]+)')
_COMPILE = re.compile(r'^compile \(s\)\s+([0-9.]+)', re.M)


def parse_rows(text: str) -> tuple[tuple[str, str, int], ...]:
  """'v5e:bfloat16:2,v4:float32:1' -> ((chip, dtype, batch), ...); ValueError naming the bad entry."""
  rows = []
  for item in filter(None, (s.strip() for s in text.split(','))):
    parts = item.split(':')
    if len(parts) != 3 or parts[0] not in CHIPS or parts[1] not in DTYPES or not parts[2].isdigit() \
        or int(parts[2]) < 1:
      raise ValueError(f'--rows entry {item!r} must be CHIP:DTYPE:BATCH with CHIP in {tuple(CHIPS)}, DTYPE in '
                       f'{DTYPES}, BATCH >= 1')
    rows.append((parts[0], parts[1], int(parts[2])))
  return tuple(rows)


def row_key(record: dict) -> tuple:
  return (record['chip'], record['dtype'], record['batch'], tuple(record['image_size']), record['config'])


def load_results(path: str) -> list[dict]:
  """The JSON lines of `path` (none if it does not exist); a truncated last line (a killed run) is ignored."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def append_record(path: str, record: dict) -> None:
  """Appends `record` as one JSON line, on a line of its own even after a killed run's unterminated line."""
  with open(path, 'a+b') as f:
    f.seek(0, os.SEEK_END)
    if f.tell():
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        f.write(b'\n')
    f.write((json.dumps(record) + '\n').encode())


def record_from_output(chip: str, dtype: str, batch: int, image_size, config: str, returncode: int,
                       output: str, wall_s: float, host_rss_gib: float) -> dict:
  """One table row from a tpu_aot_memory.py run's exit status and output (stdout + stderr)."""
  hbm = CHIPS[chip][1]
  record = {'chip': chip, 'topology': CHIPS[chip][0], 'dtype': dtype, 'batch': batch,
            'image_size': [int(v) for v in image_size], 'config': config, 'hbm_gib': hbm,
            'wall_s': round(wall_s, 1), 'host_rss_gib': round(host_rss_gib, 2)}
  match = _LAST_LINE.search(output)
  compile_s = _COMPILE.search(output)
  if returncode == 0 and match:
    temp, peak = float(match.group(1)), float(match.group(2))
    record.update(status='ok', temp_gib=temp, peak_gib=peak, fits=peak <= hbm,
                  compile_s=float(compile_s.group(1)) if compile_s else None)
  elif 'RESOURCE_EXHAUSTED' in output:
    line = next(l for l in output.splitlines() if 'RESOURCE_EXHAUSTED' in l)
    record.update(status='over_hbm', fits=False, error=line.strip()[:300])
  else:
    tail = [l for l in output.splitlines() if l.strip()][-1:] or ['']
    record.update(status='failed', returncode=returncode, error=tail[0].strip()[:300])
  return record


def format_table(records: list[dict]) -> str:
  lines = [f'{"chip":5s} {"dtype":9s} {"batch":>5s} {"canvas":>9s} {"temp GiB":>9s} {"peak GiB":>9s} '
           f'{"HBM GiB":>8s} {"fits":>4s} {"compile s":>9s} {"host RSS GiB":>12s}']
  for r in records:
    canvas = 'x'.join(str(v) for v in r['image_size'])
    if r['status'] == 'ok':
      temp, peak, fits = f'{r["temp_gib"]:.2f}', f'{r["peak_gib"]:.2f}', 'yes' if r['fits'] else 'no'
      compile_s = f'{r["compile_s"]:.0f}' if r.get('compile_s') is not None else '-'
    elif r['status'] == 'over_hbm':
      temp, peak, fits, compile_s = '-', f'>{r["hbm_gib"]:.0f}', 'no', '-'
    else:
      temp, peak, fits, compile_s = '-', '-', '?', f'failed rc={r.get("returncode")}'
    lines.append(f'{r["chip"]:5s} {r["dtype"]:9s} {r["batch"]:5d} {canvas:>9s} {temp:>9s} {peak:>9s} '
                 f'{r["hbm_gib"]:8.0f} {fits:>4s} {compile_s:>9s} {r["host_rss_gib"]:12.1f}')
  return '\n'.join(lines)


def run_row(chip: str, dtype: str, batch: int, image_size, config: str, timeout: float) -> dict:
  """Compiles one row in a child process (tpu_aot_memory.py) and returns its record."""
  h, w = image_size
  cmd = [sys.executable, os.path.join(HERE, 'tpu_aot_memory.py'), f'--config={config}',
         f'--topology={CHIPS[chip][0]}', f'--config.model.dtype={dtype}',
         f'--config.train.per_device_batch_size={batch}', f'--config.input.image_size={h},{w}']
  start = time.perf_counter()
  with tempfile.TemporaryFile() as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    timed_out = False
    while True:   # os.wait4: this child's own peak RSS (RUSAGE_CHILDREN would be the max over every row so far)
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      if not timed_out and time.perf_counter() - start > timeout:
        proc.kill()
        timed_out = True
      time.sleep(1.0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    output = log.read().decode(errors='replace') + (f'\ntimed out after {timeout:.0f} s' if timed_out else '')
  return record_from_output(chip, dtype, batch, image_size, config, proc.returncode, output,
                            time.perf_counter() - start, usage.ru_maxrss / 2**20)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/visdrone.py')
  parser.add_argument('--image_size', default='800,1344', help='H,W of the canvas')
  parser.add_argument('--results', default=os.path.join(HERE, 'data', 'tpu_memory_800x1344.jsonl'))
  parser.add_argument('--rows', default='', help='CHIP:DTYPE:BATCH,... (default: every row, priority order)')
  parser.add_argument('--timeout', type=float, default=3600.0, help='seconds per row')
  parser.add_argument('--print_only', action='store_true', help='print the table of --results; compile nothing')
  args = parser.parse_args(argv)
  try:
    rows = parse_rows(args.rows) if args.rows else DEFAULT_ROWS
    image_size = tuple(int(v) for v in args.image_size.split(','))
    if len(image_size) != 2 or min(image_size) < 32:
      raise ValueError
  except ValueError as e:
    parser.error(str(e) or f'--image_size must be H,W (>= 32 each), got {args.image_size!r}')
  records = load_results(args.results)
  done = {row_key(r) for r in records if r['status'] in FINISHED}   # a failed row (killed, timed out) runs again
  if not args.print_only:
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    for chip, dtype, batch in rows:
      key = (chip, dtype, batch, image_size, args.config)
      if key in done:
        continue
      print(f'compiling {chip} {dtype} batch {batch} at {image_size[0]}x{image_size[1]} ...', flush=True)
      record = run_row(chip, dtype, batch, image_size, args.config, args.timeout)
      append_record(args.results, record)
      records.append(record)
      done.add(key)
  wanted = {(c, d, b) for c, d, b in rows}
  latest = {row_key(r): r for r in records}   # the last record of each row (a retried row's result)
  shown = [r for r in latest.values() if (r['chip'], r['dtype'], r['batch']) in wanted
           and tuple(r['image_size']) == image_size and r['config'] == args.config]
  print(f'XLA:TPU memory analysis of the training step ({args.config}, deviceless compile, one chip), '
        f'{args.results}:')
  print(format_table(shown))
  return 0


if __name__ == '__main__':
  sys.exit(main())
