r"""Training input pipeline throughput (decode, flip, exact resize, normalize, pad, batch) in images/s.

  python benchmarks/input_pipeline.py [--data DIR[,DIR...]] [--config visdrone|sodad|smoke] [--batch 2]
      [--batches 40] [--parallel -1,1] [--sliced]

Reads VisDrone-layout folders (default: ../shared/data/visdrone/train_sample and val_dev), builds the training
iterator of `input_pipeline.pipeline` at the config's canvas (visdrone: 800 x 1344) and times NumPy host batches
after `--warmup` batches (the first pays for tracing and for filling the prefetch buffer). `--sliced` adds rows
with SODA-D's 800 x 800 patch slicing on the same images (the sodad recipe's canvas). Prints one row per
(folder, config, tf.data parallelism): host batch, images/s, ms per image, and the number of CPU cores TF sees.

`train_pipeline_images_per_sec(config, records, ...)` is the function to call from elsewhere (e.g. to compare
with the train step's images/s): the pipeline can keep up when its images/s exceed the step's.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from input_pipeline import pipeline  # noqa: E402

DEFAULT_DATA = ('../shared/data/visdrone/train_sample', '../shared/data/visdrone/val_dev')


def train_pipeline_images_per_sec(config: ml_collections.ConfigDict, records: list, *, global_batch_size: int,
                                  num_batches: int = 40, warmup_batches: int = 3, seed: int = 0) -> dict:
  """Steady-state throughput of this host's training iterator.

  Returns {'images_per_sec', 'ms_per_image', 'seconds', 'batches', 'host_batch', 'examples_per_epoch'} measured
  over `num_batches` batches after `warmup_batches`.
  """
  iterator = pipeline.train_iterator(config, records, global_batch_size=global_batch_size, seed=seed)
  for _ in range(warmup_batches):
    next(iterator)
  start = time.perf_counter()
  images = 0
  for _ in range(num_batches):
    images += len(next(iterator)['image'])
  seconds = time.perf_counter() - start
  return {'images_per_sec': images / seconds, 'ms_per_image': 1000 * seconds / images, 'seconds': seconds,
          'batches': num_batches, 'host_batch': global_batch_size,
          'examples_per_epoch': iterator.report.num_examples}


def train_step_images_per_sec(config: ml_collections.ConfigDict, records: list, *, global_batch_size: int,
                              num_steps: int = 3) -> dict:
  """Images/s of the jitted train step (full MRQM + objective) on this machine, on real pipeline batches."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mrqm_jax import datasets, model_lib, parallel, train, train_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  datasets.resolve_a_s(config, records)
  mesh = parallel.create_mesh()
  model = model_lib.make_model(config)
  variables = jax.jit(functools.partial(model_lib.init_variables, model, config),
                      out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  params, model_state = model_lib.split_variables(variables)
  tx = train_lib.make_optimizer(config, params, 1000)
  state = jax.jit(functools.partial(train_lib.create_train_state, tx=tx),
                  out_shardings=parallel.replicated(mesh))(params, model_state, rng=jax.random.PRNGKey(1))
  step = train_lib.make_train_step(train.make_loss_fn(model, config), tx, mesh)
  iterator = pipeline.train_iterator(config, records, global_batch_size=global_batch_size)
  start = time.perf_counter()
  state, metrics = step(state, parallel.host_to_global(next(iterator), mesh))
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  batches = [parallel.host_to_global(next(iterator), mesh) for _ in range(num_steps)]
  start = time.perf_counter()
  for batch in batches:
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  return {'images_per_sec': num_steps * global_batch_size / seconds, 'seconds_per_step': seconds / num_steps,
          'compile_seconds': compile_seconds}


def jax_backend() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return f'{jax.default_backend()} x{jax.device_count()}'


def _config(name: str) -> ml_collections.ConfigDict:
  if name == 'visdrone':
    from configs import visdrone as module  # pylint: disable=g-import-not-at-top
  elif name == 'sodad':
    from configs import sodad as module  # pylint: disable=g-import-not-at-top
  elif name == 'smoke':
    from configs import smoke as module  # pylint: disable=g-import-not-at-top
  else:
    raise ValueError(f'unknown config {name!r}')
  return module.get_config()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', default=','.join(DEFAULT_DATA), help='comma-separated VisDrone-layout folders')
  parser.add_argument('--config', default='visdrone')
  parser.add_argument('--batch', type=int, default=2, help='host batch')
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--parallel', default='-1', help='comma-separated input.num_parallel_calls (-1 = AUTOTUNE)')
  parser.add_argument('--sliced', action='store_true', help='also time 800x800 SODA-D slicing (sodad canvas)')
  parser.add_argument('--image_size', default='', help='override the canvas, e.g. 384,640 (the full VisDrone '
                      'train step needs ~29 GiB of XLA:CPU temporaries at 800x1344)')
  parser.add_argument('--train_step', action='store_true',
                      help='also time the full train step at --config on the first folder and print the ratio')
  args = parser.parse_args(argv)

  from input_pipeline import visdrone  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  print(f'TF {tf.__version__}, {os.cpu_count()} CPU cores visible')
  header = (f'{"data":<14} {"images":>6} {"config":<11} {"canvas":>10} {"examples":>8} {"batch":>5} '
            f'{"parallel":>8} {"img/s":>7} {"ms/img":>7}')
  print(header)
  print('-' * len(header))
  variants = [(args.config, False)] + ([('sodad', True)] if args.sliced else [])
  first_pipeline = None   # (records, result) of the first folder's unsliced pipeline, for --train_step
  for folder in args.data.split(','):
    records, _ = visdrone.read_split(folder)
    for config_name, sliced in variants:
      for parallel in [int(p) for p in args.parallel.split(',')]:
        config = _config(config_name)
        config.input.num_parallel_calls = parallel
        if args.image_size and not sliced:
          config.input.image_size = tuple(int(v) for v in args.image_size.split(','))
        if sliced:  # VisDrone images through the SODA-D protocol; the VisDrone class count
          config.dataset.num_classes = 10
          config.dataset.slicing.enabled = True
        result = train_pipeline_images_per_sec(config, records, global_batch_size=args.batch,
                                               num_batches=args.batches, warmup_batches=args.warmup)
        h, w = config.input.image_size
        name = config_name + ('+slice' if sliced else '')
        print(f'{os.path.basename(os.path.normpath(folder)):<14} {len(records):>6} {name:<11} {h:>4}x{w:<5} '
              f'{result["examples_per_epoch"]:>8} {args.batch:>5} {"auto" if parallel < 0 else parallel:>8} '
              f'{result["images_per_sec"]:>7.1f} {result["ms_per_image"]:>7.1f}', flush=True)
        if not sliced and parallel == int(args.parallel.split(',')[0]):
          first_pipeline = first_pipeline or (records, result)
  if args.train_step:
    records, piped = first_pipeline
    step_config = _config(args.config)
    if args.image_size:
      step_config.input.image_size = tuple(int(v) for v in args.image_size.split(','))
    step = train_step_images_per_sec(step_config, records, global_batch_size=args.batch)
    print(f'\ntrain step ({args.config} at {step_config.input.image_size}, batch {args.batch}, {jax_backend()}): {step["images_per_sec"]:.3f} img/s '
          f'({step["seconds_per_step"]:.2f} s/step, compile {step["compile_seconds"]:.0f} s); '
          f'pipeline/step ratio = {piped["images_per_sec"] / step["images_per_sec"]:.1f} (must stay > 1)')


if __name__ == '__main__':
  main()
