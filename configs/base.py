"""Every knob of mrqm_jax, with its default and why.

The key names under `dataset`, `train`, `eval` and `iah` are a contract (see README / DESIGN): scripts and
notebooks depend on them. Recipes (visdrone.py, sodad.py, smoke.py) start from `get_config()` here and override.
The returned config is locked: `--config.no_such_key=1` fails and names the key.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- data
  c.dataset = ml_collections.ConfigDict()
  c.dataset.format = 'visdrone'          # 'visdrone' | 'soda_d' | 'coco'
  c.dataset.root = ''                    # official layout; '' in smoke => synthetic data made in WORKDIR/data
  c.dataset.train_split = 'train'        # VisDrone: folder VisDrone2019-DET-<split> or <split>; SODA-D: <split>.json
  c.dataset.eval_split = 'val'
  c.dataset.num_classes = 10             # targets only; ignore regions are not a class
  c.dataset.max_boxes = 1000             # static per-image target count; densest VisDrone train image has 902
  c.dataset.max_ignore = 128             # static per-image ignore-region count
  # An image with more targets than max_boxes (or regions than max_ignore) is logged and counted, and its first
  # ones in reader order are kept; True makes it an error naming the image (input_pipeline.transforms).
  c.dataset.strict_max_boxes = False
  # Patch slicing (SODA-D protocol: 800x800 patches, 150 px overlap; available for VisDrone too).
  c.dataset.slicing = ml_collections.ConfigDict()
  c.dataset.slicing.enabled = False
  c.dataset.slicing.patch_size = 800
  c.dataset.slicing.overlap = 150
  c.dataset.slicing.ignore_inside_fraction = 0.4   # cut box with <= this fraction inside the patch -> ignore
  c.dataset.slicing.merge_nms_iou = 0.5

  c.input = ml_collections.ConfigDict()
  # Static [H, W] every image is resized into (keeping aspect ratio) and padded to. mmdet's (1333, 800)
  # rounded up to a multiple of 32 so every pyramid level has integer size.
  c.input.image_size = (800, 1344)
  # How an image is scaled before it is padded to the canvas (input_pipeline/transforms.resize_factors), in
  # training, eval and predict alike. 'mmdet' (Co-DINO's keep-ratio Resize to resize_scale = (1333, 800)):
  # min(1333 / long side, 800 / short side); an image that would then not fit the canvas (a portrait one) is
  # scaled to fit it instead, counted and logged. 'fit_canvas': min(H / h, W / w), the largest that fits (v0.1-v0.3;
  # 16:9 images come out 1344 px wide instead of 1333, portrait ones 25-40% smaller than mmdet's).
  c.input.resize_rule = 'mmdet'
  c.input.resize_scale = (1333, 800)
  c.input.random_flip = True             # the paper's only augmentation
  c.input.prefetch = 2
  c.input.num_parallel_calls = -1        # -1 = tf.data.AUTOTUNE
  c.input.mean = (123.675, 116.28, 103.53)   # ImageNet RGB mean/std in 0..255 (torchvision weights)
  c.input.std = (58.395, 57.12, 57.375)

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'resnet50'          # 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101'
  c.model.backbone_width = 64            # stem channels; 64 = torchvision. Smaller only for tiny test models.
  c.model.frozen_stages = 1              # stem + stage 1 frozen, as mmdet's frozen_stages=1
  # The aux heads' extra level: conv 3x3 s2 + GN; Co-DINO's conv has a bias (False: mrqm_jax <= 0.3's layout,
  # which checkpoints stored without this key get, so that they restore).
  c.model.aux_downsample_bias = True
  # Two-stage selection: invalid encoder tokens (padding, proposals outside (0.01, 0.99)) compete in the top-k
  # as in Co-DINO (False); True keeps them out (mrqm_jax <= 0.3; what checkpoints stored without this key get).
  c.model.exclude_invalid_proposals = False
  # Where the aux heads' anchors (ATSS, RPN, IAH) sit: 'mmdet' at (j, i) x the level's nominal stride (mmdet's
  # AnchorGenerator, center_offset 0, as Co-DETR); 'cell_centers' at the cells' centres (mrqm_jax <= 0.3, what
  # checkpoints stored without this key get).
  c.model.anchor_grid = 'mmdet'
  # What boxes inside the model are normalized by (models/detector.py, docs/DESIGN.md "Box frame"): 'image' =
  # each image's own resized size before padding, mapped onto the padded feature maps by per-level valid ratios
  # (Co-DINO's 1x recipe, mmdet img_shape; L1 loss, L1 matching cost, DN noise and encoder proposals in that
  # frame); 'canvas' = the padded static canvas input.image_size (Co-DINO's LSJ variant; mrqm_jax <= 0.3, what
  # checkpoints stored without this key get). The two agree when the image fills the canvas.
  c.model.box_frame = 'image'
  # ImageNet weights of the backbone (mrqm_jax/pretrained.py): 'hf://timm/resnet50.tv_in1k' (torchvision's
  # ResNet-50, as Co-DINO's torchvision://resnet50; fetched once into the Hugging Face cache), a .safetensors /
  # .npz state dict (torchvision or timm names), or 'none'. '' (not given) is an error when training: the frozen
  # stem + stage 1 would stay random; 'none' says it is meant.
  c.model.pretrained = ''
  c.model.neck = 'bifpn'                 # 'bifpn' | 'fpn'
  c.model.bifpn_repeats = 1
  c.model.neck_norm = 'group'            # 'group' (GroupNorm, batch-size independent) | 'none'; see models/bifpn.py
  # What of the static canvas takes part: 'batch' = only the batch's extent, rows / columns up to the largest image
  # of the batch, as mmdet's batch tensor (padded to its largest image) is all Co-DETR has: every GroupNorm's
  # statistics over it, convs and max-pools reading zeros / -inf past it, the encoder's level masks, top-k, anchors
  # and RoIAlign on it; 'canvas' = the whole static canvas, padding beyond the batch's images included
  # (mrqm_jax <= 0.3; what checkpoints stored without this key get). docs/DESIGN.md.
  c.model.norm_region = 'batch'
  c.model.hidden_dim = 256
  c.model.num_levels = 4                 # P2..P5
  # Convolution implementation (models/layers.py). 'lax' = lax.conv (GPU/TPU); 'matmul' = shifted-slice matmuls
  # for every conv; 'auto' = 'lax' off CPU, and on XLA:CPU per layer: matmuls for 1x1 and depthwise kernels
  # (whose lax gradients are slow there), lax for dense kxk (benchmarks/conv_cpu.py).
  c.model.conv_impl = 'auto'
  # Rematerialize in the backward pass (trade compute for activation memory): every backbone block of the
  # trained stages, every BiFPN layer, encoder and decoder layer keeps only its inputs and recomputes the rest.
  # Same results (tests/test_remat.py); README's measured table has the memory. On by default because the
  # recipe's step memory, not its compute, is what keeps it off the paper's 24 GB card; on XLA:CPU it also
  # selects XLA's memory-ordered scheduler (train_lib.memory_compiler_options).
  c.model.remat = True
  # 'bfloat16': activations and matmuls in bf16; params, optimizer state, box math, matching costs, losses and
  # the IAH's IoUs stay float32.
  c.model.dtype = 'float32'

  c.encoder = ml_collections.ConfigDict()
  c.encoder.type = 'sae'                 # 'sae' (Scale-Aware Encoder) | 'deformable' (plain, for ablation)
  c.encoder.num_layers = 6
  c.encoder.num_heads = 8
  c.encoder.num_points = 4
  c.encoder.ffn_dim = 2048
  c.encoder.dropout = 0.0
  # Sine PE of the feature maps (position_encoding.sine_pe_2d): Co-DINO's SinePositionalEncoding(num_feats=128,
  # temperature=20, normalize=True), offset 0 (Deformable DETR: 10000 and -0.5).
  c.encoder.pe_temperature = 20.0
  c.encoder.pe_offset = 0.0
  # Encoder layers process queries in rematerialized chunks of this many (0 = all at once), in the deformable
  # attention and in the FFN: bounds the gathered samples (4.4 GB f32 for the SAE's F2 update of one 800x1344
  # image) and the FFN's [tokens, ffn_dim] activations; the attention was faster on XLA:CPU too (README, measured
  # table; benchmarks/deformable_attention.py --chunk). Only layers with more queries are chunked.
  c.encoder.query_chunk_size = 8192
  # Gather layout of the encoder's deformable attention: 'flat' (4 gathers of D=32 channels per sample) |
  # 'packed' (the 2x2 footprint as one 4*32-channel row: lane-dense on TPU) | 'auto' (packed on TPU, flat
  # elsewhere). Same results; XLA:TPU pads 32-wide minor axes to 128 lanes (docs/DESIGN.md, memory decisions).
  c.encoder.sampling_layout = 'auto'

  c.decoder = ml_collections.ConfigDict()
  c.decoder.num_layers = 6
  c.decoder.num_queries = 900
  c.decoder.num_heads = 8
  c.decoder.num_points = 4
  c.decoder.ffn_dim = 2048
  c.decoder.dropout = 0.0
  c.decoder.look_forward_twice = True

  # Contrastive denoising (DINO / Co-DINO dn_cfg).
  c.dn = ml_collections.ConfigDict()
  c.dn.enabled = True
  c.dn.label_noise = 0.5
  c.dn.box_noise = 1.0
  c.dn.num_queries = 100                 # Co-DINO num_dn_queries: groups = max(1, num_queries // num_gt)
  # 'batch' (Co-DINO): the group width is the gt count of the batch's densest image; the images with fewer pad
  # their groups with background queries. 'image': each image's own count, no padding (v0.1-v0.3).
  c.dn.group_rule = 'batch'
  # Static cap of ground truths per image used for denoising (Co-DINO has none): an image with more denoises a
  # random max_gt of them each step; training counts and reports those images (80 of VisDrone's 6471 train
  # images hold more than 200; 902 denoises all, with 1804 DN queries in every step's decoder).
  c.dn.max_gt = 200

  # ---------------------------------------------------------------- collaborative auxiliary heads
  # Co-DINO trains auxiliary heads on the encoder output ("aux levels": the encoder levels + one stride-2 conv
  # level) whose positives become extra query groups of the shared decoder; training only (inference and the
  # export contain none). 'iah' (IoU-aware head, MRQM) | 'atss' (Co-DINO's ATSS head) | 'rcnn' (Faster R-CNN:
  # RPN + RoI head). MRQM = ('iah', 'rcnn'); Co-DINO = ('atss', 'rcnn'); () = plain DINO.
  c.model.aux_heads = ('iah', 'rcnn')
  # Each aux head's query group: 'negatives' (Co-DETR) pads every image's positives with random negative anchors /
  # RoIs of that image, classified as background, to max(9, most positives of an image in the batch) slots, the
  # group unmasked; 'masked' (mrqm_jax <= 0.3; what checkpoints stored without this key get) keeps the positives
  # only and hides the other slots from attention and loss.
  c.model.aux_query_padding = 'negatives'

  # IoU-Aware Head (paper section 3.2) in the ATSS head's place.
  c.iah = ml_collections.ConfigDict()
  c.iah.dynamic_threshold = True         # False: fixed threshold iah.t_b for every object (Table 3 baseline)
  c.iah.t_b = 0.55
  c.iah.k = 0.15
  c.iah.p = 0.2
  # A_s of eq. 8 in original-image px^2 (w, h of the objects are taken in original px too). -1 = auto: the
  # paper's literal reading, the smallest training instance area (input_pipeline.stats), resolved when training
  # starts; it is so small that T_I stays far above T_b and the IAH keeps about one positive per object, so the
  # recipes set the area bound of the dataset's smallest evaluated size class instead (docs/DESIGN.md,
  # benchmarks/iah_positives.py).
  c.iah.a_s = -1.0
  c.iah.max_pos = 300                    # Co-DETR max_pos_coords: auxiliary queries per image
  # Anchors, chosen by benchmarks/iah_positives.py (docs/DESIGN.md): base 2 x stride per aux level (strides 4..64,
  # canvas px) x 4 scales over 1.5 octaves x h/w ratios 1 and 2 = 8 per location, so every small size is covered
  # by two levels.
  c.iah.anchor_sizes = (8.0, 16.0, 32.0, 64.0, 128.0)
  c.iah.anchor_ratios = (1.0, 2.0)
  c.iah.anchor_scales = (1.0, 1.4142, 2.0, 2.8284)
  c.iah.stacked_convs = 1                # conv tower depth of the dense head (Co-DINO's ATSS head: 1)

  # Co-DINO's ATSS head (co_dino_5scale_r50_1x_coco.py bbox_head / train_cfg[2]).
  c.atss = ml_collections.ConfigDict()
  c.atss.octave_base_scale = 8.0         # one square anchor of 8 x stride per location
  c.atss.topk = 9                        # ATSSAssigner candidates per level
  c.atss.stacked_convs = 1
  c.atss.max_pos = 300
  c.atss.cls_weight = 1.0                # focal; each x loss.aux_dense_weight * decoder layers (Co-DINO: 12)
  c.atss.giou_weight = 2.0               # GIoU weighted by the centerness target (24)
  c.atss.centerness_weight = 1.0         # BCE (12)

  # Co-DINO's Faster R-CNN branch (rpn_head, roi_head, train_cfg[1]).
  c.rcnn = ml_collections.ConfigDict()
  c.rcnn.rpn_octave_base_scale = 4.0     # anchors 4 x 2^(i/3) x stride, i = 0..2, ratios 0.5 / 1 / 2
  c.rcnn.rpn_scales_per_octave = 3
  c.rcnn.rpn_ratios = (0.5, 1.0, 2.0)
  c.rcnn.rpn_pos_iou = 0.7               # MaxIoUAssigner 0.7 / 0.3, min_pos_iou 0.3, low-quality matches
  c.rcnn.rpn_neg_iou = 0.3
  c.rcnn.rpn_min_pos_iou = 0.3
  c.rcnn.rpn_num_samples = 256           # RandomSampler 256 at 0.5 positive
  c.rcnn.rpn_pos_fraction = 0.5
  c.rcnn.nms_pre = 4000                  # rpn_proposal: best anchors per level before NMS
  c.rcnn.nms_iou = 0.7
  c.rcnn.num_proposals = 1000            # rpn_proposal max_per_img (a static count with a validity mask)
  c.rcnn.roi_pos_iou = 0.5               # MaxIoUAssigner 0.5 / 0.5 / 0.5, no low-quality matches
  c.rcnn.roi_num_samples = 512           # RandomSampler 512 at 0.25 positive, gts added as proposals
  c.rcnn.roi_pos_fraction = 0.25
  c.rcnn.num_roi_levels = 5              # SingleRoIExtractor featmap_strides 4..64
  c.rcnn.roi_size = 7
  # 0 = mmcv's adaptive RoIAlign (Co-DINO): ceil(RoI side / 7) samples per bin side, per RoI, on a static grid of
  # at most rcnn.adaptive_max_samples per side (a RoI needing more gets that many, evenly spaced); N >= 1: a
  # fixed N x N per bin (mrqm_jax <= 0.3: 2, torchvision/Detectron2's choice).
  c.rcnn.sampling_ratio = 0
  c.rcnn.adaptive_max_samples = 6
  c.rcnn.finest_scale = 56.0
  c.rcnn.fc_dim = 1024                   # Shared2FCBBoxHead
  c.rcnn.max_pos = 300                   # query group cap (at most roi_num_samples * roi_pos_fraction = 128)
  c.rcnn.rpn_cls_weight = 1.0            # each x loss.aux_dense_weight * decoder layers (Co-DINO: RPN CE 12,
  c.rcnn.rpn_bbox_weight = 1.0           #   L1 12; RoI CE 12, GIoU 120)
  c.rcnn.roi_cls_weight = 1.0
  c.rcnn.roi_giou_weight = 10.0

  # ---------------------------------------------------------------- objective
  c.loss = ml_collections.ConfigDict()
  c.loss.cls_type = 'qfl'                # 'focal' | 'qfl' (quality focal, as Co-DINO)
  c.loss.focal_alpha = 0.25
  c.loss.focal_gamma = 2.0
  c.loss.qfl_beta = 2.0                  # Co-DINO QualityFocalLoss beta
  c.loss.cls_weight = 1.0
  c.loss.bbox_weight = 5.0
  c.loss.giou_weight = 2.0
  c.loss.dn_weight = 1.0
  c.loss.enc_weight = 1.0
  # Co-DETR's lambda_2: every auxiliary head's own losses x (lambda_2 * decoder layers), as Co-DINO's config.
  c.loss.aux_dense_weight = 2.0
  # Co-DETR's lambda_1: decoder losses of every auxiliary query group.
  c.loss.aux_query_weight = 1.0

  c.matcher = ml_collections.ConfigDict()
  c.matcher.backend = 'auto'             # 'auto' (by platform) | 'jax' (on device) | 'scipy' (host callback)
  c.matcher.cost_class = 2.0
  c.matcher.cost_bbox = 5.0
  c.matcher.cost_giou = 2.0

  # ---------------------------------------------------------------- training
  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 12                # 1x schedule
  c.train.num_steps = -1                 # > 0 overrides num_epochs
  c.train.per_device_batch_size = 2     # used only when global_batch_size = -1
  # Images per optimizer step over all devices. -1 = per_device_batch_size x device count: the batch (and so the
  # effective learning rate) then changes with the machine, which the run's log says. The recipes fix it (the
  # paper: 2 on one GPU) so a run on 8 devices trains the recipe, not batch 16 at the same learning rate; a
  # batch the devices cannot split evenly is an error that says what to set (parallel.global_batch_size).
  c.train.global_batch_size = -1
  c.train.grad_accum_steps = 1           # reach a large global batch on few devices
  c.train.learning_rate = 2e-4
  c.train.weight_decay = 1e-4
  c.train.backbone_lr_mult = 0.1
  c.train.grad_clip_norm = 0.1
  c.train.lr_drop_epochs = (11,)
  c.train.lr_drop_factor = 0.1
  c.train.warmup_steps = 0
  c.train.seed = 0
  # Start from the parameters of a checkpoint, workdir or converted Co-DETR checkpoint (`python -m
  # mrqm_jax.convert`), without its step, optimizer state or data position (fine-tuning); '' = init/pretrained.
  c.train.init_from = ''
  c.train.checkpoint_every_steps = 1000
  c.train.keep_checkpoints = 3
  c.train.log_every_steps = 50
  c.train.eval_every_epochs = 1

  # ---------------------------------------------------------------- evaluation / prediction
  c.eval = ml_collections.ConfigDict()
  c.eval.protocol = 'visdrone'           # 'coco' | 'visdrone' | 'soda'
  c.eval.batch_size = 2
  c.eval.max_detections = 500            # detections kept per image (per patch when slicing)
  c.eval.score_threshold = 0.0
  # Co-DINO's test-time soft-NMS (co_dino_5scale_r50_1x_coco.py test_cfg: max_per_img=300,
  # nms=dict(type='soft_nms', iou_threshold=0.8); mmcv soft_nms defaults method='linear', sigma=0.5,
  # min_score=1e-3), class-aware as mmcv's batched_nms, inside the jitted eval/predict function
  # (ops/postprocess.soft_nms): top eval.max_detections (query, class) candidates -> soft-NMS -> the first
  # eval.max_detections. False: plain top eval.max_detections (DINO, no NMS). The metrics' own caps
  # (maxDets) are the protocol's, not eval.max_detections.
  c.eval.soft_nms = False
  c.eval.soft_nms_iou = 0.8
  c.eval.soft_nms_method = 'linear'      # 'linear' | 'gaussian' | 'naive' (mmcv's names)
  c.eval.soft_nms_sigma = 0.5            # gaussian only
  c.eval.soft_nms_min_score = 1e-3
  c.eval.num_images = -1                 # > 0 evaluates only the first N images

  c.predict = ml_collections.ConfigDict()
  c.predict.score_threshold = 0.3        # for drawn PNGs only; txt/json keep every detection
  c.predict.slice_large_images = False

  # ---------------------------------------------------------------- runtime
  # JAX's persistent compilation cache: a rerun skips recompiling the init, train step and eval (README has
  # the startup times). 'auto' = $XDG_CACHE_HOME/mrqm_jax/jax (~/.cache/mrqm_jax/jax); '' = off; or a folder.
  c.compilation_cache_dir = 'auto'

  c.lock()
  return c
