"""Co-DINO R50 5-scale 1x on COCO 2017 (80 classes): the official Co-DINO R50 COCO checkpoint evaluates here.

mmdetection 3's `co_dino_5scale_r50_8xb2_1x_coco.py` (Sense-X: `co_dino_5scale_r50_1x_coco.py`): the Co-DINO
baseline of configs/co_dino.py with COCO's 80 classes (category ids in sorted order -> labels 0..79, as mmdet's
cat2label), its test path (keep-ratio resize to (1333, 800), soft-NMS IoU 0.8, 300 detections per image) and its
batch (8 GPUs x 2 = 16). COCO layout: DIR/annotations/instances_{train2017,val2017}.json, DIR/{train2017,val2017}/.

  python -m mrqm_jax.convert --from=codetr --checkpoint=co_dino_5scale_r50_1x_coco.pth \
      --config=configs/co_dino_coco.py --out=converted/
  python -m mrqm_jax.main --config=configs/co_dino_coco.py --mode=eval --checkpoint=converted/ \
      --workdir=runs/co_dino_coco --config.dataset.root=/data/coco

Portrait images (480 x 640 and the like) do not fit the 800 x 1344 canvas at mmdet's factor: they are scaled to
fit and counted (docs/DESIGN.md, resize), so AP on COCO can differ slightly from mmdet's; a square canvas,
`--config.input.image_size=1344,1344`, gives every image mmdet's scale at 1.7x the encoder tokens.
"""

from configs import co_dino


def get_config():
  c = co_dino.get_config()
  c.dataset.format = 'coco'
  c.dataset.train_split = 'train2017'
  c.dataset.eval_split = 'val2017'
  c.dataset.num_classes = 80
  c.dataset.max_boxes = 100          # more in one image is logged and counted (dataset.strict_max_boxes)
  c.eval.protocol = 'coco'
  c.eval.soft_nms = True
  c.eval.max_detections = 300
  c.train.global_batch_size = 16     # 8 GPUs x 2 images
  return c
