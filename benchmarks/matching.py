r"""Hungarian matching speed: on-device JAX solver vs SciPy host callback, jitted and vmapped over a batch.

  python benchmarks/matching.py [--batch 2] [--repeats 5] [--shapes 900x100,900x500] [--kinds uniform,detr,contested]

Prints the device and a table of median wall times (after compile and one warm-up call) per backend, cost
shape [N x M] and cost kind:
  uniform    i.i.d. U(0, 1) costs: short augmenting paths, the easy case.
  detr       DETR matching cost (2 * class + 5 * L1 + 2 * (-GIoU)) of random query boxes vs random gt boxes.
  contested  every column prefers the same rows (cost = row index + small noise): the longest augmenting paths,
             close to the solver's O(M^2 N) worst case.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mrqm_jax.ops import boxes as box_ops
from mrqm_jax.ops import matching


def make_cost(kind: str, batch: int, num_rows: int, num_cols: int, seed: int = 0) -> np.ndarray:
  """[batch, num_rows, num_cols] float32 cost matrices of the given kind."""
  rng = np.random.default_rng(seed)
  if kind == 'uniform':
    return rng.random((batch, num_rows, num_cols), np.float32)
  if kind == 'contested':
    rows = np.arange(num_rows, dtype=np.float32)[None, :, None]
    return (rows + 0.01 * rng.random((batch, num_rows, num_cols))).astype(np.float32)
  if kind == 'detr':
    pred = np.concatenate([rng.random((batch, num_rows, 2)), 0.02 + 0.2 * rng.random((batch, num_rows, 2))], -1)
    gt = np.concatenate([rng.random((batch, num_cols, 2)), 0.02 + 0.2 * rng.random((batch, num_cols, 2))], -1)
    class_cost = -rng.random((batch, num_rows, num_cols))
    l1 = np.abs(pred[:, :, None, :] - gt[:, None, :, :]).sum(-1)
    giou = np.asarray(box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(jnp.asarray(pred, jnp.float32)),
                                            box_ops.cxcywh_to_xyxy(jnp.asarray(gt, jnp.float32))))
    return (2.0 * class_cost + 5.0 * l1 - 2.0 * giou).astype(np.float32)
  raise ValueError(f'unknown cost kind {kind!r}')


def time_backend(backend: str, cost: np.ndarray, col_valid: np.ndarray, repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of `repeats` calls after a warm-up)."""
  fn = jax.jit(functools.partial(matching.batched_hungarian_match, backend=backend))
  cost, col_valid = jax.device_put(cost), jax.device_put(col_valid)
  start = time.perf_counter()
  jax.block_until_ready(fn(cost, col_valid))
  first = time.perf_counter() - start
  jax.block_until_ready(fn(cost, col_valid))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(cost, col_valid))
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--shapes', default='900x100,900x500')
  parser.add_argument('--kinds', default='uniform,detr,contested')
  args = parser.parse_args()

  print(f'jax {jax.__version__}, backend {jax.default_backend()}, devices: {jax.devices()}')
  print(f'batch {args.batch} (vmapped), median of {args.repeats} runs after compile + warm-up')
  header = (f'{"cost [N x M]":>13} {"kind":>10} {"backend":>8} {"compile+1st (s)":>16} {"median (ms)":>12} '
            f'{"total cost":>14}')
  print(header)
  print('-' * len(header))
  for shape in args.shapes.split(','):
    num_rows, num_cols = (int(x) for x in shape.split('x'))
    for kind in args.kinds.split(','):
      cost = make_cost(kind, args.batch, num_rows, num_cols)
      col_valid = np.ones((args.batch, num_cols), bool)
      for backend in matching.BACKENDS:
        first, median = time_backend(backend, cost, col_valid, args.repeats)
        row_idx, matched = matching.batched_hungarian_match(cost, col_valid, backend)
        # Summed optimum (float64): must agree between backends, so a fast but wrong solver is visible.
        picked = np.take_along_axis(np.float64(cost), np.asarray(row_idx)[:, None, :], 1)[:, 0]
        total = float(picked[np.asarray(matched)].sum())
        print(f'{shape:>13} {kind:>10} {backend:>8} {first:16.2f} {1e3 * median:12.2f} {total:14.4f}')


if __name__ == '__main__':
  main()
