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
  - FLOPs (XLA cost analysis of the compiled function) per module of the inference forward at the canvas
    (config.input.image_size, or --image_size), batch --batch: backbone, neck, encoder, decoder (one pass of
    the Q matching queries), query selection + heads (= the whole forward minus those), and the training-only
    part of a training forward (DN group, auxiliary heads with their assignment, auxiliary query groups).
  - SAE vs plain deformable encoder: FLOPs ratio and measured forward wall time ratio (median of --repeats
    after compile and a warm-up) in the same run, same inputs. On CPU pass a smaller --image_size.
  - memory analysis of the compiled whole inference forward (arguments, outputs, temporaries).
The last line is `total_params=N`.
"""

import argparse
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
  print(f'\nFLOPs per module (XLA cost analysis, forward, canvas {h}x{w}, batch {b}, backend '
        f'{jax.default_backend()})')
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

  rows = {}
  rows['backbone'] = flops_of(compile_fn(lambda v, x: backbone.apply(v, x), sub_variables(variables, 'backbone'),
                                         images))
  rows['neck'] = flops_of(compile_fn(lambda v, f: neck.apply(v, f), sub_variables(variables, 'neck'), feats))
  enc_vars = sub_variables(variables, 'encoder')
  rows['encoder'] = flops_of(compile_fn(lambda v, f, m: encoder.apply(v, f, m), enc_vars, pyramid, masks))

  def run_decoder(v, queries, refs, mem, mem_pad):
    return decoder.apply(v, queries, refs, mem, mem_pad, shapes)

  dec_vars = sub_variables(variables, 'decoder')
  rows['decoder'] = flops_of(compile_fn(run_decoder, dec_vars, jax.ShapeDtypeStruct((b, q, d), jnp.float32),
                                        jax.ShapeDtypeStruct((b, q, 4), jnp.float32), memory, memory_pad))
  forward = compile_fn(lambda v, x, m: model.apply(v, x, m, train=False), variables, images, pad)
  total = flops_of(forward)
  rows['query sel. + heads'] = total - sum(rows.values())
  print(f'{"module":<22} {"GFLOPs":>10} {"share":>7}')
  for name, f in rows.items():
    print(f'{name:<22} {f / 1e9:>10.1f} {f / total:>7.1%}')
  print(f'{"inference total":<22} {total / 1e9:>10.1f}')

  m = config.dataset.max_boxes
  targets = {'boxes': jax.ShapeDtypeStruct((b, m, 4), jnp.float32),
             'labels': jax.ShapeDtypeStruct((b, m), jnp.int32),
             'box_valid': jax.ShapeDtypeStruct((b, m), jnp.bool_), 'scale': jax.ShapeDtypeStruct((b,), jnp.float32)}
  rngs = {n: jax.random.PRNGKey(0) for n in ('dn', 'aux', 'dropout')}
  train_flops = flops_of(compile_fn(lambda v, x, mk, t: model.apply(v, x, mk, targets=t, train=True, rngs=rngs),
                                    variables, images, pad, targets))
  print(f'{"training-only part":<22} {(train_flops - total) / 1e9:>10.1f}   (DN group, aux heads '
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
    seconds = median_time(fn, (params, feats, pad_masks), repeats)
    results[kind] = (flops, seconds)
  print(f'{"encoder":<12} {"GFLOPs":>10} {"time ms":>10}')
  for kind, (flops, seconds) in results.items():
    print(f'{kind:<12} {flops / 1e9:>10.1f} {seconds * 1e3:>10.1f}')
  (f_sae, t_sae), (f_plain, t_plain) = results['sae'], results['deformable']
  print(f'SAE / plain: FLOPs {f_sae / f_plain:.3f}, forward time {t_sae / t_plain:.3f} (median of {repeats})')


if __name__ == '__main__':
  main()
