"""The errors our CLIs report as one line (no traceback), and how they report them.

Every error meant for the user derives from `UsageError`; `mrqm_jax.main` and `mrqm_jax.evaluate_files` catch
that one base class and print `PROG: error: MESSAGE` with the class's `exit_code`. Modules raise the most
specific subclass (a missing checkpoint is a `CheckpointError`, a NaN loss a `TrainingError`).

Also the argument guards a CLI runs before loading anything heavy (`check_output_folder`, `check_new_files`), so
the error is instant, and `write_traceback`: where an unexpected exception's traceback goes (WORKDIR/error.log)
while the screen gets one line.
"""

import datetime
import os
import sys
import tempfile
import traceback


class UsageError(Exception):
  """A mistake in the command line, config, inputs or workdir: one line, exit code 2."""
  exit_code = 2
  label = 'error'   # the word after `PROG:` in the printed line


class ConfigError(UsageError):
  """A config value the code cannot use; the message names the key and what it accepts."""


class CheckpointError(UsageError):
  """A checkpoint that is missing or cannot be read; the message names the folder."""


class TrainingError(UsageError):
  """Training cannot go on (non-finite loss); the message says why and where. Exit code 1: not the user's input."""
  exit_code = 1


class DataError(UsageError):
  """A dataset the code cannot use as it is (two images of one name); the message names the files."""


class WorkdirBusyError(UsageError):
  """Another live process holds the workdir's lock; the message names it (pid, host)."""


class OutputExistsError(UsageError):
  """An output would replace an existing file; the message names it."""


class Interrupted(UsageError):
  """Ctrl-C (SIGINT): what was saved, in one line; exit code 130 (128 + SIGINT), as shells report it."""
  exit_code = 130
  label = 'interrupted'


def one_line(message: object, limit: int = 300) -> str:
  """The first line of `message`, at most `limit` characters (library errors can dump whole specs)."""
  text = str(message).strip()
  line = text.splitlines()[0] if text else ''
  return line if len(line) <= limit else line[:limit - 3] + '...'


def fail(prog: str, message: object, exit_code: int = 2, label: str = 'error') -> None:
  """Prints `prog: LABEL: message` (one line) to stderr and exits."""
  print(f'{prog}: {label}: {one_line(message, limit=1000)}', file=sys.stderr)
  sys.exit(exit_code)


ERROR_LOG = 'error.log'


def write_traceback(workdir: str | None, argv: list[str]) -> str:
  """Appends the exception being handled (time, command, traceback) to WORKDIR/error.log, or to a file in the
  temp folder when the workdir cannot take it; returns that file's path. The screen gets one line naming it."""
  text = (f'--- {datetime.datetime.now().isoformat(timespec="seconds")} pid {os.getpid()}: {" ".join(argv)}\n'
          + traceback.format_exc())
  if workdir and '://' not in str(workdir):
    try:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(os.path.abspath(workdir), ERROR_LOG)
      with open(path, 'a', encoding='utf-8') as f:
        f.write(text)
      return path
    except OSError:
      pass
  fd, path = tempfile.mkstemp(prefix='mrqm_jax-error-', suffix='.log')
  with os.fdopen(fd, 'w', encoding='utf-8') as f:
    f.write(text)
  return path


def check_output_folder(input_path: str, output: str) -> None:
  """UsageError when predict's `output` could put drawn PNGs over input images.

  A folder input: `output` must not be that folder or inside it (the next run would read the drawings as
  input). A single image: `output` must not be the image's own folder (NAME.png there can be the image itself);
  a folder below it is fine, since the outputs are named after the one input and land beside no other input.
  """
  if '://' in str(output):
    return
  is_folder = os.path.isdir(input_path)
  source = os.path.realpath(input_path if is_folder else os.path.dirname(input_path) or '.')
  target = os.path.realpath(output)
  if target == source:
    raise UsageError(f'--output={output} is the {"input folder" if is_folder else "folder of the input image"} '
                     f'{source}: predict would write next to (or over) its input images; choose another folder')
  if is_folder and target.startswith(source.rstrip(os.sep) + os.sep):
    raise UsageError(f'--output={output} is inside the input folder {source}: predict would write next to (or '
                     'over) its input images; choose another folder')


def check_new_files(folder: str, names: list[str], flag: str = '--output') -> None:
  """OutputExistsError naming the first of `names` that already exists in `folder` (and how many do)."""
  if '://' in str(folder) or not os.path.isdir(folder):
    return
  existing = [n for n in names if os.path.lexists(os.path.join(folder, n))]
  if existing:
    more = f' (and {len(existing) - 1} more of the files it would write)' if len(existing) > 1 else ''
    raise OutputExistsError(f'{flag}={folder} already holds {os.path.join(folder, existing[0])}{more}: predict '
                            'never replaces a file; choose an empty folder or pass --overwrite')
