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

Training: the query head's loss terms on the reference's predictions, the gradient norms of module groups under
the query head's loss (the reference's DN draws pinned), each auxiliary branch on the reference's inputs, and the
gradient norms under the WHOLE training loss (query head, RPN, RoI head, ATSS head, both aux query groups) with
every draw pinned to the reference's: DN queries, top-k, RPN sample, RPN proposals, RoI sample, aux groups
(`reference_pins`; our model reads them from targets, `rcnn.RCNNBranch` and `aux_heads.query_group`).

Last line: `max_rel_inference=A ... max_rel_loss=B max_rel_grad=C ...` (A: the largest relative difference over
the inference stages; C: over both gradient tables; also the whole loss's terms and total: max_rel_loss_all,
rel_total_loss_all).
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
    raise argparse.ArgumentTypeError(f'--size={text}: H and W must be multiples of 32 (the batch canvas)')
  return h, w


def parse_image_size(text: str) -> tuple[int, int]:
  h, w = (int(v) for v in text.split(','))
  if h < 32 or w < 32:
    raise argparse.ArgumentTypeError(f'--image-size={text}: H and W must be >= 32')
  return h, w


def image_sizes(args, count: int) -> list[tuple[int, int]]:
  """Each image's own (H, W): --image-size per image (a padded batch), else --size for all."""
  sizes = list(args.image_size or [])
  if not sizes:
    return [tuple(args.size)] * count
  if len(sizes) != count:
    sys.exit(f'codetr_parity: {len(sizes)} --image-size for {count} images')
  canvas = (max(h for h, _ in sizes), max(w for _, w in sizes))
  if canvas[0] % 32 or canvas[1] % 32:
    sys.exit(f'codetr_parity: the largest --image-size {canvas} must be multiples of 32 (the batch canvas)')
  return sizes


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
  # No activation checkpointing in the encoder (fairscale's does not allow torch.autograd.grad, which the
  # gradient under the query head's loss alone needs); same values, more memory.
  m.query_head.transformer.encoder.with_cp = -1
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

  images = args.image or default_images()
  if not images:
    sys.exit('codetr_parity: no --image given and ../shared/data/visdrone/val_dev/images is absent')
  sizes = image_sizes(args, len(images))
  inputs, samples = [], []
  for i, (path, (h, w)) in enumerate(zip(images, sizes)):
    rgb = np.asarray(Image.open(path).convert('RGB').resize((w, h), Image.BILINEAR))
    bgr = np.ascontiguousarray(rgb[..., ::-1])   # mmdet loads BGR (cv2); its preprocessor converts to RGB
    inputs.append(torch.from_numpy(bgr).permute(2, 0, 1).contiguous())
    samples.append(DetDataSample(metainfo=dict(
        img_id=i, img_path=path, ori_shape=(h, w), img_shape=(h, w), scale_factor=(1.0, 1.0), flip=False,
        flip_direction=None, pad_shape=(h, w))))
  # The preprocessor pads the batch to its largest image (pad value 0 after normalisation) and sets
  # batch_input_shape: a batch of different sizes is a padded batch, as in Co-DINO's 1x recipe.
  data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), False)
  batch_inputs, batch_samples = data['inputs'], data['data_samples']
  h, w = (int(v) for v in batch_inputs.shape[-2:])

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
    ih, iw = sizes[i]
    wh = 6.0 + 50.0 * torch.rand(n, 2, generator=gen)
    xy = torch.rand(n, 2, generator=gen) * (torch.tensor([iw, ih], dtype=torch.float32) - wh)
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
  restore = record_aux_heads(model, keep)
  model.train()
  model.zero_grad()
  head_terms = {}
  original_head_loss = model.query_head.loss_by_feat

  def head_loss_by_feat(*a, **k):   # the query head's own terms, for the gradient under them alone
    result = original_head_loss(*a, **k)
    head_terms.update(result)
    return result

  model.query_head.loss_by_feat = head_loss_by_feat
  with torch.enable_grad():
    # The whole training loss as mmdet computes it: query head, RPN, RoI head, ATSS head, the aux query groups.
    all_losses = model.loss(batch_inputs, batch_samples)
    for name, value in all_losses.items():
      keep(f'loss_all/{name}', torch.stack(list(value)) if isinstance(value, (list, tuple)) else value)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head_grads = torch.autograd.grad(sum(head_terms.values()), [p for _, p in params], retain_graph=True,
                                     allow_unused=True)
    total = sum(sum(v) if isinstance(v, (list, tuple)) else v for n, v in all_losses.items() if 'loss' in n)
    keep('loss_all/total', total)
    total.backward()
  generator_class.__call__ = original_call
  model.query_head.loss_by_feat = original_head_loss
  restore()
  # Gradient norm of every parameter under the query head's total loss, and under the whole training loss.
  for (name, _), g in zip(params, head_grads):
    if g is not None:
      keep(f'grad_norm/{name}', torch.linalg.vector_norm(g.double()))
  for name, p in params:
    if p.grad is not None:
      keep(f'grad_norm_all/{name}', torch.linalg.vector_norm(p.grad.double()))
  model.zero_grad()
  model.eval()

  os.makedirs(args.out, exist_ok=True)
  state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
  torch.save({'state_dict': state, 'meta': {'note': 'codetr_parity random weights', 'seed': args.seed}},
             os.path.join(args.out, 'checkpoint.pth'))
  np.savez(os.path.join(args.out, 'intermediates.npz'), **out)
  meta = dict(size=[h, w], image_sizes=[list(v) for v in sizes], images=images, seed=args.seed, noise=args.noise, num_classes=NUM_CLASSES,
              forward_s=forward_s, torch=torch.__version__, config=REF_CONFIG,
              test_cfg=dict(max_per_img=int(model.query_head.test_cfg.get('max_per_img', 300)),
                            nms=dict(model.query_head.test_cfg.get('nms') or {})))
  with open(os.path.join(args.out, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  print(f'codetr_parity dump: {len(out)} tensors, {len(state)} checkpoint entries, forward {forward_s:.1f} s '
        f'-> {args.out}')


def record_aux_heads(model, keep):
  """Patches the reference's auxiliary branches so that the training pass records what they computed and drew:
  the aux levels, the ATSS / RPN / RoI outputs, RPN and RoI samples, proposals, each aux query group's targets
  (get_aux_targets: chosen coords, labels, weights) and its decoded outputs. Returns a function that undoes it."""
  import torch   # pylint: disable=g-import-not-at-top
  undo = []
  nhwc = lambda t: t.permute(0, 2, 3, 1)   # noqa: E731

  def wrap(obj, name, make):
    original = getattr(obj, name)
    setattr(obj, name, make(original))
    undo.append(lambda: setattr(obj, name, original))

  def head_loss(original):
    def call(x, samples):
      losses, maps = original(x, samples)
      for level, m in enumerate(maps):
        keep(f'aux/maps/{level}', nhwc(m))
      return losses, maps
    return call

  wrap(model.query_head, 'loss', head_loss)

  def on_atss(_, __, outputs):
    for kind, maps in zip(('cls', 'reg', 'ctr'), outputs):
      for level, m in enumerate(maps):
        keep(f'atss/{kind}/{level}', nhwc(m))

  def on_rpn(_, __, outputs):
    for kind, maps in zip(('cls', 'reg'), outputs):
      for level, m in enumerate(maps):
        keep(f'rpn/{kind}/{level}', nhwc(m))

  def on_roi_extractor(_, inputs, output):
    keep('roi/rois', inputs[1])
    keep('roi/feats', nhwc(output))

  def on_roi_head(_, __, outputs):
    keep('roi/cls', outputs[0])
    keep('roi/reg', outputs[1])

  roi_head = model.roi_head[0]
  hooks = [model.bbox_head[0].register_forward_hook(on_atss), model.rpn_head.register_forward_hook(on_rpn),
           roi_head.bbox_roi_extractor.register_forward_hook(on_roi_extractor),
           roi_head.bbox_head.register_forward_hook(on_roi_head)]
  undo.extend(h.remove for h in hooks)
  calls = {'rpn': 0, 'roi': 0}

  def sampler(kind):
    def make(original):
      def call(assign_result, *a, **k):
        result = original(assign_result, *a, **k)
        i = calls[kind]
        calls[kind] += 1
        keep(f'{kind}/sample/{i}/pos', result.pos_inds)
        keep(f'{kind}/sample/{i}/neg', result.neg_inds)
        keep(f'{kind}/sample/{i}/pos_gt', result.pos_assigned_gt_inds)
        keep(f'{kind}/sample/{i}/priors', result.priors)
        keep(f'{kind}/assign/{i}/gt', assign_result.gt_inds)
        return result
      return call
    return make

  wrap(model.rpn_head.sampler, 'sample', sampler('rpn'))
  wrap(roi_head.bbox_sampler, 'sample', sampler('roi'))

  def rpn_loss_and_predict(original):
    def call(*a, **k):
      losses, proposals = original(*a, **k)
      for i, p in enumerate(proposals):
        keep(f'rpn/proposals/{i}/boxes', p.bboxes)
        keep(f'rpn/proposals/{i}/scores', p.scores)
      return losses, proposals
    return call

  wrap(model.rpn_head, 'loss_and_predict', rpn_loss_and_predict)

  def atss_loss(original):
    def call(*a, **k):
      result = original(*a, **k)
      anchors, labels, targets = result['pos_coords'][:3]
      keep('atss/anchors', torch.stack(list(anchors)) if isinstance(anchors, (list, tuple)) else anchors)
      keep('atss/labels', torch.stack(list(labels)) if isinstance(labels, (list, tuple)) else labels)
      keep('atss/targets', torch.stack(list(targets)) if isinstance(targets, (list, tuple)) else targets)
      return result
    return call

  wrap(model.bbox_head[0], 'loss_by_feat', atss_loss)

  def aux_targets(original):
    def call(pos_coords, img_metas, feats, head_idx):
      result = original(pos_coords, img_metas, feats, head_idx)
      for name, value in zip(('coords', 'labels', 'targets', 'label_weights', 'bbox_weights', 'feats'), result):
        keep(f'aux{head_idx}/{name}', value)
      keep(f'aux{head_idx}/name', pos_coords[-1])
      return result
    return call

  def forward_aux(original):
    def call(feats, img_metas, targets, head_idx):
      result = original(feats, img_metas, targets, head_idx)
      keep(f'aux{head_idx}/logits', result[0])
      keep(f'aux{head_idx}/boxes', result[1])
      return result
    return call

  wrap(model.query_head, 'get_aux_targets', aux_targets)
  wrap(model.query_head, 'forward_aux', forward_aux)

  def restore():
    for fn in reversed(undo):
      fn()
  return restore


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


def batch_pad_mask(meta: dict, batch: int):
  """[B, H, W] bool, True on the padding of each image in the dump's batch (images sit top-left, as mmdet pads)."""
  import numpy as np   # pylint: disable=g-import-not-at-top
  h, w = meta['size']
  mask = np.ones((batch, h, w), bool)
  for i, (ih, iw) in enumerate(meta.get('image_sizes') or [(h, w)] * batch):
    mask[i, :ih, :iw] = False
  return mask


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
  pad_mask = jnp.asarray(batch_pad_mask(meta, images.shape[0]))
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
  image_sizes = meta.get('image_sizes') or [[h, w]] * batch
  dets = postprocess.detections_from_outputs(
      outputs['pred_logits'], outputs['pred_boxes'], canvas_hw=(h, w), scale=jnp.ones((batch,)),
      patch_origin=jnp.zeros((batch, 2)), orig_size=jnp.asarray(image_sizes, jnp.int32),
      num_detections=max_per_img, box_frame=outputs.get('box_frame'))
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
    box_diff = float(np.max(np.abs(ours_boxes - ref_boxes))) / max(image_sizes[i]) if len(ref_boxes) else 0.0
    score_diff = float(np.max(np.abs(ours_scores - ref_scores))) if len(ref_boxes) else 0.0
    rows.append((f'detections image {i} (top {len(ref_boxes)})', score_diff, score_diff,
                 f'labels equal {same_labels}/{len(ref_boxes)}; boxes max |diff| / image side {box_diff:.2e}'))

  loss_rows = compare_losses(ref, config, batch, h, w, pad_mask) if 'loss/loss_cls' in ref else []
  grad_rows, totals, clipped = ([], None, 0)
  if 'dn/label_query' in ref:
    grad_rows, totals, clipped = compare_gradients(ref, meta, state, images, batch, h, w)

  all_rows, all_loss_rows, all_totals, all_notes = ([], [], None, '')
  if 'dn/label_query' in ref and 'aux/maps/0' in ref and any(k.startswith('grad_norm_all/') for k in ref):
    jax.clear_caches()   # the eager passes above leave thousands of small executables behind (GiBs)
    all_rows, all_loss_rows, all_totals, all_notes = compare_gradients_all(ref, meta, state, images, batch, h, w)

  aux_rows, aux_loss_rows = ([], [])
  if 'aux/maps/0' in ref:
    aux_rows, aux_loss_rows = compare_aux_heads(ref, config, model, variables['params'], pad_mask, batch, h, w)
    group_rows, group_loss_rows = compare_aux_groups(ref, config, model, variables['params'], pad_mask, batch, h, w)
    aux_rows, aux_loss_rows = aux_rows + group_rows, aux_loss_rows + group_loss_rows

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
  if all_rows:
    rel_total = abs(all_totals[1] - all_totals[0]) / abs(all_totals[0])
    worst = max(all_loss_rows, key=lambda r: r[3])
    print(f'\nGradient norms under the WHOLE training loss (query head + RPN + RoI + ATSS + both aux query groups; '
          f'every draw pinned to the reference\'s: DN queries, top-k, RPN sample, RPN proposals, RoI sample, aux '
          f'groups; {all_notes}). Total loss: reference {all_totals[0]:.5f}, ours {all_totals[1]:.5f}, rel '
          f'{rel_total:.3e}; its {len(all_loss_rows)} terms: max rel {worst[3]:.3e} ({worst[0]}). max_rel_grad '
          f'below is the max over this table and the query-head table above:')
    print(f'| {"module group":<42} | {"reference":>10} | {"ours":>10} | {"rel":>10}')
    print(f'|{"-" * 44}|{"-" * 12}|{"-" * 12}|{"-" * 12}')
    for name, ref_value, ours_value, rel in all_rows:
      print(f'| {name:<42} | {ref_value:>10.4e} | {ours_value:>10.4e} | {rel:>10.3e}')
  if aux_rows:
    print('\nAuxiliary branches (the dump\'s training pass), each on the reference\'s own inputs:')
    print(f'| {"part":<42} | {"max abs":>10} | {"max rel":>10} | note')
    print(f'|{"-" * 44}|{"-" * 12}|{"-" * 12}|------')
    for stage, diff, rel, note in aux_rows:
      print(f'| {stage:<42} | {diff:>10.3e} | {rel:>10.3e} | {note}')
    print(f'| {"loss term (reference name)":<42} | {"reference":>10} | {"ours":>10} | {"rel":>10}')
    for name, ref_value, ours_value, rel in aux_loss_rows:
      print(f'| {name:<42} | {ref_value:>10.5f} | {ours_value:>10.5f} | {rel:>10.3e}')
  loss_rows = loss_rows + aux_loss_rows
  line = f'max_rel_inference={max(inference):.3e}'
  if aux_rows:
    line += f' max_rel_aux={max(rel for _, _, rel, _ in aux_rows if rel == rel):.3e}'
  if loss_rows:
    line += f' max_rel_loss={max(r for _, _, _, r in loss_rows):.3e}'
  if grad_rows or all_rows:
    line += f' max_rel_grad={max(r for _, _, _, r in grad_rows + all_rows):.3e}'
  if grad_rows:
    line += f' rel_total_loss_train={abs(totals[1] - totals[0]) / abs(totals[0]):.3e}'
  if all_rows:
    line += (f' max_rel_loss_all={max(r for _, _, _, r in all_loss_rows):.3e}'
             f' rel_total_loss_all={abs(all_totals[1] - all_totals[0]) / abs(all_totals[0]):.3e}')
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


def converted_model(state_dict: dict, config):
  """The reference's checkpoint converted onto our model for `config` -> (model, params, model_state)."""
  import jax   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top

  from mrqm_jax import convert, model_lib   # pylint: disable=g-import-not-at-top
  model = model_lib.make_model(config)
  abstract = model_lib.abstract_variables(model, config)
  converted, _ = convert.convert_codetr(state_dict, abstract, config)
  variables = jax.tree.map(jnp.asarray, convert.fill_from_init(converted, model, config))
  params, model_state = model_lib.split_variables(variables)
  return model, params, model_state


def compare_gradients(ref: dict, meta: dict, state_dict: dict, images, batch: int, h: int, w: int):
  """The query head's total training loss (matched layers, encoder, DN; the reference's drawn DN queries pinned)
  and the gradient norm of each module group: [(group, reference, ours, relative)], (ref loss, our loss)."""
  import re   # pylint: disable=g-import-not-at-top

  import flax   # pylint: disable=g-import-not-at-top
  import jax   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax.models import detector as detector_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import losses   # pylint: disable=g-import-not-at-top

  config = parity_config(meta)
  config.model.aux_heads = ()            # the reference's query-head loss alone
  model, params, model_state = converted_model(state_dict, config)
  gt_boxes, gt_labels, gt_valid, counts = reference_targets(ref, batch, h, w)
  targets = {'boxes': jnp.asarray(gt_boxes), 'labels': jnp.asarray(gt_labels), 'box_valid': jnp.asarray(gt_valid)}
  cap = min(config.dn.max_gt, gt_valid.shape[1])
  num_slots = detector_lib.dn_num_slots(config.dn.num_queries, cap)
  pad_mask = jnp.asarray(batch_pad_mask(meta, batch))
  frame_boxes = gt_boxes   # DN noise is drawn on the boxes in the model's frame
  if config.model.box_frame == 'image':
    frame_boxes = np.asarray(detector_lib.to_box_frame(jnp.asarray(gt_boxes), detector_lib.image_box_frame(pad_mask)))
  noise, clipped = pinned_dn_noise(ref, frame_boxes, gt_labels, gt_valid, counts, params['label_embedding'],
                                   num_slots, config.dn.box_noise)
  noise = jax.tree.map(jnp.asarray, noise)
  original_draw = detector_lib.draw_dn_noise
  detector_lib.draw_dn_noise = lambda *a, **k: noise
  pad_mask = jnp.asarray(batch_pad_mask(meta, batch))
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


AUX_GRADIENT_GROUPS = (   # the auxiliary branches' parameters (whole loss only): (group, reference, ours)
    ('aux level (downsample)', r'query_head\.downsample\.', r'aux_levels/'),
    ('RPN head', r'rpn_head\.', r'rcnn/rpn/'),
    ('RoI box head', r'roi_head\.', r'rcnn/bbox_head/'),
    ('ATSS head', r'bbox_head\.', r'atss/dense/'),
    ('aux query embedding (R-CNN group)', r'query_head\.transformer\.aux_pos_trans(_norm)?\.0\.',
     r'aux_query_rcnn/'),
    ('aux query embedding (ATSS group)', r'query_head\.transformer\.aux_pos_trans(_norm)?\.1\.',
     r'aux_query_atss/'),
)


def whole_loss_reference_name(ours: str) -> str:
  """Our loss term name (`losses.compute_losses`) -> the reference's (Co-DETR's `loss` dict; aux0 = R-CNN, aux1 =
  ATSS: the order of its roi_head / bbox_head lists)."""
  fixed = {'rpn.cls': 'loss_rpn_cls', 'rpn.bbox': 'loss_rpn_bbox', 'roi.cls': 'loss_cls0', 'roi.giou': 'loss_bbox0',
           'atss.cls': 'loss_cls1', 'atss.giou': 'loss_bbox1', 'atss.centerness': 'loss_centerness1'}
  if ours in fixed:
    return fixed[ours]
  *prefix, kind = ours.split('.')
  kind = {'cls': 'loss_cls', 'bbox': 'loss_bbox', 'giou': 'loss_iou'}[kind]
  layer = [p for p in prefix if p.startswith('d') and p[1:].isdigit()]
  group = [p for p in prefix if not (p.startswith('d') and p[1:].isdigit())]
  name = kind
  if group and group[0] in ('enc', 'dn'):
    name = f'{group[0]}_{kind}'
  elif group:
    name = f'{kind}_aux' + {'aux_rcnn': '0', 'aux_atss': '1'}[group[0]]
  return f'{layer[0]}.{name}' if layer else name


def reference_pins(ref: dict, config, model, batch: int, h: int, w: int, image_sizes, gt_counts, max_gts: int):
  """Targets keys that pin every draw of our auxiliary branches to the dump's (`rcnn.RCNNBranch`, `aux_heads.
  query_group`): the RPN sample (the reference's sampled anchors found among ours by pixel coordinates, with their
  gts), the RPN proposals, the RoI sample (its candidates: gts then proposals) and each aux query group (R-CNN: the
  sample slots holding the reference's group boxes; ATSS: our anchors at them). Returns (pins, notes)."""
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax.models import aux_heads   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import iou_aware_head   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import rcnn as rcnn_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import boxes as box_ops   # pylint: disable=g-import-not-at-top

  heads = {head.name: head for head in model.aux_heads}
  rcnn, atss = heads['rcnn'], heads['atss']
  num_maps = len([k for k in ref if k.startswith('aux/maps/')])
  shapes = tuple(tuple(int(v) for v in ref[f'aux/maps/{level}'].shape[1:3]) for level in range(num_maps))
  to_px = lambda a: np.concatenate([a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2], -1) * [w, h, w, h]  # noqa

  sizes, scales_of = rcnn_lib.rpn_anchor_sizes(rcnn.strides, rcnn.rpn_octave_base_scale, rcnn.rpn_scales_per_octave)
  # Pixel corners as the model's assignments use them (generate_anchors(pixel_xyxy=True), float32).
  rpn_px = iou_aware_head.generate_anchors(shapes, (h, w), sizes, rcnn.rpn_ratios, scales_of,
                                           grid=rcnn.anchor_grid, strides=rcnn.strides, pixel_xyxy=True)
  atss_px = iou_aware_head.generate_anchors(
      shapes, (h, w), [atss.octave_base_scale * s for s in atss.strides], (1.0,), (1.0,), grid=atss.anchor_grid,
      strides=atss.strides, pixel_xyxy=True)
  rpn_lookup = {tuple(np.round(a, 1)): i for i, a in enumerate(rpn_px)}
  atss_lookup = {tuple(np.round(a, 1)): i for i, a in enumerate(atss_px)}
  num_pos = min(rcnn.max_pos, int(rcnn.roi_num_samples * rcnn.roi_pos_fraction))
  pins = {'rcnn_rpn_sample_index': np.full((batch, rcnn.rpn_num_samples), -1, np.int32),
          'rcnn_rpn_sample_gt': np.full((batch, rcnn.rpn_num_samples), -1, np.int32),
          'rcnn_proposals': np.zeros((batch, rcnn.num_proposals, 4), np.float32),
          'rcnn_proposal_valid': np.zeros((batch, rcnn.num_proposals), bool),
          'rcnn_roi_sample_index': np.full((batch, rcnn.roi_num_samples), -1, np.int32),
          'rcnn_roi_sample_gt': np.full((batch, rcnn.roi_num_samples), -1, np.int32),
          'rcnn_query_index': np.full((batch, aux_heads.query_group_slots(num_pos, rcnn.query_padding)), -1,
                                      np.int32),
          'atss_query_index': np.full((batch, aux_heads.query_group_slots(atss.max_pos, atss.query_padding)), -1,
                                      np.int32)}
  missing = {'rpn': 0, 'atss': 0}
  worst = {'roi': 0.0, 'rcnn group': 0.0}
  for i in range(batch):
    priors = ref[f'rpn/sample/{i}/priors']
    index = [rpn_lookup.get(tuple(np.round(p, 1)), -1) for p in priors]
    missing['rpn'] += sum(j < 0 for j in index)
    pins['rcnn_rpn_sample_index'][i, :len(index)] = np.maximum(index, 0)
    pos_gt = ref[f'rpn/sample/{i}/pos_gt']
    pins['rcnn_rpn_sample_gt'][i, :len(pos_gt)] = pos_gt            # mmdet's sample: positives first
    proposals = ref[f'rpn/proposals/{i}/boxes']
    pins['rcnn_proposals'][i, :len(proposals)] = proposals
    pins['rcnn_proposal_valid'][i, :len(proposals)] = True
    # The RoI sample indexes mmdet's [gts, proposals]; ours are [gts padded to M, proposals].
    n = gt_counts[i]
    sample = np.concatenate([ref[f'roi/sample/{i}/pos'], ref[f'roi/sample/{i}/neg']]).astype(np.int64)
    ours = np.where(sample < n, sample, sample - n + max_gts)
    pins['rcnn_roi_sample_index'][i, :len(ours)] = ours
    roi_pos_gt = ref[f'roi/sample/{i}/pos_gt']
    pins['rcnn_roi_sample_gt'][i, :len(roi_pos_gt)] = roi_pos_gt
    gts_px = np.zeros((max_gts, 4))
    gts_px[:n] = ref[f'gt/{i}/boxes']
    candidates = np.concatenate([gts_px, pins['rcnn_proposals'][i]])
    rois = ref[f'roi/sample/{i}/priors']
    worst['roi'] = max(worst['roi'], float(np.abs(candidates[ours] - rois).max()))
    # Each aux group slot: the candidate of the reference's box (R-CNN: a sample slot; ATSS: an anchor).
    ih, iw = image_sizes[i]
    for key, lookup in (('aux0', None), ('aux1', atss_lookup)):
      coords = ref[f'{key}/coords'][i].astype(np.float64)
      boxes = to_px(coords) / [w, h, w, h] * [iw, ih, iw, ih]
      if lookup is None:   # nearest sampled RoI (duplicates: the same box and label, either will do)
        distance = np.abs(boxes[:, None] - rois[None]).sum(-1)
        slots = distance.argmin(1)
        worst['rcnn group'] = max(worst['rcnn group'], float(distance.min(1).max()))
        pins['rcnn_query_index'][i, :len(slots)] = slots
      else:
        slots = [lookup.get(tuple(np.round(b, 1)), -1) for b in boxes]
        missing['atss'] += sum(j < 0 for j in slots)
        pins['atss_query_index'][i, :len(slots)] = np.maximum(slots, 0)
  notes = (f'RPN sampled anchors not found among ours {missing["rpn"]}, ATSS group anchors not found '
           f'{missing["atss"]}; RoI sample vs its candidates max |diff| {worst["roi"]:.1e} px, R-CNN group boxes '
           f'vs their sample slots {worst["rcnn group"]:.1e} px')
  return pins, notes


def compare_gradients_all(ref: dict, meta: dict, state_dict: dict, images, batch: int, h: int, w: int):
  """The WHOLE training loss (query head, RPN, RoI head, ATSS head, both aux query groups) with every draw pinned
  to the dump's: DN queries (`pinned_dn_noise`), the top-k selection, the RPN and RoI samples, the RPN proposals
  and the aux groups (`reference_pins`). Returns (gradient rows [(group, reference, ours, relative)], loss rows
  [(reference name, reference, ours, relative)], (reference total, our total), notes)."""
  import re   # pylint: disable=g-import-not-at-top

  import flax   # pylint: disable=g-import-not-at-top
  import jax   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax.models import detector as detector_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import losses   # pylint: disable=g-import-not-at-top

  config = parity_config(meta)
  model, params, model_state = converted_model(state_dict, config)
  gt_boxes, gt_labels, gt_valid, counts = reference_targets(ref, batch, h, w)
  pad_mask = jnp.asarray(batch_pad_mask(meta, batch))
  image_sizes = meta.get('image_sizes') or [[h, w]] * batch
  pins, notes = reference_pins(ref, config, model, batch, h, w, image_sizes, counts, gt_valid.shape[1])
  targets = {'boxes': jnp.asarray(gt_boxes), 'labels': jnp.asarray(gt_labels), 'box_valid': jnp.asarray(gt_valid),
             **{k: jnp.asarray(v) for k, v in pins.items()}}
  cap = min(config.dn.max_gt, gt_valid.shape[1])
  num_slots = detector_lib.dn_num_slots(config.dn.num_queries, cap)
  frame_boxes = gt_boxes
  if config.model.box_frame == 'image':
    frame_boxes = np.asarray(detector_lib.to_box_frame(jnp.asarray(gt_boxes), detector_lib.image_box_frame(pad_mask)))
  noise, _ = pinned_dn_noise(ref, frame_boxes, gt_labels, gt_valid, counts, params['label_embedding'], num_slots,
                             config.dn.box_noise)
  noise = jax.tree.map(jnp.asarray, noise)
  ref_topk = jnp.asarray(ref['encoder/topk_index'], jnp.int32)
  pinned = {}   # the jitted function's arguments, read by the patched draws while it is traced

  def select_with_reference(enc_logits, enc_boxes_logit, token_valid, num_queries):
    del token_valid, num_queries
    topk = pinned['topk'][..., None]
    return jnp.take_along_axis(enc_logits, topk, axis=1), jnp.take_along_axis(enc_boxes_logit, topk, axis=1)

  original_draw, original_select = detector_lib.draw_dn_noise, detector_lib.select_top_proposals
  detector_lib.draw_dn_noise = lambda *a, **k: pinned['noise']
  detector_lib.select_top_proposals = select_with_reference
  key = jax.random.PRNGKey(0)

  def loss_fn(p, state, images, pad_mask, targets, noise, topk):
    pinned.update(noise=noise, topk=topk)
    outputs = model.apply({'params': p, **state}, images, pad_mask, targets=targets, train=True,
                          rngs={'dn': key, 'aux': key, 'dropout': key})
    return losses.compute_losses(outputs, targets, config)

  try:   # eager, op by op: slow (8-30 min on 2 shared cores) but ~5-7 GiB; one jit of this graph needs > 10 GiB
    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, images, pad_mask, targets, noise, ref_topk)
  finally:
    detector_lib.draw_dn_noise, detector_lib.select_top_proposals = original_draw, original_select
  ours_norms = {'/'.join(k): float(np.sum(np.square(np.asarray(v, np.float64))))
                for k, v in flax.traverse_util.flatten_dict(grads).items()}
  ref_norms = {k[len('grad_norm_all/'):]: float(v) ** 2 for k, v in ref.items() if k.startswith('grad_norm_all/')}
  rows = []
  for group, ref_pattern, ours_pattern in GRADIENT_GROUPS + AUX_GRADIENT_GROUPS:
    r = np.sqrt(sum(v for k, v in ref_norms.items() if re.match(ref_pattern, k)))
    o = np.sqrt(sum(v for k, v in ours_norms.items() if re.match(ours_pattern, k)))
    rows.append((group, float(r), float(o), abs(o - r) / max(r, 1e-30)))
  loss_rows = []
  for ours_name, value in sorted(terms.items()):
    name = whole_loss_reference_name(ours_name)
    ref_value = float(np.sum(ref[f'loss_all/{name}']))
    loss_rows.append((name, ref_value, float(value), abs(float(value) - ref_value) / max(abs(ref_value), 1e-12)))
  return rows, loss_rows, (float(ref['loss_all/total']), float(total)), notes


def compare_losses(ref: dict, config, batch: int, h: int, w: int, pad_mask) -> list[tuple[str, float, float, float]]:
  """Our matched (decoder layers, encoder) and denoising losses on the predictions the reference's query head
  made in train mode, against the reference's loss values: [(reference name, reference, ours, relative)]."""
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax.models import detector as detector_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import losses   # pylint: disable=g-import-not-at-top

  gt_boxes, gt_labels, gt_valid, counts = reference_targets(ref, batch, h, w)
  gt = (jnp.asarray(gt_boxes), jnp.asarray(gt_labels), jnp.asarray(gt_valid))
  if config.model.box_frame == 'image':   # the query head's losses are in each image's frame
    gt = losses.targets_in_frame(gt, detector_lib.image_box_frame(jnp.asarray(pad_mask)))
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


def flatten_levels(ref: dict, prefix: str, count: int):
  """The reference's per-level NHWC maps `prefix/{l}` -> [B, sum H_l W_l, C] (our anchor order for 1 anchor)."""
  import numpy as np   # pylint: disable=g-import-not-at-top
  maps = [ref[f'{prefix}/{level}'] for level in range(count)]
  return np.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)


def compare_aux_heads(ref: dict, config, model, params, pad_mask, batch: int, h: int, w: int):
  """Co-DINO's auxiliary branches on the reference's own inputs (train pass of the dump), each part isolated:
  the aux levels from the reference's encoder memory; the ATSS, RPN and RoI heads on the reference's aux maps
  (and RoIs); the ATSS losses on the reference's ATSS outputs and anchors. Returns (rows, loss rows)."""
  import jax   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax.models import atss_head as atss_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import aux_heads   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import detector as detector_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import iou_aware_head   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import rcnn as rcnn_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import assigners, box_coder, losses, roi_align   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import boxes as box_ops   # pylint: disable=g-import-not-at-top

  rows, loss_rows = [], []

  def row(stage, ours, reference, note=''):
    diff, rel = relative(ours, reference)
    rows.append((stage, diff, rel, note))

  num_maps = len([k for k in ref if k.startswith('aux/maps/')])
  ref_maps = [jnp.asarray(ref[f'aux/maps/{level}']) for level in range(num_maps)]
  shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in ref_maps)
  memory = jnp.concatenate([m.reshape(batch, -1, m.shape[-1]) for m in ref_maps[:-1]], axis=1)
  level_pad = detector_lib.level_pad_masks(pad_mask, shapes)
  ours_maps = model.aux_levels.apply({'params': params['aux_levels']}, memory, shapes[:-1])
  row('aux level (downsample conv + GN)', ours_maps[-1], ref_maps[-1])

  heads = {head.name: head for head in model.aux_heads}
  atss = heads['atss']
  dense = aux_heads.DenseHead(1, atss.num_classes, atss.stacked_convs, True, atss.norm, atss.conv_impl,
                              atss.dtype).apply({'params': params['atss']['dense']}, ref_maps)
  row('ATSS class logits', dense['cls_logits'], flatten_levels(ref, 'atss/cls', num_maps))
  row('ATSS box deltas', dense['deltas'], flatten_levels(ref, 'atss/reg', num_maps))
  row('ATSS centerness', dense['centerness'], flatten_levels(ref, 'atss/ctr', num_maps)[..., 0])

  rcnn = heads['rcnn']
  per_location = rcnn.rpn_scales_per_octave * len(rcnn.rpn_ratios)
  rpn = aux_heads.RPNHead(per_location, ref_maps[0].shape[-1], rcnn.conv_impl, rcnn.dtype).apply(
      {'params': params['rcnn']['rpn']}, ref_maps)
  ratios, scales = len(rcnn.rpn_ratios), rcnn.rpn_scales_per_octave

  def scale_major(x, per_anchor):   # mmdet: a location's anchors ratio-major; ours scale-major
    b, n, _ = x.shape
    return x.reshape(b, n, ratios, scales, per_anchor).swapaxes(2, 3).reshape(b, -1, per_anchor)

  row('RPN objectness', rpn['logits'], scale_major(flatten_levels(ref, 'rpn/cls', num_maps), 1)[..., 0])
  row('RPN deltas', rpn['deltas'], scale_major(flatten_levels(ref, 'rpn/reg', num_maps), 4))

  rois = ref['roi/rois']
  rois_px = jnp.asarray(rois[:, 1:].reshape(batch, -1, 4))
  levels = min(rcnn.num_roi_levels, num_maps)
  feats = roi_align.multilevel_roi_align(ref_maps[:levels], rois_px, tuple(rcnn.strides[:levels]),
                                         output_size=rcnn.roi_size, sampling_ratio=rcnn.sampling_ratio,
                                         max_samples=rcnn.adaptive_max_samples, finest_scale=rcnn.finest_scale)
  ref_feats = ref['roi/feats'].reshape(feats.shape)
  level = np.asarray(roi_align.map_roi_levels(rois_px, levels))
  side = (np.asarray(rois_px)[..., 2:] - np.asarray(rois_px)[..., :2]) / np.asarray(rcnn.strides)[level][..., None]
  needed = int(np.ceil(side / rcnn.roi_size).max())
  row('RoIAlign features', feats, ref_feats,
      f'sampling_ratio={rcnn.sampling_ratio} (0: adaptive, cap {rcnn.adaptive_max_samples}; these RoIs need '
      f'up to {needed} per side)')
  head = aux_heads.Shared2FCHead(rcnn.num_classes, rcnn.fc_dim, rcnn.dtype).apply(
      {'params': params['rcnn']['bbox_head']}, jnp.asarray(ref_feats))
  row('RoI head class logits (reference features)', head['cls_logits'], ref['roi/cls'].reshape(batch, -1, rcnn.num_classes + 1))
  row('RoI head deltas (reference features)', head['deltas'], ref['roi/reg'].reshape(head['deltas'].shape))

  # ATSS losses on the reference's outputs, with our anchors (model.anchor_grid) and our assignment.
  gt_boxes, gt_labels, gt_valid, _ = reference_targets(ref, batch, h, w)
  gt = (jnp.asarray(gt_boxes), jnp.asarray(gt_labels), jnp.asarray(gt_valid))
  atss_anchor_args = (shapes, (h, w), [atss.octave_base_scale * s for s in atss.strides], (1.0,), (1.0,))
  anchors = jnp.asarray(iou_aware_head.generate_anchors(*atss_anchor_args, grid=atss.anchor_grid,
                                                        strides=atss.strides))
  anchors_px = jnp.asarray(iou_aware_head.generate_anchors(*atss_anchor_args, grid=atss.anchor_grid,
                                                           strides=atss.strides, pixel_xyxy=True))
  row('ATSS anchors (pixels)', anchors_px, ref['atss/anchors'][0], f'model.anchor_grid={atss.anchor_grid!r}')
  deltas = jnp.asarray(flatten_levels(ref, 'atss/reg', num_maps))
  anchor_valid = aux_heads.anchor_valid_mask(level_pad, 1)
  per_level = tuple(a * b for a, b in shapes)
  gt_px = box_ops.cxcywh_to_pixel_xyxy(gt[0], (h, w))
  assigned, _ = jax.vmap(lambda g, v, av: assigners.atss_assign(anchors_px, per_level, g, v, topk=atss.topk,
                                                                anchor_valid=av))(gt_px, gt[2], anchor_valid)
  ref_positive = ref['atss/labels'] < atss.num_classes
  same = int(((np.asarray(assigned) >= 0) == ref_positive).sum())
  target = jnp.take_along_axis(gt[0], jnp.maximum(assigned, 0)[..., None], axis=1)
  atss_out = {'cls_logits': jnp.asarray(flatten_levels(ref, 'atss/cls', num_maps)),
              'pred_boxes': box_coder.decode_deltas(anchors[None], deltas, box_coder.DELTA_STDS),
              'centerness': jnp.asarray(flatten_levels(ref, 'atss/ctr', num_maps)[..., 0]),
              'anchor_valid': anchor_valid, 'assigned_gt': assigned,
              'centerness_target': jnp.where(assigned >= 0, atss_lib.centerness_target(anchors[None], target), 0.0)}
  terms = losses.atss_losses(atss_out, gt, config, None)
  rows.append(('ATSS assignment (positive / negative agree)', float('nan'), float('nan'),
               f'{same}/{ref_positive.size} anchors; positives ours {int((np.asarray(assigned) >= 0).sum())}, '
               f'reference {int(ref_positive.sum())}'))
  for ours_name, ref_name in (('atss.cls', 'loss_cls1'), ('atss.giou', 'loss_bbox1'),
                              ('atss.centerness', 'loss_centerness1')):
    ref_value = float(np.sum(ref[f'loss_all/{ref_name}']))
    ours_value = float(terms[ours_name])
    loss_rows.append((ref_name, ref_value, ours_value, abs(ours_value - ref_value) / max(abs(ref_value), 1e-12)))

  # Faster R-CNN losses on the reference's outputs and its RPN / RoI samples (the sampled anchors found among ours
  # by their coordinates: our RPN anchors are mmdet's, scale-major).
  sizes, scales_of = rcnn_lib.rpn_anchor_sizes(rcnn.strides, rcnn.rpn_octave_base_scale, rcnn.rpn_scales_per_octave)
  rpn_anchors = np.asarray(iou_aware_head.generate_anchors(shapes, (h, w), sizes, rcnn.rpn_ratios, scales_of,
                                                           grid=rcnn.anchor_grid, strides=rcnn.strides))
  rpn_px = iou_aware_head.generate_anchors(shapes, (h, w), sizes, rcnn.rpn_ratios, scales_of,
                                           grid=rcnn.anchor_grid, strides=rcnn.strides, pixel_xyxy=True)
  lookup = {tuple(np.round(a, 1)): i for i, a in enumerate(rpn_px)}
  rpn_logits = scale_major(flatten_levels(ref, 'rpn/cls', num_maps), 1)[..., 0]
  rpn_deltas = scale_major(flatten_levels(ref, 'rpn/reg', num_maps), 4)
  gt_cxcywh = np.asarray(gt_boxes)
  out = {k: [] for k in ('rpn_logits', 'rpn_deltas', 'rpn_delta_targets', 'rpn_pos', 'rpn_valid', 'roi_logits',
                         'roi_boxes', 'roi_gt', 'roi_valid')}
  unmatched = 0
  ref_roi_cls = ref['roi/cls'].reshape(batch, -1, rcnn.num_classes + 1)
  ref_roi_reg = ref['roi/reg'].reshape(batch, -1, rcnn.num_classes, 4)
  for i in range(batch):
    priors = ref[f'rpn/sample/{i}/priors']
    index = []
    for p in priors:
      j = lookup.get(tuple(np.round(p, 1)))
      unmatched += j is None
      index.append(0 if j is None else j)
    index = np.asarray(index)
    num_pos = len(ref[f'rpn/sample/{i}/pos'])
    positive = np.arange(len(index)) < num_pos
    matched_gt = np.zeros(len(index), np.int64)
    matched_gt[:num_pos] = ref[f'rpn/sample/{i}/pos_gt']
    anchors_i = jnp.asarray(rpn_anchors[index])
    targets_i = jnp.where(jnp.asarray(positive)[:, None], jnp.asarray(gt_cxcywh[i][matched_gt]), anchors_i)
    out['rpn_logits'].append(rpn_logits[i, index])
    out['rpn_deltas'].append(rpn_deltas[i, index])
    out['rpn_delta_targets'].append(box_coder.encode_deltas(anchors_i, targets_i, box_coder.UNIT_STDS))
    out['rpn_pos'].append(positive)
    out['rpn_valid'].append(np.ones(len(index), bool))
    roi_pos = len(ref[f'roi/sample/{i}/pos'])
    num_rois = ref_roi_cls.shape[1]
    roi_gt = np.full(num_rois, -1, np.int64)
    roi_gt[:roi_pos] = ref[f'roi/sample/{i}/pos_gt']
    rois_i = box_ops.pixel_xyxy_to_cxcywh(jnp.asarray(ref[f'roi/sample/{i}/priors']), (h, w))
    target_class = np.asarray(gt_labels[i])[np.maximum(roi_gt, 0)]
    deltas = ref_roi_reg[i][np.arange(num_rois), target_class]
    out['roi_logits'].append(ref_roi_cls[i])
    out['roi_boxes'].append(box_coder.decode_deltas(rois_i, jnp.asarray(deltas), box_coder.DELTA_STDS))
    out['roi_gt'].append(roi_gt)
    out['roi_valid'].append(np.ones(num_rois, bool))
  out = {k: jnp.stack([jnp.asarray(v) for v in vs]) for k, vs in out.items()}
  terms = losses.rcnn_losses(out, gt, config, None)
  # Proposals from the reference's RPN outputs: ours (per-level top-k, NMS, the best num_proposals) against its.
  level_sizes = tuple(a * b * per_location for a, b in shapes)
  image_wh = np.stack(detector_lib.valid_extent(jnp.asarray(pad_mask)), axis=-1)   # as the detector passes it
  for i in range(batch):
    proposals, valid = rcnn_lib.select_proposals(
        jnp.asarray(rpn_logits[i]), jnp.asarray(rpn_deltas[i]), jnp.asarray(rpn_anchors),
        jnp.ones(len(rpn_anchors), bool), level_sizes, (h, w), nms_pre=rcnn.nms_pre, nms_iou=rcnn.nms_iou,
        num_proposals=rcnn.num_proposals, clip_wh=jnp.asarray(image_wh[i]))
    ours_boxes = np.asarray(proposals)[np.asarray(valid)]
    ref_boxes = ref[f'rpn/proposals/{i}/boxes']
    ours_set = {tuple(np.round(b, 2)) for b in ours_boxes}
    common = sum(tuple(np.round(b, 2)) in ours_set for b in ref_boxes)
    # A set: proposals of equal score (e.g. from the constant padding region) come in either order, and an NMS
    # near-tie (IoU at the threshold, scores at the 1000th place) may flip a few: counted, not compared.
    ours_set = {tuple(np.round(b, 2)) for b in ours_boxes}
    ref_set = {tuple(np.round(b, 2)) for b in ref_boxes}
    shared = np.asarray(sorted(ours_set & ref_set))
    rows.append((f'RPN proposals image {i} (as a set)', float('nan'), float('nan'),
                 f'{common}/{len(ref_boxes)} reference boxes among ours ({len(ours_boxes)}, to 0.01 px); '
                 f'{len(ref_set - ours_set)} differ (NMS / top-k near-ties)' if len(shared) else 'none shared'))
  rows.append(('RPN sampled anchors found among ours', float('nan'), float('nan'),
               f'{batch * len(index) - unmatched}/{batch * len(index)} (by pixel coordinates)'))
  for ours_name, ref_name in (('rpn.cls', 'loss_rpn_cls'), ('rpn.bbox', 'loss_rpn_bbox'),
                              ('roi.cls', 'loss_cls0'), ('roi.giou', 'loss_bbox0')):
    ref_value = float(np.sum(ref[f'loss_all/{ref_name}']))
    ours_value = float(terms[ours_name])
    loss_rows.append((ref_name, ref_value, ours_value, abs(ours_value - ref_value) / max(abs(ref_value), 1e-12)))
  return rows, loss_rows


def compare_aux_groups(ref: dict, config, model, params, pad_mask, batch: int, h: int, w: int):
  """Each aux query group of the dump (aux0 = R-CNN, aux1 = ATSS: Co-DINO's order): the reference's group (its
  positives and drawn negatives, their boxes in the image frame) decoded by our query-group embedding and decoder
  on the reference's encoder memory, then our aux-query loss on the reference's decoded outputs and targets.
  Returns (rows, loss rows)."""
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  import numpy as np   # pylint: disable=g-import-not-at-top

  from mrqm_jax.models import aux_heads   # pylint: disable=g-import-not-at-top
  from mrqm_jax.models import detector as detector_lib   # pylint: disable=g-import-not-at-top
  from mrqm_jax.ops import losses   # pylint: disable=g-import-not-at-top

  rows, loss_rows = [], []
  num_maps = len([k for k in ref if k.startswith('aux/maps/')])
  enc_maps = [jnp.asarray(ref[f'aux/maps/{level}']) for level in range(num_maps - 1)]
  shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in enc_maps)
  memory = jnp.concatenate([m.reshape(batch, -1, m.shape[-1]) for m in enc_maps], axis=1)
  image_frame = config.model.box_frame == 'image'
  level_masks = detector_lib.level_pad_masks(pad_mask, shapes, torch_nearest=image_frame)
  memory_pad_mask = jnp.concatenate([m.reshape(batch, -1) for m in level_masks], axis=1)
  ratios = detector_lib.valid_ratios(level_masks) if image_frame else None
  box_frame = detector_lib.image_box_frame(pad_mask) if image_frame else jnp.ones((batch, 4), jnp.float32)
  gt_boxes, gt_labels, gt_valid, _ = reference_targets(ref, batch, h, w)
  gt = (detector_lib.to_box_frame(jnp.asarray(gt_boxes), box_frame), jnp.asarray(gt_labels), jnp.asarray(gt_valid))
  dim = config.model.hidden_dim
  for index in range(2):
    key = f'aux{index}'
    if f'{key}/coords' not in ref:
      continue
    head = str(ref[f'{key}/name'])
    refs = jnp.asarray(ref[f'{key}/coords'])                       # [B, K, 4] cxcywh, image frame
    queries = aux_heads.AuxQueryGroup(dim, None).apply({'params': params[f'aux_query_{head}']}, refs, None)
    decoded = model.decoder.apply({'params': params['decoder']}, queries, refs, memory, memory_pad_mask, shapes,
                                  None, train=False, valid_ratios=ratios)
    layers = decoded['pred_logits'].shape[0]
    for layer in range(layers):
      diff, rel = relative(decoded['pred_logits'][layer], ref[f'{key}/logits'][layer])
      rows.append((f'aux group {head}: layer {layer} logits', diff, rel, f'K={refs.shape[1]}, unmasked'))
      diff, rel = relative(decoded['pred_boxes'][layer], ref[f'{key}/boxes'][layer])
      rows.append((f'aux group {head}: layer {layer} boxes', diff, rel, ''))
    # Losses on the reference's own decoded outputs: the slots' gts found from their targets.
    labels, targets = ref[f'{key}/labels'], ref[f'{key}/targets']
    query_gt = np.full(labels.shape, -1, np.int32)
    frame_gt = np.asarray(gt[0])
    for i in range(batch):
      for k in np.nonzero(labels[i] < config.dataset.num_classes)[0]:
        query_gt[i, k] = int(np.argmin(np.abs(frame_gt[i] - targets[i, k]).sum(-1)))
    head_out = {'query_logits': jnp.asarray(ref[f'{key}/logits']), 'query_boxes': jnp.asarray(ref[f'{key}/boxes']),
                'query_gt': jnp.asarray(query_gt), 'query_valid': jnp.asarray(ref[f'{key}/label_weights'] > 0)}
    terms = losses.aux_query_losses(head_out, gt, config, None, f'aux_{head}')
    for ours_name, value in sorted(terms.items()):
      *prefix, kind = ours_name.split('.')
      name = {'cls': 'loss_cls_aux', 'bbox': 'loss_bbox_aux', 'giou': 'loss_iou_aux'}[kind] + str(index)
      layer = [p for p in prefix if p.startswith('d') and p[1:].isdigit()]
      name = f'{layer[0]}.{name}' if layer else name
      ref_value = float(ref[f'loss_all/{name}'])
      loss_rows.append((name, ref_value, float(value), abs(float(value) - ref_value) / max(abs(ref_value), 1e-12)))
  return rows, loss_rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  d = sub.add_parser('dump', help='reference venv: build, run and save the reference')
  d.add_argument('--out', required=True)
  d.add_argument('--image', action='append', default=None, help='image path (repeat; default: two val_dev images)')
  d.add_argument('--size', type=parse_size, default=DEFAULT_SIZE, help='H,W every image is resized to')
  d.add_argument('--image-size', type=parse_image_size, action='append', default=None,
                 help='H,W of one image (repeat, one per image): a padded batch of different sizes')
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
