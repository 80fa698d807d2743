r"""MRQM model cost: parameters per module, XLA FLOPs per module, SAE vs plain encoder, forward memory.

  python benchmarks/model_cost.py --config=configs/visdrone.py [--params-only] [--image_size=H,W]
      [--batch=1] [--repeats=3]

Parameters come from `jax.eval_shape` of `MRQM.init` (nothing is computed), grouped by module:
  backbone   ResNet ('params'; the frozen BatchNorm statistics are counted apart, they are not trained)
  neck       BiFPN
  encoder    SAE (or the plain encoder, per config.encoder.type)
  decoder    decoder layers, ref_point_head, final norm
  heads      per-layer decoder class/box heads, encoder-proposal heads (enc_output + norm, class, box),
             the learned content queries and the DN label embedding
  aux levels Co-DINO's extra aux level (conv 3x3 stride 2 + GN)            } training only: the collaborative
  iah / atss the dense auxiliary head (IoU-aware head or ATSS)              } heads of `model.aux_heads` and
  rpn        the R-CNN branch's RPN head                                    } their query-group projections
  roi head   the R-CNN branch's Shared2FC box head                          }
  aux queries the query-group projections of every aux head               }
beside the paper's count for the config (Table 2 "Params": MRQM 60M for configs/visdrone.py, Co-DINO 66M for
configs/co_dino.py).

Without --params-only (compiles, does not run, except for the timing):
  - FLOPs (XLA cost analysis of the compiled function, which counts a loop's body once, next to the jaxpr
    count of matmul + conv FLOPs with every loop iteration, `jaxpr_flops`) per module of the inference
    forward at the canvas (config.input.image_size, or --image_size), batch --batch: backbone, neck, encoder, decoder (one pass of
    the Q matching queries), query selection + heads (= the whole forward minus those), and the training-only
    part of a training forward (DN group, auxiliary heads with their assignment, auxiliary query groups).
  - SAE vs plain deformable encoder: FLOPs ratio (XLA's and the jaxpr count) and measured forward wall time ratio (median of --repeats
    after compile and a warm-up) in the same run, same inputs. On CPU pass a smaller --image_size.
  - memory analysis of the compiled whole inference forward (arguments, outputs, temporaries).
The last line is `total_params=N`.

Also the jaxpr FLOP counter `jaxpr_cost` / `jaxpr_flops` / `loss_and_grad_cost` (matmul + conv FLOPs with
loops counted per iteration, and the rematerialized recomputation told apart), used by
benchmarks/train_step.py; the per-module table above is XLA's cost analysis (loop bodies counted once).
"""

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mrqm_jax.models import detector  # noqa: E402

# Table 2 "Params" per config file name (the paper's counts); other configs are compared with MRQM's.
PAPER_PARAMS = {'co_dino': 66e6, 'visdrone': 60e6}
HEAD_KEYS = ('enc_output', 'enc_output_norm', 'enc_class_head', 'enc_box_head', 'query_embed', 'label_embedding')
TRAINING_ONLY = ('aux levels', 'iah', 'atss', 'rpn', 'roi head', 'aux queries')


def load_config(path: str, image_size: str | None):
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  if spec is None or spec.loader is None:
    raise SystemExit(f'--config: cannot load {path}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    if image_size:
      try:
        h, w = (int(v) for v in image_size.lower().replace('x', ',').split(','))
      except ValueError:
        raise SystemExit(f'--image_size must be H,W (e.g. 400,672), got {image_size!r}') from None
      config.input.image_size = (h, w)
    if config.iah.a_s <= 0:   # -1 = auto (resolved from data in training): any number gives the same cost
      config.iah.a_s = 1.0
  return config


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_groups(params) -> dict[str, int]:
  groups = {'backbone': count(params.get('backbone', {})), 'neck': count(params.get('neck', {}))}
  groups['encoder'] = count(params['encoder'])
  dec = params['decoder']
  dec_heads = {k: v for k, v in dec.items() if k.startswith(('class_heads_', 'box_heads_'))}
  groups['decoder'] = count(dec) - count(dec_heads)
  groups['heads'] = count(dec_heads) + sum(count(params[k]) for k in HEAD_KEYS if k in params)
  rcnn = params.get('rcnn', {})
  groups.update({'aux levels': count(params.get('aux_levels', {})), 'iah': count(params.get('iah', {})),
                 'atss': count(params.get('atss', {})), 'rpn': count(rcnn.get('rpn', {})),
                 'roi head': count(rcnn.get('bbox_head', {})),
                 'aux queries': sum(count(v) for k, v in params.items() if k.startswith('aux_query_'))})
  listed = set(HEAD_KEYS) | {'backbone', 'neck', 'encoder', 'decoder', 'aux_levels', 'iah', 'atss', 'rcnn'}
  other = {k: v for k, v in params.items() if k not in listed and not k.startswith('aux_query_')}
  if other:
    groups['other (' + ','.join(sorted(other)) + ')'] = count(other)
  return groups


def sub_variables(variables, name):
  """{collection: variables[collection][name]} for every collection that has `name`."""
  return {col: tree[name] for col, tree in variables.items() if name in tree}


def flops_of(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan'))) if analysis else float('nan')


# ------------------------------------------------------------------------------------ FLOPs from a jaxpr
@dataclasses.dataclass(frozen=True)
class JaxprFlops:
  """Matmul and convolution FLOPs of a jaxpr (`jaxpr_cost`); elementwise ops, reductions, gathers and
  scatters are not counted (the MFU convention counts the matmul/conv work; XLA's cost analysis counts them).

  executed   every dot_general and conv_general_dilated the program runs: a scan's body x its length, a
             while loop's body once, the largest branch of a cond, each remat region's backward with its
             recomputed forward.
  recompute  of those, the rematerialization: matmul/conv work inside the backward pass of a remat region
             (`jax.checkpoint`, nn.remat; `remat2[differentiated=True]` in the jaxpr) that does not depend on
             the cotangent, i.e. the forward recomputed there. Only known when the cotangent is an input of
             the jaxpr (`cotangent_invars`); 0 otherwise.
  model      executed - recompute: the forward once plus the backward's transposed matmuls/convs (PaLM
             appendix B's model FLOPs, the numerator of MFU).
  while_loops  while loops whose body has matmul/conv FLOPs: their trip count is unknown to the jaxpr, the
             body is counted once, so with while_loops > 0 the counts are lower bounds.
  """
  executed: float = 0.0
  recompute: float = 0.0
  while_loops: int = 0

  @property
  def model(self) -> float:
    return self.executed - self.recompute

  def __add__(self, other):
    return JaxprFlops(self.executed + other.executed, self.recompute + other.recompute,
                      self.while_loops + other.while_loops)

  def __mul__(self, n):   # a loop body run n times; its while loops are still one each
    return JaxprFlops(self.executed * n, self.recompute * n, self.while_loops)


def dot_general_flops(lhs_shape, out_shape, dimension_numbers) -> float:
  """2 x output elements x contracted size (one multiply and one add per term)."""
  (lhs_contract, _), _ = dimension_numbers
  return 2.0 * float(np.prod(out_shape, dtype=np.float64)) * float(np.prod([lhs_shape[d] for d in lhs_contract],
                                                                           dtype=np.float64))


def _valid_taps(in_size, out_size, kernel, stride, pad_lo, lhs_dilation, rhs_dilation) -> int:
  """(output position, kernel tap) pairs along one spatial dim whose input position is a real element: not in
  the padding, not a hole of the input's dilation (transposed convolutions are lhs-dilated)."""
  o = np.arange(out_size)[:, None]
  k = np.arange(kernel)[None, :]
  p = o * stride + k * rhs_dilation - pad_lo
  valid = (p >= 0) & (p <= (in_size - 1) * lhs_dilation) & (p % lhs_dilation == 0)
  return int(valid.sum())


def conv_flops(lhs_shape, rhs_shape, out_shape, params) -> float:
  """2 x output batch x output features x in-features per group x the (output position, kernel tap) pairs
  that read a real input element. Without padding and dilation that is the closed form 2 x output elements x
  kernel spatial size x in-features per group; padding and dilation holes are skipped (zeros), as XLA's cost
  analysis does, which matters for the backward of strided convs (an input-dilated conv that would otherwise
  count stride^2 times its real work)."""
  dn = params['dimension_numbers']
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  taps = 1
  for i in range(len(lhs_spec) - 2):
    taps *= _valid_taps(lhs_shape[lhs_spec[2 + i]], out_shape[out_spec[2 + i]], rhs_shape[rhs_spec[2 + i]],
                        params['window_strides'][i], params['padding'][i][0], params['lhs_dilation'][i],
                        params['rhs_dilation'][i])
  return (2.0 * out_shape[out_spec[0]] * out_shape[out_spec[1]] * rhs_shape[rhs_spec[1]]) * float(taps)


def eqn_flops(eqn) -> float:
  """FLOPs of one dot_general or conv_general_dilated equation (0 for any other primitive)."""
  name = eqn.primitive.name
  if name == 'dot_general':
    return dot_general_flops(eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape, eqn.params['dimension_numbers'])
  if name == 'conv_general_dilated':
    return conv_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape, eqn.params)
  return 0.0


def _sub_jaxprs(value):
  """(jaxpr, consts-are-closed) for every Jaxpr / ClosedJaxpr in an equation parameter (tuples included)."""
  from jax.extend import core as jcore   # pylint: disable=g-import-not-at-top
  if isinstance(value, jcore.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jcore.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _walk(jaxpr, tainted_in, in_backward_remat: bool):
  """(JaxprFlops, taint of each outvar) of an open jaxpr whose invars carry `tainted_in` (depends on the
  cotangent); constvars and literals are not tainted."""
  from jax.extend import core as jcore   # pylint: disable=g-import-not-at-top
  tainted = {v for v, t in zip(jaxpr.invars, tainted_in) if t}

  def is_tainted(v):
    return not isinstance(v, jcore.Literal) and v in tainted

  total = JaxprFlops()
  for eqn in jaxpr.eqns:
    t_in = [is_tainted(v) for v in eqn.invars]
    name, params = eqn.primitive.name, eqn.params
    t_out = None
    if name in ('dot_general', 'conv_general_dilated'):
      f = eqn_flops(eqn)
      total += JaxprFlops(f, f if in_backward_remat and not any(t_in) else 0.0)
    elif name == 'scan':
      n_consts, n_carry = params['num_consts'], params['num_carry']
      body = params['jaxpr'].jaxpr
      carry = t_in[n_consts:n_consts + n_carry]
      while True:   # the carry's taint: a fixpoint (a carry can become tainted after an iteration)
        flops, t_body = _walk(body, t_in[:n_consts] + carry + t_in[n_consts + n_carry:], in_backward_remat)
        new_carry = [a or b for a, b in zip(carry, t_body[:n_carry])]
        if new_carry == carry:
          break
        carry = new_carry
      total += flops * params['length']
      t_out = t_body
    elif name == 'while':
      nc, nb = params['cond_nconsts'], params['body_nconsts']
      body, cond = params['body_jaxpr'].jaxpr, params['cond_jaxpr'].jaxpr
      carry = t_in[nc + nb:]
      while True:
        flops, t_body = _walk(body, t_in[nc:nc + nb] + carry, in_backward_remat)
        new_carry = [a or b for a, b in zip(carry, t_body)]
        if new_carry == carry:
          break
        carry = new_carry
      cond_flops, _ = _walk(cond, t_in[:nc] + carry, in_backward_remat)
      loop = flops + cond_flops
      total += loop + JaxprFlops(while_loops=1 if loop.executed > 0 else 0)
      t_out = carry
    elif name == 'cond':
      walks = [_walk(b.jaxpr, t_in[1:], in_backward_remat) for b in params['branches']]
      total += max((w[0] for w in walks), key=lambda f: f.executed)   # the most expensive branch
      t_out = [t_in[0] or any(col) for col in zip(*(w[1] for w in walks))]
    else:
      # Call-like primitives (pjit, remat2 / checkpoint, custom_jvp_call, custom_vjp_call, closed_call,
      # shard_map): their jaxpr runs once on the equation's operands. remat2 with differentiated=True is the
      # backward of a remat region: the forward it recomputes is what `recompute` counts.
      backward = in_backward_remat or (name in ('remat2', 'checkpoint') and bool(params.get('differentiated')))
      for value in params.values():
        for sub in _sub_jaxprs(value):
          sub_in = t_in if len(sub.invars) == len(eqn.invars) else [any(t_in)] * len(sub.invars)
          flops, t_sub = _walk(sub, sub_in, backward)
          total += flops
          if len(t_sub) == len(eqn.outvars):
            t_out = t_sub if t_out is None else [a or b for a, b in zip(t_out, t_sub)]
    if t_out is None:
      t_out = [any(t_in)] * len(eqn.outvars)
    tainted.update(v for v, t in zip(eqn.outvars, t_out) if t)
  return total, [is_tainted(v) for v in jaxpr.outvars]


def jaxpr_cost(closed_jaxpr, cotangent_invars=()) -> JaxprFlops:
  """Matmul/conv FLOPs of a ClosedJaxpr (`JaxprFlops`), after dead-code elimination (XLA drops unused
  values too). cotangent_invars: indices of the jaxpr's inputs that are the output cotangent of a vjp
  (`jax.make_jaxpr(lambda *a, ct: jax.vjp(f, *a)[1](ct))`); the ops that depend on them are the backward
  pass, which tells the rematerialized forward (`recompute`) apart from it. Loop-aware where XLA's cost
  analysis is not (it counts a while loop's body once: scan, lax.map and fori_loop with static bounds
  all lower to while loops)."""
  # Private API (no public equivalent in jax 0.10): DCE keeps the invars' Var objects, so the taint survives.
  from jax._src.interpreters import partial_eval as pe   # pylint: disable=g-import-not-at-top
  jaxpr = closed_jaxpr.jaxpr
  tainted = {jaxpr.invars[i] for i in cotangent_invars}
  jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
  flops, _ = _walk(jaxpr, [v in tainted for v in jaxpr.invars], False)
  if not cotangent_invars:   # nothing depends on a cotangent: the backward cannot be told from the recomputation
    flops = dataclasses.replace(flops, recompute=0.0)
  return flops


def jaxpr_flops(closed_jaxpr) -> float:
  """Executed matmul + conv FLOPs of a ClosedJaxpr (`jaxpr_cost(...).executed`)."""
  return jaxpr_cost(closed_jaxpr).executed


def loss_and_grad_cost(loss_fn, params, *args) -> JaxprFlops:
  """`JaxprFlops` of loss_fn(params, *args) -> (scalar loss, aux) and its gradient w.r.t. params, traced (not
  compiled) as a vjp whose cotangent is an input, so that the recomputation is told apart (`jaxpr_cost`)."""
  def loss_and_grad(p, rest, cotangent):
    loss, pullback, _ = jax.vjp(lambda q: loss_fn(q, *rest), p, has_aux=True)
    return loss, pullback(cotangent.astype(loss.dtype))

  closed = jax.make_jaxpr(loss_and_grad)(params, args, jnp.ones((), jnp.float32))
  return jaxpr_cost(closed, cotangent_invars=(len(closed.jaxpr.invars) - 1,))


def compile_fn(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def median_time(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='config file, e.g. configs/visdrone.py')
  parser.add_argument('--params-only', '--params_only', dest='params_only', action='store_true')
  parser.add_argument('--image_size', default=None, help='H,W canvas override (smaller for CPU)')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)

  config = load_config(args.config, args.image_size)
  h, w = config.input.image_size
  b = args.batch
  model = detector.build_model(config)
  images = jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)
  pad = jax.ShapeDtypeStruct((b, h, w), jnp.bool_)
  rng = jax.random.PRNGKey(0)
  variables = jax.eval_shape(lambda r, x, m: model.init({'params': r, 'dropout': r, 'dn': r, 'aux': r}, x, m, train=False),
                             rng, images, pad)
  params = variables['params']
  groups = param_groups(params)
  total = count(params)
  frozen = count({k: v for k, v in variables.items() if k != 'params'})

  name = os.path.splitext(os.path.basename(args.config))[0]
  paper = PAPER_PARAMS.get(name, PAPER_PARAMS['visdrone'])
  print(f'Parameters — {args.config} ({config.model.backbone}, neck {config.model.neck}, hidden '
        f'{config.model.hidden_dim}, encoder {config.encoder.type} x{config.encoder.num_layers} over '
        f'{config.model.num_levels} levels, decoder x{config.decoder.num_layers}, {config.decoder.num_queries} '
        f'queries, aux_heads={tuple(config.model.aux_heads)})')
  print(f'{"module":<12} {"params":>14} {"share":>7}')
  for group, n in groups.items():
    print(f'{group:<12} {n:>14,d} {n / total:>7.1%}')
  print(f'{"total":<12} {total:>14,d}   (paper: {paper / 1e6:.0f}M; ratio {total / paper:.3f})')
  training_only = sum(groups[g] for g in TRAINING_ONLY)
  print(f'{"inference":<12} {total - training_only:>14,d}   (without the training-only auxiliary heads)')
  print(f'{"frozen BN":<12} {frozen:>14,d}   (batch statistics, not trained, not in the total)')

  if not args.params_only:
    cost_tables(config, model, variables, images, pad, b, args.repeats)
  print(f'total_params={total}')


def cost_tables(config, model, variables, images, pad, b, repeats):
  h, w = config.input.image_size
  print(f'\nFLOPs per module (XLA cost analysis: a loop body counted once, elementwise ops included; and the '
        f'jaxpr count, `jaxpr_flops`; forward, canvas {h}x{w}, batch {b}, backend {jax.default_backend()})')
  backbone = detector.build_backbone(config)
  neck = detector.build_neck(config)
  encoder = detector.build_encoder(config)
  decoder = detector.build_decoder(config)

  feats = jax.eval_shape(lambda v, x: backbone.apply(v, x), sub_variables(variables, 'backbone'), images)
  pyramid = jax.eval_shape(lambda v, f: neck.apply(v, f), sub_variables(variables, 'neck'), feats)
  shapes = tuple((int(p.shape[1]), int(p.shape[2])) for p in pyramid)
  masks = [jax.ShapeDtypeStruct((b, hh, ww), jnp.bool_) for hh, ww in shapes]
  s = sum(hh * ww for hh, ww in shapes)
  d, q = config.model.hidden_dim, config.decoder.num_queries
  memory = jax.ShapeDtypeStruct((b, s, d), jnp.float32)
  memory_pad = jax.ShapeDtypeStruct((b, s), jnp.bool_)

  def both(fn, *args):   # (XLA's count of the compiled fn, the jaxpr count, the compiled fn)
    compiled = compile_fn(fn, *args)
    return flops_of(compiled), jaxpr_flops(jax.make_jaxpr(fn)(*args)), compiled

  rows = {}
  rows['backbone'] = both(lambda v, x: backbone.apply(v, x), sub_variables(variables, 'backbone'), images)[:2]
  rows['neck'] = both(lambda v, f: neck.apply(v, f), sub_variables(variables, 'neck'), feats)[:2]
  enc_vars = sub_variables(variables, 'encoder')
  rows['encoder'] = both(lambda v, f, m: encoder.apply(v, f, m), enc_vars, pyramid, masks)[:2]

  def run_decoder(v, queries, refs, mem, mem_pad):
    return decoder.apply(v, queries, refs, mem, mem_pad, shapes)

  dec_vars = sub_variables(variables, 'decoder')
  rows['decoder'] = both(run_decoder, dec_vars, jax.ShapeDtypeStruct((b, q, d), jnp.float32),
                         jax.ShapeDtypeStruct((b, q, 4), jnp.float32), memory, memory_pad)[:2]
  *total, forward = both(lambda v, x, m: model.apply(v, x, m, train=False), variables, images, pad)
  rows['query sel. + heads'] = tuple(t - sum(r[i] for r in rows.values()) for i, t in enumerate(total))
  print(f'{"module":<22} {"GFLOPs":>10} {"share":>7} {"jaxpr GFLOPs":>13} {"share":>7}   (jaxpr: matmul + conv, '
        f'every loop iteration)')
  for name, (f, g) in rows.items():
    print(f'{name:<22} {f / 1e9:>10.1f} {f / total[0]:>7.1%} {g / 1e9:>13.1f} {g / total[1]:>7.1%}')
  print(f'{"inference total":<22} {total[0] / 1e9:>10.1f} {"":>7} {total[1] / 1e9:>13.1f}')

  m = config.dataset.max_boxes
  targets = {'boxes': jax.ShapeDtypeStruct((b, m, 4), jnp.float32),
             'labels': jax.ShapeDtypeStruct((b, m), jnp.int32),
             'box_valid': jax.ShapeDtypeStruct((b, m), jnp.bool_), 'scale': jax.ShapeDtypeStruct((b,), jnp.float32)}
  rngs = {n: jax.random.PRNGKey(0) for n in ('dn', 'aux', 'dropout')}
  train_flops = both(lambda v, x, mk, t: model.apply(v, x, mk, targets=t, train=True, rngs=rngs),
                     variables, images, pad, targets)[:2]
  print(f'{"training-only part":<22} {(train_flops[0] - total[0]) / 1e9:>10.1f} {"":>7} '
        f'{(train_flops[1] - total[1]) / 1e9:>13.1f}   (DN group, aux heads '
        f'{tuple(config.model.aux_heads)} with their assignment and query groups; M = {m} gt slots)')

  mem = forward.memory_analysis()
  if mem is not None:
    gib = 1024.0**3
    print(f'\nCompiled inference forward memory (batch {b}, {h}x{w}): arguments '
          f'{mem.argument_size_in_bytes / gib:.3f} GiB, outputs {mem.output_size_in_bytes / gib:.4f} GiB, '
          f'temporaries {mem.temp_size_in_bytes / gib:.3f} GiB, code {mem.generated_code_size_in_bytes / 2**20:.1f} MiB')

  encoder_comparison(config, pyramid, masks, b, repeats)


def encoder_comparison(config, pyramid, masks, b, repeats):
  """SAE vs plain deformable encoder on the same pyramid: FLOPs and measured forward time."""
  print(f'\nScale-aware vs plain deformable encoder (forward, batch {b}, canvas '
        f'{config.input.image_size[0]}x{config.input.image_size[1]}, backend {jax.default_backend()})')
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=p.shape), jnp.float32) for p in pyramid]
  pad_masks = [jnp.zeros(m.shape, bool) for m in masks]
  results = {}
  for kind in ('sae', 'deformable'):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.encoder.type = kind
    enc = detector.build_encoder(cfg)
    params = enc.init(jax.random.PRNGKey(0), feats, pad_masks)
    fn = jax.jit(lambda v, f, m, enc=enc: enc.apply(v, f, m).memory)
    flops = flops_of(fn.lower(params, feats, pad_masks).compile())
    counted = jaxpr_flops(jax.make_jaxpr(fn)(params, feats, pad_masks))
    seconds = median_time(fn, (params, feats, pad_masks), repeats)
    results[kind] = (flops, counted, seconds)
  print(f'{"encoder":<12} {"GFLOPs":>10} {"jaxpr GFLOPs":>13} {"time ms":>10}')
  for kind, (flops, counted, seconds) in results.items():
    print(f'{kind:<12} {flops / 1e9:>10.1f} {counted / 1e9:>13.1f} {seconds * 1e3:>10.1f}')
  (f_sae, c_sae, t_sae), (f_plain, c_plain, t_plain) = results['sae'], results['deformable']
  print(f'SAE / plain: FLOPs {f_sae / f_plain:.3f} (XLA), {c_sae / c_plain:.3f} (jaxpr), forward time '
        f'{t_sae / t_plain:.3f} (median of {repeats})')


if __name__ == '__main__':
  main()
