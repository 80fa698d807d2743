r"""mrqm_jax command line: train, evaluate, predict or export.

  python -m mrqm_jax.main --config=configs/visdrone.py --workdir=DIR [--mode=train|eval|predict|export] \
      [--config.dataset.root=/data/VisDrone] [--config.train.num_steps=1000]

Every path given (--workdir, --input, --output, --checkpoint, dataset.root, model.pretrained) is read once by
`paths.user_path` (`~`, `file://`, `gs://`). Before anything compiles, the flags, every config value
(mrqm_jax/config_validation.py), the folders that must be written, predict's outputs (no existing file replaced
without --overwrite) and, for eval/predict/export, the checkpoint and its stored config are checked. A problem
prints one line naming it and exits with code 2, without a traceback: every error meant for the user is an
`errors.UsageError` (a non-finite loss, `errors.TrainingError`, exits with 1; Ctrl-C, `errors.Interrupted`, with
130). Any other exception is a bug: one line naming WORKDIR/error.log, where its traceback is written; exit 1.
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

from mrqm_jax import config_validation  # noqa: E402
from mrqm_jax import errors  # noqa: E402
from mrqm_jax import paths  # noqa: E402

MODES = ('train', 'eval', 'predict', 'export')
PROG = 'mrqm_jax'

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and data.')
_MODE = flags.DEFINE_string('mode', 'train', f'One of {"|".join(MODES)}.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'eval/predict/export: checkpoint directory (default: latest in WORKDIR).')
_INPUT = flags.DEFINE_string('input', None, 'predict: an image file or a folder of images.')
_OUTPUT = flags.DEFINE_string('output', None, 'predict/export: output directory.')
_HEATMAPS = flags.DEFINE_bool('heatmaps', False, 'predict: also write query heatmaps (paper Fig. 2).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'predict: replace result files already in --output (default: refuse, naming one).')

UsageError = errors.UsageError


def _fail(message: str, exit_code: int = 2) -> None:
  errors.fail(PROG, message, exit_code)


def _parse_flags(argv):
  """absl flag parsing, but a bad flag or config override is one line and exit 2."""
  # iah.a_s is a float whose auto value is -1; the word 'auto' keeps working on the command line.
  argv = ['--config.iah.a_s=-1' if a == '--config.iah.a_s=auto' else a for a in argv]
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


_is_url = paths.is_url

PATH_KEYS = paths.CONFIG_PATH_KEYS


def normalize_config_paths(config) -> None:
  """`~` expanded and `file://` stripped in the config's path keys (in place), as paths.user_path does."""
  for section, key in PATH_KEYS:
    holder = config[section] if section else config
    value = holder[key]
    if isinstance(value, str) and value not in ('', 'auto'):
      holder[key] = paths.user_path(value)


def check_writable(folder: str, what: str) -> None:
  """Creates `folder` if needed and writes a probe file there; UsageError (one line) if it cannot."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(folder)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.mrqm_write_probe_{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError locally; bucket libraries raise their own)
    why = getattr(e, 'strerror', None) or errors.one_line(e, 160)
    raise UsageError(f'{what} {folder} is not writable ({why})') from None


def validate(config, workdir: str, mode: str, input_path: str | None = None, checkpoint: str | None = None
             ) -> None:
  """Checks what a user can get wrong before anything heavy starts; raises UsageError."""
  if mode not in MODES:
    raise UsageError(f'--mode={mode!r} is not one of {", ".join(MODES)}')
  if not workdir:
    raise UsageError('--workdir is required')
  config_validation.validate(config, mode)
  root = config.dataset.root
  if mode in ('train', 'eval') and root and not _is_url(root) and not os.path.isdir(root):
    raise UsageError(f'dataset folder not found: config.dataset.root={root!r}')
  if mode == 'predict':
    if not input_path:
      raise UsageError('--mode=predict needs --input=FILE_OR_DIR')
    if not os.path.exists(input_path):
      raise UsageError(f'--input not found: {input_path!r}')
  if checkpoint and not _is_url(checkpoint) and not os.path.exists(checkpoint):
    raise UsageError(f'--checkpoint not found: {checkpoint!r}')


def enable_compilation_cache(setting: str) -> str | None:
  """Turns on JAX's persistent compilation cache (config.compilation_cache_dir); returns the folder or None.

  'auto' = $XDG_CACHE_HOME/mrqm_jax/jax (~/.cache/...); '' = off. A folder set by JAX_COMPILATION_CACHE_DIR
  wins. An unwritable cache folder only costs the speed-up, so it is a warning.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not setting or jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir or None
  if setting == 'auto':
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    setting = os.path.join(base, 'mrqm_jax', 'jax')
  try:
    if not _is_url(setting):
      os.makedirs(setting, exist_ok=True)
  except OSError as e:
    print(f'{PROG}: warning: compilation cache off: cannot create {setting} ({e.strerror})', file=sys.stderr)
    return None
  jax.config.update('jax_compilation_cache_dir', setting)
  # Cache every program that took a second to compile (the train step, init, eval), not tiny helpers.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  return setting


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  mode = _MODE.value
  # Every path the CLI takes, read once (paths.user_path): `~`, `file://` and `gs://` mean the same everywhere.
  workdir, input_path, checkpoint = (paths.user_path(v) for v in (_WORKDIR.value, _INPUT.value, _CHECKPOINT.value))
  overrides = config_validation.overridden_keys(sys.argv[1:])
  try:
    normalize_config_paths(config)
    validate(config, workdir, mode, input_path, checkpoint)
    if mode in ('train', 'eval'):
      check_writable(workdir, '--workdir')
    output = paths.user_path(_OUTPUT.value) or os.path.join(workdir, 'predictions' if mode == 'predict' else 'export')
    if mode == 'predict':  # before creating it: the output must not be (in) the input folder, nor replace files
      errors.check_output_folder(input_path, output)
      paths.check_predict_output_files(input_path, output, _HEATMAPS.value, _OVERWRITE.value)
    if mode in ('predict', 'export'):
      check_writable(output, '--output')
    if mode != 'train':  # the checkpoint and its stored config, before anything compiles
      from mrqm_jax import model_lib  # pylint: disable=g-import-not-at-top
      model_lib.inference_config(config, workdir, checkpoint, overrides)
    enable_compilation_cache(config.compilation_cache_dir)
    if mode == 'train':
      _mode_module('train').train_and_evaluate(config, workdir)
    elif mode == 'eval':
      _mode_module('evaluate').evaluate_checkpoint(config, workdir, checkpoint=checkpoint, overrides=overrides)
    elif mode == 'predict':
      _mode_module('predict').predict_files(config, workdir, input_path, output, checkpoint=checkpoint,
                                            heatmaps=_HEATMAPS.value, overrides=overrides,
                                            overwrite=_OVERWRITE.value)
    elif mode == 'export':
      _mode_module('export').export_model(config, workdir, output, checkpoint=checkpoint, overrides=overrides)
  except UsageError as e:
    errors.fail(PROG, str(e), e.exit_code, e.label)
  except (FileNotFoundError, NotADirectoryError) as e:  # dataset / checkpoint paths found missing late
    _fail(str(e))
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (reading data, compiling): nothing to save
    errors.fail(PROG, 'stopped by Ctrl-C (SIGINT)', 130, 'interrupted')
  except Exception as e:  # pylint: disable=broad-except  (a bug: its traceback goes to a file, one line here)
    log = errors.write_traceback(workdir, sys.argv)
    _fail(f'unexpected {type(e).__name__}: {errors.one_line(e, 200)} (a bug; traceback in {log})', 1)


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
