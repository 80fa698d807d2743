"""The paths a user gives the CLI, read one way, and the workdir lock that keeps two trainings apart.

`user_path` is the one reading of every path the CLI takes (--workdir, --input, --output, --checkpoint,
config.dataset.root, config.model.pretrained, config.compilation_cache_dir): `~` expanded, `file://` stripped,
bucket URLs (`gs://...`) kept as they are. Reading them once in main.py means every part (the synthetic data
writer, Orbax, the writability probe) sees the same folder: a literal `./~/W` beside `$HOME/W` cannot happen.

`WorkdirLock` is WORKDIR/lock, held by a training run for its whole life. It is an advisory `flock` on that file,
which the kernel drops when the process ends in any way (even SIGKILL), so a lock left behind by a dead run
is recognised without guessing from pids; the file itself only names the holder (pid, host, start time,
command) for the message a second run prints. Workdirs on buckets cannot be locked (no flock there): a warning.

Also predict's input listing and output names (`list_images`, `output_names`, `predict_output_files`), here so
that main.py can refuse an --output that already holds one of them before jax or tf is imported.
"""

import datetime
import json
import os
import socket
import sys

from absl import logging

from mrqm_jax import errors

LOCK_FILE = 'lock'

# Config keys that hold a path: read by user_path like the path flags ('' and 'auto' stay as they are).
CONFIG_PATH_KEYS = (('dataset', 'root'), ('model', 'pretrained'), ('train', 'init_from'),
                    ('', 'compilation_cache_dir'))


def is_url(path: str) -> bool:
  return '://' in str(path)


def user_path(path: str | None) -> str | None:
  """`~` expanded, `file://` stripped, `gs://...` (any other URL) unchanged; None and '' stay as they are.

  Relative paths stay relative (to the current folder, as the user meant them).
  """
  if not path:
    return path
  text = str(path)
  if text.startswith('file://'):
    text = text[len('file://'):]
  if is_url(text):
    return text
  return os.path.expanduser(text)


def _holder_text(holder: dict) -> str:
  return (f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")}, started {holder.get("started", "?")}'
          + (f': {holder["command"]}' if holder.get('command') else ''))


def _read_holder(f) -> dict:
  f.seek(0)
  text = f.read().strip()
  if not text:
    return {}
  try:
    holder = json.loads(text)
  except ValueError:
    return {'pid': '?', 'host': '?', 'command': text[:200]}
  return holder if isinstance(holder, dict) else {}


class WorkdirLock:
  """`with WorkdirLock(workdir):` — WorkdirBusyError (one line naming the holder) if a live run holds it.

  A lock file still naming a process that has ended (its flock went with it) is taken over with a warning.
  On release the file is emptied, never deleted (deleting would let two later runs lock two different files).
  """

  def __init__(self, workdir: str):
    self.workdir = user_path(workdir)
    self.path = None if is_url(self.workdir) else os.path.join(self.workdir, LOCK_FILE)
    self._file = None
    self.taken_over: dict = {}

  def __enter__(self) -> 'WorkdirLock':
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only; imported where used)
    if self.path is None:
      logging.warning('%s is not a local folder: no workdir lock; do not start two trainings on it', self.workdir)
      return self
    os.makedirs(self.workdir, exist_ok=True)
    f = open(self.path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with  (held until __exit__)
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _read_holder(f)
      f.close()
      raise errors.WorkdirBusyError(
          f'--workdir {self.workdir} is in use by another run ({_holder_text(holder)}): two trainings would '
          f'overwrite each other\'s checkpoints; wait for it to end, stop it, or use another --workdir') from None
    self.taken_over = _read_holder(f)
    if self.taken_over:
      message = (f'{self.path} named a run that has ended without releasing it ({_holder_text(self.taken_over)}); '
                 'taking it over')
      logging.warning('%s', message)
      print(f'mrqm_jax: warning: {message}', file=sys.stderr)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                        'started': datetime.datetime.now().isoformat(timespec='seconds'),
                        'command': ' '.join(sys.argv)[:500]}))
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()   # an empty file = free; the flock goes with the close
      self._file.close()
      self._file = None


# ---------------------------------------------------------------- predict's inputs and output names

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def list_images(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {path}')
  return files


def output_names(paths: list[str]) -> list[str]:
  """Output file stems, one per input, never two alike: the stem where unique, else the file name."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  counts: dict[str, int] = {}
  for stem in stems:
    counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
  names = [stem if counts[stem.lower()] == 1 else os.path.basename(p) for stem, p in zip(stems, paths)]
  # NAME_heatmap.png of one image must not be another image's NAME.png; a file name keeps them apart.
  taken = {n.lower() for n in names}
  names = [os.path.basename(p) if n.lower().endswith('_heatmap') and n.lower()[:-len('_heatmap')] in taken else n
           for n, p in zip(names, paths)]
  if len({n.lower() for n in names}) != len(names):  # e.g. 'x.jpg' (a stem) next to x.jpg.png
    names = [os.path.relpath(p, os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(p))
             .replace(os.sep, '__') for p in paths]
  return names


def predict_output_files(paths: list[str], heatmaps: bool = False) -> list[str]:
  """Every file name predict writes in OUTPUT for these inputs (detections.json first)."""
  suffixes = ('.txt', '.png') + (('_heatmap.png',) if heatmaps else ())
  return ['detections.json'] + [name + suffix for name in output_names(paths) for suffix in suffixes]


def check_predict_output_files(input_path: str, output: str, heatmaps: bool = False,
                               overwrite: bool = False) -> None:
  """OutputExistsError (one line naming it) when a file predict would write is already in `output`, unless
  `overwrite`. Reads only the folder listing, so the CLI runs it before anything heavy."""
  if not overwrite:
    errors.check_new_files(output, predict_output_files(list_images(input_path), heatmaps))
