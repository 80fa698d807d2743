r"""The full training step (forward, every auxiliary head, matching, losses, backward, AdamW): compile time, step
time, images/s, achieved TFLOP/s and MFU, XLA's memory analysis and the step's time split by part, on whatever
backend is present.

  python benchmarks/train_step.py --config=configs/visdrone.py [--config.input.image_size=384,640]
      [--steps=N] [--warmup=N] [--num_boxes=100] [--parts|--no-parts] [--memory-only] [--flops-only]

The batch is `train.per_device_batch_size x devices` images of the config's canvas with `--num_boxes` random
small boxes each (sides 4..64 px, VisDrone-like), so the matching and the auxiliary heads do real work.
--memory-only compiles the step without running it (works at the full canvas on a machine that could not run
it) and prints XLA's memory analysis of the compiled step and its FLOPs:
  step GFLOPs, model        matmul + conv FLOPs per device (the global count / devices: data parallel;
                            dot_general, conv_general_dilated; elementwise ops, gathers and reductions not
                            counted, the MFU convention) of the forward and backward pass
                            without the rematerialized recomputation (PaLM appendix B), from jaxprs
                            (`model_cost.jaxpr_cost`, no compile): every scan / lax.map iteration counted
                            (the SAE's and decoder's layer scans, the encoder's token chunks), a while loop's
                            body once (then the row says it is a lower bound), a cond's largest branch.
                            The recomputation is told apart in a trace of the loss and its vjp with the
                            cotangent as an input: inside a remat region's backward, the matmuls/convs that
                            do not depend on the cotangent are the recomputed forward.
  step GFLOPs, executed     the same count over the step's own jaxpr (the program that is compiled), with the
                            recomputation (and its size in the comment)
  step GFLOPs (XLA)         XLA's cost analysis of the compiled step (per device: the SPMD program): it counts
                            every while loop's body ONCE (scan and lax.map lower to while loops) and counts
                            elementwise ops, so it is neither of the two above.
--flops-only prints only the first two (and init / compile as nan, XLA's row as nan, temp_gib=nan peak_gib=nan):
it traces the step with abstract shapes, without running the init or compiling (seconds at 800x1344).
Otherwise it also runs `--warmup` untimed steps (default 0 on CPU, where a step takes far longer than its
first-run setup, and 1 on GPU/TPU), then `--steps` timed steps (default 1 on CPU, 10 on GPU/TPU) and prints:
  step, median / images/s   median wall time of the timed steps, batch / median
  step CPU, median          median process CPU seconds of the timed steps (all threads; steadier under load)
  TFLOP/s                   model FLOPs / median step time
  TFLOP/s, executed         executed FLOPs / median step time (the hardware's matmul/conv throughput)
  MFU                       TFLOP/s (model FLOPs) / the device's dense peak for config.model.dtype
                            (`PEAK_TFLOPS`); 'n/a' on a device not in the table (e.g. CPU)
  device peak (GiB)         the device's `memory_stats()` peak (GPU/TPU; CPU has none)
and with --parts (default) the time split by part, from a PROFILE of one more step (`jax.profiler.trace`,
its per-HLO-op events): each executed op is attributed to a part by the module scopes that Flax puts in its
metadata (op_name) and by the file that created it:
  backbone / neck / encoder       ops under MRQM/backbone, MRQM/neck, MRQM/encoder (forward and backward)
  decoder (+ query selection)     the decoder's main call (DN + matching queries), the encoder-output heads, the
                                  top-k query selection and the DN query construction (the rest of MRQM)
  auxiliary heads                 aux levels, the IAH / ATSS / R-CNN heads and their query groups, including
                                  the decoder calls that decode those groups (scoped apart by this benchmark)
  matching                        ops created in mrqm_jax/ops/matching.py: the Hungarian solver (on device or
                                  the SciPy host callback) of every matching of the step
  losses                          the rest of the loss function (matching costs, every loss term)
  optimizer                       everything outside the loss function and its gradient: gradient clipping,
                                  AdamW (tx.update), apply_updates, the grad-norm metric
  other                           ops without metadata (copies and layout changes XLA inserts)
Op times are summed per part (an op nested in another op's event, e.g. a while body, is counted once, in the
outer op). Ops that run concurrently on several threads or streams are each counted, so the sum of the parts
can exceed the step's wall time, and host gaps between ops make it fall short: the table prints the sum
against the profiled step's wall time and the residual (wall - sum). The scopes only add metadata: the
compiled step is the same program as without them.
The line before the last is the wall time of the whole benchmark; the last line is always
`temp_gib=T peak_gib=P` (XLA memory analysis: P = arguments + outputs + temporaries - aliased (donated) bytes).
Config overrides (`--config.KEY=VALUE`) work as in `python -m mrqm_jax.main`.

Time budget: the run costs init + compile + two traces for the FLOP count (printed) + (warmup + steps + 1
profiled) steps. On a 2-core CPU at 384x640
that is the init and compile (2-3 minutes on a quiet machine) plus two steps of about 45 s (hence the CPU
defaults; the profiled step's wall time, printed with the split, is a second sample). On one GPU at 800x1344, batch 2, the init and step compiles take a few minutes, and 1 + 10 + 1 steps
stay far below a minute unless the step is slower than about 5 s (the on-device Hungarian solver is the
candidate: matcher.backend); pass a smaller --steps then.
"""

import collections
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 1024.0 ** 3

# Dense (no structured sparsity) peak TFLOP/s per chip, from the vendors' datasheets / whitepapers: NVIDIA
# H100 SXM5 and H200 SXM (BF16 989.4, TF32 494.7), H100 PCIe (756.5 / 378), H100 NVL and H200 NVL (835.5 /
# 417.5), A100 SXM4/PCIe (312 / 156), GeForce RTX 3090 (GA102 whitepaper, FP32 accumulate: BF16 71, TF32 35.6);
# Google Cloud TPU system-architecture pages, BF16 per chip: v4 275, v5e 197, v5p 459, v6e (Trillium) 918.
# The 'float32' entry is what JAX runs a float32 matmul or convolution as at its default precision: TF32
# tensor cores on NVIDIA Ampere and newer, one bf16 pass on the TPU's MXU (so a TPU's float32 peak is its bf16
# peak). Rows are tried in order; the pattern is searched in the lower-cased `device_kind`.
PEAK_TFLOPS = (
    (r'h100.*pcie', 'H100 PCIe', {'float32': 378.0, 'bfloat16': 756.5}),
    (r'h100.*nvl', 'H100 NVL', {'float32': 417.5, 'bfloat16': 835.5}),
    (r'h100', 'H100 SXM', {'float32': 494.7, 'bfloat16': 989.4}),
    (r'h200.*nvl', 'H200 NVL', {'float32': 417.5, 'bfloat16': 835.5}),
    (r'h200', 'H200 SXM', {'float32': 494.7, 'bfloat16': 989.4}),
    (r'a100', 'A100', {'float32': 156.0, 'bfloat16': 312.0}),
    (r'rtx 3090$', 'RTX 3090', {'float32': 35.6, 'bfloat16': 71.0}),
    (r'tpu v4', 'TPU v4', {'float32': 275.0, 'bfloat16': 275.0}),
    (r'tpu v5 ?(lite|e)', 'TPU v5e', {'float32': 197.0, 'bfloat16': 197.0}),
    (r'tpu v5', 'TPU v5p', {'float32': 459.0, 'bfloat16': 459.0}),
    (r'tpu v6 ?(lite|e)', 'TPU v6e', {'float32': 918.0, 'bfloat16': 918.0}),
)

PARTS = ('backbone', 'neck', 'encoder', 'decoder (+ query selection)', 'auxiliary heads', 'matching', 'losses',
         'optimizer', 'other')
# Named scopes this benchmark adds: the loss function (model + losses; outside it is the optimizer) and the
# decoder calls that decode the auxiliary heads' query groups (the same 'decoder' module as the main call).
LOSS_SCOPE = 'bench_loss_fn'
AUX_GROUP_SCOPE = 'bench_aux_query_group'
MODEL_PART = {'backbone': 'backbone', 'neck': 'neck', 'encoder': 'encoder', 'aux_levels': 'auxiliary heads',
              'iah': 'auxiliary heads', 'atss': 'auxiliary heads', 'rcnn': 'auxiliary heads'}
MATCHING_FILE = os.path.join('mrqm_jax', 'ops', 'matching.py')
LAST_LINE = re.compile(r'^temp_gib=(nan|\d+\.\d{3}) peak_gib=(nan|\d+\.\d{3})$')


# ------------------------------------------------------------------------------------------------ MFU
def device_peak(device_kind: str, dtype: str) -> tuple[str, float] | None:
  """(table name, dense peak TFLOP/s) of a device kind for the model dtype, None if the device is unknown."""
  kind = device_kind.lower()
  key = 'bfloat16' if dtype in ('bfloat16', 'float16') else 'float32'
  for pattern, name, peaks in PEAK_TFLOPS:
    if re.search(pattern, kind):
      return name, peaks[key]
  return None


def throughput(flops: float, seconds: float, device_kind: str, dtype: str) -> tuple[float, float | None]:
  """(achieved TFLOP/s, MFU in [0, 1] or None for an unknown device)."""
  tflops = flops / seconds / 1e12
  peak = device_peak(device_kind, dtype)
  return tflops, (tflops / peak[1] if peak else None)


# ---------------------------------------------------------------------------------------- parts from a profile
def scope_names(op_name: str) -> list[str]:
  """'jit(step)/transpose(jvp(bench_loss_fn))/MRQM/decoder.foo/dot' -> ['step', 'bench_loss_fn', 'MRQM',
  'decoder', 'dot']: transformation wrappers and method suffixes stripped."""
  names = []
  for part in op_name.split('/'):
    part = re.sub(r'^(?:[\w\-]+\()+', '', part).rstrip(')')
    names.append(part.split('.')[0])
  return names


def classify(op_name: str, files: tuple[str, ...], model_scope: str = 'MRQM') -> str:
  """The part (one of PARTS) of an HLO op from its metadata op_name and the files of its creating stack."""
  if any(f.endswith(MATCHING_FILE) for f in files):
    return 'matching'
  if not op_name:
    return 'other'
  names = scope_names(op_name)
  if LOSS_SCOPE not in names:
    return 'optimizer'
  if model_scope not in names:
    return 'losses'
  inside = names[names.index(model_scope) + 1:-1]   # module scopes under the model (the last is the primitive)
  if AUX_GROUP_SCOPE in inside or any(n.startswith('aux_query_') for n in inside):
    return 'auxiliary heads'
  if inside and inside[0] in MODEL_PART:
    return MODEL_PART[inside[0]]
  return 'decoder (+ query selection)'


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+) \(.*\{\s*$')
_CALLED = re.compile(r'\b(?:calls|body|condition|to_apply|branch_computations|called_computations)='
                     r'(\{[^}]*\}|%?[\w.\-]+)')
_METADATA = re.compile(r'metadata=\{([^}]*)\}')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r'stack_frame_id=(\d+)')
_SOURCE_FILE = re.compile(r'source_file="([^"]*)"')


def hlo_op_metadata(hlo_text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
  """{instruction name: (op_name, files of its creating Python stack, innermost first)} of a compiled HLO
  module's text, for the instructions of every computation (a while body's ops run as their own kernels on
  GPU). An op whose op_name is not a scope path (ops inside while bodies, reductions and sorts often carry
  only the primitive's name) takes the op_name of the instruction that calls its computation; its own files
  stay first."""
  files, locations, frames = {}, {}, {}
  section, computation = None, None
  ops, computation_of, callers = {}, {}, {}
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = line
      continue
    if section and re.match(r'^\d+ ', line):
      key, rest = line.split(' ', 1)
      if section == 'FileNames':
        files[key] = rest.strip().strip('"')
      elif section == 'FileLocations':
        m = re.search(r'file_name_id=(\d+)', rest)
        locations[key] = m.group(1) if m else None
      elif section == 'StackFrames':
        loc = re.search(r'file_location_id=(\d+)', rest)
        parent = re.search(r'parent_frame_id=(\d+)', rest)
        frames[key] = (loc.group(1) if loc else None, parent.group(1) if parent else None)
      continue
    section = None
    m = _COMPUTATION.match(line)
    if m:
      computation = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, rest = m.groups()
    meta = _METADATA.search(rest)
    meta = meta.group(1) if meta else ''
    op, frame, source = _OP_NAME.search(meta), _FRAME_ID.search(meta), _SOURCE_FILE.search(meta)
    ops[name] = (op.group(1) if op else '', frame.group(1) if frame else None, source.group(1) if source else None)
    computation_of[name] = computation
    for called in _CALLED.findall(rest):
      for callee in re.findall(r'%?([\w.\-]+)', called):
        callers.setdefault(callee, name)

  def stack_files(frame_id):
    out, seen = [], set()
    while frame_id and frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc, parent = frames[frame_id]
      if loc in locations and locations[loc] in files:
        out.append(files[locations[loc]])
      frame_id = parent
    return out

  def scoped_name(name, seen=()):
    op = ops[name][0]
    if '/' in op or name in seen:
      return op
    caller = callers.get(computation_of.get(name))
    return scoped_name(caller, seen + (name,)) if caller in ops else op

  return {name: (scoped_name(name), tuple(stack_files(frame)) + ((source,) if source else ()))
          for name, (_, frame, source) in ops.items()}


def op_events(trace: dict) -> list[dict]:
  """Per-HLO-op complete events of a Perfetto/Chrome trace: outermost ones only per thread (an op inside
  another op's span, e.g. a while body's, belongs to the outer one); on GPU/TPU only the device's events."""
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  process_names = {e.get('pid'): str(e.get('args', {}).get('name', '')) for e in events
                   if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  ops = [e for e in events if e.get('ph') == 'X' and isinstance(e.get('args'), dict) and 'hlo_op' in e['args']]
  device = {pid for pid, name in process_names.items() if '/device:' in name}
  if any(e.get('pid') in device for e in ops):
    ops = [e for e in ops if e.get('pid') in device]
  by_thread = collections.defaultdict(list)
  for e in ops:
    by_thread[(e.get('pid'), e.get('tid'))].append(e)
  outer = []
  for thread_events in by_thread.values():
    end = -float('inf')
    for e in sorted(thread_events, key=lambda e: (float(e['ts']), -float(e.get('dur', 0)))):
      if float(e['ts']) >= end:
        outer.append(e)
        end = float(e['ts']) + float(e.get('dur', 0))
  return outer


def part_seconds(events: list[dict], metadata: dict, model_scope: str = 'MRQM', module: str | None = None,
                 other_ops: dict | None = None) -> dict[str, float]:
  """{part: seconds} over PARTS from op events (dur in microseconds) and `hlo_op_metadata`; events of another
  HLO module than `module` are skipped. The seconds of each op counted as 'other' are added to other_ops."""
  out = dict.fromkeys(PARTS, 0.0)
  for e in events:
    if module and e['args'].get('hlo_module', module) != module:
      continue
    op_name, files = metadata.get(e['args']['hlo_op'], ('', ()))
    part = classify(op_name, files, model_scope)
    seconds = float(e.get('dur', 0.0)) * 1e-6
    out[part] += seconds
    if part == 'other' and other_ops is not None:
      other_ops[e['args']['hlo_op']] = other_ops.get(e['args']['hlo_op'], 0.0) + seconds
  return out


def parts_table(parts: dict[str, float], step_seconds: float) -> list[str]:
  """The printed table: seconds and % of the step per part, their sum, the step and the residual."""
  lines = [f'{"part":<28} {"seconds":>10} {"% of step":>10}']
  for name, seconds in parts.items():
    lines.append(f'{name:<28} {seconds:>10.3f} {seconds / step_seconds:>10.1%}')
  total = sum(parts.values())
  lines.append(f'{"sum of parts":<28} {total:>10.3f} {total / step_seconds:>10.1%}')
  lines.append(f'{"profiled step (wall)":<28} {step_seconds:>10.3f} {1:>10.1%}')
  lines.append(f'{"residual (wall - sum)":<28} {step_seconds - total:>10.3f} {(step_seconds - total) / step_seconds:>10.1%}')
  return lines


def print_memory_analysis(mem, print_fn, extra_rows=()) -> tuple[float, float]:
  """Prints XLA's memory analysis of a compiled step (GiB rows; `extra_rows`: (label, bytes) printed before the
  peak) and returns (temporaries, peak) in GiB, peak = arguments + outputs + temporaries - aliased (donated)
  bytes; (nan, nan) when there is no analysis."""
  if mem is None:
    return float('nan'), float('nan')
  temp = mem.temp_size_in_bytes / GIB
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes) / GIB
  rows = [('arguments', mem.argument_size_in_bytes), ('outputs', mem.output_size_in_bytes),
          ('temporaries', mem.temp_size_in_bytes), ('aliased', mem.alias_size_in_bytes), *extra_rows]
  for label, size in rows:
    print_fn(f'{label + " (GiB)":<28} {size / GIB:>10.3f}')
  print_fn(f'{"peak (GiB)":<28} {peak:>10.3f}')
  return temp, peak


def aux_group_interceptor():
  """A Flax method interceptor that runs every call of the top-level 'decoder' after the first one of each
  model call (the detector decodes the matching + DN queries first, then one query group per auxiliary head)
  under AUX_GROUP_SCOPE. Returns (interceptor, counts) with counts['aux_group_calls'] per traced model call."""
  import jax  # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import detector  # pylint: disable=g-import-not-at-top
  counts = {'decoder_calls': 0, 'aux_group_calls': 0}

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.scope.path) if context.module.scope is not None else ()
    # The model itself, not the unbound layer templates that the layer loops (lax.scan) apply at their own root.
    if context.method_name == '__call__' and path == () and isinstance(context.module, detector.MRQM):
      counts['decoder_calls'] = 0
      counts['aux_group_calls'] = 0
    elif context.method_name == '__call__' and path == ('decoder',):
      counts['decoder_calls'] += 1
      if counts['decoder_calls'] > 1:
        counts['aux_group_calls'] += 1
        with jax.named_scope(AUX_GROUP_SCOPE):
          return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)

  return interceptor, counts


def profile_parts(compiled, state, batch, model_scope: str):
  """Runs one step under jax.profiler.trace: (new state, {part: seconds}, the step's wall seconds, [(op,
  seconds)] of the 'other' ops, largest first)."""
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      wall = time.perf_counter() - start
    paths = [os.path.join(root, f) for root, _, fs in os.walk(folder) for f in fs if f.endswith('.trace.json.gz')]
    trace = {'traceEvents': []}   # no trace file: no per-op events, the caller says so
    if paths:
      with gzip.open(paths[0], 'rt') as f:
        trace = json.load(f)
  # The HLO text is parsed only now, so that neither it nor the trace is resident while the step runs.
  metadata = hlo_op_metadata(compiled.as_text())
  # Only the step's own module: the trace may hold small jitted helpers (e.g. host-to-device copies).
  events = op_events(trace)
  del trace
  modules = collections.Counter(e['args'].get('hlo_module') for e in events)
  module = modules.most_common(1)[0][0] if modules else None
  other_ops = {}
  split = part_seconds(events, metadata, model_scope, module, other_ops)
  return state, split, wall, sorted(other_ops.items(), key=lambda kv: -kv[1])


# ---------------------------------------------------------------------------------------------------- the run
def random_batch(config, batch_size: int, num_boxes: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  h, w = config.input.image_size
  m = config.dataset.max_boxes
  n = min(num_boxes, m)
  sides = rng.uniform(4, 64, (batch_size, m, 2)) / np.array([w, h])
  centres = rng.uniform(0.05, 0.95, (batch_size, m, 2))
  return {'image': rng.normal(size=(batch_size, h, w, 3)).astype(np.float32),
          'pad_mask': np.zeros((batch_size, h, w), bool),
          'boxes': np.concatenate([centres, sides], -1).astype(np.float32),
          'labels': rng.integers(0, config.dataset.num_classes, (batch_size, m)).astype(np.int32),
          'box_valid': np.arange(m)[None, :].repeat(batch_size, 0) < n,
          'scale': np.full((batch_size,), 0.53, np.float32)}


def run(config, *, steps: int | None = None, warmup: int | None = None, num_boxes: int = 100, parts: bool = True,
        memory_only: bool = False, flops_only: bool = False, start_time: float | None = None, print_fn=print) -> dict:
  """The benchmark (module doc); prints its table with print_fn and returns what it printed as numbers."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from benchmarks import model_cost  # pylint: disable=g-import-not-at-top
  from mrqm_jax import model_lib, parallel, train, train_lib  # pylint: disable=g-import-not-at-top

  start_time = time.perf_counter() if start_time is None else start_time
  config = ml_collections.ConfigDict(config.to_dict())
  if config.iah.a_s <= 0:       # -1 = auto (resolved from data in training): the value does not change the cost
    config.iah.a_s = 3.0
  config.lock()
  backend = jax.default_backend()
  if steps is None:
    steps = 1 if backend == 'cpu' else 10
  if warmup is None:   # on CPU a step takes far longer than its first-run setup, and every step costs minutes
    warmup = 0 if backend == 'cpu' else 1
  if steps < 1 or warmup < 0:
    raise ValueError(f'--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}')
  mesh = parallel.create_mesh()
  batch_size = config.train.per_device_batch_size * jax.device_count()
  model = model_lib.make_model(config)
  model_scope = type(model).__name__
  result = {'backend': backend, 'device_kind': jax.devices()[0].device_kind, 'batch': batch_size}
  start = time.perf_counter()
  # flops_only: abstract values (shapes) throughout, nothing is computed or compiled.
  init = lambda r: model_lib.init_variables(model, config, r)
  key = jax.random.PRNGKey(0)
  variables = jax.eval_shape(init, key) if flops_only else jax.jit(init)(key)
  result['init_s'] = time.perf_counter() - start
  params, model_state = model_lib.split_variables(variables)
  tx = train_lib.make_optimizer(config, params, steps_per_epoch=1000)
  make_state = lambda p, s: train_lib.create_train_state(p, s, tx, rng=jax.random.PRNGKey(1))
  state = (jax.eval_shape(make_state, params, model_state) if flops_only else
           jax.jit(make_state, out_shardings=parallel.replicated(mesh))(params, model_state))
  base_loss_fn = train.make_loss_fn(model, config)

  def loss_fn(*args):
    with jax.named_scope(LOSS_SCOPE):   # metadata only: tells the model + losses apart from the optimizer
      return base_loss_fn(*args)

  step = train_lib.make_train_step(loss_fn, tx, mesh, minimize_memory=config.model.remat)
  batch = random_batch(config, batch_size, num_boxes)
  batch = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()} if flops_only else
           parallel.host_to_global(batch, mesh))

  nn.enable_named_call()   # Flax's module scopes in the op metadata (the default; an env var can turn it off)
  interceptor, calls = aux_group_interceptor()
  start = time.perf_counter()
  with nn.intercept_methods(interceptor):
    traced = step.trace(state, batch)
  lowered = compiled = None
  if not flops_only:
    lowered = traced.lower()
    compiled = lowered.compile()
  result['compile_s'] = float('nan') if flops_only else time.perf_counter() - start
  # Matmul/conv FLOPs from jaxprs (no compile): the step's own (every loop iteration, the recomputation
  # included) and the loss-and-gradient's traced as a vjp, which tells the recomputation apart (model FLOPs).
  start = time.perf_counter()
  executed = model_cost.jaxpr_cost(traced.jaxpr)
  del traced
  cost = model_cost.loss_and_grad_cost(base_loss_fn, state.params, state.model_state, batch,
                                       jax.random.PRNGKey(2))
  result['flops_trace_s'] = time.perf_counter() - start
  del lowered, variables, params   # the StableHLO module and the init's copy of the parameters
  result['aux_group_calls'] = calls['aux_group_calls']
  h, w = config.input.image_size
  print_fn(f'train step: {config.get("dataset", {}).get("format", "")} config, canvas {h}x{w}, batch '
           f'{batch_size}, aux_heads={tuple(config.model.aux_heads)}, dtype {config.model.dtype}, matcher '
           f'{config.matcher.backend}, backend {backend} ({result["device_kind"]})')
  print_fn(f'{"init (s)":<28} {result["init_s"]:>10.1f}')
  print_fn(f'{"compile (s)":<28} {result["compile_s"]:>10.1f}')
  temp, peak = print_memory_analysis(None if flops_only else compiled.memory_analysis(), print_fn)
  result.update(temp_gib=temp, peak_gib=peak)
  # The jaxprs count the global batch; per device (data parallel) like XLA's SPMD program and the peak table.
  devices = jax.device_count()
  flops = cost.model / devices
  result.update(flops=flops, flops_executed=executed.executed / devices, flops_loss_and_grad=cost.executed / devices,
                flops_recompute=cost.recompute / devices, while_loops=executed.while_loops,
                flops_xla=float('nan') if flops_only else model_cost.flops_of(compiled))
  bound = (f'; {executed.while_loops} while loop(s) with matmuls, counted once: a lower bound'
           if executed.while_loops else '')
  print_fn(f'{"step GFLOPs, model":<28} {flops / 1e9:>10.1f}   (matmul + conv, forward + backward, without '
           f'the recomputation{bound})')
  print_fn(f'{"step GFLOPs, executed":<28} {result["flops_executed"] / 1e9:>10.1f}   (the same, with the backward\'s '
           f'rematerialized forward: {result["flops_recompute"] / 1e9:.1f}; jaxprs traced in '
           f'{result["flops_trace_s"]:.1f} s)')
  print_fn(f'{"step GFLOPs (XLA)":<28} {result["flops_xla"] / 1e9:>10.1f}   (XLA cost analysis of the compiled '
           f'step: loop bodies counted once, elementwise ops included)')
  if not (memory_only or flops_only):
    for _ in range(warmup):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    times, cpu_times = [], []
    for _ in range(steps):
      start, cpu_start = time.perf_counter(), time.process_time()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    result.update(step_s=median, step_cpu_s=statistics.median(cpu_times), images_per_s=batch_size / median,
                  loss=float(metrics['loss']))
    print_fn(f'{"step, median (s)":<28} {median:>10.3f}   (of {len(times)}: '
             f'{", ".join(f"{t:.3f}" for t in times)}; after {warmup} warm-up)')
    # Process CPU seconds (all threads): steadier than wall time on a shared machine, and what
    # ../shared/reference/codino_step.py prints for the PyTorch reference.
    print_fn(f'{"step CPU, median (s)":<28} {result["step_cpu_s"]:>10.3f}   (process CPU seconds, all threads)')
    print_fn(f'{"images/s":<28} {batch_size / median:>10.3f}')
    tflops, mfu = throughput(flops, median, result['device_kind'], config.model.dtype)
    peak_entry = device_peak(result['device_kind'], config.model.dtype)
    result.update(tflops=tflops, mfu=mfu, tflops_executed=result['flops_executed'] / median / 1e12)
    print_fn(f'{"TFLOP/s":<28} {tflops:>10.3f}   (model FLOPs / median step time)')
    print_fn(f'{"TFLOP/s, executed":<28} {result["tflops_executed"]:>10.3f}   (with the recomputation)')
    if mfu is None:
      print_fn(f'{"MFU":<28} {"n/a":>10}   (no peak known for {result["device_kind"]!r})')
    else:
      print_fn(f'{"MFU":<28} {mfu:>10.1%}   (of {peak_entry[0]} {config.model.dtype} dense peak '
               f'{peak_entry[1]:g} TFLOP/s)')
    print_fn(f'{"loss":<28} {result["loss"]:>10.3f}')
    devices = jax.local_devices()
    stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      result['device_peak_gib'] = stats['peak_bytes_in_use'] / GIB
      print_fn(f'{"device peak (GiB)":<28} {result["device_peak_gib"]:>10.3f}')
    if parts:
      state, split, wall, other_ops = profile_parts(compiled, state, batch, model_scope)
      result.update(parts=split, profiled_step_s=wall)
      print_fn(f'\ntime by part (profile of one more step; auxiliary query-group decoder calls: '
               f'{calls["aux_group_calls"]} for {len(config.model.aux_heads)} aux heads)')
      if any(split.values()):
        for line in parts_table(split, wall):
          print_fn(line)
      else:
        print_fn(f'the profile has no per-HLO-op events on backend {backend}: no split by part')
      if other_ops:
        print_fn('largest ops without metadata (other): '
                 + ', '.join(f'{op} {seconds:.3f} s' for op, seconds in other_ops[:3]))
  result['wall_s'] = time.perf_counter() - start_time
  print_fn(f'{"benchmark wall time (s)":<28} {result["wall_s"]:>10.1f}')
  print_fn(f'temp_gib={temp:.3f} peak_gib={peak:.3f}')
  return result


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  if (values.steps is not None and values.steps < 1) or (values.warmup or 0) < 0 or values.num_boxes < 0:
    print(f'train_step.py: --steps must be >= 1, --warmup and --num_boxes >= 0; got {values.steps}, '
          f'{values.warmup}, {values.num_boxes}', file=sys.stderr)
    sys.exit(2)
  run(values.config, steps=values.steps, warmup=values.warmup, num_boxes=values.num_boxes, parts=values.parts,
      memory_only=values['memory-only'].value, flops_only=values['flops-only'].value, start_time=_START)


_START = time.perf_counter()

if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  # Defined here, not at import, so that tests can import this module next to others that define --config.
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/visdrone.py.', lock_config=True)
  flags.DEFINE_integer('steps', None, 'Timed steps after the warm-up (default 1 on CPU, 10 on GPU/TPU).')
  flags.DEFINE_integer('warmup', None, 'Untimed steps before the timed ones (default 0 on CPU, 1 on GPU/TPU).')
  flags.DEFINE_integer('num_boxes', 100, 'Valid boxes per image in the random batch.')
  flags.DEFINE_bool('parts', True, 'Profile one more step and print the time split by part.')
  flags.DEFINE_bool('memory-only', False, 'Compile and print the memory analysis; do not run.')
  flags.DEFINE_bool('flops-only', False, 'Trace (abstract shapes: no init, no compile) and print the jaxpr FLOPs.')
  flags.mark_flag_as_required('config')
  app.run(main)
