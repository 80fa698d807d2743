r"""The full training step (forward, every auxiliary head, matching, losses, backward, AdamW): compile time, step
time, images/s and XLA's memory analysis, on whatever backend is present.

  python benchmarks/train_step.py --config=configs/visdrone.py [--config.input.image_size=384,640]
      [--steps=5] [--num_boxes=100] [--memory-only]

The batch is `train.per_device_batch_size x devices` images of the config's canvas with `--num_boxes` random
small boxes each (sides 4..64 px, VisDrone-like), so the matching and the auxiliary heads do real work.
--memory-only compiles the step without running it (works at the full canvas on a machine that could not run
it) and prints XLA's memory analysis of the compiled step; its last line is
`temp_gib=T peak_gib=P` with P = arguments + outputs + temporaries - aliased (donated) bytes.
Otherwise it also runs `--steps` steps after one warm-up and prints the median step time and images/s.
Config overrides (`--config.KEY=VALUE`) work as in `python -m mrqm_jax.main`.
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/visdrone.py.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (after one warm-up).')
_NUM_BOXES = flags.DEFINE_integer('num_boxes', 100, 'Valid boxes per image in the random batch.')
_MEMORY_ONLY = flags.DEFINE_bool('memory-only', False, 'Compile and print the memory analysis; do not run.')

GIB = 1024.0 ** 3


def random_batch(config, batch_size: int, num_boxes: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  h, w = config.input.image_size
  m = config.dataset.max_boxes
  n = min(num_boxes, m)
  sides = rng.uniform(4, 64, (batch_size, m, 2)) / np.array([w, h])
  centres = rng.uniform(0.05, 0.95, (batch_size, m, 2))
  return {'image': rng.normal(size=(batch_size, h, w, 3)).astype(np.float32),
          'pad_mask': np.zeros((batch_size, h, w), bool),
          'boxes': np.concatenate([centres, sides], -1).astype(np.float32),
          'labels': rng.integers(0, config.dataset.num_classes, (batch_size, m)).astype(np.int32),
          'box_valid': np.arange(m)[None, :].repeat(batch_size, 0) < n,
          'scale': np.full((batch_size,), 0.53, np.float32)}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mrqm_jax import model_lib, parallel, train, train_lib  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
  if config.iah.a_s <= 0:       # -1 = auto (resolved from data in training): the value does not change the cost
    config.iah.a_s = 3.0
  config.lock()
  mesh = parallel.create_mesh()
  batch_size = config.train.per_device_batch_size * jax.device_count()
  model = model_lib.make_model(config)
  start = time.perf_counter()
  variables = jax.jit(lambda r: model_lib.init_variables(model, config, r))(jax.random.PRNGKey(0))
  init_seconds = time.perf_counter() - start
  params, model_state = model_lib.split_variables(variables)
  tx = train_lib.make_optimizer(config, params, steps_per_epoch=1000)
  state = jax.jit(lambda p, s: train_lib.create_train_state(p, s, tx, rng=jax.random.PRNGKey(1)),
                  out_shardings=parallel.replicated(mesh))(params, model_state)
  step = train_lib.make_train_step(train.make_loss_fn(model, config), tx, mesh)
  batch = parallel.host_to_global(random_batch(config, batch_size, _NUM_BOXES.value), mesh)

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  h, w = config.input.image_size
  print(f'train step: {_CONFIG.value.get("dataset", {}).get("format", "")} config, canvas {h}x{w}, batch '
        f'{batch_size}, aux_heads={tuple(config.model.aux_heads)}, dtype {config.model.dtype}, backend '
        f'{jax.default_backend()} ({jax.devices()[0].device_kind})')
  print(f'{"init (s)":<28} {init_seconds:>10.1f}')
  print(f'{"compile (s)":<28} {compile_seconds:>10.1f}')
  mem = compiled.memory_analysis()
  temp = peak = float('nan')
  if mem is not None:
    temp = mem.temp_size_in_bytes / GIB
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) / GIB
    print(f'{"arguments (GiB)":<28} {mem.argument_size_in_bytes / GIB:>10.3f}')
    print(f'{"outputs (GiB)":<28} {mem.output_size_in_bytes / GIB:>10.3f}')
    print(f'{"temporaries (GiB)":<28} {temp:>10.3f}')
    print(f'{"aliased (GiB)":<28} {mem.alias_size_in_bytes / GIB:>10.3f}')
    print(f'{"peak (GiB)":<28} {peak:>10.3f}')
  if not _MEMORY_ONLY.value:
    state, metrics = compiled(state, batch)   # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f'{"step, median (s)":<28} {median:>10.3f}   (of {len(times)})')
    print(f'{"images/s":<28} {batch_size / median:>10.3f}')
    print(f'{"loss":<28} {float(metrics["loss"]):>10.3f}')
    devices = jax.local_devices()
    stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      print(f'{"device peak (GiB)":<28} {stats["peak_bytes_in_use"] / GIB:>10.3f}')
  print(f'temp_gib={temp:.3f} peak_gib={peak:.3f}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
