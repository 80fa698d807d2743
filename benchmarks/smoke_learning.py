r"""Does the smoke config learn? Trains configs/smoke.py on synthetic data and prints a table.

  python benchmarks/smoke_learning.py [--steps=300] [--workdir=/tmp/mrqm_smoke_learning] [--aux_heads=iah,atss,rcnn]

Prints: steps, wall minutes, loss at start and end, AP / AP50 on held-out synthetic images for the untrained
and the trained model. The last line is one JSON object with the same numbers.
"""

import json
import os
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir (default: a fresh temporary folder).')
_AUX_HEADS = flags.DEFINE_list('aux_heads', None, 'config.model.aux_heads (default: the smoke config\'s).')


def run(steps: int, workdir: str, aux_heads=None) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from mrqm_jax import datasets, evaluate, model_lib, parallel, train  # pylint: disable=g-import-not-at-top

  config = smoke.get_config()
  config.train.num_steps = steps
  config.train.eval_every_epochs = 1000  # evaluate at the end only
  config.train.checkpoint_every_steps = 10 ** 9
  if aux_heads is not None:
    config.model.aux_heads = tuple(aux_heads)

  # Untrained reference: same init as training, scored on the same held-out images.
  mesh = parallel.create_mesh()
  cfg = train.ml_collections.ConfigDict(config.to_dict())
  data = datasets.prepare_data(cfg, workdir)
  datasets.resolve_a_s(cfg, data.train_records)
  cfg.lock()
  model = model_lib.make_model(cfg)
  variables = model_lib.init_variables(model, cfg, jax.random.split(jax.random.PRNGKey(cfg.train.seed))[0])
  before = evaluate.evaluate_params(model, cfg, *model_lib.split_variables(variables), data.eval_records, mesh,
                                    data.class_names)

  start = time.time()
  history = []
  after = train.train_and_evaluate(config, workdir, loss_history=history)
  minutes = (time.time() - start) / 60
  return {'steps': steps, 'minutes': round(minutes, 2), 'aux_heads': list(config.model.aux_heads),
          'loss_start': round(history[0][1], 4) if history else None,
          'loss_end': round(history[-1][1], 4) if history else None,
          'AP_untrained': round(before['AP'], 2), 'AP50_untrained': round(before['AP50'], 2),
          'AP': round(after['AP'], 2), 'AP50': round(after['AP50'], 2)}


def main(argv):
  del argv
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='mrqm_smoke_learning_')
  if not _WORKDIR.value:
    shutil.rmtree(workdir)
  result = run(_STEPS.value, workdir, _AUX_HEADS.value)
  print()
  print(f'{"steps":>6} {"minutes":>8} {"loss start":>11} {"loss end":>9} {"AP0":>6} {"AP50_0":>7} '
        f'{"AP":>6} {"AP50":>6}')
  print(f'{result["steps"]:>6} {result["minutes"]:>8.2f} {result["loss_start"]:>11.4f} '
        f'{result["loss_end"]:>9.4f} {result["AP_untrained"]:>6.2f} {result["AP50_untrained"]:>7.2f} '
        f'{result["AP"]:>6.2f} {result["AP50"]:>6.2f}')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
