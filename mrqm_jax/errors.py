"""The errors our CLIs report as one line (no traceback), and how they report them.

Every error meant for the user derives from `UsageError`; `mrqm_jax.main` and `mrqm_jax.evaluate_files` catch
that one base class and print `PROG: error: MESSAGE` with the class's `exit_code`. Modules raise the most
specific subclass (a missing checkpoint is a `CheckpointError`, a NaN loss a `TrainingError`).

Also the argument guards a CLI runs before loading anything heavy (`check_output_folder`), so the error is instant.
"""

import os
import sys


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


def check_output_folder(input_path: str, output: str) -> None:
  """UsageError when `output` is the input folder or inside it (drawn PNGs would replace input images)."""
  if '://' in str(output):
    return
  source = os.path.realpath(input_path if os.path.isdir(input_path) else os.path.dirname(input_path) or '.')
  target = os.path.realpath(output)
  if target == source or target.startswith(source.rstrip(os.sep) + os.sep):
    raise UsageError(f'--output={output} is {"the input folder" if target == source else "inside the input folder"}'
                     f' {source}: predict would write next to (or over) its input images; choose another folder')
