#!/usr/bin/env python
"""mrqm_jax against the PyTorch reference Co-DINO (mmdetection 3.3.0 `projects/CO-DETR`), tensor for tensor.

Two halves, two processes (the reference needs numpy < 2 and torch 2.1, mrqm_jax numpy 2), exchanging files:

  # 1. in the reference venv (see ../shared/reference/README.md): build Co-DINO R50 (configs/co_dino.py's 10
  #    classes) with seeded random weights, run it, save the checkpoint, the preprocessed batch and every
  #    intermediate below
  /tmp/ref-venv/bin/python benchmarks/codetr_parity.py dump --out=/tmp/parity [--image=PATH ...] [--size=H,W]
  # 2. in the project venv: convert that checkpoint with `mrqm_jax.convert`, run our model on the same batch and
  #    print one table of differences per stage
  python benchmarks/codetr_parity.py compare --dump=/tmp/parity

Stages compared (inference, eval mode): backbone C2..C5, neck levels, encoder memory, the encoder's proposal
logits / boxes and the top-k selection (overlap of the selected indices), decoder logits and boxes per layer,
the final detections after soft-NMS. Relative = max|ours - reference| / max|reference| per tensor.
Random weights make near-ties: where the top-k selection differs, the reference's indices are handed to the
stages after it (`selection` row says how many flipped), so each stage is compared on equal inputs.

Weights: every parameter of the reference is its mmdet initialisation plus seeded Gaussian noise (so that
zero-initialised layers — box heads' last layers, sampling offsets — take part), and the frozen BatchNorm
statistics are set from the batch itself (a calibration pass), so activations stay O(1) through ResNet-50.

Last line: `max_rel_inference=A` (the largest relative difference over the inference stages).
The reference code is imported at run time from --codetr-src (default $CODETR_SRC or /tmp/codetr_src); none of it
is part of this project.
"""

import argparse
import json
import os
import sys
import time

# The project root first: benchmarks/input_pipeline.py would shadow the input_pipeline package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_SIZE = (256, 384)
REF_CONFIG = 'projects/CO-DETR/configs/codino/co_dino_5scale_r50_8xb2_1x_coco.py'
NUM_CLASSES = 10
SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data')


def parse_size(text: str) -> tuple[int, int]:
  h, w = (int(v) for v in text.split(','))
  if h % 32 or w % 32:
    raise argparse.ArgumentTypeError(f'--size={text}: H and W must be multiples of 32 (no padding in the batch)')
  return h, w


def default_images() -> list[str]:
  folder = os.path.join(SHARED_DATA, 'visdrone', 'val_dev', 'images')
  if not os.path.isdir(folder):
    return []
  return [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:2]]


# ------------------------------------------------------------------------------------------- dump (reference)
def dump(args) -> None:
  """Runs in the reference venv: see the module doc."""
  import importlib

  import numpy as np
  import torch
  from PIL import Image

  torch.set_num_threads(args.threads)
  if not torch.cuda.is_available():   # co_dino_head.get_aux_targets hard-codes .cuda() on two index tensors
    torch.Tensor.cuda = lambda self, *a, **k: self
  src = os.path.abspath(args.codetr_src)
  if not os.path.isdir(os.path.join(src, 'projects', 'CO-DETR')):
    sys.exit(f'codetr_parity: no projects/CO-DETR under {src}; pass --codetr-src')
  sys.path.insert(0, src)
  from mmengine.config import Config
  from mmengine.logging import MMLogger
  from mmengine.structures import InstanceData
  from mmdet.registry import MODELS
  from mmdet.structures import DetDataSample
  from mmdet.structures.bbox import HorizontalBoxes
  from mmdet.utils import register_all_modules

  MMLogger.get_instance('mmengine', log_level='ERROR')
  register_all_modules(init_default_scope=True)
  cfg = Config.fromfile(os.path.join(src, REF_CONFIG))
  importlib.import_module('projects.CO-DETR.codetr')
  m = cfg.model
  m.backbone.init_cfg = None
  m.query_head.num_classes = NUM_CLASSES
  for rh in m.roi_head:
    rh.bbox_head.num_classes = NUM_CLASSES
  for bh in m.bbox_head:
    bh.num_classes = NUM_CLASSES
  torch.manual_seed(args.seed)
  model = MODELS.build(m)
  model.init_weights()

  # Perturb every parameter (zero-initialised layers must take part) and set BN statistics from the batch.
  gen = torch.Generator().manual_seed(args.seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = args.noise * max(float(p.detach().abs().mean()), 0.02)
      p.add_(torch.randn(p.shape, generator=gen) * scale)

  h, w = args.size
  images = args.image or default_images()
  if not images:
    sys.exit('codetr_parity: no --image given and ../shared/data/visdrone/val_dev/images is absent')
  inputs, samples = [], []
  for i, path in enumerate(images):
    rgb = np.asarray(Image.open(path).convert('RGB').resize((w, h), Image.BILINEAR))
    bgr = np.ascontiguousarray(rgb[..., ::-1])   # mmdet loads BGR (cv2); its preprocessor converts to RGB
    inputs.append(torch.from_numpy(bgr).permute(2, 0, 1).contiguous())
    samples.append(DetDataSample(metainfo=dict(
        img_id=i, img_path=path, ori_shape=(h, w), img_shape=(h, w), scale_factor=(1.0, 1.0), flip=False,
        flip_direction=None, batch_input_shape=(h, w), pad_shape=(h, w))))
  data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), False)
  batch_inputs, batch_samples = data['inputs'], data['data_samples']

  # BN calibration: frozen statistics = this batch's per-channel statistics, layer by layer.
  bns = [mod for mod in model.backbone.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.reset_running_stats()
      bn.momentum = None   # cumulative average: after one batch, exactly the batch statistics
    model.backbone.train()
    for bn in bns:
      bn.train()
    model.backbone(batch_inputs)
    model.eval()
    for bn in bns:
      bn.momentum = 0.1
      bn.running_var.clamp_(min=1e-3)

  out = {}

  def keep(name, value):
    if isinstance(value, torch.Tensor):
      value = value.detach()
      out[name] = (value.float() if value.is_floating_point() else value).numpy().copy()
    else:
      out[name] = np.asarray(value)

  hooks = []
  transformer = model.query_head.transformer

  def on_backbone(_, __, outputs):
    for i, t in enumerate(outputs):
      keep(f'backbone/C{i + 2}', t.permute(0, 2, 3, 1))

  def on_neck(_, __, outputs):
    for i, t in enumerate(outputs):
      keep(f'neck/P{i}', t.permute(0, 2, 3, 1))

  def on_encoder(_, __, output):
    keep('encoder/memory', output.permute(1, 0, 2))

  def on_decoder(_, __, output):
    states, refs = output
    keep('decoder/states', states)          # [L, B, Q(+dn), C] after the shared final norm
    keep('decoder/references', refs)        # [L + 1, B, Q, 4] (sigmoid space)

  hooks.append(model.backbone.register_forward_hook(on_backbone))
  hooks.append(model.neck.register_forward_hook(on_neck))
  hooks.append(transformer.encoder.register_forward_hook(on_encoder))
  hooks.append(transformer.decoder.register_forward_hook(on_decoder))
  num_dec = transformer.decoder.num_layers
  hooks.append(model.query_head.cls_branches[num_dec].register_forward_hook(
      lambda _, __, o: keep('encoder/proposal_logits', o)))
  original_gen = transformer.gen_encoder_output_proposals

  def gen_proposals(*a, **k):
    memory, proposals = original_gen(*a, **k)
    keep('encoder/output_memory', memory)
    keep('encoder/proposal_anchors', proposals)   # logit space, inf where invalid
    return memory, proposals

  transformer.gen_encoder_output_proposals = gen_proposals
  original_forward = model.query_head.forward

  def head_forward(*a, **k):
    result = original_forward(*a, **k)
    classes, coords, topk_score, topk_anchor = result[:4]
    keep('decoder/logits', classes)
    keep('decoder/boxes', coords)
    keep('encoder/topk_logits', topk_score)
    keep('encoder/topk_boxes', topk_anchor)
    return result

  model.query_head.forward = head_forward

  t0 = time.perf_counter()
  with torch.no_grad():
    results = model.predict(batch_inputs, batch_samples, rescale=False)
  forward_s = time.perf_counter() - t0
  for hk in hooks:
    hk.remove()
  model.query_head.forward = original_forward          # the training pass below records only its losses
  transformer.gen_encoder_output_proposals = original_gen
  # The reference's top-k (recomputed exactly as CoDinoTransformer.forward does).
  logits = torch.from_numpy(out['encoder/proposal_logits'])
  keep('encoder/topk_index', torch.topk(logits.max(-1)[0], model.query_head.num_query, dim=1)[1])
  for i, r in enumerate(results):
    inst = r.pred_instances
    keep(f'detections/{i}/boxes', inst.bboxes)
    keep(f'detections/{i}/scores', inst.scores)
    keep(f'detections/{i}/labels', inst.labels)
  keep('batch/image', batch_inputs.permute(0, 2, 3, 1))   # normalized RGB, NHWC

  # Training losses of the query head (matching, encoder and DN terms) on random small boxes: the head's
  # outputs and dn_meta are saved, so our loss functions are compared on the reference's own predictions.
  gen = torch.Generator().manual_seed(args.seed + 2)
  for i, sample in enumerate(batch_samples):
    n = args.num_gt + 7 * i      # images with different gt counts: DN padding slots exist
    wh = 6.0 + 50.0 * torch.rand(n, 2, generator=gen)
    xy = torch.rand(n, 2, generator=gen) * (torch.tensor([w, h], dtype=torch.float32) - wh)
    boxes = torch.cat([xy, xy + wh], 1)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    sample.gt_instances = InstanceData(bboxes=boxes, labels=labels)
    keep(f'gt/{i}/boxes', boxes)
    keep(f'gt/{i}/labels', labels)
  original_loss_by_feat = model.query_head.loss_by_feat

  def loss_by_feat(cls_scores, bbox_preds, enc_scores, enc_boxes, gt_instances, img_metas, dn_meta):
    keep('loss_in/logits', cls_scores)
    keep('loss_in/boxes', bbox_preds)
    keep('loss_in/enc_logits', enc_scores)
    keep('loss_in/enc_boxes', enc_boxes)
    keep('loss_in/num_dn', int(dn_meta['num_denoising_queries']))
    keep('loss_in/num_dn_groups', int(dn_meta['num_denoising_groups']))
    result = original_loss_by_feat(cls_scores, bbox_preds, enc_scores, enc_boxes, gt_instances, img_metas,
                                   dn_meta)
    for name, value in result.items():
      keep(f'loss/{name}', value)
    return result

  model.query_head.loss_by_feat = loss_by_feat

  generator_class = type(model.query_head.dn_generator)
  original_call = generator_class.__call__

  def dn_call(self, *a, **k):   # the DN queries this step drew (label flips, box noise): ours will use the same
    label_query, bbox_query, attn_mask, dn_meta = original_call(self, *a, **k)
    keep('dn/label_query', label_query)
    keep('dn/bbox_query', bbox_query)
    keep('dn/attn_mask', attn_mask)
    return label_query, bbox_query, attn_mask, dn_meta

  generator_class.__call__ = dn_call   # CdnQueryGenerator defines __call__ itself: hooks never fire
  model.train()
  model.zero_grad()
  with torch.enable_grad():
    feats = model.extract_feat(batch_inputs)
    head_losses, _ = model.query_head.loss(feats, batch_samples)
    sum(v for v in head_losses.values()).backward()
  generator_class.__call__ = original_call
  # Gradient norm of every parameter under the query head's total loss (the aux heads' losses are not in it).
  for name, p in model.named_parameters():
    if p.grad is not None:
      keep(f'grad_norm/{name}', torch.linalg.vector_norm(p.grad.double()))
  model.zero_grad()
  model.eval()

  os.makedirs(args.out, exist_ok=True)
  state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
  torch.save({'state_dict': state, 'meta': {'note': 'codetr_parity random weights', 'seed': args.seed}},
             os.path.join(args.out, 'checkpoint.pth'))
  np.savez(os.path.join(args.out, 'intermediates.npz'), **out)
  meta = dict(size=list(args.size), images=images, seed=args.seed, noise=args.noise, num_classes=NUM_CLASSES,
              forward_s=forward_s, torch=torch.__version__, config=REF_CONFIG,
              test_cfg=dict(max_per_img=int(model.query_head.test_cfg.get('max_per_img', 300)),
                            nms=dict(model.query_head.test_cfg.get('nms') or {})))
  with open(os.path.join(args.out, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  print(f'codetr_parity dump: {len(out)} tensors, {len(state)} checkpoint entries, forward {forward_s:.1f} s '
        f'-> {args.out}')


# --------------------------------------------------------------------------------------- compare (mrqm_jax)
def parity_config(meta: dict):
  """configs/co_dino.py at the dump's size and classes, float32 (the reference's test path)."""
  from configs import co_dino   # pylint: disable=g-import-not-at-top
  c = co_dino.get_config()
  c.input.image_size = tuple(meta['size'])
  c.dataset.num_classes = int(meta['num_classes'])
  c.model.dtype = 'float32'
  c.model.pretrained = ''
  return c


def relative(ours, ref) -> tuple[float, float]:
  """(max abs difference, max abs difference / max |reference|)."""
  import numpy as np   # pylint: disable=g-import-not-at-top
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f'shape {ours.shape} (ours) != {ref.shape} (reference)')
  diff = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  return diff, diff / scale if scale > 0 else diff


def compare(args) -> int:
  import jax   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax import convert, model_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import detector as detector_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import postprocess   # pylint: disable=g-import-not-at-top

  with open(os.path.join(args.dump, 'meta.json')) as f:
    meta = json.load(f)
  with np.load(os.path.join(args.dump, 'intermediates.npz')) as data:
    ref = {k: data[k] for k in data.files}
  config = parity_config(meta)
  model = model_lib.make_model(config)
  abstract = model_lib.abstract_variables(model, config)
  state = convert.load_checkpoint(os.path.join(args.dump, 'checkpoint.pth'))
  converted, report = convert.convert_codetr(state, abstract, config)
  print(f'converter: {report.counts()}')
  for var, why in report.unfilled:
    print(f'  unfilled: {var} ({why})')
  for key in report.unused:
    print(f'  unused: {key}')
  variables = convert.fill_from_init(converted, model, config)
  variables = jax.tree.map(jnp.asarray, variables)

  images = jnp.asarray(ref['batch/image'])
  pad_mask = jnp.zeros(images.shape[:3], bool)
  ref['encoder/topk_index'] = ref['encoder/topk_index'].astype(np.int64)
  ref_topk = jnp.asarray(ref['encoder/topk_index'], jnp.int32)
  ours_topk = {}

  def select_with_reference(enc_logits, enc_boxes_logit, token_valid, num_queries):
    # Ours first (recorded), then the reference's choice, so that the decoder starts from the same queries.
    score = jnp.where(token_valid, enc_logits.max(axis=-1), -jnp.inf)
    ours_topk['index'] = jax.lax.top_k(score, num_queries)[1]
    return (jnp.take_along_axis(enc_logits, ref_topk[..., None], axis=1),
            jnp.take_along_axis(enc_boxes_logit, ref_topk[..., None], axis=1))

  original_select = detector_lib.select_top_proposals
  detector_lib.select_top_proposals = select_with_reference
  try:
    t0 = time.perf_counter()
    outputs, state_out = model.apply(variables, images, pad_mask, train=False, capture_intermediates=True,
                                     mutable=['intermediates'])
    forward_s = time.perf_counter() - t0
  finally:
    detector_lib.select_top_proposals = original_select
  inter = state_out['intermediates']

  rows = []   # (stage, max abs, max rel, note)

  def row(stage, ours, reference, note=''):
    diff, rel = relative(ours, reference)
    rows.append((stage, diff, rel, note))

  backbone = inter['backbone']['__call__'][0]
  for i, c in enumerate(backbone):
    row(f'backbone C{i + 2}', c, ref[f'backbone/C{i + 2}'])
  neck = inter['neck']['__call__'][0]
  for i, p in enumerate(neck):
    row(f'neck P{i}', p, ref[f'neck/P{i}'])
  enc = inter['encoder']['__call__'][0]
  row('encoder memory', enc.memory, ref['encoder/memory'])
  enc_logits = inter['enc_class_head']['__call__'][0]
  valid = np.isfinite(ref['encoder/proposal_anchors']).all(-1)   # the reference's +inf marks invalid tokens
  row('encoder proposal logits (valid tokens)', np.where(valid[..., None], enc_logits, 0),
      np.where(valid[..., None], ref['encoder/proposal_logits'], 0))
  ours_index, ref_index = np.asarray(ours_topk['index']), np.asarray(ref['encoder/topk_index'])
  # Invalid tokens share one constant logit: which of them fill the tied slots does not matter (same content and
  # box), so they are counted, not matched by index.
  overlaps, ref_invalid, ours_invalid = [], 0, 0
  for v, a, b in zip(valid, ours_index, ref_index):
    overlaps.append((len(set(a[v[a]]) & set(b[v[b]])) + min((~v[a]).sum(), (~v[b]).sum())) / len(b))
    ref_invalid += int((~v[b]).sum())
    ours_invalid += int((~v[a]).sum())
  rows.append(('top-k selection (overlap of indices)', float('nan'), float('nan'),
               f'overlap {np.mean(overlaps):.4f}; invalid tokens picked: reference {ref_invalid}, ours '
               f'{ours_invalid}; the reference indices are used after'))
  # Encoder outputs of the selected tokens: valid ones only (an invalid token's box is inf in the reference).
  sel_valid = np.take_along_axis(valid, ref_index, axis=1)
  row('encoder top-k logits', outputs['enc_outputs']['pred_logits'], ref['encoder/topk_logits'])
  row('encoder top-k boxes (valid)', np.where(sel_valid[..., None], outputs['enc_outputs']['pred_boxes'], 0),
      np.where(sel_valid[..., None], ref['encoder/topk_boxes'], 0))
  logits = np.concatenate([outputs['aux_outputs']['pred_logits'], outputs['pred_logits'][None]], 0)
  boxes = np.concatenate([outputs['aux_outputs']['pred_boxes'], outputs['pred_boxes'][None]], 0)
  for layer in range(logits.shape[0]):
    row(f'decoder layer {layer} logits', logits[layer], ref['decoder/logits'][layer])
    row(f'decoder layer {layer} boxes', boxes[layer], ref['decoder/boxes'][layer])

  # Detections, mmdet 3's test path: top max_per_img (query, class) candidates, soft-NMS, the first max_per_img.
  h, w = meta['size']
  max_per_img = int(meta['test_cfg']['max_per_img'])
  nms_iou = float(meta['test_cfg']['nms'].get('iou_threshold', 0.8))
  batch = images.shape[0]
  dets = postprocess.detections_from_outputs(
      outputs['pred_logits'], outputs['pred_boxes'], canvas_hw=(h, w), scale=jnp.ones((batch,)),
      patch_origin=jnp.zeros((batch, 2)), orig_size=jnp.tile(jnp.asarray([[h, w]]), (batch, 1)),
      num_detections=max_per_img)
  dets = postprocess.soft_nms(dets['boxes'], dets['scores'], dets['labels'], max_detections=max_per_img,
                              iou_threshold=nms_iou)
  top = 100
  for i in range(batch):
    ref_boxes, ref_scores = ref[f'detections/{i}/boxes'][:top], ref[f'detections/{i}/scores'][:top]
    ref_labels = ref[f'detections/{i}/labels'][:top]
    ours_boxes = np.asarray(dets['boxes'][i, :len(ref_boxes)])
    ours_scores = np.asarray(dets['scores'][i, :len(ref_boxes)])
    ours_labels = np.asarray(dets['labels'][i, :len(ref_boxes)])
    same_labels = int((ours_labels == ref_labels).sum())
    box_diff = float(np.max(np.abs(ours_boxes - ref_boxes))) / max(h, w) if len(ref_boxes) else 0.0
    score_diff = float(np.max(np.abs(ours_scores - ref_scores))) if len(ref_boxes) else 0.0
    rows.append((f'detections image {i} (top {len(ref_boxes)})', score_diff, score_diff,
                 f'labels equal {same_labels}/{len(ref_boxes)}; boxes max |diff| / image side {box_diff:.2e}'))

  loss_rows = compare_losses(ref, config, batch, h, w) if 'loss/loss_cls' in ref else []
  grad_rows, totals, clipped = ([], None, 0)
  if 'dn/label_query' in ref:
    grad_rows, totals, clipped = compare_gradients(ref, meta, state, images, batch, h, w)

  print(f'\nmrqm_jax vs Co-DINO (mmdet 3.3.0 projects/CO-DETR), {images.shape[0]} images {h}x{w}, float32, '
        f'ours forward {forward_s:.1f} s (with compile), reference {meta["forward_s"]:.1f} s')
  print(f'| {"stage":<42} | {"max abs":>10} | {"max rel":>10} | note')
  print(f'|{"-" * 44}|{"-" * 12}|{"-" * 12}|------')
  for stage, diff, rel, note in rows:
    print(f'| {stage:<42} | {diff:>10.3e} | {rel:>10.3e} | {note}')
  inference = [rel for stage, _, rel, _ in rows if rel == rel]
  if loss_rows:
    print(f'\nQuery-head losses on the reference\'s own predictions (train mode, {len(loss_rows)} terms; ours: '
          f'Hungarian matching, QFL / L1 / GIoU, normalizers):')
    print(f'| {"term (reference name)":<42} | {"reference":>10} | {"ours":>10} | {"rel":>10}')
    print(f'|{"-" * 44}|{"-" * 12}|{"-" * 12}|{"-" * 12}')
    for name, ref_value, ours_value, rel in loss_rows:
      print(f'| {name:<42} | {ref_value:>10.5f} | {ours_value:>10.5f} | {rel:>10.3e}')
  if grad_rows:
    print(f'\nGradient norms under the query head\'s total training loss (our forward in train mode, the reference\'s '
          f'DN draws pinned; {clipped} DN boxes with a corner at the border; total loss: reference {totals[0]:.5f}, '
          f'ours {totals[1]:.5f}, rel {abs(totals[1] - totals[0]) / abs(totals[0]):.3e}):')
    print(f'| {"module group":<42} | {"reference":>10} | {"ours":>10} | {"rel":>10}')
    print(f'|{"-" * 44}|{"-" * 12}|{"-" * 12}|{"-" * 12}')
    for name, ref_value, ours_value, rel in grad_rows:
      print(f'| {name:<42} | {ref_value:>10.4e} | {ours_value:>10.4e} | {rel:>10.3e}')
  line = f'max_rel_inference={max(inference):.3e}'
  if loss_rows:
    line += f' max_rel_loss={max(r for _, _, _, r in loss_rows):.3e}'
  if grad_rows:
    line += (f' max_rel_grad={max(r for _, _, _, r in grad_rows):.3e}'
             f' rel_total_loss_train={abs(totals[1] - totals[0]) / abs(totals[0]):.3e}')
  print(line)
  return 0


def reference_targets(ref: dict, batch: int, h: int, w: int):
  """The dump's gts as our targets: (boxes [B, M, 4] cxcywh / image size, labels [B, M], valid [B, M], counts)."""
  import numpy as np   # pylint: disable=g-import-not-at-top
  counts = [len(ref[f'gt/{i}/labels']) for i in range(batch)]
  m = max(counts)
  gt_boxes = np.tile(np.asarray([0.5, 0.5, 0.1, 0.1], np.float32), (batch, m, 1))
  gt_labels = np.zeros((batch, m), np.int32)
  gt_valid = np.zeros((batch, m), bool)
  for i, n in enumerate(counts):
    xyxy = ref[f'gt/{i}/boxes'].astype(np.float64) / np.array([w, h, w, h])
    gt_boxes[i, :n] = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    gt_labels[i, :n] = ref[f'gt/{i}/labels']
    gt_valid[i, :n] = True
  return gt_boxes, gt_labels, gt_valid, counts


def pinned_dn_noise(ref: dict, gt_boxes, gt_labels, gt_valid, counts, label_embedding, num_slots: int,
                    box_noise: float) -> tuple[dict, int]:
  """`detector.draw_dn_noise`'s dict that makes our DN queries the reference's: each slot's label recovered from
  its content (the nearest label-embedding row), each box from its reference box (sign +1, magnitude solved).
  Returns (noise, number of slots whose box could not be matched exactly: a corner clipped at the border)."""
  import numpy as np   # pylint: disable=g-import-not-at-top
  label_query, bbox_query = ref['dn/label_query'], ref['dn/bbox_query'].astype(np.float64)
  batch, used = label_query.shape[:2]
  groups = int(ref['loss_in/num_dn_groups'])
  width = used // (2 * groups)
  emb = np.asarray(label_embedding, np.float64)
  noise = {'gt_priority': np.zeros(gt_valid.shape, np.float32),
           'flip_u': np.ones((batch, num_slots), np.float32), 'random_label': np.zeros((batch, num_slots), np.int32),
           'box_sign': np.ones((batch, num_slots, 4), np.float32),
           'box_u': np.full((batch, num_slots, 4), 0.5, np.float32)}
  clipped = 0
  for i in range(batch):
    for s in range(used):
      within = s % (2 * width)
      j, negative = within % width, within >= width
      if j >= counts[i]:
        continue   # a padding slot of its group: no noise
      label = int(np.argmin(((emb - label_query[i, s]) ** 2).sum(-1)))
      if label != gt_labels[i, j]:
        noise['flip_u'][i, s], noise['random_label'][i, s] = 0.0, label
      box = 1.0 / (1.0 + np.exp(-bbox_query[i, s]))
      target = np.concatenate([box[:2] - box[2:] / 2, box[:2] + box[2:] / 2])
      clipped += int(np.any((target < 0) | (target > 1)))
      g = gt_boxes[i, j].astype(np.float64)
      corners = np.concatenate([g[:2] - g[2:] / 2, g[:2] + g[2:] / 2])
      half = np.concatenate([g[2:], g[2:]]) / 2
      noise['box_u'][i, s] = (target - corners) / (half * box_noise) - float(negative)
  return noise, clipped


GRADIENT_GROUPS = (   # (group, reference name pattern, our variable path pattern)
    ('backbone (trained stages)', r'backbone\.', r'backbone/'),
    ('neck', r'neck\.', r'neck/'),
    ('level embedding', r'query_head\.transformer\.level_embeds', r'encoder/level_embed'),
    *((f'encoder layer {i}', rf'query_head\.transformer\.encoder\.layers\.{i}\.', rf'encoder/layers_{i}/')
      for i in range(6)),
    ('enc_output + norm', r'query_head\.transformer\.enc_output', r'enc_output'),
    ('encoder class head', r'query_head\.cls_branches\.6\.', r'enc_class_head/'),
    ('encoder box head', r'query_head\.reg_branches\.6\.', r'enc_box_head/'),
    ('query embedding', r'query_head\.transformer\.query_embed', r'query_embed'),
    ('DN label embedding', r'query_head\.dn_generator\.label_embedding', r'label_embedding'),
    *((f'decoder layer {i}', rf'query_head\.transformer\.decoder\.layers\.{i}\.', rf'decoder/layers_{i}/')
      for i in range(6)),
    ('decoder ref point head + norm', r'query_head\.transformer\.decoder\.(ref_point_head|norm)',
     r'decoder/(ref_point_head|final_norm)'),
    ('decoder class heads', r'query_head\.cls_branches\.[0-5]\.', r'decoder/class_heads_'),
    ('decoder box heads', r'query_head\.reg_branches\.[0-5]\.', r'decoder/box_heads_'),
)


def compare_gradients(ref: dict, meta: dict, state_dict: dict, images, batch: int, h: int, w: int):
  """The query head's total training loss (matched layers, encoder, DN; the reference's drawn DN queries pinned)
  and the gradient norm of each module group: [(group, reference, ours, relative)], (ref loss, our loss)."""
  import re   # pylint: disable=g-import-not-at-top

  import flax   # pylint: disable=g-import-not-at-top
  import jax   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax import convert, model_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import detector as detector_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import losses   # pylint: disable=g-import-not-at-top

  config = parity_config(meta)
  config.model.aux_heads = ()            # the reference's query-head loss alone
  model = model_lib.make_model(config)
  abstract = model_lib.abstract_variables(model, config)
  converted, _ = convert.convert_codetr(state_dict, abstract, config)
  variables = jax.tree.map(jnp.asarray, convert.fill_from_init(converted, model, config))
  params, model_state = model_lib.split_variables(variables)
  gt_boxes, gt_labels, gt_valid, counts = reference_targets(ref, batch, h, w)
  targets = {'boxes': jnp.asarray(gt_boxes), 'labels': jnp.asarray(gt_labels), 'box_valid': jnp.asarray(gt_valid)}
  cap = min(config.dn.max_gt, gt_valid.shape[1])
  num_slots = detector_lib.dn_num_slots(config.dn.num_queries, cap)
  noise, clipped = pinned_dn_noise(ref, gt_boxes, gt_labels, gt_valid, counts, params['label_embedding'],
                                   num_slots, config.dn.box_noise)
  noise = jax.tree.map(jnp.asarray, noise)
  original_draw = detector_lib.draw_dn_noise
  detector_lib.draw_dn_noise = lambda *a, **k: noise
  pad_mask = jnp.zeros(images.shape[:3], bool)
  key = jax.random.PRNGKey(0)

  def loss_fn(p):
    outputs = model.apply({'params': p, **model_state}, images, pad_mask, targets=targets, train=True,
                          rngs={'dn': key, 'aux': key, 'dropout': key})
    return losses.compute_losses(outputs, targets, config)

  try:
    (total, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  finally:
    detector_lib.draw_dn_noise = original_draw
  ours_norms = {'/'.join(k): float(np.sum(np.square(np.asarray(v, np.float64))))
                for k, v in flax.traverse_util.flatten_dict(grads).items()}
  ref_norms = {k[len('grad_norm/'):]: float(v) ** 2 for k, v in ref.items() if k.startswith('grad_norm/')}
  rows = []
  for group, ref_pattern, ours_pattern in GRADIENT_GROUPS:
    r = np.sqrt(sum(v for k, v in ref_norms.items() if re.match(ref_pattern, k)))
    o = np.sqrt(sum(v for k, v in ours_norms.items() if re.match(ours_pattern, k)))
    rows.append((group, float(r), float(o), abs(o - r) / max(r, 1e-30)))
  ref_total = float(sum(float(v) for k, v in ref.items() if k.startswith('loss/')))
  return rows, (ref_total, float(total)), clipped


def compare_losses(ref: dict, config, batch: int, h: int, w: int) -> list[tuple[str, float, float, float]]:
  """Our matched (decoder layers, encoder) and denoising losses on the predictions the reference's query head
  made in train mode, against the reference's loss values: [(reference name, reference, ours, relative)]."""
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax.ops import losses   # pylint: disable=g-import-not-at-top

  gt_boxes, gt_labels, gt_valid, counts = reference_targets(ref, batch, h, w)
  gt = (jnp.asarray(gt_boxes), jnp.asarray(gt_labels), jnp.asarray(gt_valid))
  num_dn, groups = int(ref['loss_in/num_dn']), int(ref['loss_in/num_dn_groups'])
  logits, boxes = jnp.asarray(ref['loss_in/logits']), jnp.asarray(ref['loss_in/boxes'])
  outputs = {'pred_logits': logits[-1, :, num_dn:], 'pred_boxes': boxes[-1, :, num_dn:],
             'aux_outputs': {'pred_logits': logits[:-1, :, num_dn:], 'pred_boxes': boxes[:-1, :, num_dn:]},
             'enc_outputs': {'pred_logits': jnp.asarray(ref['loss_in/enc_logits']),
                             'pred_boxes': jnp.asarray(ref['loss_in/enc_boxes'])}}
  terms = losses.matched_losses(outputs, gt, jnp.maximum(gt_valid.sum(), 1).astype(jnp.float32), config)
  # mmdet's DN layout: G groups of 2w queries (w = the batch's most gts): positives of gts 0..n-1 first, their
  # negatives from w on; every DN query is classified (background unless positive).
  width = num_dn // (2 * groups)
  slot = np.arange(num_dn)
  within = slot % (2 * width)
  gt_index = np.where(within < width, within, within - width)[None].repeat(batch, 0)
  positive = (within < width)[None] & (gt_index < np.asarray(counts)[:, None])
  dn = {'pred_logits': logits[:, :, :num_dn], 'pred_boxes': boxes[:, :, :num_dn],
        'gt_index': jnp.asarray(np.where(positive, gt_index, -1)), 'positive': jnp.asarray(positive),
        'valid': jnp.ones((batch, num_dn), bool)}
  terms.update(losses.denoising_losses(dn, gt, config, None))

  def reference_name(ours: str) -> str:
    *prefix, kind = ours.split('.')
    kind = {'cls': 'loss_cls', 'bbox': 'loss_bbox', 'giou': 'loss_iou'}[kind]
    layer = [p for p in prefix if p.startswith('d') and p[1:].isdigit()]
    group = [p for p in prefix if p in ('enc', 'dn')]
    name = (f'{group[0]}_{kind}' if group else kind)
    return f'{layer[0]}.{name}' if layer else name

  rows = []
  for ours_name, value in sorted(terms.items()):
    name = reference_name(ours_name)
    ref_value = float(ref[f'loss/{name}'])
    ours_value = float(value)
    rows.append((name, ref_value, ours_value, abs(ours_value - ref_value) / max(abs(ref_value), 1e-12)))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  d = sub.add_parser('dump', help='reference venv: build, run and save the reference')
  d.add_argument('--out', required=True)
  d.add_argument('--image', action='append', default=None, help='image path (repeat; default: two val_dev images)')
  d.add_argument('--size', type=parse_size, default=DEFAULT_SIZE, help='H,W every image is resized to')
  d.add_argument('--seed', type=int, default=0)
  d.add_argument('--noise', type=float, default=0.5, help='Gaussian noise on every parameter, x its mean |value|')
  d.add_argument('--threads', type=int, default=2)
  d.add_argument('--num-gt', type=int, default=20, help='random gt boxes of the first image (the second: +7)')
  d.add_argument('--codetr-src', default=os.environ.get('CODETR_SRC', '/tmp/codetr_src'))
  c = sub.add_parser('compare', help='project venv: convert, run ours, print the table')
  c.add_argument('--dump', required=True)
  args = p.parse_args(argv)
  if args.command == 'dump':
    dump(args)
    return 0
  return compare(args)


if __name__ == '__main__':
  sys.exit(main())
