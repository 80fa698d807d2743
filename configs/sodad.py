"""MRQM on SODA-D: the paper's recipe on 800x800 patches (the benchmark's sliced protocol)."""

from configs import base


def get_config():
  c = base.get_config()
  c.dataset.format = 'soda_d'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'val'
  c.dataset.num_classes = 9
  c.dataset.max_boxes = 1000
  c.dataset.slicing.enabled = True
  c.input.image_size = (800, 800)
  c.eval.protocol = 'soda'
  c.eval.max_detections = 100
  # Eq. 8's A_s: the area bound of SODA-D's smallest evaluated size class (eS: <= 12^2 px^2), the same reading as
  # configs/visdrone.py; not measured on SODA-D (no sample of it here).
  c.iah.a_s = '144'
  return c
