"""Orbax checkpoints in WORKDIR/checkpoints: resume exactly, keep the last K and the best by AP.

Each checkpoint (one folder per step) holds three items:
  state   the train state pytree (params, optimizer state, step, rng) — StandardSave
  config  the run's config as JSON, so a checkpoint is self-describing (eval/predict/export read it)
  data    the data position {'step': int}, so a resumed run replays the same batches
Preservation: the latest `keep` checkpoints, plus the one with the highest eval AP ever saved.
A damaged newest checkpoint (truncated file, missing metadata) is reported with a warning naming it and the
newest readable one is used instead; nothing is ever deleted (training moves the damaged folder aside to
WORKDIR/checkpoints_damaged/ so its step number can be saved again).
Paths go through etils.epath, so workdirs on buckets (gs://...) and local paths take the same code.
"""

import json
import re
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy_lib

from mrqm_jax import errors, paths

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'checkpoints_damaged'
CONFIG_FILE = 'config/metadata'   # where ocp.args.JsonSave puts the 'config' item inside a step folder
EXPORT_CONFIG_FILE = 'config.json'
METRICS_ITEM = 'metrics'          # Orbax's item (and file) name for a step's metrics (best-by-AP)

CheckpointError = errors.CheckpointError


def to_path(path: str | epath.PathLike) -> epath.Path:
  """An epath.Path; local paths (and file:// URLs) made absolute (Orbax wants them), buckets (gs://) untouched."""
  text = paths.user_path(str(path))
  if paths.is_url(text):
    return epath.Path(text)
  return epath.Path(epath.Path(text).absolute())


def reason(e: BaseException) -> str:
  """One short line for why Orbax/TensorStore could not read a checkpoint (their messages dump whole specs)."""
  text = str(e)
  files = re.findall(r'local file "([^"]+)"', text)
  where = f' ({files[-1]})' if files else ''
  if any(code in text for code in ('OUT_OF_RANGE', 'DATA_LOSS', 'Error reading Byte range', 'Error decoding')):
    return f'a data file is truncated or corrupt{where}'
  if isinstance(e, json.JSONDecodeError) or 'JSONDecodeError' in type(e).__name__:
    return 'a metadata file is truncated or not JSON'
  if isinstance(e, FileNotFoundError):
    return f'a file is missing: {errors.one_line(e, 160)}'
  return f'{type(e).__name__}: {errors.one_line(e, 160)}'


def _metric_for_best(metrics) -> float:
  return float(metrics.get('AP', float('-inf')))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with our item layout and policies."""

  def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False, async_save: bool = False):
    self.workdir = to_path(workdir)
    self.directory = self.workdir / CHECKPOINT_DIR
    policy = policy_lib.AnyPreservationPolicy([
        policy_lib.LatestN(n=max(1, keep)),
        policy_lib.BestN(get_metric_fn=_metric_for_best, reverse=False, n=1,
                         keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_metric_for_best, best_mode="max",
        create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'config', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the highest stored AP (None when no checkpoint has metrics); `best_fn` ranks them."""
    return self._manager.best_step() if self._manager.all_steps() else None

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict, data_step: int,
           metrics: dict[str, float] | None = None, force: bool = True) -> bool:
    """Saves `state` at `step` (blocking unless async); `metrics` (e.g. {'AP': 31.9}) rank 'best'."""
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
            data=ocp.args.JsonSave({'step': int(data_step)})),
        metrics=metrics, force=force)
    return saved

  def set_metrics(self, step: int, metrics: dict[str, float]) -> None:
    """Attaches `metrics` to the saved `step` (for best-by-AP), as `save(..., metrics=)` would have stored them.

    Training saves a step BEFORE evaluating it, so an eval that fails (or is killed) never loses the step; the
    AP is added afterwards. Orbax keeps a step's metrics as its 'metrics' json item (STEP/metrics/metrics) and
    reads them back on reload; tests/test_checkpointing.py checks that best_step() sees them, also in a new
    CheckpointManager.
    """
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      item = self.directory / str(step) / METRICS_ITEM
      item.mkdir(parents=True, exist_ok=True)
      (item / METRICS_ITEM).write_text(json.dumps({k: float(v) for k, v in metrics.items()}))
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f'mrqm_set_metrics_{step}')
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the same step once any host got a preemption notice (JAX's sync service)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None, move_damaged: bool = False
              ) -> tuple[Any, int, dict]:
    """Restores (state, data_step, config_dict) into `abstract_state`'s structure.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays giving the target layout.
    With `step` None, the newest readable checkpoint: each damaged newer one is warned about by name (and with
    `move_damaged`, moved to WORKDIR/checkpoints_damaged/STEP so training can save that step again).
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    damaged = []
    for s in steps:
      try:
        restored = self._manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                       config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many types for damaged files)
        damaged.append(f'{self.directory / str(s)}: {reason(e)}')
        logging.warning('cannot read checkpoint %s: %s', self.directory / str(s), reason(e))
        continue
      if damaged:
        print(f'mrqm_jax: warning: {len(damaged)} newer checkpoint(s) unreadable ({"; ".join(damaged)}); '
              f'using step {s}')
        if move_damaged:
          self._move_aside([d for d in steps if d > s])
      logging.info('Restored checkpoint step %d from %s', s, self.directory)
      return restored['state'], int(restored['data']['step']), dict(restored['config'])
    raise CheckpointError(f'cannot read checkpoint {damaged[0]}' if len(damaged) == 1 else
                          f'no readable checkpoint in {self.directory}: {"; ".join(damaged)}')

  def _move_aside(self, steps: list[int]) -> None:
    """Moves damaged step folders to WORKDIR/checkpoints_damaged/ (kept for inspection, never deleted)."""
    target = self.workdir / DAMAGED_DIR
    target.mkdir(parents=True, exist_ok=True)
    for s in steps:
      dest = target / f'{s}-{int(time.time())}'
      (self.directory / str(s)).rename(dest)
      print(f'mrqm_jax: moved damaged checkpoint {self.directory / str(s)} to {dest}')
    self._manager.reload()

  def restore_config(self, step: int | None = None) -> dict:
    """The config stored with a checkpoint (for eval/predict/export of a finished run)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    return read_stored_config(self.directory / str(step))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _step_folders(directory: epath.Path) -> list[epath.Path]:
  """Step folders of a CheckpointManager directory, newest first."""
  return [directory / str(n) for n in sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()),
                                             reverse=True)]


def checkpoint_candidates(path: str | epath.PathLike) -> list[epath.Path]:
  """The folders `--checkpoint=PATH` (or a workdir) may mean, best first; checked without reading arrays.

  PATH may be a workdir, a CheckpointManager directory (its steps, newest first), one step folder, or an
  export folder. Raises CheckpointError when PATH does not exist or holds none of these.
  """
  path = to_path(path)
  if not path.is_dir():
    raise CheckpointError(f'checkpoint folder not found: {path}')
  if (path / CHECKPOINT_DIR).is_dir():  # a workdir
    path = path / CHECKPOINT_DIR
  steps = _step_folders(path)
  if steps:
    return steps
  if (path / 'state').is_dir() or (path / 'params').is_dir():
    return [path]
  raise CheckpointError(f'no checkpoint in {path} (expected a workdir, a checkpoints/ folder, a step folder or '
                        'an export folder)')


def read_stored_config(folder: str | epath.PathLike) -> dict:
  """The config saved with a step folder (config/metadata) or an export folder (config.json); {} if none."""
  folder = to_path(folder)
  for name in (CONFIG_FILE, EXPORT_CONFIG_FILE):
    if (folder / name).exists():
      try:
        return json.loads((folder / name).read_text())
      except (ValueError, OSError) as e:
        raise CheckpointError(f'cannot read the config stored in {folder / name}: {reason(e)}') from None
  return {}


def restore_params_from_path(path: str | epath.PathLike, abstract_params: Any) -> tuple[Any, Any, epath.Path]:
  """Restores (params, model_state or None, folder used) from `--checkpoint=PATH` (see checkpoint_candidates).

  The newest readable step is used; damaged newer ones are warned about by name.
  """
  damaged = []
  for folder in checkpoint_candidates(path):
    try:
      params, model_state = _restore_params(folder, abstract_params)
    except CheckpointError as e:
      damaged.append(str(e))
      logging.warning('%s', e)
      continue
    if damaged:
      print(f'mrqm_jax: warning: {len(damaged)} newer checkpoint(s) unreadable ({"; ".join(damaged)}); '
            f'using {folder}')
    return params, model_state, folder
  raise CheckpointError(damaged[0] if len(damaged) == 1 else f'no readable checkpoint: {"; ".join(damaged)}')


def _restore_params(folder: epath.Path, abstract_params: Any) -> tuple[Any, Any]:
  # A step folder holds the train state in 'state'; an export folder holds 'params'. Both are dicts with
  # 'params' and 'model_state'.
  item_dir = next((folder / item for item in ('state', 'params') if (folder / item).is_dir()), None)
  if item_dir is None:
    raise CheckpointError(f'cannot read checkpoint {folder}: no "state" or "params" item')
  try:
    restored = ocp.PyTreeCheckpointer().restore(item_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'cannot read checkpoint {item_dir}: {reason(e)}') from None
  if not isinstance(restored, dict) or 'params' not in restored:
    raise CheckpointError(f'cannot read checkpoint {item_dir}: it holds no "params"')
  params, model_state = restored['params'], restored.get('model_state')
  if abstract_params is not None:
    want = jax.tree.structure(abstract_params)
    got = jax.tree.structure(params)
    if want != got:
      raise CheckpointError(f'checkpoint {item_dir} does not match the model of its config '
                            f'({got.num_leaves} arrays stored, {want.num_leaves} expected)')
    bad = [jax.tree_util.keystr(k) for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                                        jax.tree.leaves(params)) if tuple(a.shape) != tuple(b.shape)]
    if bad:
      raise CheckpointError(f'checkpoint {item_dir} does not match the model of its config: {len(bad)} arrays '
                            f'differ in shape, e.g. {bad[0]}')
  return params, model_state
