"""Tiny MRQM on synthetic small objects: trains in minutes on 2 CPU cores (demo, tests, CI).

With dataset.root unset, the synthetic VisDrone-layout set is generated into WORKDIR/data.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.dataset.format = 'visdrone'
  c.dataset.root = ''
  c.dataset.num_classes = 10
  c.dataset.max_boxes = 32
  c.dataset.max_ignore = 8
  c.input.image_size = (128, 128)
  c.input.resize_rule = 'fit_canvas'   # the synthetic images are canvas-sized
  c.model.backbone = 'resnet18'
  c.model.backbone_width = 8
  c.model.frozen_stages = 0
  c.model.pretrained = 'none'   # a tiny width no ImageNet file has; trains from scratch on purpose
  c.model.remat = False          # tiny activations: recomputing them only costs time
  c.model.hidden_dim = 32
  c.encoder.num_layers = 2
  c.encoder.num_heads = 4
  c.encoder.num_points = 2
  c.encoder.ffn_dim = 64
  c.decoder.num_layers = 2
  c.decoder.num_queries = 50
  c.decoder.num_heads = 4
  c.decoder.num_points = 2
  c.decoder.ffn_dim = 64
  c.dn.num_queries = 20
  c.dn.max_gt = 32
  c.iah.max_pos = 32
  c.iah.anchor_sizes = (4.0, 8.0, 16.0, 32.0, 64.0)
  c.rcnn.rpn_num_samples = 64
  c.rcnn.nms_pre = 200
  c.rcnn.num_proposals = 64
  c.rcnn.roi_num_samples = 64
  c.rcnn.fc_dim = 64
  c.rcnn.sampling_ratio = 2    # a fixed 2 x 2 per bin: 16 gather terms instead of the adaptive grid's 144
  c.rcnn.max_pos = 16
  c.atss.max_pos = 32
  c.train.num_steps = 300
  c.train.per_device_batch_size = 2
  c.train.learning_rate = 1e-3
  c.train.backbone_lr_mult = 1.0
  c.train.lr_drop_epochs = ()
  c.train.checkpoint_every_steps = 100
  c.train.log_every_steps = 10
  # The on-device solver, not 'auto' (SciPy on CPU): JAX never writes an executable with a host callback to its
  # persistent compilation cache, so with SciPy every smoke run compiled its train step again (60-85 s). At
  # smoke's 50 queries x 32 gts the device solver's loops are short. (docs/DESIGN.md, matching)
  c.matcher.backend = 'jax'
  c.eval.protocol = 'visdrone'
  c.eval.batch_size = 4
  c.eval.max_detections = 100
  return c
