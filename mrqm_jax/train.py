"""train_and_evaluate(config, workdir): the user's main job.

Reads the dataset (or writes the synthetic one for the smoke config), builds the model and the data-parallel
step, resumes from WORKDIR/checkpoints when there is a checkpoint, trains with a progress bar (step, loss,
images/s, ETA), writes TensorBoard events to WORKDIR/tensorboard, evaluates every `train.eval_every_epochs`,
checkpoints every `train.checkpoint_every_steps`, before every eval and at the end, and on SIGTERM (preemption)
or Ctrl-C saves and exits. WORKDIR/lock keeps a second training off a live workdir.
A NaN or Inf loss stops training naming the step; the last good checkpoint stays.
"""

import contextlib
import functools
import math
import os
import signal
from typing import Callable

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections
import tqdm

from input_pipeline import pipeline
from mrqm_jax import checkpointing, config_validation, datasets, errors, evaluate, model_lib, parallel, paths
from mrqm_jax import pretrained, train_lib, weights
from mrqm_jax.models import backbone as backbone_lib
from mrqm_jax.ops import losses as losses_lib

# Called as hook(step, checkpointer) after every checkpoint save, in order. Empty in normal use; a caller (the
# resume test: SIGKILL right after a save) appends its own.
AFTER_SAVE_HOOKS: list[Callable[[int, checkpointing.Checkpointer], None]] = []

TrainingError = errors.TrainingError

# Batch arrays the model and the loss read in training ('scale' maps canvas px to original px for eq. 8).
TARGET_KEYS = ('boxes', 'labels', 'box_valid', 'scale')


def make_loss_fn(model, config: ml_collections.ConfigDict):
  """(params, model_state, batch, rng) -> (loss, terms): forward in train mode + the full objective."""

  def loss_fn(params, model_state, batch, rng):
    dropout_rng, dn_rng, aux_rng = jax.random.split(rng, 3)
    targets = {k: batch[k] for k in TARGET_KEYS}
    outputs = model.apply({'params': params, **model_state}, batch['image'], batch['pad_mask'],
                          targets=targets, train=True, rngs={'dropout': dropout_rng, 'dn': dn_rng, 'aux': aux_rng})
    return losses_lib.compute_losses(outputs, targets, config)

  return loss_fn


def step_trace_key(config: ml_collections.ConfigDict, per_epoch: int) -> str:
  """What the train step closes over, for `traced_cache`: the config (its paths blanked: where data and weights
  live does not change the program, and a new workdir must not miss) and the steps per epoch (lr schedule)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for section, key in paths.CONFIG_PATH_KEYS:
    (config[section] if section else config)[key] = ''
  return f'{config.to_json(sort_keys=True)}|steps_per_epoch={per_epoch}'


def _frozen_predicate(config):
  """Which param paths the optimizer must not touch (backbone stem + first `frozen_stages` stages)."""
  prefixes = set(backbone_lib.frozen_prefixes(config.model.frozen_stages))
  return lambda names: len(names) > 1 and names[0] == train_lib.BACKBONE_KEY and names[1] in prefixes


def steps_per_epoch(num_images: int, batch: int) -> int:
  return max(1, num_images // batch)


def total_steps(config: ml_collections.ConfigDict, per_epoch: int) -> int:
  return config.train.num_steps if config.train.num_steps > 0 else config.train.num_epochs * per_epoch


class _Preemption:
  """Preemption (SIGTERM) and Ctrl-C (SIGINT) as a decision the loop checks after every step: save that step,
  then exit (SIGTERM: exit 0; SIGINT: errors.Interrupted, exit 130). A second Ctrl-C exits at once, unsaved.

  One process: our handlers set a flag, so the signal never lands as a KeyboardInterrupt inside JAX (which once
  swallowed it in a gc callback and ran on to the end). Several processes (multi-host): Orbax's
  `reached_preemption` (JAX's preemption sync service, which catches SIGTERM itself) tells every host the same
  step to save at, even when only some hosts got the signal; a per-process flag would let hosts save different
  steps. Ctrl-C is then left to Python (KeyboardInterrupt, one line from main.py; nothing saved).
  """

  def __init__(self, ckpt: checkpointing.Checkpointer | None = None):
    self.requested = False
    self.interrupted = False   # by SIGINT (Ctrl-C) rather than SIGTERM
    self._ckpt = ckpt
    self._multi = jax.process_count() > 1 and ckpt is not None
    self._previous = {}

  def __enter__(self):
    if self._multi:
      return self  # JAX's preemption service owns SIGTERM; a Python handler would hide the notice from it
    try:
      for signum, handler in ((signal.SIGTERM, self._handle), (signal.SIGINT, self._handle_interrupt)):
        self._previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      pass
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and exiting')
    self.requested = True

  def _handle_interrupt(self, signum, frame):
    del signum, frame
    if self.interrupted:
      os.write(2, b'mrqm_jax: interrupted: Ctrl-C again: exiting at once, without saving\n')
      os._exit(130)  # pylint: disable=protected-access  (no cleanup: the user asked to stop now)
    self.interrupted = self.requested = True
    os.write(2, b'\nmrqm_jax: Ctrl-C: saving the current step, then exiting (Ctrl-C again: exit at once, unsaved)\n')

  def should_stop(self, step: int) -> bool:
    """Called by every process after every step (the multi-host sync needs each step)."""
    if self._multi and not self.requested:
      self.requested = self._ckpt.reached_preemption(step)
    return self.requested

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      if previous is not None:
        signal.signal(signum, previous)
    self._previous = {}


def check_finite(scalars: dict[str, float], step: int, last_checkpoint: int | None, directory: str) -> None:
  """Raises TrainingError naming the step and the non-finite terms; the last good checkpoint is kept."""
  bad = [k for k, v in scalars.items() if not math.isfinite(v)]
  if bad:
    where = f'step {last_checkpoint} in {directory}' if last_checkpoint is not None else 'none saved yet'
    raise TrainingError(f'non-finite loss at step {step} ({", ".join(sorted(bad))}); last good checkpoint: {where}')


class ReportProgress(periodic_actions.ReportProgress):
  """clu's progress report (steps/s, % done and ETA in the log as work-unit notes, with the share of time spent
  in `timed('eval')`; 'steps_per_sec' and 'uptime' to the writer) plus 'images_per_sec' = steps/s x the global
  batch, written beside them and kept in `images_per_sec` for the progress bar."""

  def __init__(self, *, images_per_step: int, **kwargs):
    super().__init__(**kwargs)
    self._images_per_step = images_per_step
    self.images_per_sec: float | None = None

  def _apply(self, step: int, t: float):
    # The same window clu's own steps/s uses (PeriodicAction keeps the previous trigger's step and time).
    steps_per_sec = (step - self._previous_step) / max(t - self._previous_time, 1e-9)
    super()._apply(step, t)
    self.images_per_sec = steps_per_sec * self._images_per_step
    if self._writer is not None:
      self._writer.write_scalars(step, {'images_per_sec': self.images_per_sec})


def _all_decoded(valid) -> bool:
  """Whether every example of the global batch was decoded (none is a blank stand-in; the pipeline marks those
  valid=False). Every host agrees: one all-gather when multi-host.

  A step on a batch holding a blank is skipped: the smoke model's gradient is not finite for an all-zero image,
  even next to a real one (benchmarks/blank_image_gradient.py: loss finite, grad_norm inf; a real image without
  boxes, or a constant non-zero one, is fine), and the blank has no target to learn anyway.
  """
  local = bool(valid.all())
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.process_allgather(local).all())


def _scalars(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def init_from_checkpoint(path: str, variables: dict, mesh) -> dict:
  """`variables` with params (and model_state, when stored) read from PATH — a checkpoint, workdir or a folder
  `python -m mrqm_jax.convert` wrote (`train.init_from`); shapes must match the model of the config."""
  params, _ = model_lib.split_variables(variables)
  restored, model_state, folder = checkpointing.restore_params_from_path(path, params)
  logging.info('initialised parameters from %s', folder)
  _, fresh_state = model_lib.split_variables(variables)
  new = {'params': restored, **(model_state if model_state else fresh_state)}
  return jax.device_put(new, parallel.replicated(mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       loss_history: list | None = None) -> dict[str, float]:
  """Trains (resuming if WORKDIR/checkpoints has a checkpoint), evaluates, and returns the last eval metrics.

  Holds WORKDIR/lock for the whole run (the chief process of a multi-host job), taken before anything is
  read or written: a second training on a live workdir is a one-line WorkdirBusyError naming the first.
  loss_history: if given, (step, loss) is appended at every logged step (benchmarks, tests, notebooks).
  """
  config_validation.validate(config, 'train')  # main checked it already; notebooks and scripts call this directly
  parallel.initialize_distributed()
  with paths.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train_and_evaluate(config, workdir, loss_history)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        loss_history: list | None) -> dict[str, float]:
  mesh = parallel.create_mesh()
  is_chief = jax.process_index() == 0
  config = ml_collections.ConfigDict(config.to_dict())  # a private, mutable copy (a_s, resolved root)
  data = datasets.prepare_data(config, workdir)
  if not any(len(r.boxes) for r in data.train_records):
    raise errors.UsageError(f'no box in the {len(data.train_records)} training images of {config.dataset.root} '
                            f'(split {config.dataset.train_split!r}): nothing to learn; check the annotations')
  datasets.resolve_a_s(config, data.train_records)
  config.lock()
  batch_size = parallel.global_batch_size(config)  # ConfigError (what to set) when the devices cannot split it
  pretrained_file = pretrained.resolve(config.model.pretrained)  # before compiling: a failed fetch is one line
  num_examples = pipeline.num_train_examples(config, data.train_records)  # patches when slicing
  per_epoch = steps_per_epoch(num_examples, batch_size)
  num_steps = total_steps(config, per_epoch)

  logging.info('Config:\n%s', config)
  logging.info('%s', parallel.describe_mesh(mesh))
  logging.info('%s', parallel.describe_global_batch(config))
  logging.info('Data:\n%s', data.report)
  dn_warning = datasets.dn_cap_report(config, data.train_records)
  if dn_warning:
    logging.warning('%s', dn_warning)
  if is_chief:
    print(f'mrqm_jax: {parallel.describe_mesh(mesh)}')
    print(f'mrqm_jax: {len(data.train_records)} training images ({num_examples} examples), '
          f'{len(data.eval_records)} eval images, {per_epoch} steps/epoch, {num_steps} steps')
    print(f'mrqm_jax: {parallel.describe_global_batch(config)}')
    print(data.report)
    if dn_warning:
      print(f'mrqm_jax: warning: {dn_warning}')

  # Before anything compiles: a finished run asked for fewer steps than it holds would otherwise save the
  # newest parameters under a smaller step number.
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  newest = ckpt.latest_step()
  if newest is not None and newest > num_steps:
    ckpt.close()
    raise errors.UsageError(f'{ckpt.directory} already holds step {newest} > train.num_steps={num_steps}: '
                            'nothing to train and nothing written (raise num_steps to continue, or use a new '
                            '--workdir)')
  if newest == num_steps:
    ckpt.close()
    if is_chief:
      print(f'mrqm_jax: {ckpt.directory} already holds the final step {num_steps}: nothing to train')
    return {}

  model = model_lib.make_model(config)
  rng = jax.random.PRNGKey(config.train.seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = jax.jit(functools.partial(model_lib.init_variables, model, config),
                      out_shardings=parallel.replicated(mesh))(init_rng)
  if pretrained_file:
    variables, report = weights.load_pretrained(config, jax.device_get(variables))
    variables = jax.device_put(variables, parallel.replicated(mesh))
    if is_chief:
      print(f'mrqm_jax: pretrained backbone {config.model.pretrained} ({pretrained_file}): {report.summary()}')
  if config.train.init_from:
    variables = init_from_checkpoint(config.train.init_from, variables, mesh)
    if is_chief:
      print(f'mrqm_jax: parameters from {config.train.init_from} (step, optimizer and data position start '
            f'afresh)')
  params, model_state = model_lib.split_variables(variables)
  tx = train_lib.make_optimizer(config, params, per_epoch, frozen=_frozen_predicate(config))
  state = jax.jit(functools.partial(train_lib.create_train_state, tx=tx),
                  out_shardings=parallel.replicated(mesh))(params, model_state, rng=state_rng)

  start_step = 0
  if ckpt.latest_step() is not None:
    state, start_step, _ = ckpt.restore(state, move_damaged=is_chief)
    # Same shardings/types as a fresh state, so the step compiles once, not once more after a resume.
    state = jax.jit(lambda s: s, out_shardings=parallel.replicated(mesh))(state)
    if is_chief:
      print(f'mrqm_jax: resumed from {ckpt.directory}/{start_step} (step {start_step})')

  train_step = train_lib.make_train_step(make_loss_fn(model, config), tx, mesh,
                                         grad_accum_steps=config.train.grad_accum_steps,
                                         minimize_memory=config.model.remat,
                                         trace_key=step_trace_key(config, per_epoch))
  train_iter = pipeline.train_iterator(config, data.train_records, global_batch_size=batch_size,
                                       start_step=start_step, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  writer = metric_writers.create_default_writer(str(checkpointing.to_path(workdir) / 'tensorboard'),
                                               just_logging=not is_chief)
  predict_fn = evaluate.make_predict_fn(model, config, mesh)  # one jit for every evaluation of the run
  eval_every = max(1, int(round(config.train.eval_every_epochs * per_epoch)))
  eval_metrics: dict[str, float] = {}
  last_saved = start_step

  def save(step, metrics=None):
    nonlocal last_saved
    if step == last_saved and step in ckpt.all_steps():
      return
    ckpt.save(step, state, config, data_step=step, metrics=metrics)
    last_saved = step
    for hook in AFTER_SAVE_HOOKS:
      hook(step, ckpt)

  lr_schedule = train_lib.learning_rate_schedule(config, per_epoch)
  step_keys = ('image', 'pad_mask') + TARGET_KEYS  # all the step reads; the rest stays on host
  progress = tqdm.tqdm(total=num_steps, initial=start_step, desc='train', unit='step', dynamic_ncols=True,
                       disable=not is_chief, mininterval=1.0)
  report = ReportProgress(images_per_step=batch_size, num_train_steps=num_steps, writer=writer,
                          every_steps=config.train.log_every_steps, every_secs=None)

  def stop(step, interrupted):
    """Saves `step` (if not yet) and ends the run: SIGTERM returns (exit 0), Ctrl-C raises Interrupted (130)."""
    save(step)
    ckpt.wait()
    progress.close()
    if interrupted:
      ckpt.close()
      raise errors.Interrupted(f'Ctrl-C: saved step {step} to {ckpt.directory}; the same command resumes there')
    if is_chief:
      print(f'mrqm_jax: preempted; saved step {step} to {ckpt.directory}')
    return eval_metrics

  skipped_steps = []   # steps whose batch held an undecodable image (a blank stand-in): skipped, counted

  with _Preemption(ckpt) as preemption:
    step = start_step
    while step < num_steps:
      host_batch = next(train_iter)
      if _all_decoded(host_batch['valid']):
        state, metrics = train_step(state, parallel.host_to_global({k: host_batch[k] for k in step_keys}, mesh))
        trained = True
      else:   # an image failed to decode: its all-zero blank stand-in gives the model an inf gradient
        skipped_steps.append(step + 1)
        trained = False
        logging.warning('step %d: an image of the batch could not be decoded: step skipped (%d so far)', step + 1,
                        len(skipped_steps))
      step += 1
      progress.update(1)
      preempted = preemption.should_stop(step)
      saving = (step % config.train.checkpoint_every_steps == 0 or step % eval_every == 0 or step == num_steps
                or preempted)
      logging_step = trained and (step % config.train.log_every_steps == 0 or saving or step == start_step + 1)
      # Checked before every save too, so a checkpoint never holds the params of a non-finite step.
      if logging_step:
        scalars = _scalars(metrics)   # (waits for the step, so the progress report below times finished steps)
        check_finite(scalars, step, ckpt.latest_step(), ckpt.directory)
      report(step)
      if logging_step:
        scalars['lr'] = float(lr_schedule(step))
        writer.write_scalars(step, scalars)
        if loss_history is not None:
          loss_history.append((step, scalars['loss']))
        postfix = {'loss': f'{scalars["loss"]:.4f}'}
        if report.images_per_sec is not None:
          postfix['img_s'] = f'{report.images_per_sec:.1f}'
        progress.set_postfix(postfix)
      if preempted:
        return stop(step, preemption.interrupted)
      if step % eval_every == 0 or step == num_steps:
        save(step)   # before the eval: an eval that fails or is killed never loses the trained step
        with report.timed('eval', wait_jax_async_dispatch=False):
          eval_metrics = evaluate.evaluate_params(model, config, state.params, state.model_state,
                                                  data.eval_records, mesh, data.class_names, predict_fn=predict_fn)
        writer.write_scalars(step, {f'eval/{k}': v for k, v in eval_metrics.items()})
        if is_chief:
          tqdm.tqdm.write(f'step {step}: ' + ', '.join(f'{k} {v:.2f}' for k, v in eval_metrics.items()))
        ckpt.set_metrics(step, {'AP': eval_metrics.get('AP', 0.0)})   # ranks it for best-by-AP
        if preemption.requested:   # a signal during the eval: this step is saved, stop here
          return stop(step, preemption.interrupted)
      elif step % config.train.checkpoint_every_steps == 0:
        save(step)
  progress.close()
  if last_saved != num_steps:
    save(num_steps)
  ckpt.close()
  writer.flush()
  if skipped_steps and is_chief:
    print(f'mrqm_jax: warning: {len(skipped_steps)} step(s) skipped because an image of their batch could not be '
          f'decoded (steps {", ".join(map(str, skipped_steps[:10]))}{", ..." if len(skipped_steps) > 10 else ""}; '
          'the files are named in the log)')
  return eval_metrics
