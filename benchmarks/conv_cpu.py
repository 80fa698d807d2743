"""Forward+backward time of convolutions on XLA:CPU: flax nn.Conv vs Conv2D impl='lax' | 'matmul' | 'auto'.

Prints one table: single layers with the shapes ResNet-50 / BiFPN use at a 256x256 input (batch 1), the whole
ResNet-50 backbone at 256x256 batch 1 (every stage trainable), and the BiFPN neck on that backbone's C2..C5.
Each row runs twice, in fresh subprocesses, with XLA's default CPU fusions and with
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` (YNNPACK fusions off). Times are the minimum over
--repeats runs of a jitted grad (w.r.t. input and parameters) after one warm-up call; 'compile' is that
warm-up call. The machine may be shared: the 1-minute load average is printed with the table.

  python benchmarks/conv_cpu.py [--repeats 3] [--only resnet-50] [--large]
"""

import argparse
import json
import os
import subprocess
import sys
import time

YNN_OFF_FLAG = '--xla_cpu_experimental_ynn_fusion_type='
IMPLS = ('nn.Conv', 'lax', 'matmul', 'auto')

# name -> (kind, spec); single layers: (B, H, W, Cin, Cout, kernel, stride, groups)
CASES = {
    'stem 7x7/2 3->64 @256': ('conv', (1, 256, 256, 3, 64, 7, 2, 1)),
    '1x1 256->64 @64': ('conv', (1, 64, 64, 256, 64, 1, 1, 1)),
    '3x3 64->64 @64': ('conv', (1, 64, 64, 64, 64, 3, 1, 1)),
    '3x3/2 128->128 @64': ('conv', (1, 64, 64, 128, 128, 3, 2, 1)),
    '1x1/2 1024->2048 @16': ('conv', (1, 16, 16, 1024, 2048, 1, 2, 1)),
    'depthwise 3x3 256 @64': ('conv', (1, 64, 64, 256, 256, 3, 1, 256)),
    'ResNet-50 @256 b1': ('resnet50', (1, 256)),
    'BiFPN D=256 on R50 @256': ('bifpn', (1, 256)),
}
# With --large: the training-size backbone step.
LARGE_CASES = {'ResNet-50 @512 b2': ('resnet50', (2, 512))}


def _worker(repeats: int, only: str, large: bool) -> None:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mrqm_jax.models import backbone, bifpn, layers  # pylint: disable=g-import-not-at-top

  class FlaxConv(nn.Module):
    """Stands in for layers.Conv2D (same fields) but runs flax.linen.Conv."""
    features: int
    kernel_size: object = 3
    strides: object = 1
    padding: object = 'SAME'
    feature_group_count: int = 1
    use_bias: bool = True
    impl: str = 'auto'
    dtype: object = None
    param_dtype: object = jnp.float32
    precision: object = None
    kernel_init: object = nn.initializers.lecun_normal()
    bias_init: object = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
      k = layers._pair(self.kernel_size, 'kernel_size')  # pylint: disable=protected-access
      s = layers._pair(self.strides, 'strides')  # pylint: disable=protected-access
      pads = layers.resolve_padding(self.padding, x.shape[1:3], k, s)
      return nn.Conv(self.features, k, s, padding=pads, feature_group_count=self.feature_group_count,
                     use_bias=self.use_bias, dtype=self.dtype, kernel_init=self.kernel_init,
                     name='conv')(x)

  real_conv = layers.Conv2D

  def build(kind, spec, impl):
    """(module, input pytree) for one row and implementation."""
    layers.Conv2D = FlaxConv if impl == 'nn.Conv' else real_conv
    conv_impl = 'lax' if impl == 'nn.Conv' else impl
    if kind == 'conv':
      b, h, w, cin, cout, k, stride, groups = spec
      module = layers.Conv2D(cout, k, stride, padding=k // 2, feature_group_count=groups, impl=conv_impl)
      return module, jnp.ones((b, h, w, cin))
    b, size = spec
    if kind == 'resnet50':
      return backbone.ResNet(50, 64, frozen_stages=0, conv_impl=conv_impl), jnp.ones((b, size, size, 3))
    chans = backbone.resnet_out_channels(50)
    feats = [jnp.ones((b, size >> (l + 2), size >> (l + 2), c)) for l, c in enumerate(chans)]
    return bifpn.BiFPN(256, 1, 'group', conv_impl), feats

  results = {}
  for name, (kind, spec) in {**CASES, **(LARGE_CASES if large else {})}.items():
    if only and only not in name.lower():
      continue
    for impl in IMPLS:
      module, x = build(kind, spec, impl)
      variables = jax.jit(module.init)(jax.random.key(0), x)
      params = variables['params']
      rest = {k: v for k, v in variables.items() if k != 'params'}

      def loss(p, inp, module=module, rest=rest):
        out = module.apply({'params': p, **rest}, inp)
        return sum(jnp.mean(o**2) for o in jax.tree.leaves(out))

      step = jax.jit(jax.grad(loss, argnums=(0, 1)))
      t0 = time.perf_counter()
      jax.block_until_ready(step(params, x))
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - t0)
      results[f'{name}|{impl}'] = {'run_ms': 1e3 * min(times), 'compile_s': compile_s}
      layers.Conv2D = real_conv
  print('RESULTS ' + json.dumps(results), flush=True)


def _run_worker(ynn_off: bool, repeats: int, only: str, large: bool) -> dict:
  env = dict(os.environ)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  flags = env.get('XLA_FLAGS', '').replace(YNN_OFF_FLAG, '').strip()
  env['XLA_FLAGS'] = f'{flags} {YNN_OFF_FLAG}'.strip() if ynn_off else flags
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--repeats', str(repeats), '--only', only] + (
      ['--large'] if large else [])
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULTS ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'benchmark worker failed (XLA_FLAGS={env["XLA_FLAGS"]!r}):\n{proc.stderr[-4000:]}')
  return json.loads(lines[-1][len('RESULTS '):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--only', default='', help='run only rows whose name contains this (lower case)')
  parser.add_argument('--large', action='store_true', help='add ResNet-50 at 512x512 batch 2 (slow)')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args.repeats, args.only.lower(), args.large)
    return

  import jax  # pylint: disable=g-import-not-at-top
  load_before = os.getloadavg()[0]
  runs = {'default': _run_worker(False, args.repeats, args.only.lower(), args.large),
          'ynn off': _run_worker(True, args.repeats, args.only.lower(), args.large)}
  load_after = os.getloadavg()[0]
  print(f'jax {jax.__version__}, {os.cpu_count()} CPU cores, load average {load_before:.1f} -> '
        f'{load_after:.1f}; fwd+bwd ms (min of {args.repeats}); ResNet-50/BiFPN rows also compile s')
  header = ['case'] + [f'{impl} [{mode}]' for mode in runs for impl in IMPLS]
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for name, (kind, _) in {**CASES, **LARGE_CASES}.items():
    if f'{name}|lax' not in runs['default']:
      continue
    cells = [name]
    for mode, res in runs.items():
      for impl in IMPLS:
        r = res[f'{name}|{impl}']
        cell = f'{r["run_ms"]:.1f}'
        if kind != 'conv':
          cell += f' ({r["compile_s"]:.0f}s)'
        cells.append(cell)
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
