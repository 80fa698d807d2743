r"""Multi-scale deformable attention core: gather layouts and weighting, forward and forward+backward; and the
encoder cost of the Scale-Aware Encoder vs the plain deformable encoder.

  python benchmarks/deformable_attention.py [--cases small,decoder] [--batch 1] [--repeats 3]
      [--chunk N] [--einsum_only] [--encoder_canvas HxW] [--flops] [--tpu_memory v5e:1x1 [--memory_cases ...]]

Core table: median wall time (after compile and a warm-up) of `ms_deform_attn_core` for each
  layout   'flat'   = one gather of D values for each of the 4 bilinear neighbours;
           'packed' = neighbours packed along channels, one gather of 4*D values per sample (scenic's TPU layout);
           'flat/N' = flat with query_chunk_size=N (--chunk N): rematerialized query chunks, bounded memory;
  weights  'einsum' vs 'mul-sum' ((w[..., None] * g).sum(-2)); the packed layout has one weighting (a lane-dense
           multiply-and-sum, 'lanes'): one row;
and 'fwd' (output) / 'fwd+bwd' (gradients w.r.t. value, locations and weights of <output, random cotangent>).
'auto' marks the layout config `encoder.sampling_layout='auto'` picks on this backend; 'flat' is the layout
before that key existed, so the flat and packed rows are the before / after of one run.
Cases (8 heads x 32 channels, 4 levels x 4 points, P2..P5 of the canvas):
  small      128x128 canvas (smoke config), 100 queries          S = 1360
  decoder    800x1344 canvas (VisDrone recipe), 900 queries      S = 89250   (decoder cross-attention)
  sae_high   800x1344 canvas, the 22050 P3..P5 queries           S = 89250   (one SAE layer; ~1.5 GB/batch)
  sae_f2_384 384x640 canvas, the 15360 P2 queries (SAE F2 update) S = 20400   (--memory_cases default, chunk 8192)

--encoder_canvas HxW: wall time of the full SAE and plain encoder forward (base config sizes) at that canvas.
--tpu_memory TOPOLOGY (e.g. v5e:1x1; needs libtpu: pip install 'jax[tpu]==<jax version>', no TPU needed): XLA's
memory analysis (temporaries) of the core's fwd+bwd per layout, compiled for this host's backend and, deviceless,
for that TPU chip (as benchmarks/tpu_aot_memory.py does for the whole step), batch --batch, query_chunk_size
--chunk (default 8192), cases --memory_cases: the XLA:TPU / host ratio is what the layout is for.
--flops: XLA cost analysis (compiled, not run) of the full encoder at hidden_dim 256, 6 layers, 800x1344 canvas,
batch 1: SAE vs plain deformable encoder, forward only, plus the count of query tokens each one updates.
"""

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mrqm_jax

if __name__ == '__main__' and any(a.startswith('--tpu_memory') for a in sys.argv[1:]):
  from benchmarks import tpu_aot_memory  # pylint: disable=g-import-not-at-top
  for _key, _value in tpu_aot_memory.TPU_ENV_DEFAULTS.items():   # libtpu reads them when jax loads it
    os.environ.setdefault(_key, _value)

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from mrqm_jax.models import deformable_attention as da
from mrqm_jax.models import detector

HEADS, HEAD_DIM, POINTS = 8, 32, 4


def pyramid(canvas):
  h, w = canvas
  return tuple((h // s, w // s) for s in (4, 8, 16, 32))


CASES = {
    'small': (pyramid((128, 128)), 100),
    'decoder': (pyramid((800, 1344)), 900),
    'sae_high': (pyramid((800, 1344)), sum(h * w for h, w in pyramid((800, 1344))[1:])),
    'sae_f2_384': (pyramid((384, 640)), 96 * 160),
}


def median_time(fn, args, repeats):
  """(compile + first call s, median of `repeats` calls after one warm-up s)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def core_fns(shapes, packed, use_einsum, query_chunk, cot):
  """(jitted forward, jitted gradient of <forward, cot> w.r.t. value, locations, weights) of the core."""
  core = functools.partial(da.ms_deform_attn_core, spatial_shapes=shapes, packed_neighbours=packed,
                           use_einsum=use_einsum, query_chunk_size=query_chunk)
  fwd = jax.jit(lambda v, l, a: core(v, sampling_locations=l, attention_weights=a))
  bwd = jax.jit(jax.grad(lambda v, l, a, c: jnp.vdot(core(v, sampling_locations=l, attention_weights=a), c),
                         argnums=(0, 1, 2)))
  return fwd, (lambda v, l, a: bwd(v, l, a, cot)) if cot is not None else bwd


def core_table(case_names, batch, repeats, chunk=None, einsum_only=False):
  auto = da.resolve_sampling_layout('auto')
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {batch}, {HEADS} heads x '
        f'{HEAD_DIM} ch, 4 levels x {POINTS} points; median of {repeats}; encoder.sampling_layout=auto -> {auto}')
  print(f'{"case":10s} {"S":>7s} {"Q":>6s} {"layout":11s} {"auto":4s} {"weights":8s} {"fwd ms":>9s} '
        f'{"fwd+bwd ms":>11s} {"compile s":>9s}')
  for name in case_names:
    shapes, q = CASES[name]
    s = sum(h * w for h, w in shapes)
    rng = np.random.default_rng(0)
    value = jnp.asarray(rng.normal(size=(batch, s, HEADS, HEAD_DIM)), jnp.float32)
    loc = jnp.asarray(rng.uniform(-0.05, 1.05, size=(batch, q, HEADS, 4, POINTS, 2)), jnp.float32)
    w = jnp.asarray(rng.uniform(size=(batch, q, HEADS, 4, POINTS)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(batch, q, HEADS * HEAD_DIM)), jnp.float32)
    variants = [(False, True, None)] + ([] if einsum_only else [(False, False, None)]) + [(True, True, None)]
    variants += [(packed, True, chunk) for packed in (False, True)] if chunk and chunk < q else []
    for packed, use_einsum, query_chunk in variants:
      fwd, bwd = core_fns(shapes, packed, use_einsum, query_chunk, cot)
      c1, t_fwd = median_time(fwd, (value, loc, w), repeats)
      c2, t_bwd = median_time(bwd, (value, loc, w), repeats)
      layout = ('packed' if packed else 'flat') + (f'/{query_chunk}' if query_chunk else '')
      weights = 'lanes' if packed else 'einsum' if use_einsum else 'mul-sum'
      print(f'{name:10s} {s:7d} {q:6d} {layout:11s} {"*" if layout.split("/")[0] == auto else "":4s} '
            f'{weights:8s} {1e3 * t_fwd:9.1f} {1e3 * t_bwd:11.1f} {c1 + c2:9.1f}')


def memory_table(case_names, batch, chunk, topology):
  """XLA temporaries of the core's fwd+bwd per layout: compiled for this host and, deviceless, for `topology`."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from benchmarks import tpu_aot_memory  # pylint: disable=g-import-not-at-top
  tpu = topologies.get_topology_desc(platform='tpu', **tpu_aot_memory.topology_kwargs(topology)).devices[0]
  host = jax.devices()[0]
  print(f'\ncore fwd+bwd memory (XLA memory analysis, temporaries GiB), batch {batch}, query_chunk_size {chunk}: '
        f'{host.platform} ({host.device_kind}) vs XLA:TPU {topology} ({tpu.device_kind}, deviceless)')
  print(f'{"case":10s} {"S":>7s} {"Q":>6s} {"layout":7s} {host.platform + " GiB":>9s} {"TPU GiB":>9s} '
        f'{"TPU/" + host.platform:>8s} {"TPU compile s":>13s}')
  for name in case_names:
    shapes, q = CASES[name]
    s = sum(h * w for h, w in shapes)
    by_layout = {}
    for packed in (False, True):
      temps = []
      for device in (host, tpu):
        sds = lambda shape, d=device: jax.ShapeDtypeStruct(shape, jnp.float32,  # noqa: E731
                                                            sharding=jax.sharding.SingleDeviceSharding(d))
        args = (sds((batch, s, HEADS, HEAD_DIM)), sds((batch, q, HEADS, 4, POINTS, 2)),
                sds((batch, q, HEADS, 4, POINTS)), sds((batch, q, HEADS * HEAD_DIM)))
        _, bwd = core_fns(shapes, packed, True, chunk if chunk < q else None, None)
        start = time.perf_counter()
        compiled = bwd.lower(*args).compile()
        temps.append((compiled.memory_analysis().temp_size_in_bytes / 2**30, time.perf_counter() - start))
      (host_gib, _), (tpu_gib, tpu_s) = temps
      layout = 'packed' if packed else 'flat'
      by_layout[layout] = (host_gib, tpu_gib)
      print(f'{name:10s} {s:7d} {q:6d} {layout:7s} {host_gib:9.3f} {tpu_gib:9.3f} {tpu_gib / host_gib:8.2f} '
            f'{tpu_s:13.1f}')
    host_auto, tpu_auto = da.resolve_sampling_layout('auto', host.platform), da.resolve_sampling_layout('auto', 'tpu')
    print(f'{name:10s} sampling_layout=auto on each: XLA:TPU ({tpu_auto}) {by_layout[tpu_auto][1]:.3f} GiB / '
          f'{host.platform} ({host_auto}) {by_layout[host_auto][0]:.3f} GiB = '
          f'{by_layout[tpu_auto][1] / by_layout[host_auto][0]:.2f}')


def flops_table():
  cfg = base.get_config()
  shapes = pyramid(cfg.input.image_size)
  d = cfg.model.hidden_dim
  feats = [jax.ShapeDtypeStruct((1, h, w, d), jnp.float32) for h, w in shapes]
  masks = [jax.ShapeDtypeStruct((1, h, w), jnp.bool_) for h, w in shapes]
  n_total, n_low = sum(h * w for h, w in shapes), shapes[0][0] * shapes[0][1]
  layers = cfg.encoder.num_layers
  print(f'\nencoder cost, {cfg.input.image_size} canvas, levels {shapes}, hidden {d}, {layers} layers, batch 1 '
        f'(XLA cost analysis of the compiled forward)')
  print(f'{"encoder":10s} {"query tokens":>13s} {"GFLOP":>9s} {"GB accessed":>12s}')
  for kind in ('sae', 'deformable'):
    cfg.encoder.type = kind
    cfg.encoder.query_chunk_size = 0  # XLA's cost analysis does not multiply a loop body by its trip count
    model = detector.build_encoder(cfg)
    params = jax.eval_shape(lambda f, m: model.init(jax.random.PRNGKey(0), f, m), feats, masks)
    compiled = jax.jit(lambda p, f, m: model.apply(p, f, m).memory).lower(params, feats, masks).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    queries = layers * (n_total - n_low) + n_low if kind == 'sae' else layers * n_total
    print(f'{kind:10s} {queries:13d} {cost.get("flops", float("nan")) / 1e9:9.1f} '
          f'{cost.get("bytes accessed", float("nan")) / 1e9:12.2f}')


def encoder_time_table(canvas, repeats):
  """Wall time of the full encoder forward (base config sizes) at `canvas`, batch 1: SAE vs plain."""
  cfg = base.get_config()
  shapes = pyramid(canvas)
  d = cfg.model.hidden_dim
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=(1, h, w, d)), jnp.float32) for h, w in shapes]
  masks = [jnp.zeros((1, h, w), bool) for h, w in shapes]
  print(f'\nencoder forward, {canvas} canvas, levels {shapes}, hidden {d}, {cfg.encoder.num_layers} layers, '
        f'query_chunk_size {cfg.encoder.query_chunk_size}, batch 1; median of {repeats}')
  print(f'{"encoder":10s} {"fwd ms":>9s} {"compile s":>9s}')
  for kind in ('sae', 'deformable'):
    cfg.encoder.type = kind
    model = detector.build_encoder(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), feats, masks)
    fwd = jax.jit(lambda p, f, m: model.apply(p, f, m).memory)
    first, t = median_time(fwd, (params, feats, masks), repeats)
    print(f'{kind:10s} {1e3 * t:9.1f} {first:9.1f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cases', default='small,decoder', help=f'comma list of {sorted(CASES)}')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--chunk', type=int, default=0,
                      help='also time flat/einsum with query_chunk_size=CHUNK (cases with more queries)')
  parser.add_argument('--einsum_only', action='store_true', help='skip the (slow) mul-sum rows')
  parser.add_argument('--encoder_canvas', default='',
                      help='HxW: also time the full SAE and plain encoder forward at this canvas (e.g. 256x448)')
  parser.add_argument('--flops', action='store_true', help='also print SAE vs plain encoder FLOPs')
  parser.add_argument('--tpu_memory', default='', metavar='TOPOLOGY',
                      help="also print the core's fwd+bwd memory per layout on this host and on this one-chip TPU "
                      "topology, e.g. v5e:1x1 (deviceless; needs libtpu)")
  parser.add_argument('--memory_cases', default='sae_f2_384', help='cases of the --tpu_memory table')
  args = parser.parse_args()
  names = [c for c in args.cases.split(',') if c]
  if args.encoder_canvas and not all(v.isdigit() for v in args.encoder_canvas.lower().split('x')):
    parser.error(f'--encoder_canvas must be HxW, got {args.encoder_canvas!r}')
  memory_names = [c for c in args.memory_cases.split(',') if c]
  unknown = [c for c in names + memory_names if c not in CASES]
  if unknown:
    parser.error(f'unknown --cases {unknown}; choose from {sorted(CASES)}')
  if names:
    core_table(names, args.batch, args.repeats, args.chunk or None, args.einsum_only)
  if args.encoder_canvas:
    encoder_time_table(tuple(int(v) for v in args.encoder_canvas.lower().split('x')), args.repeats)
  if args.flops:
    flops_table()
  if args.tpu_memory:
    from benchmarks import tpu_aot_memory  # pylint: disable=g-import-not-at-top
    try:
      tpu_aot_memory.topology_kwargs(args.tpu_memory)
    except ValueError as e:
      parser.error(str(e).replace('--topology', '--tpu_memory'))
    if importlib.util.find_spec('libtpu') is None:
      parser.error("--tpu_memory needs libtpu (pip install 'jax[tpu]==<the jax version>')")
    memory_table(memory_names, args.batch, args.chunk or 8192, args.tpu_memory)


if __name__ == '__main__':
  main()
