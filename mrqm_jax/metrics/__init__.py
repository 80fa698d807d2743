"""Metrics of record (COCO, VisDrone-DET toolkit, SODA-D) and VisDrone result-file I/O.

  from mrqm_jax.metrics import Detections, evaluate_detections
"""

from mrqm_jax.metrics.coco import evaluate_detections
from mrqm_jax.metrics.coco import PROTOCOLS
from mrqm_jax.metrics.detections import Detections

__all__ = ['Detections', 'PROTOCOLS', 'evaluate_detections']
