r"""What is live at the compiled train step's memory peak, summed by Flax module path (XLA's own attribution).

  XLA_FLAGS=--xla_dump_to=DIR python benchmarks/train_step.py --config=configs/visdrone.py --memory-only
  python benchmarks/peak_breakdown.py DIR [--depth=3] [--top=40]

Reads the `*jit_step*live-range.txt` file XLA writes into DIR, whose "Stack trace breakdown for peak usage" lists
every buffer live at the peak with the op that made it; prints GiB per module path cut at `--depth` components
('jvp(...)' = forward residuals, 'transpose(...)' = backward pass, 'state' = params and optimizer state).
The numbers in docs/DESIGN.md's memory decisions and the closing notes come from this script.
"""

import argparse
import collections
import glob
import os
import re
import sys

GIB = 1024.0 ** 3
_ENTRY = re.compile(r'^      [├└]── (.*) \([0-9.]+%, total: ([0-9 ]+) bytes')


def breakdown(text: str, depth: int) -> tuple[int, collections.Counter]:
  """(total bytes, Counter {module path: bytes}) of the peak's top-level entries."""
  start = text.index('Stack trace breakdown for peak usage')
  totals, overall = collections.Counter(), 0
  for line in text[start:].splitlines()[1:]:
    match = _ENTRY.match(line)
    if not match:
      continue
    name, size = match.group(1), int(match.group(2).replace(' ', ''))
    overall += size
    key = 'state (params + optimizer)' if name.startswith('state') else '/'.join(
        re.sub(r'^jit\(step\)/', '', name).split('/')[:depth])
    totals[key] += size
  return overall, totals


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('dump_dir')
  parser.add_argument('--depth', type=int, default=3)
  parser.add_argument('--top', type=int, default=40)
  args = parser.parse_args()
  files = sorted(glob.glob(os.path.join(args.dump_dir, '*jit_step*live-range.txt')))
  if not files:
    print(f'peak_breakdown: no *jit_step*live-range.txt in {args.dump_dir} (run train_step.py with '
          'XLA_FLAGS=--xla_dump_to=DIR first)', file=sys.stderr)
    return 2
  overall, totals = breakdown(open(files[-1]).read(), args.depth)
  print(f'live at the peak: {overall / GIB:.3f} GiB ({os.path.basename(files[-1])})')
  for key, size in totals.most_common(args.top):
    print(f'{size / GIB:8.3f} GiB  {key}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
