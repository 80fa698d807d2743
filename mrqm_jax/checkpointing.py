"""Orbax checkpoints in WORKDIR/checkpoints: resume exactly, keep the last K and the best by AP.

Each checkpoint (one folder per step) holds three items:
  state   the train state pytree (params, optimizer state, step, rng) — StandardSave
  config  the run's config as JSON, so a checkpoint is self-describing (eval/predict/export read it)
  data    the data position {'step': int}, so a resumed run replays the same batches
Preservation: the latest `keep` checkpoints, plus the one with the highest eval AP ever saved.
"""

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy_lib

CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(Exception):
  """A checkpoint that cannot be read; the message names the folder."""


def _metric_for_best(metrics) -> float:
  return float(metrics.get('AP', float('-inf')))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with our item layout and policies."""

  def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False, async_save: bool = False):
    # Cloud buckets (gs://...) pass through untouched; Orbax writes to them via its path library.
    joined = os.path.join(workdir, CHECKPOINT_DIR)
    self.directory = joined if '://' in joined else os.path.abspath(joined)
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
    """The kept step with the highest stored AP (None when no checkpoint has metrics)."""
    scored = [(float(m['AP']), step) for step in self._manager.all_steps()
              if (m := self._manager.metrics(step)) and 'AP' in m]
    return max(scored)[1] if scored else None

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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, int, dict]:
    """Restores (state, data_step, config_dict) at `step` (default latest) into `abstract_state`'s structure.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays giving the target layout.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                        config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for truncated/corrupt files
      raise CheckpointError(f'cannot read checkpoint {os.path.join(self.directory, str(step))}: '
                            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from e
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    return restored['state'], int(restored['data']['step']), dict(restored['config'])

  def restore_config(self, step: int | None = None) -> dict:
    """The config stored with a checkpoint (for eval/predict/export of a finished run)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f'cannot read the config of checkpoint {step} in {self.directory}: {e}') from e
    return dict(restored['config'])

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params_from_path(path: str, abstract_params: Any) -> tuple[Any, Any]:
  """Restores (params, model_state or None) from a checkpoint folder given by the user (`--checkpoint=DIR`).

  DIR may be a CheckpointManager directory (latest step is used), one step folder inside it, or an export folder.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'checkpoint folder not found: {path}')
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):  # a workdir
    path = os.path.join(path, CHECKPOINT_DIR)
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit())
  if steps:  # a CheckpointManager directory: its latest step
    path = os.path.join(path, str(steps[-1]))
  # A step folder holds the train state in 'state'; an export folder holds 'params'. Both are dicts with
  # 'params' and 'model_state'.
  item_dir = next((os.path.join(path, item) for item in ('state', 'params')
                   if os.path.isdir(os.path.join(path, item))), None)
  if item_dir is None:
    raise CheckpointError(f'no "state" or "params" item in {path}')
  try:
    restored = ocp.PyTreeCheckpointer().restore(item_dir)
  except Exception as e:
    raise CheckpointError(f'cannot read checkpoint {item_dir}: {type(e).__name__}: {e}') from e
  if not isinstance(restored, dict) or 'params' not in restored:
    raise CheckpointError(f'checkpoint {item_dir} holds no "params"')
  params, model_state = restored['params'], restored.get('model_state')
  if abstract_params is not None:
    want = jax.tree.structure(abstract_params)
    got = jax.tree.structure(params)
    if want != got:
      raise CheckpointError(f'checkpoint {item_dir} does not match this config\'s model '
                            f'({got.num_leaves} arrays stored, {want.num_leaves} expected)')
  return params, model_state
