"""What the Colab notebooks (colab/*.ipynb) share, so that their cells stay short.

  describe_accelerator()         'TPU (8 x TPU v2)' / 'GPU (1 x Tesla T4)' / 'CPU (1 x cpu)'
  LiveLossPlot                   a `loss_history` list for `train.train_and_evaluate` that redraws its plot
  latest_checkpoint_step(workdir)  newest step in WORKDIR/checkpoints (None if none)
  eval_records(config, workdir)  the eval split's records (synthetic set written first in smoke)
  restore_model(config, workdir) model + restored variables (latest checkpoint of WORKDIR, or `checkpoint`)
  iah_positives(config, ...)     where the IoU-Aware Head's positive anchors fall for one canvas's ground truth
  write_figure2(restored, ...)   per image: detections, encoder-proposal heatmap, IAH-positive heatmap (Fig. 2)
  size_band_ap / plot_size_band_ap   AP per object-size band of an eval run (S/M/L or eS/rS/gS/N)
  format_metrics                 eval metrics as labelled lines (visdrone: paper's COCO-style vs toolkit_*)
  mirror_tree(src, dst)          copies a folder to any tf.io.gfile path (gs://bucket/...)

Nothing here is needed for training; it only wraps the package's public functions for interactive use.
"""

import contextlib
import dataclasses
import json
import os
import time
import warnings
from typing import Any, NamedTuple, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow as tf

from input_pipeline import pipeline
from input_pipeline import readers
from mrqm_jax import checkpointing, datasets, evaluate, model_lib, parallel, predict, visualize
from mrqm_jax.metrics import coco as metrics_lib
from mrqm_jax.models import aux_heads
from mrqm_jax.models import detector
from mrqm_jax.models import iou_aware_head

# Metric keys of each protocol's size bands, in band order (mrqm_jax/metrics/coco.py documents them).
SIZE_BANDS = {
    'coco': (('S', 'AP_S'), ('M', 'AP_M'), ('L', 'AP_L')),
    'visdrone': (('S', 'AP_S'), ('M', 'AP_M'), ('L', 'AP_L')),
    'soda': (('eS', 'AP_eS'), ('rS', 'AP_rS'), ('gS', 'AP_gS'), ('N', 'AP_N')),
}
# Encoder levels P2, P3, ... have strides 4, 8, ...: level l of a canvas side S has ceil(S / 2^(l + 2)) tokens.
FIRST_LEVEL_LOG2_STRIDE = 2


def describe_accelerator() -> str:
  """Names what jax runs on: 'TPU (8 x TPU v2)', 'GPU (1 x NVIDIA A100-SXM4-40GB)' or 'CPU (1 x cpu)'."""
  devices = jax.devices()
  platform = devices[0].platform.lower()
  name = {'tpu': 'TPU', 'gpu': 'GPU', 'cuda': 'GPU', 'rocm': 'GPU', 'cpu': 'CPU'}.get(platform, platform.upper())
  kinds = ', '.join(sorted({d.device_kind for d in devices}))
  return f'{name} ({len(devices)} x {kinds})'


# ------------------------------------------------------------------------------------------ TPU batch plan
# XLA:TPU memory of the recipe's step (800x1344) per chip x dtype x per-chip batch, from
# benchmarks/tpu_memory_table.py (deviceless compiles; README's measured table).
TPU_MEMORY_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'data',
                                'tpu_memory_800x1344.jsonl')
# jax device_kind -> the table's chip name.
_TPU_CHIPS = {'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e', 'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e', 'TPU v4': 'v4',
              'TPU v5p': 'v5p', 'TPU v5': 'v5p'}


class TpuPlan(NamedTuple):
  """How to run the recipe's global batch on the chips found: set these config keys; `reason` says why."""
  per_device_batch: int
  dtype: str
  remat: bool
  grad_accum_steps: int
  reason: str


def tpu_plan(device_kind: str, num_devices: int, global_batch: int, records: Sequence[dict]) -> TpuPlan:
  """Per-chip batch, model.dtype, remat and gradient accumulation for `num_devices` chips of `device_kind` that
  keep the optimizer's batch at `global_batch` images (so its learning rate holds), from measured `records`
  (tpu_memory_table.py's rows; all measured with the recipe's remat on).

  Choice: the largest per-chip batch b dividing global_batch / num_devices whose measured peak fits the chip's
  HBM, float32 (the recipe's numerics) when it fits at that b, else bfloat16; grad_accum_steps = global_batch /
  (b * num_devices). A chip without a fitting measured row gets per-chip batch 1 in bfloat16 (the smallest
  step) and says that it is unmeasured. ValueError when global_batch does not split over the devices."""
  if global_batch % num_devices:
    raise ValueError(f'the global batch {global_batch} does not split over {num_devices} devices: set '
                     f'train.global_batch_size to a multiple of {num_devices} (and scale train.learning_rate)')
  per_device = global_batch // num_devices
  chip = _TPU_CHIPS.get(device_kind)
  rows = [r for r in records if r.get('chip') == chip and r.get('status') == 'ok' and r.get('fits')]
  for batch in sorted((b for b in range(per_device, 0, -1) if per_device % b == 0), reverse=True):
    for dtype in ('float32', 'bfloat16'):
      row = next((r for r in rows if r['batch'] == batch and r['dtype'] == dtype), None)
      if row:
        accum = per_device // batch
        return TpuPlan(batch, dtype, True, accum,
                       f'{device_kind} ({chip}, {row["hbm_gib"]:.0f} GiB HBM): XLA:TPU measured {row["peak_gib"]:.1f} '
                       f'GiB peak for {dtype} at {batch} image(s) per chip'
                       + (f'; {accum} accumulated micro-batches keep the global batch {global_batch}' if accum > 1
                          else f'; global batch {global_batch} in one step'))
  return TpuPlan(1, 'bfloat16', True, per_device,
                 f'{device_kind}: no measured row that fits (benchmarks/tpu_memory_table.py has '
                 f'{sorted({r.get("chip") for r in records})}): 1 image per chip in bfloat16, the smallest step, '
                 f'unmeasured here; {per_device} accumulated micro-batches keep the global batch {global_batch}')


def load_tpu_memory_table(path: str = TPU_MEMORY_TABLE) -> list[dict]:
  """The measured rows (JSON lines) of `path`; none when the file is absent."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------ live loss plot
class LiveLossPlot(list):
  """A list of (step, loss) that redraws a loss curve in the notebook output as training appends to it.

  Pass it as `train.train_and_evaluate(config, workdir, loss_history=plot)`: the loop appends at every logged
  step; the figure is redrawn at most every `min_interval_s` seconds (rendering is not free) and once more by
  `draw()` at the end. The same object can be passed to several calls (e.g. a resumed run): points accumulate.
  """

  def __init__(self, title: str = 'training loss', min_interval_s: float = 5.0):
    super().__init__()
    self.title = title
    self.min_interval_s = min_interval_s
    self._handle = None
    self._last_draw = -float('inf')

  def append(self, item) -> None:
    step, loss = item
    super().append((int(step), float(loss)))
    now = time.monotonic()
    if now - self._last_draw >= self.min_interval_s:
      self._last_draw = now
      self.draw()

  def figure(self):
    """A new matplotlib figure of the curve (the caller closes it)."""
    import matplotlib.pyplot as plt  # optional, plots only: pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if self:
      steps, losses = zip(*self)
      ax.plot(steps, losses, marker='.' if len(self) < 50 else None)
      ax.set_title(f'{self.title}: step {steps[-1]}, loss {losses[-1]:.4f}')
    else:
      ax.set_title(f'{self.title}: waiting for the first logged step')
    ax.set_xlabel('step')
    ax.set_ylabel('loss')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

  def draw(self) -> None:
    """Shows the current curve, replacing the previous drawing of this plot in the cell's output."""
    import matplotlib.pyplot as plt  # optional, plots only: pylint: disable=g-import-not-at-top
    from IPython import display  # optional, notebooks only: pylint: disable=g-import-not-at-top
    fig = self.figure()
    if self._handle is None:
      self._handle = display.display(fig, display_id=True)
    else:
      self._handle.update(fig)
    plt.close(fig)  # otherwise the inline backend shows it once more when the cell ends


# ------------------------------------------------------------------------------------------ restoring a model
@contextlib.contextmanager
def _quiet_checkpoint_reads():
  """Hides orbax's per-call notices on read-only access (read_only=True, sharding read from file), which
  would otherwise repeat several times in a notebook cell without telling the user anything."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='Sharding info not provided', category=UserWarning)
      yield
  finally:
    logging.set_verbosity(verbosity)


@dataclasses.dataclass
class Restored:
  """A model ready for inference. config: locked, with `iah.a_s` resolved to a number."""
  model: Any
  config: ml_collections.ConfigDict
  variables: dict
  mesh: Any
  class_names: tuple[str, ...]


def latest_checkpoint_step(workdir: str) -> int | None:
  """The newest checkpoint step in WORKDIR/checkpoints, or None when there is none (or no folder)."""
  if not (checkpointing.to_path(workdir) / checkpointing.CHECKPOINT_DIR).is_dir():   # gs://, file:// too
    return None
  with _quiet_checkpoint_reads():
    return checkpointing.Checkpointer(workdir, read_only=True).latest_step()


def eval_records(config: ml_collections.ConfigDict, workdir: str) -> list:
  """The eval split's records (with ground truth). With `dataset.root` unset (smoke) the synthetic set is
  written into WORKDIR/data first, exactly as training does."""
  if not config.dataset.root:
    return datasets.prepare_data(ml_collections.ConfigDict(config.to_dict()), workdir).eval_records
  records, report, _ = readers.read_dataset(config.dataset, config.dataset.eval_split)
  print(report.summary())
  return records


def restore_model(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None) -> Restored:
  """Builds the model of `config` and restores its params (latest checkpoint of WORKDIR, or `checkpoint`).

  The one restore path of eval/predict/export (`model_lib.restore_for_inference`): the model keys come from
  the checkpoint's stored config, `iah.a_s` included (what training resolved); when that is still -1, auto (no
  stored config) it is recomputed from the training split (`datasets.resolve_a_s`). A checkpoint of another
  model size raises `checkpointing.CheckpointError` naming the folder.
  """
  mesh = parallel.create_mesh()
  with _quiet_checkpoint_reads():
    model, config, variables = model_lib.restore_for_inference(config, workdir, checkpoint, mesh,
                                                               a_s_from_data=True)
  return Restored(model, config, variables, mesh, predict.class_names_for(config))


# ------------------------------------------------------------------------------------------ IAH positives
def encoder_spatial_shapes(config: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
  """((H_l, W_l), ...) of the encoder levels P2.. for `config.input.image_size` (the backbone's ceil rule)."""
  canvas_h, canvas_w = (int(v) for v in config.input.image_size)
  shapes = []
  for level in range(int(config.model.num_levels)):
    stride = 2 ** (FIRST_LEVEL_LOG2_STRIDE + level)
    shapes.append((-(-canvas_h // stride), -(-canvas_w // stride)))
  return tuple(shapes)


class IAHPositives(NamedTuple):
  """The IoU-Aware Head's assignment for one canvas (A anchors, P selected positives).

  anchors [A, 4] canvas-normalized cxcywh; assigned_gt [A] int (-1 negative); selected [P] int anchor indices of
  the positives that become auxiliary queries Q_a (at most `iah.max_pos`, round-robin over objects).
  """
  anchors: np.ndarray
  assigned_gt: np.ndarray
  selected: np.ndarray


@jax.jit
def _assign(anchors, boxes, box_valid, thresholds, anchor_valid):
  return iou_aware_head.assign_anchors(anchors, boxes, box_valid, thresholds, anchor_valid=anchor_valid)


def iah_positives(config: ml_collections.ConfigDict, boxes: np.ndarray, box_valid: np.ndarray,
                  pad_mask: np.ndarray | None = None, a_s: float | None = None,
                  scale: float | None = None) -> IAHPositives:
  """Runs the IAH's own anchor generation and dynamic-threshold assignment on one canvas's ground truth.

  Args:
    config: uses input.image_size, model.num_levels and iah.* (anchor sizes/scales/ratios, thresholds, max_pos).
    boxes: [M, 4] canvas-normalized cxcywh (a batch row of the input pipeline).  box_valid: [M] bool.
    pad_mask: optional [H, W] bool, True on padding pixels: anchors on padding tokens are never positive
      (as in training).
    a_s: A_s override (needed when config.iah.a_s is -1, auto).
    scale: canvas px per original px of this canvas (the batch's `scale`): eq. 8 works in original pixels.
  """
  iah = config.iah
  canvas_hw = tuple(int(v) for v in config.input.image_size)
  shapes = aux_heads.aux_level_shapes(encoder_spatial_shapes(config))   # the IAH runs on the aux levels
  anchors = iou_aware_head.generate_anchors(shapes, canvas_hw, iah.anchor_sizes, iah.anchor_ratios,
                                            iah.anchor_scales, grid=config.model.anchor_grid,
                                            strides=aux_heads.aux_level_strides(len(shapes) - 1))
  per_location = len(iah.anchor_scales) * len(iah.anchor_ratios)
  if pad_mask is None:
    anchor_valid = np.ones(len(anchors), bool)
  else:
    levels = detector.level_pad_masks(np.asarray(pad_mask, bool)[None], shapes)
    anchor_valid = np.repeat(~np.concatenate([m.reshape(-1) for m in levels]), per_location)
  boxes = np.asarray(boxes, np.float32)
  box_valid = np.asarray(box_valid, bool)
  rule = detector.iou_threshold(config)
  if a_s is not None:
    rule = dataclasses.replace(rule, a_s=float(a_s))
  thresholds = iou_aware_head.gt_thresholds(boxes, canvas_hw, rule, scale=scale)
  assigned_gt, iou = _assign(anchors, boxes, box_valid, thresholds, anchor_valid)
  index, valid = iou_aware_head.select_positives(assigned_gt, iou, int(iah.max_pos))
  return IAHPositives(anchors, np.asarray(assigned_gt), np.asarray(index)[np.asarray(valid)])


def canvas_to_image_xy(points: np.ndarray, canvas_hw: Sequence[int], scale: float,
                       patch_origin: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
  """[N, 2] canvas-normalized (x, y) -> [N, 2] pixels of the original image (undo resize and patch offset)."""
  canvas_h, canvas_w = canvas_hw
  return (np.asarray(points, np.float64) * np.array([canvas_w, canvas_h]) / float(scale)
          + np.asarray(patch_origin, np.float64))


# ------------------------------------------------------------------------------------------ Figure 2
def write_iah_heatmaps(config: ml_collections.ConfigDict, records: list, output: str,
                       selected_only: bool = True) -> dict[str, np.ndarray]:
  """NAME_iah.png: where the IAH positive anchors fall for each record's ground truth (centres, original px).

  Uses the eval pipeline's canvas (same resize, padding and — with slicing — patches as training), so the
  positives are the ones training would assign. selected_only: the <= iah.max_pos anchors that become
  auxiliary queries; False: every positive anchor. Returns {name: [P, 2] centres in original pixels}.
  """
  canvas_hw = tuple(int(v) for v in config.input.image_size)
  by_id = {r.image_id: r for r in records}
  centres: dict[int, list] = {r.image_id: [] for r in records}
  for batch in pipeline.eval_iterator(config, records, global_batch_size=max(1, int(config.eval.batch_size))):
    for i in np.flatnonzero(batch['valid']):
      found = iah_positives(config, batch['boxes'][i], batch['box_valid'][i], batch['pad_mask'][i],
                            scale=float(batch['scale'][i]))
      index = found.selected if selected_only else np.flatnonzero(found.assigned_gt >= 0)
      centres[int(batch['image_id'][i])].append(canvas_to_image_xy(
          found.anchors[index, :2], canvas_hw, batch['scale'][i], batch['patch_origin'][i]))
  out = {}
  os.makedirs(output, exist_ok=True)
  for image_id, parts in centres.items():
    r = by_id[image_id]
    points = np.concatenate(parts) if parts else np.zeros((0, 2))
    with Image.open(r.file_name) as im:
      picture = visualize.heatmap_overlay(im.convert('RGB'), points)
    _outline_boxes(picture, r.boxes).save(os.path.join(output, f'{r.name}_iah.png'))
    out[r.name] = points
  return out


def _outline_boxes(picture: Image.Image, boxes_xyxy: np.ndarray) -> Image.Image:
  """Thin white ground-truth outlines, so positives can be compared with the objects that own them."""
  draw = ImageDraw.Draw(picture)
  for x0, y0, x1, y1 in np.asarray(boxes_xyxy, np.float64).reshape(-1, 4):
    draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 255), width=1)
  return picture


def write_figure2(restored: Restored, records: list, output: str) -> list[dict[str, str]]:
  """For each record: NAME.png (detections), NAME_heatmap.png (selected encoder proposals, score-weighted) and
  NAME_iah.png (IAH positives for its ground truth), plus the txt/json of `--mode=predict`.

  Returns one {'detections', 'proposals', 'iah'} dict of PNG paths per record.
  """
  config = restored.config
  predict_fn = evaluate.make_predict_fn(restored.model, config, restored.mesh)
  detections = evaluate.predict_records(predict_fn, restored.variables, config, records, restored.mesh,
                                        desc='predict')
  predict.write_outputs(output, records, detections, restored.class_names, config.predict.score_threshold)
  predict.write_heatmaps(restored.model, config, restored.variables, records, restored.mesh, output)
  write_iah_heatmaps(config, records, output)
  return [{'detections': os.path.join(output, f'{r.name}.png'),
           'proposals': os.path.join(output, f'{r.name}_heatmap.png'),
           'iah': os.path.join(output, f'{r.name}_iah.png')} for r in records]


def show_figure2(panels: list[dict[str, str]], width: float = 4.0):
  """A matplotlib figure: one row per image, columns detections | encoder proposals | IAH positives."""
  import matplotlib.pyplot as plt  # optional, plots only: pylint: disable=g-import-not-at-top
  titles = {'detections': 'detections', 'proposals': 'selected encoder proposals', 'iah': 'IAH positive anchors'}
  fig, axes = plt.subplots(len(panels), 3, figsize=(3 * width, width * len(panels)), squeeze=False)
  for row, paths in zip(axes, panels):
    for ax, key in zip(row, titles):
      with Image.open(paths[key]) as im:
        ax.imshow(np.asarray(im.convert('RGB')))
      ax.set_title(f'{os.path.basename(paths["detections"])[:-4]}: {titles[key]}', fontsize=9)
      ax.axis('off')
  fig.tight_layout()
  return fig


# ------------------------------------------------------------------------------------------ AP per size band
def format_metrics(metrics: dict[str, float]) -> str:
  """Eval metrics as labelled lines: the headline and, for 'visdrone', the official toolkit's numbers apart.

  'visdrone' headline = the paper's Table 2 columns (COCO-style, Co-DETR's evaluation); toolkit_* = the
  VisDrone-DET toolkit's (VOC all-point AP, maxDets 500), see mrqm_jax/metrics/coco.py.
  """
  prefix = metrics_lib.TOOLKIT_PREFIX
  toolkit = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
  headline = {k: v for k, v in metrics.items() if not k.startswith(prefix)}

  def row(values):
    return ', '.join(f'{k} {v:.2f}' for k, v in values.items())

  if not toolkit:
    return 'metrics: ' + row(headline)
  return ('COCO-style (as the paper reports, Co-DETR evaluation): ' + row(headline) + '\n'
          'VisDrone toolkit (VOC all-point, maxDets 500): ' + row(toolkit))


def size_band_ap(metrics: dict[str, float], protocol: str) -> list[tuple[str, float]]:
  """[(band, AP in percent)] for the protocol's size bands; -1 (pycocotools: no ground truth there) kept."""
  if protocol not in SIZE_BANDS:
    raise ValueError(f'unknown eval protocol {protocol!r}; expected one of {sorted(SIZE_BANDS)}')
  missing = [key for _, key in SIZE_BANDS[protocol] if key not in metrics]
  if missing:
    raise KeyError(f'metrics lack {missing} for protocol {protocol!r}; got keys {sorted(metrics)}')
  return [(band, float(metrics[key])) for band, key in SIZE_BANDS[protocol]]


def plot_size_band_ap(metrics: dict[str, float], protocol: str, ax=None, title: str | None = None):
  """Bar chart of AP per size band; bands without ground truth (-1) are marked 'n/a'. Returns the figure."""
  import matplotlib.pyplot as plt  # optional, plots only: pylint: disable=g-import-not-at-top
  bands = size_band_ap(metrics, protocol)
  if ax is None:
    _, ax = plt.subplots(figsize=(1.2 * len(bands) + 2, 3))
  names = [band for band, _ in bands]
  values = [max(v, 0.0) for _, v in bands]
  bars = ax.bar(names, values, color='tab:blue')
  for bar, (_, v) in zip(bars, bands):
    ax.annotate('n/a' if v < 0 else f'{v:.1f}', (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha='center', va='bottom', fontsize=9)
  ax.set_ylabel('AP (%)')
  ax.set_ylim(0, max(values + [1.0]) * 1.2)
  ax.set_title(title or f'AP per size band ({protocol}); AP {metrics.get("AP", float("nan")):.1f}')
  ax.figure.tight_layout()
  return ax.figure


# ------------------------------------------------------------------------------------------ copying runs
def mirror_tree(src: str, dst: str) -> int:
  """Copies every file under `src` to `dst` (local or any tf.io.gfile URL such as gs://bucket/run); returns
  the number of files copied. Existing files are overwritten, nothing is deleted."""
  count = 0
  for folder, _, files in tf.io.gfile.walk(src):
    target = dst.rstrip('/') + '/' + os.path.relpath(folder, src).replace(os.sep, '/')
    target = target[:-2] if target.endswith('/.') else target
    tf.io.gfile.makedirs(target)
    for name in files:
      tf.io.gfile.copy(os.path.join(folder, name), f'{target}/{name}', overwrite=True)
      count += 1
  return count
