"""Building, initializing and restoring the model: the one place training, eval, predict, export and the
notebooks get an MRQM and its variables from.

  make_model(config)                 the flax module
  init_variables(model, config, rng) fresh variables for the static input shape (no data needed)
  abstract_variables(model, config)  their shapes/dtypes from `jax.eval_shape` (nothing compiles)
  split_variables(variables)         (params, model_state): what the optimizer trains / everything else
  inference_config(...)              the config with the model keys stored with the checkpoint
  restore_for_inference(...)         (model, locked config, variables) from a checkpoint or export folder
"""

from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections

from mrqm_jax import checkpointing, config_validation, datasets, parallel
from mrqm_jax.models import detector as detector_lib


def make_model(config: ml_collections.ConfigDict) -> detector_lib.MRQM:
  """The flax module of `config` (`detector.build_model`, the one config -> module-fields mapping)."""
  return detector_lib.build_model(config)


def init_variables(model, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
  """Model variables for the static input shape (no data needed)."""
  h, w = config.input.image_size
  images = jnp.zeros((1, h, w, 3), jnp.float32)
  pad_mask = jnp.zeros((1, h, w), bool)
  return model.init({'params': rng, 'dropout': rng, 'dn': rng, 'aux': rng}, images, pad_mask, train=False)


def abstract_variables(model, config: ml_collections.ConfigDict) -> dict:
  """The variables' tree of jax.ShapeDtypeStruct (what a checkpoint restore needs to know), without computing."""
  return jax.eval_shape(lambda r: init_variables(model, config, r), jax.random.PRNGKey(0))


def split_variables(variables: dict) -> tuple[Any, dict]:
  """(params, model_state): the 'params' collection and the dict of every other collection."""
  model_state, params = flax.core.pop(variables, 'params')
  return params, dict(model_state)


def inference_config(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None,
                     overrides=()) -> ml_collections.ConfigDict:
  """`config` with the model keys of the config stored with the checkpoint; checks the checkpoint exists.

  Cheap (reads folder listings and one JSON file), so a wrong --checkpoint or a model override that disagrees
  with the checkpoint fails before anything compiles. Raises CheckpointError / ConfigError.
  """
  try:
    candidates = checkpointing.checkpoint_candidates(checkpoint or workdir)
  except checkpointing.CheckpointError as e:
    if checkpoint:
      raise
    raise checkpointing.CheckpointError(f'{e}: train first or pass --checkpoint=DIR') from None
  stored = {}
  for folder in candidates:  # the newest folder whose config is readable
    try:
      stored = checkpointing.read_stored_config(folder)
      break
    except checkpointing.CheckpointError as e:
      logging.warning('%s', e)
  if not stored:
    logging.warning('no config stored with %s: the model is built from the given config', candidates[0])
  merged, changed = config_validation.merge_stored_model_config(config, stored, overrides)
  if changed:
    logging.info('model keys from the checkpoint\'s config: %s', ', '.join(changed))
  config_validation.validate(merged, mode='eval')
  return merged


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None,
                          mesh=None, overrides=(), *, a_s_from_data: bool = False):
  """(model, locked config copy, variables) restored from `checkpoint` or WORKDIR's latest.

  The model is built from the config stored with the checkpoint (`inference_config`); `iah.a_s` is one of its
  model keys, so a checkpoint trained with `a_s = -1` (auto) gives the value training resolved. When it is
  still -1 (no stored config) and `a_s_from_data`, it is recomputed from the training split as training does
  (the notebooks' IAH figures need the real value); otherwise it stays -1, since `iah.a_s` only shapes the
  training-time IoU-aware branch, which eval/predict/export never run. The variables' shapes come from
  `jax.eval_shape` of the init (nothing compiles); the arrays are then read from the checkpoint.
  """
  mesh = mesh or parallel.create_mesh()
  config = inference_config(config, workdir, checkpoint, overrides)
  if a_s_from_data and config.iah.a_s == config_validation.A_S_AUTO:   # (reading the data only when needed)
    datasets.resolve_a_s(config, datasets.prepare_data(config, workdir).train_records)
  config.lock()
  model = make_model(config)
  abstract = abstract_variables(model, config)
  params, model_state, folder = checkpointing.restore_params_from_path(checkpoint or workdir, abstract['params'])
  logging.info('restored params from %s', folder)
  if not model_state:
    _, model_state = split_variables(abstract)
    if jax.tree.leaves(model_state):
      # An old export without model_state: its initial values (this compiles the init once).
      _, model_state = split_variables(jax.jit(lambda r: init_variables(model, config, r))(jax.random.PRNGKey(0)))
  variables = jax.device_put({'params': params, **model_state}, parallel.replicated(mesh))
  return model, config, variables
