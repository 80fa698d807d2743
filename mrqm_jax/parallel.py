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


def global_batch_size(config) -> int:
  """`train.global_batch_size`, or per_device_batch_size x device count when it is -1."""
  if config.train.global_batch_size > 0:
    size = config.train.global_batch_size
  else:
    size = config.train.per_device_batch_size * jax.device_count()
  if size % jax.device_count():
    raise ValueError(f'config.train.global_batch_size={size} is not divisible by the {jax.device_count()} devices')
  if size % jax.process_count():
    raise ValueError(f'global batch {size} is not divisible by the {jax.process_count()} hosts')
  return size


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
