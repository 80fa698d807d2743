r"""Which batches give the smoke model's train step a non-finite loss or gradient? Prints a table.

  python benchmarks/blank_image_gradient.py [--data_dir=/tmp/mrqm_blank_probe]

One train step of configs/smoke.py (the CLI's step: same config, data, optimizer and shapes, so a compilation
cache filled by a 4-step smoke run serves it) from the initial state, on: a real batch; its images without
boxes; all-zero images (the input pipeline's blank stand-in for an image that cannot be decoded); one all-zero
image next to a real one; constant non-zero images. Why training skips a step whose batch holds a blank
(mrqm_jax/train.py). Columns: loss, grad_norm, the non-finite metrics.
"""

import functools
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/mrqm_blank_probe', 'Where the synthetic smoke data is written.')


def run(workdir: str, print_fn=print) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from mrqm_jax import datasets, main, model_lib, parallel, train, train_lib  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(smoke.get_config().to_dict())
  main.enable_compilation_cache(config.compilation_cache_dir)
  data = datasets.prepare_data(config, workdir)
  datasets.resolve_a_s(config, data.train_records)
  config.lock()
  mesh = parallel.create_mesh()
  batch_size = parallel.global_batch_size(config)
  per_epoch = train.steps_per_epoch(pipeline.num_train_examples(config, data.train_records), batch_size)
  model = model_lib.make_model(config)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
  replicated = parallel.replicated(mesh)
  variables = jax.jit(functools.partial(model_lib.init_variables, model, config),
                      out_shardings=replicated)(init_rng)
  params, model_state = model_lib.split_variables(variables)
  frozen = train._frozen_predicate(config)  # pylint: disable=protected-access  (the training run's own)
  tx = train_lib.make_optimizer(config, params, per_epoch, frozen=frozen)
  state = jax.jit(functools.partial(train_lib.create_train_state, tx=tx),
                  out_shardings=replicated)(params, model_state, rng=state_rng)
  host_state = jax.device_get(state)   # the step donates its state: a fresh copy for every batch
  step = train_lib.make_train_step(train.make_loss_fn(model, config), tx, mesh,
                                   grad_accum_steps=config.train.grad_accum_steps,
                                   minimize_memory=config.model.remat)
  real = next(pipeline.train_iterator(config, data.train_records, global_batch_size=batch_size))
  keys = ('image', 'pad_mask') + train.TARGET_KEYS

  no_boxes = dict(real, boxes=np.zeros_like(real['boxes']), box_valid=np.zeros_like(real['box_valid']))
  blank = dict(no_boxes, image=np.zeros_like(real['image']), pad_mask=np.zeros_like(real['pad_mask']),
               scale=np.ones_like(real['scale']))
  mixed = {k: v.copy() for k, v in real.items()}
  for k in ('image', 'boxes'):
    mixed[k][0] = 0
  mixed['pad_mask'][0] = mixed['box_valid'][0] = False
  mixed['scale'][0] = 1.0
  constant = dict(no_boxes, image=np.full_like(real['image'], 0.5))
  cases = {'real batch': real, 'real images, no boxes': no_boxes, 'all-zero (blank) images, no boxes': blank,
           'image 0 blank, image 1 real with boxes': mixed, 'constant 0.5 images, no boxes': constant}
  results = {}
  print_fn(f'{"batch":<42}{"loss":>10}{"grad_norm":>12}  non-finite')
  for name, batch in cases.items():
    _, metrics = step(jax.device_put(host_state, replicated),
                      parallel.host_to_global({k: batch[k] for k in keys}, mesh))
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in values.items() if not np.isfinite(v))
    results[name] = {'loss': values['loss'], 'grad_norm': values.get('grad_norm', float('nan')), 'non_finite': bad}
    print_fn(f'{name:<42}{values["loss"]:>10.4f}{values.get("grad_norm", float("nan")):>12.4g}  '
             f'{", ".join(bad) or "-"}')
  return results


def main(argv):
  del argv
  run(_DATA_DIR.value)


if __name__ == '__main__':
  app.run(main)
