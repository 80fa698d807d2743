r"""Hungarian matching speed: on-device JAX solver vs SciPy host callback, and matching's share of a training step.

  python benchmarks/matching.py [--batch 2] [--repeats 5] [--shapes 900x100,900x500] [--kinds uniform,detr,contested]
  python benchmarks/matching.py --step-share [--config configs/visdrone.py] [--image-size 384,640]
      [--num-boxes 100] [--steps 2] [--backends jax,auto] [--step-seconds S]

Default mode: the device and a table of median wall times (after compile and one warm-up call) per solver, cost
shape [N x M] and cost kind, jitted and vmapped over a batch:
  uniform    i.i.d. U(0, 1) costs: short augmenting paths, the easy case.
  detr       DETR matching cost (2 * class + 5 * L1 + 2 * (-GIoU)) of random query boxes vs random gt boxes.
  contested  every column prefers the same rows (cost = row index + small noise): the longest augmenting paths,
             close to the solver's O(M^2 N) worst case.
The 'scipy' rows also give the host solve alone on one thread and on the thread pool (the callback's pool).

--step-share: the full training step of a config (as benchmarks/train_step.py builds it; random batch with
`--num-boxes` valid small boxes per image, untrained weights) with each `matcher.backend`: the median step time,
the time of all of the step's matchings alone (costs of every decoder layer and the encoder proposals, every
image, and the solve, jitted, on the model's train-mode outputs for that batch after the timed steps), its
share of the step, and for the SciPy solver the host time the callback reported inside the timed steps
(`matching.HOST_STATS`). Needs the step's memory (384x640, batch 2: ~15 GiB): run it under the machine's
memory lock. `--step-seconds S` skips the steps (and their memory) and divides by S, a step time measured by
benchmarks/train_step.py.
"""

import argparse
import functools
import gc
import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mrqm_jax.ops import boxes as box_ops  # pylint: disable=g-import-not-at-top
from mrqm_jax.ops import matching  # pylint: disable=g-import-not-at-top
from benchmarks.train_step import random_batch  # pylint: disable=g-import-not-at-top


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


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `repeats` calls of fn() (blocking on its result)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def host_solve_seconds(cost: np.ndarray, col_valid: np.ndarray, repeats: int) -> tuple[float, float]:
  """(one thread, thread pool) median seconds of the callback's host function alone on these costs."""
  one = median_seconds(lambda: matching._scipy_on_host(cost, col_valid, threads=False), repeats)  # pylint: disable=protected-access
  pool = median_seconds(lambda: matching._scipy_on_host(cost, col_valid, threads=True), repeats)  # pylint: disable=protected-access
  return one, pool


def solver_table(args) -> None:
  print(f'batch {args.batch} (vmapped), median of {args.repeats} runs after compile + warm-up; host solve alone: '
        f'1 thread / pool of {os.cpu_count()} threads')
  header = (f'{"cost [N x M]":>13} {"kind":>10} {"backend":>8} {"compile+1st (s)":>16} {"median (ms)":>12} '
            f'{"total cost":>14} {"host 1 thr (ms)":>16} {"host pool (ms)":>15}')
  print(header)
  print('-' * len(header))
  for shape in args.shapes.split(','):
    num_rows, num_cols = (int(x) for x in shape.split('x'))
    for kind in args.kinds.split(','):
      cost = make_cost(kind, args.batch, num_rows, num_cols)
      col_valid = np.ones((args.batch, num_cols), bool)
      for backend in ('jax', 'scipy'):
        first, median = time_backend(backend, cost, col_valid, args.repeats)
        row_idx, matched = matching.batched_hungarian_match(cost, col_valid, backend)
        # Summed optimum (float64): must agree between backends, so a fast but wrong solver is visible.
        picked = np.take_along_axis(np.float64(cost), np.asarray(row_idx)[:, None, :], 1)[:, 0]
        total = float(picked[np.asarray(matched)].sum())
        host = ''
        if backend == 'scipy':
          one, pool = host_solve_seconds(cost, col_valid, args.repeats)
          host = f'{1e3 * one:16.2f} {1e3 * pool:15.2f}'
        print(f'{shape:>13} {kind:>10} {backend:>8} {first:16.2f} {1e3 * median:12.2f} {total:14.4f} {host}')


def _load_config(path: str, image_size: str):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if image_size:
    config.input.image_size = tuple(int(x) for x in image_size.split(','))
  if config.iah.a_s <= 0:       # -1 = auto (resolved from data in training): the value does not change the cost
    config.iah.a_s = 3.0
  return config


def step_share(args) -> None:
  """Matching's share of the training step, per matcher backend (see module docstring).

  Order keeps the process's peak at the step's: every backend's steps run first, then one forward pass (on the
  weights after those steps) gives the outputs that the matching-alone timings use.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mrqm_jax import model_lib, parallel, train, train_lib  # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import losses  # pylint: disable=g-import-not-at-top

  base = _load_config(args.config, args.image_size)
  mesh = parallel.create_mesh()
  batch_size = base.train.per_device_batch_size * jax.device_count()
  host_batch = random_batch(base, batch_size, args.num_boxes)
  model = model_lib.make_model(base)
  params, model_state = model_lib.split_variables(
      jax.jit(lambda r: model_lib.init_variables(model, base, r))(jax.random.PRNGKey(0)))
  h, w = base.input.image_size
  print(f'step share: canvas {h}x{w}, batch {batch_size}, {args.num_boxes} valid boxes of '
        f'{base.dataset.max_boxes} per image, aux_heads={tuple(base.model.aux_heads)}, untrained weights; '
        + (f'step time given: {args.step_seconds} s' if args.step_seconds > 0 else
           f'{args.steps} timed steps after a warm-up'), flush=True)

  configs, steps = {}, {}
  for backend in args.backends.split(','):
    config = ml_collections.ConfigDict(base.to_dict())
    config.matcher.backend = backend
    config.lock()
    configs[backend] = config
    if args.step_seconds > 0:   # the step measured elsewhere (benchmarks/train_step.py): do not run it here
      steps[backend] = (float('nan'), args.step_seconds, 'not run (--step-seconds)')
      continue
    tx = train_lib.make_optimizer(config, params, steps_per_epoch=1000)
    state = jax.jit(lambda p, s, tx=tx: train_lib.create_train_state(p, s, tx, rng=jax.random.PRNGKey(1)),
                    out_shardings=parallel.replicated(mesh))(params, model_state)
    step = train_lib.make_train_step(train.make_loss_fn(model, config), tx, mesh)
    batch = parallel.host_to_global(host_batch, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, batch)   # warm-up
    jax.block_until_ready(metrics)
    matching.HOST_STATS.reset()
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    stats = matching.HOST_STATS
    host = (f'{stats.seconds / args.steps:.3f} s in {stats.calls / args.steps:g} call(s) of '
            f'{stats.problems // max(stats.calls, 1)} problems' if stats.calls else '-')
    steps[backend] = (compile_seconds, statistics.median(times), host)
    print(f'{backend}: compile {compile_seconds:.1f} s, step times {[round(t, 2) for t in times]}, host solve '
          f'{host}', flush=True)
    params, model_state = state.params, state.model_state
    del state, metrics, compiled, step, batch
    gc.collect()

  # The step's forward outputs (train mode): what every matching of the step sees.
  forward = jax.jit(lambda p, s, b, r: model.apply({'params': p, **s}, b['image'], b['pad_mask'], targets={
      k: b[k] for k in train.TARGET_KEYS}, train=True, rngs={'dropout': r, 'dn': r, 'aux': r}))
  full = forward(params, model_state, host_batch, jax.random.PRNGKey(2))
  outputs = {'pred_logits': full['pred_logits'], 'pred_boxes': full['pred_boxes'],
             'aux_outputs': {k: full['aux_outputs'][k] for k in ('pred_logits', 'pred_boxes')},
             'enc_outputs': {k: full['enc_outputs'][k] for k in ('pred_logits', 'pred_boxes')}}
  jax.block_until_ready(outputs)
  del full, forward
  gc.collect()
  targets = {k: host_batch[k] for k in train.TARGET_KEYS}
  num_sets = outputs['aux_outputs']['pred_logits'].shape[0] + 2

  header = (f'{"backend":>8} {"solver":>7} {"compile (s)":>12} {"step (s)":>9} {"matching (s)":>13} '
            f'{"share":>7}  host solve inside the step, per step')
  print(f'matching = costs + solve of all {num_sets} query sets (decoder layers + encoder proposals) x '
        f'{outputs["pred_logits"].shape[1]} queries x {batch_size} images, jitted alone, median of 5')
  print(header)
  print('-' * len(header))
  for backend, config in configs.items():

    def all_matchings(outs, tgts, config=config):
      gt_boxes, gt_labels, gt_valid = losses._sanitize_targets(tgts, outs['pred_logits'].shape[-1])  # pylint: disable=protected-access
      logits = jnp.concatenate([outs['aux_outputs']['pred_logits'], outs['pred_logits'][None]], 0)
      boxes = jnp.concatenate([outs['aux_outputs']['pred_boxes'], outs['pred_boxes'][None]], 0)
      sets = [(logits, boxes), (outs['enc_outputs']['pred_logits'], outs['enc_outputs']['pred_boxes'])]
      return losses.match_query_sets(sets, gt_boxes, gt_labels, gt_valid, config)

    match_fn = jax.jit(all_matchings)
    jax.block_until_ready(match_fn(outputs, targets))   # compile + warm-up
    match_seconds = median_seconds(lambda: match_fn(outputs, targets), 5)
    compile_seconds, step_seconds, host = steps[backend]
    print(f'{backend:>8} {matching.resolve_backend(backend):>7} {compile_seconds:12.1f} {step_seconds:9.2f} '
          f'{match_seconds:13.3f} {100 * match_seconds / step_seconds:6.1f}%  {host}')

  # The cost matrices alone (same for every backend): matching minus this is the solve.
  def all_costs(outs, tgts):
    gt_boxes, gt_labels, _ = losses._sanitize_targets(tgts, outs['pred_logits'].shape[-1])  # pylint: disable=protected-access
    cost_fn = jax.vmap(lambda lg, bx, gb, gl: losses.matching_cost(lg, bx, gb, gl, base))
    layers = jax.vmap(cost_fn, in_axes=(0, 0, None, None))(
        jnp.concatenate([outs['aux_outputs']['pred_logits'], outs['pred_logits'][None]], 0),
        jnp.concatenate([outs['aux_outputs']['pred_boxes'], outs['pred_boxes'][None]], 0), gt_boxes, gt_labels)
    enc = cost_fn(outs['enc_outputs']['pred_logits'], outs['enc_outputs']['pred_boxes'], gt_boxes, gt_labels)
    return layers, enc

  cost_fn = jax.jit(all_costs)
  jax.block_until_ready(cost_fn(outputs, targets))
  print(f'cost matrices alone (in every row above): {median_seconds(lambda: cost_fn(outputs, targets), 5):.3f} s')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--shapes', default='900x100,900x500')
  parser.add_argument('--kinds', default='uniform,detr,contested')
  parser.add_argument('--step-share', action='store_true', help='matching\'s share of the training step')
  parser.add_argument('--config', default='configs/visdrone.py')
  parser.add_argument('--image-size', default='384,640', help='H,W canvas override for --step-share')
  parser.add_argument('--num-boxes', type=int, default=100)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--backends', default='jax,auto')
  parser.add_argument('--step-seconds', type=float, default=0.0,
                      help='--step-share without running the step: the share against this step time (s)')
  args = parser.parse_args()
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, devices: {jax.devices()}, '
        f'{os.cpu_count()} CPUs')
  if args.step_share:
    step_share(args)
  else:
    solver_table(args)


if __name__ == '__main__':
  main()
