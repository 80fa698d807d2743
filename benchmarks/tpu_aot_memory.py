r"""XLA:TPU's memory analysis of the full training step, compiled ahead of time for a TPU this machine does not have.

  pip install 'jax[tpu]==0.10.2'      # libtpu from PyPI: the TPU compiler; no TPU needed (separate venv is fine)
  python benchmarks/tpu_aot_memory.py --config=configs/visdrone.py [--topology=v5p:1x1x1] [--num_boxes=100]
      [--config.model.dtype=bfloat16] [--config.input.image_size=384,640]

Why: XLA:CPU has no bfloat16 arithmetic; it converts bf16 operands to f32 and keeps those copies, so
`train_step.py --memory-only` on CPU overstates what a bf16 step holds. This script builds the same step as
`train_step.py --memory-only` (same config handling, optimizer, loss function, `train_lib.make_train_step`,
`random_batch` shapes), but on compile-only devices of a TPU topology from libtpu
(`jax.experimental.topologies.get_topology_desc`) and with abstract inputs (jax.ShapeDtypeStruct; the train
state via jax.eval_shape), so nothing is allocated or run. The mesh is one chip: `train.per_device_batch_size`
images per step, the paper's single-card setting.

What differs from a CPU trace, because the backend-dependent choices are resolved for TPU, not for the
host's backend (JAX_PLATFORMS=cpu here):
  matcher.backend 'auto' -> matching.resolve_backend(..., 'tpu') (the on-device solver: a host callback
                            cannot be compiled for a device the host does not drive)
  model.conv_impl 'auto' -> 'lax' (what layers.resolve_conv_impl picks off CPU)
  encoder.sampling_layout 'auto' -> deformable_attention.resolve_sampling_layout(..., 'tpu') ('packed')
  compiler options       -> none (train_lib.memory_compiler_options is CPU-only)

The program must fit the chip's HBM or XLA:TPU refuses to compile it (RESOURCE_EXHAUSTED, with the size it
needed); the default v5p chip (95 GiB HBM) leaves room to measure steps larger than a 16 GiB v5e.
Topologies that compile here with libtpu 0.0.42.1: v5e:1x1, v5p:1x1x1, v6e:1x1, v4:1x1x1 (v4's two
TensorCores appear as one device only with chip config 'megacore', which this script uses for v4).

XLA:TPU's compile runs on the host's CPUs and memory: a full-size step takes far longer and more host
memory than XLA:CPU's compile of it (README, measured table); run it alone (the shared memory lock).
XLA_FLAGS=--xla_dump_to=DIR writes the TPU compile's HLO and a buffer assignment (with live-range file: benchmarks/peak_breakdown.py reads it)
written before the TPU backend's last passes: its totals are below memory_analysis()'s, which is the number to use.
The last line is `temp_gib=T peak_gib=P` with train_step.py's formula (P = arguments + outputs +
temporaries - aliased (donated) bytes).
"""

import importlib.util
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# '<chip>:<dims>': the chip generations libtpu knows as compile targets and one chip's mesh per generation.
_TOPOLOGY = re.compile(r'^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$')
# libtpu reads these at load time; without them it still compiles but logs errors about hardware it could
# not find (no metadata server / worker hostnames on a machine that is not a TPU VM).
TPU_ENV_DEFAULTS = {'JAX_PLATFORMS': 'cpu', 'TPU_ACCELERATOR_TYPE': 'v5litepod-1',
                    'TPU_WORKER_HOSTNAMES': 'localhost'}


def topology_kwargs(name: str) -> dict:
  """get_topology_desc keyword arguments for a one-chip topology name such as 'v5e:1x1' or 'v5p:1x1x1'.

  Raises ValueError for another name: an unknown chip, or more than one chip (the step is measured on one
  chip; a multi-chip topology needs the host layout, which this script does not model)."""
  match = _TOPOLOGY.match(name)
  if not match:
    raise ValueError(f"--topology must be '<v4|v5e|v5p|v6e>:<dims>' like 'v5e:1x1' or 'v5p:1x1x1', got {name!r}")
  chip, dims = match.group(1), [int(d) for d in match.group(2).split('x')]
  if dims != [1] * len(dims):
    raise ValueError(f'--topology must be one chip (all dimensions 1), got {name!r}')
  if len(dims) != (2 if chip in ('v5e', 'v6e') else 3):
    raise ValueError(f'--topology {name!r}: {chip} topologies have {2 if chip in ("v5e", "v6e") else 3} '
                     'dimensions')
  return {'topology_name': name, 'chip_config_name': 'megacore' if chip == 'v4' else 'default',
          'chips_per_host_bounds': (1, 1, 1), 'num_slices': 1, 'wrap': (False, False, False)}


def tpu_config(config):
  """A copy of the config with the backend-dependent 'auto' choices resolved as on a TPU (module doc)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import deformable_attention  # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import matching  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  if config.iah.a_s <= 0:       # as train_step.run: -1 = auto (resolved from data); the value does not change the cost
    config.iah.a_s = 3.0
  config.matcher.backend = matching.resolve_backend(config.matcher.backend, 'tpu')
  if config.model.conv_impl == 'auto':
    config.model.conv_impl = 'lax'
  config.encoder.sampling_layout = deformable_attention.resolve_sampling_layout(config.encoder.sampling_layout,
                                                                                'tpu')
  config.lock()
  return config


def run(config, topology: str, num_boxes: int = 100, print_fn=print) -> dict:
  """Compiles the step for `topology` and prints its memory analysis (module doc); returns the numbers."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from benchmarks import model_cost  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  from mrqm_jax import model_lib, parallel, train, train_lib  # pylint: disable=g-import-not-at-top

  start_time = time.perf_counter()
  kwargs = topology_kwargs(topology)
  config = tpu_config(config)
  devices = topologies.get_topology_desc(platform='tpu', **kwargs).devices
  mesh = jax.sharding.Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  batch_size = config.train.per_device_batch_size * len(devices)
  replicated, batch_sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  model = model_lib.make_model(config)
  params, model_state = model_lib.split_variables(model_lib.abstract_variables(model, config))
  tx = train_lib.make_optimizer(config, params, steps_per_epoch=1000)
  state = jax.eval_shape(lambda p, s: train_lib.create_train_state(p, s, tx, rng=jax.random.PRNGKey(1)),
                         params, model_state)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharded)
           for k, v in train_step.random_batch(config, batch_size, num_boxes).items()}
  base_loss_fn = train.make_loss_fn(model, config)

  def loss_fn(*args):
    with jax.named_scope(train_step.LOSS_SCOPE):   # metadata only, as in train_step.py
      return base_loss_fn(*args)

  step = train_lib.make_train_step(loss_fn, tx, mesh, minimize_memory=False)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  h, w = config.input.image_size
  print_fn(f'train step (TPU AOT): canvas {h}x{w}, batch {batch_size}, aux_heads={tuple(config.model.aux_heads)}, '
           f'dtype {config.model.dtype}, matcher {config.matcher.backend}, conv_impl {config.model.conv_impl}, '
           f'remat {config.model.remat}, sampling_layout {config.encoder.sampling_layout}, target {topology} ({devices[0].device_kind}, {len(devices)} device), '
           f'jax {jax.__version__}')
  print_fn(f'{"lower (s)":<28} {lower_s:>10.1f}')
  print_fn(f'{"compile (s)":<28} {compile_s:>10.1f}')
  mem = compiled.memory_analysis()
  temp, peak = train_step.print_memory_analysis(
      mem, print_fn, extra_rows=[('generated code', mem.generated_code_size_in_bytes)])
  flops = model_cost.flops_of(compiled)
  print_fn(f'{"step GFLOPs (XLA)":<28} {flops / 1e9:>10.1f}')
  wall = time.perf_counter() - start_time
  print_fn(f'{"benchmark wall time (s)":<28} {wall:>10.1f}')
  print_fn(f'temp_gib={temp:.3f} peak_gib={peak:.3f}')
  return {'temp_gib': temp, 'peak_gib': peak, 'compile_s': compile_s, 'lower_s': lower_s, 'flops': flops,
          'batch': batch_size, 'device_kind': devices[0].device_kind}


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  try:
    topology_kwargs(values.topology)
  except ValueError as e:
    print(f'tpu_aot_memory.py: {e}', file=sys.stderr)
    sys.exit(2)
  if values.num_boxes < 0:
    print(f'tpu_aot_memory.py: --num_boxes must be >= 0, got {values.num_boxes}', file=sys.stderr)
    sys.exit(2)
  if importlib.util.find_spec('libtpu') is None:
    print("tpu_aot_memory.py: libtpu is not installed (pip install 'jax[tpu]==<the jax version>')", file=sys.stderr)
    sys.exit(2)
  run(values.config, values.topology, values.num_boxes)


if __name__ == '__main__':
  for _key, _value in TPU_ENV_DEFAULTS.items():   # before jax (and with it libtpu) loads
    os.environ.setdefault(_key, _value)
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/visdrone.py.', lock_config=True)
  flags.DEFINE_string('topology', 'v5p:1x1x1', "One TPU chip to compile for: 'v5e:1x1', 'v5p:1x1x1', 'v6e:1x1', "
                      "'v4:1x1x1'.")
  flags.DEFINE_integer('num_boxes', 100, 'Valid boxes per image in the (abstract) batch; as train_step.py.')
  flags.mark_flag_as_required('config')
  app.run(main)
