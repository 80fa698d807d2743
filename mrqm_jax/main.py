r"""mrqm_jax command line: train, evaluate, predict or export.

  python -m mrqm_jax.main --config=configs/visdrone.py --workdir=DIR [--mode=train|eval|predict|export] \
      [--config.dataset.root=/data/VisDrone] [--config.train.num_steps=1000]

Usage errors (unknown config key, bad mode, missing dataset folder, missing input) print one line naming the
problem and exit with code 2, without a traceback.
"""

import importlib
import importlib.util
import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ('train', 'eval', 'predict', 'export')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and data.')
_MODE = flags.DEFINE_string('mode', 'train', f'One of {"|".join(MODES)}.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'eval/predict/export: checkpoint directory (default: latest in WORKDIR).')
_INPUT = flags.DEFINE_string('input', None, 'predict: an image file or a folder of images.')
_OUTPUT = flags.DEFINE_string('output', None, 'predict/export: output directory.')
_HEATMAPS = flags.DEFINE_bool('heatmaps', False, 'predict: also write query heatmaps (paper Fig. 2).')


class UsageError(Exception):
  """A user mistake reported as one line and exit code 2."""


def _fail(message: str) -> None:
  print(f'mrqm_jax: error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl flag parsing, but a bad flag or config override is one line and exit 2."""
  try:
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    match = re.search(r"flag '(config\.[\w.]+)'", str(e))
    if match:
      _fail(f'unknown config key {match.group(1)!r} (see configs/base.py for every key)')
    _fail(_short(e))
  except flags.Error as e:
    _fail(_short(e))
  except (KeyError, AttributeError) as e:  # an override of a key the locked config does not have
    found = re.findall(r"[A-Za-z_][\w]*", str(e.args[0] if e.args else e).replace('Key', '', 1))
    key = found[0] if found else str(e)
    overrides = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a]
    _fail(f'unknown config key {overrides[0][len("--config."):] if overrides else key!r} (see configs/base.py for every key)')
  except (ValueError, TypeError) as e:
    _fail(f'bad config override: {_short(e)}')
  if flags.FLAGS['config'].present == 0 and _CONFIG.value is None:
    _fail('--config=configs/NAME.py is required')
  try:
    _ = _CONFIG.value.dataset  # a config file that fails to load raises here, not at parse time
  except (OSError, AttributeError, SyntaxError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f'cannot load the config file: {lines[-1] if lines else e}')
  return rest


def _short(e: BaseException) -> str:
  """First line of an exception message, without ml_collections' dump of every field."""
  text = str(e).strip().strip('\'"')
  text = text.split('Other fields present')[0].rstrip(' .')
  return text.splitlines()[0] if text else type(e).__name__


def validate(config, workdir: str, mode: str) -> None:
  """Checks what a user can get wrong before anything heavy starts; raises UsageError."""
  if mode not in MODES:
    raise UsageError(f'--mode={mode!r} is not one of {", ".join(MODES)}')
  if not workdir:
    raise UsageError('--workdir is required')
  root = config.dataset.root
  if mode in ('train', 'eval') and root and not os.path.isdir(root):
    raise UsageError(f'dataset folder not found: config.dataset.root={root!r}')
  if mode == 'predict':
    if not _INPUT.value:
      raise UsageError('--mode=predict needs --input=FILE_OR_DIR')
    if not os.path.exists(_INPUT.value):
      raise UsageError(f'--input not found: {_INPUT.value!r}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  workdir, mode = _WORKDIR.value, _MODE.value
  try:
    validate(config, workdir, mode)
    if '://' not in workdir:  # bucket paths (gs://...) need no local folder
      os.makedirs(workdir, exist_ok=True)
    if mode == 'train':
      _mode_module('train').train_and_evaluate(config, workdir)
    elif mode == 'eval':
      _mode_module('evaluate').evaluate_checkpoint(config, workdir, checkpoint=_CHECKPOINT.value)
    elif mode == 'predict':
      _mode_module('predict').predict_files(config, workdir, _INPUT.value, _OUTPUT.value or os.path.join(workdir, 'predictions'),
                            checkpoint=_CHECKPOINT.value, heatmaps=_HEATMAPS.value)
    elif mode == 'export':
      _mode_module('export').export_model(config, workdir, _OUTPUT.value or os.path.join(workdir, 'export'),
                          checkpoint=_CHECKPOINT.value)
  except UsageError as e:
    _fail(str(e))
  except (FileNotFoundError, NotADirectoryError) as e:  # dataset / checkpoint paths found missing late
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    # Errors our own modules raise for the user (unreadable checkpoint, NaN loss) are one line, not a trace.
    if type(e).__name__ in ('CheckpointError', 'TrainingError'):
      print(f'mrqm_jax: error: {e}', file=sys.stderr)
      sys.exit(1 if type(e).__name__ == 'TrainingError' else 2)
    raise


def _mode_module(name: str):
  """Imports mrqm_jax.<name> lazily (so `--help` and usage errors stay fast)."""
  if importlib.util.find_spec(f'mrqm_jax.{name}') is None:
    raise UsageError(f'mrqm_jax.{name} is not implemented yet in this version')
  return importlib.import_module(f'mrqm_jax.{name}')


def run():
  logging.set_verbosity(logging.WARNING)  # orbax and tf are chatty at INFO; our progress is printed
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
