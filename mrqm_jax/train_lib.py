"""The pieces of training that do not touch files: train state, optimizer, the jitted data-parallel step.

Kept apart from `train.py` (the loop, data, checkpoints, logging) so that tests can build a step for any model
and loss, e.g. to check that a step on 4 devices equals a step on 1.
"""

from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mrqm_jax import parallel
from mrqm_jax import traced_cache

PyTree = Any

# Top-level param collections the optimizer treats specially.
BACKBONE_KEY = 'backbone'


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  step: [] int32; params: trainable params; opt_state: optax state; model_state: non-trainable variable
  collections (e.g. frozen BatchNorm statistics); rng: [2] uint32 PRNG key, split every step.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  rng: jax.Array


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Constant lr with step drops at `train.lr_drop_epochs` (mmdet 1x: x0.1 at epoch 11), optional warmup."""
  boundaries = {int(round(e * steps_per_epoch)): config.train.lr_drop_factor for e in config.train.lr_drop_epochs}
  schedule = optax.piecewise_constant_schedule(config.train.learning_rate, boundaries)
  if config.train.warmup_steps > 0:
    warmup = optax.linear_schedule(0.0, config.train.learning_rate, config.train.warmup_steps)
    schedule = optax.join_schedules([warmup, schedule], [config.train.warmup_steps])
  return schedule


def param_labels(params: PyTree, frozen: Callable[[tuple[str, ...]], bool] | None = None) -> PyTree:
  """'frozen' | 'backbone' | 'rest' for every param leaf, by its path.

  Frozen params get no update at all (not even AdamW's decoupled weight decay, which would otherwise shrink
  weights that the model keeps constant with stop_gradient).
  """
  def label(path, _):
    names = tuple(getattr(k, 'key', getattr(k, 'name', str(k))) for k in path)
    if frozen is not None and frozen(names):
      return 'frozen'
    return 'backbone' if names and names[0] == BACKBONE_KEY else 'rest'
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ml_collections.ConfigDict, params: PyTree, steps_per_epoch: int,
                   frozen: Callable[[tuple[str, ...]], bool] | None = None) -> optax.GradientTransformation:
  """AdamW (paper: lr 2e-4, wd 1e-4), backbone lr x `backbone_lr_mult`, global-norm clipping first."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  backbone_schedule = lambda step: schedule(step) * config.train.backbone_lr_mult
  adamw = lambda lr: optax.adamw(lr, weight_decay=config.train.weight_decay)
  return optax.chain(
      optax.clip_by_global_norm(config.train.grad_clip_norm),
      optax.multi_transform({'rest': adamw(schedule), 'backbone': adamw(backbone_schedule),
                             'frozen': optax.set_to_zero()},
                            param_labels(params, frozen)))


LossFn = Callable[[PyTree, PyTree, dict, jax.Array], tuple[jax.Array, dict]]
"""(params, model_state, batch, rng) -> (scalar loss, dict of scalar terms), a mean over the given batch."""


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    grad_accum_steps: int = 1, donate: bool = True, minimize_memory: bool = False,
                    trace_key: str | None = None):
  """The jitted step: (state, batch) -> (state, metrics), data-parallel over `mesh`.

  batch: dict of global arrays with leading axis B (the global batch), sharded over 'data'. With
  `grad_accum_steps = A > 1` the batch is split into A micro-batches of B/A, whose gradients are averaged
  before one optimizer update (the paper's global batch on fewer devices). Every micro-batch keeps the data
  sharding, so each device processes B/(A * num_devices) examples at a time.

  metrics: {'loss', 'grad_norm', 'lr_scale' ..., and every loss term}, means over the batch.

  trace_key: what the loss function closes over (train.py: the config as JSON); given, the traced step is kept
  across runs beside the compilation cache (`traced_cache`); None: plain jit.

  minimize_memory (set with config.model.remat): on XLA:CPU, compile with its memory-optimized scheduler.
  The default CPU scheduler starts independent work as early as possible (for thread-level concurrency), so
  it runs every layer's rematerialized forward and every zero-initialized gradient buffer at the start of the
  backward pass, and remat then saves little. GPU and TPU get their backend's default (not measured here).
  """

  def step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    if grad_accum_steps == 1:
      (loss, terms), grads = grad_fn(state.params, state.model_state, batch, step_rng)
    else:
      def split(x):
        x = x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:])
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS)))
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        micro_batch, i = xs
        (loss, terms), grads = grad_fn(state.params, state.model_state, micro_batch,
                                       jax.random.fold_in(step_rng, i))
        carry = jax.tree.map(jnp.add, carry, (loss, terms, grads))
        return carry, None
      (loss_shape, terms_shape), grads_shape = jax.eval_shape(
          grad_fn, state.params, state.model_state, jax.tree.map(lambda x: x[0], micro), step_rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, terms_shape, grads_shape))
      (loss, terms, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
      loss, terms, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, terms, grads))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads), **terms}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  replicated = parallel.replicated(mesh)
  return traced_cache.cached_jit(
      step, name='train_step', key=None if trace_key is None else f'{trace_key}|accum={grad_accum_steps}',
      mesh=mesh, in_shardings=(replicated, parallel.batch_sharded(mesh)), out_shardings=(replicated, replicated),
      donate_argnums=(0,) if donate else (), compiler_options=memory_compiler_options() if minimize_memory else None)


def memory_compiler_options() -> dict[str, str] | None:
  """XLA options that order a compiled step for the least live memory on this backend (None: its default)."""
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
  return None


def create_train_state(params: PyTree, model_state: PyTree, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    model_state=model_state, rng=rng)
