"""Co-DINO R50 1x on VisDrone2019-DET: the paper's baseline, Table 3 row I (no BiFPN / SAE, no IAH).

Sense-X/Co-DETR `co_dino_5scale_r50_1x_coco.py` with VisDrone's classes: ChannelMapper (conv 1x1 + GN per C2..C5,
a fifth level by conv 3x3 stride 2 + GN on C5; strides 4..64), the plain deformable encoder over the 5 levels,
the DINO decoder, and the collaborative ATSS head + Faster R-CNN branch on 6 aux levels (strides 4..128).

The other rows of Table 3, as overrides (`python -m mrqm_jax.main --config=...`):
  row II  (BiFPN + SAE, no IAH):  --config=configs/visdrone.py --config.model.aux_heads="('atss','rcnn')"
  row III (IAH, no BiFPN + SAE):  --config=configs/co_dino.py --config.model.aux_heads="('iah','rcnn')"
                                  --config.iah.anchor_sizes="(8.,16.,32.,64.,128.,256.)"  (one per aux level)
  row IV  (MRQM):                 --config=configs/visdrone.py
"""

from configs import visdrone


def get_config():
  c = visdrone.get_config()
  c.model.neck = 'channel_mapper'
  c.model.num_levels = 5
  c.encoder.type = 'deformable'
  c.model.aux_heads = ('atss', 'rcnn')
  c.iah.anchor_sizes = (8.0, 16.0, 32.0, 64.0, 128.0, 256.0)   # used only when 'iah' is put in aux_heads (row III)
  return c
