"""Data parallelism over every device of every host: one mesh axis 'data', params replicated.

The train step is a plain `jax.jit` over global arrays: the batch is sharded along its leading axis over
`data`, params and optimizer state are replicated, and XLA inserts the gradient all-reduce. Means and sums
inside the step (loss normalisation by the number of boxes, gradient averaging) are therefore global by
construction, with no `psum` to forget.
"""

import os

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrqm_jax import errors

DATA_AXIS = 'data'


def initialize_distributed() -> None:
  """Joins a multi-host job when the environment describes one (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS).

  A single-process run (laptop, one GPU, Colab) does nothing here.
  """
  if jax.distributed.is_initialized():
    return
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address and os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    # Multi-process CPU runs (tests, debugging a pod setup on a laptop) need a CPU collectives backend.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if address:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') or os.environ.get('SLURM_NTASKS', '1') != '1':
    jax.distributed.initialize()  # cluster auto-detection
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices of all hosts."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


# `train.global_batch_size` = GLOBAL_BATCH_PER_DEVICE: the global batch is per_device_batch_size x device count,
# so it (and the effective learning rate) changes with the machine. Recipes fix the global batch instead.
GLOBAL_BATCH_PER_DEVICE = -1


def global_batch_size(config, device_count: int | None = None, process_count: int | None = None) -> int:
  """The images per optimizer step over all devices and hosts.

  `train.global_batch_size` when > 0 (the recipes: fixed whatever the device count, since train.learning_rate
  was tuned for it), else (-1) `train.per_device_batch_size` x device count. Raises errors.ConfigError, saying
  what to set, when the devices, hosts or `train.grad_accum_steps` cannot split it evenly.
  device_count / process_count: jax.device_count() / jax.process_count() unless given (tests).
  """
  devices = jax.device_count() if device_count is None else device_count
  hosts = jax.process_count() if process_count is None else process_count
  accum = config.train.grad_accum_steps
  if config.train.global_batch_size == GLOBAL_BATCH_PER_DEVICE:
    size = config.train.per_device_batch_size * devices
    key = f'config.train.global_batch_size=-1 (per_device_batch_size x {devices} device(s) = {size})'
  else:
    size = config.train.global_batch_size
    key = f'config.train.global_batch_size={size}'
  if size % devices:
    raise errors.ConfigError(
        f'{key} is not divisible by the {devices} devices: run on fewer devices (e.g. CUDA_VISIBLE_DEVICES=0), '
        f'or set --config.train.global_batch_size to a multiple of {devices} and scale train.learning_rate with '
        f'it (the recipe\'s rate is tuned for its own batch)')
  if size % accum:
    raise errors.ConfigError(f'{key} is not divisible by train.grad_accum_steps={accum}: set grad_accum_steps to '
                             f'a divisor of the global batch')
  if size % hosts:
    raise errors.ConfigError(f'{key} is not divisible by the {hosts} hosts: set --config.train.global_batch_size '
                             f'to a multiple of {hosts}')
  return size


def describe_global_batch(config, device_count: int | None = None) -> str:
  """Where the global batch comes from, for the run's log: 'global batch 2 (config.train.global_batch_size)'."""
  devices = jax.device_count() if device_count is None else device_count
  size = global_batch_size(config, device_count=devices, process_count=1)
  accum = config.train.grad_accum_steps
  split = f', {size // devices} per device' + (f' in {accum} accumulated micro-batches' if accum > 1 else '')
  if config.train.global_batch_size == GLOBAL_BATCH_PER_DEVICE:
    return (f'global batch {size} (train.global_batch_size=-1: per_device_batch_size '
            f'{config.train.per_device_batch_size} x {devices} device(s); it grows with the device count while '
            f'train.learning_rate stays {config.train.learning_rate:g}{split})')
  return f'global batch {size} (train.global_batch_size, fixed whatever the device count{split})'


def host_to_global(batch: dict, mesh: Mesh) -> dict:
  """Assembles each host's slice of the batch into global arrays sharded along 'data'.

  batch: a dict of host-local numpy arrays whose leading axis is this host's share of the global batch.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def describe_mesh(mesh: Mesh) -> str:
  devices = mesh.devices.reshape(-1)
  kinds = sorted({d.device_kind for d in devices})
  return (f'mesh {dict(mesh.shape)} over {len(devices)} device(s) ({", ".join(kinds)}), '
          f'{jax.process_count()} process(es), backend {jax.default_backend()}')
