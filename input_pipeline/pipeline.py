"""tf.data from `ImageRecord`s to static-shape host batches (the batch contract in DESIGN.md), train and eval.

  it = train_iterator(config, records, global_batch_size=G, start_step=s, process_index=p, process_count=P)
  batch = next(it)   # dict of NumPy arrays, leading axis B = G / P (this host's share of global step s)

Every batch holds `image [B,H,W,3] f32` (normalized), `pad_mask [B,H,W] bool` (True = padding), `boxes [B,M,4]`
canvas-normalized cxcywh, `labels [B,M] i32`, `box_valid [B,M]`, `ignore [B,R,4]` canvas-normalized xyxy,
`ignore_valid [B,R]`, `image_id [B] i32`, `orig_size [B,2] i32` (source image H, W), `scale [B] f32` (canvas px
per source px), `patch_origin [B,2] f32` (x, y; zeros without slicing) and `valid [B] bool` (False: eval padding,
or an example whose image could not be decoded; such an example has no boxes).

Order, sharding and resuming (training)
  The training stream is a sequence of example positions t = 0, 1, 2, ...: position t is example
  perm_e[t mod N] of epoch e = t // N, where perm_e is a permutation of the N examples drawn from (seed, e), and
  its flip coin is drawn from (seed, t). Global step s consumes positions [s*G, (s+1)*G); host p of P takes the
  contiguous block [s*G + p*B, s*G + (p+1)*B) of it, so hosts are disjoint and together cover every global
  batch, and the global batch does not depend on P. Epochs run back to back (no example is dropped; a global
  batch may straddle two epochs). The checkpointed "data position" is the step: `train_iterator(...,
  start_step=s)` rebuilds the stream from position s*G and yields exactly the batches an uninterrupted run would
  have yielded from step s on (a few integer ops to skip; no image is read for the skipped part). Everything
  random is stateless, so tf.data's parallelism does not change a single value. There is no shuffle buffer:
  each epoch is a full permutation.

Evaluation
  No shuffle, no flip. The N examples are padded to a multiple of G with blank examples (valid False,
  image_id -1); global batch k holds examples [k*G, (k+1)*G) in order and host p the block p of it, so every
  host yields exactly ceil(N / G) batches and every image is seen exactly once.

Slicing (`config.dataset.slicing.enabled`): examples are the patches of `slicing.slice_records` (training
patches for training, every window for evaluation); `image_id` stays the source image's, so patch detections
are merged per image (`mrqm_jax.ops.postprocess.merge_patch_detections`).

Bad data
  * More annotations than config.dataset.max_boxes / max_ignore: capped in Python when the dataset is built,
    logged and counted (`PipelineReport.overflow`), or a ValueError with config.dataset.strict_max_boxes.
  * An image that cannot be decoded at iteration time (readers already validated headers and JPEG end markers,
    so this is a file changed or damaged since), or whose decoded size differs from its record: the example is
    replaced by a blank one (zero image, no padding, no boxes, valid False, same image_id), so batch
    composition and the step <-> data mapping stay as they were. Each replacement is logged with the file name
    and counted in `PipelineReport.decode_failures` by the iterator.
"""

import dataclasses
import os
from typing import Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline import records as records_lib
from input_pipeline import slicing
from input_pipeline import transforms

try:  # The pipeline runs on the host CPU; TF must not take accelerator memory from JAX.
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # already initialised, or no GPU support compiled in
  pass

BATCH_KEYS = ('image', 'pad_mask', 'boxes', 'labels', 'box_valid', 'ignore', 'ignore_valid', 'image_id',
              'orig_size', 'scale', 'patch_origin', 'valid')
_EPOCH_SEED_STREAM, _FLIP_SEED_STREAM = 0, 1  # stateless seeds (2 * seed + stream, counter) never collide


@dataclasses.dataclass
class PipelineReport:
  """What the pipeline did to the data; `summary()` is logged when a dataset is built.

  Attributes:
    split: 'train' or 'eval'.
    num_records: source images.
    num_examples: examples per epoch (patches when slicing).
    overflow: examples capped at max_boxes / max_ignore.
    resize: how the examples are resized (`input.resize_rule`), and how many could not take it.
    decode_failures: examples replaced by blanks so far (counted by the iterator as batches are read).
    failed_files: the first few files that failed.
  """
  split: str
  num_records: int
  num_examples: int
  overflow: transforms.OverflowReport
  resize: str = ''
  decode_failures: int = 0
  failed_files: list = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (f'{self.split} pipeline: {self.num_records} images -> {self.num_examples} examples; '
            f'{self.overflow.summary()}; {self.resize + "; " if self.resize else ""}'
            f'{self.decode_failures} undecodable examples replaced by blanks')


@dataclasses.dataclass
class ExampleTable:
  """Columns of the examples the pipeline reads (one row per image, or per patch when slicing).

  file_names [N] str; image_ids [N] int32; origin [N, 2] int32 (x, y) window top-left in the image;
  window [N, 2] int32 (h, w) window size; image_hw [N, 2] int32 source image size; boxes/labels/ignore: the
  capped annotations in window pixels, concatenated, with row splits box_splits/ignore_splits [N + 1];
  scale [N] f32 the resize factor of each window (`transforms.resize_factors`; None = fit the canvas).
  """
  names: list
  file_names: np.ndarray
  image_ids: np.ndarray
  origin: np.ndarray
  window: np.ndarray
  image_hw: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  box_splits: np.ndarray
  ignore: np.ndarray
  ignore_splits: np.ndarray
  scale: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.names)


def examples_from_records(records: Sequence[records_lib.ImageRecord], *, max_boxes: int, max_ignore: int,
                          strict: bool) -> tuple[ExampleTable, transforms.OverflowReport]:
  """Records (or `slicing.PatchRecord`s) -> an ExampleTable, capping annotations (`limit_annotations`).

  Raises:
    ValueError naming the record if its image size is unknown (annotations-only records) or, when `strict`,
    if it has more annotations than the limits.
  """
  overflow = transforms.OverflowReport(max_boxes=max_boxes, max_ignore=max_ignore)
  boxes, labels, ignore, rows = [], [], [], []
  for r in records:
    if r.width <= 0 or r.height <= 0 or not r.file_name:
      raise ValueError(f'{r.name}: no image (size {r.width}x{r.height}, file {r.file_name!r}): the pipeline '
                       'needs records read with their images')
    b, l, g = transforms.limit_annotations(r.name, r.boxes, r.labels, r.ignore, max_boxes=max_boxes,
                                           max_ignore=max_ignore, strict=strict, report=overflow)
    boxes.append(b)
    labels.append(l)
    ignore.append(g)
    if isinstance(r, slicing.PatchRecord):
      rows.append((r.origin_x, r.origin_y, r.height, r.width, r.image_height, r.image_width))
    else:
      rows.append((0, 0, r.height, r.width, r.height, r.width))
  rows = np.asarray(rows, np.int32).reshape(-1, 6)

  def splits(parts):
    return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

  table = ExampleTable(
      names=[r.name for r in records], file_names=np.asarray([r.file_name for r in records], object),
      image_ids=np.asarray([r.image_id for r in records], np.int32), origin=rows[:, 0:2], window=rows[:, 2:4],
      image_hw=rows[:, 4:6], boxes=np.concatenate(boxes + [np.zeros((0, 4), np.float32)]).astype(np.float32),
      labels=np.concatenate(labels + [np.zeros(0, np.int32)]).astype(np.int32), box_splits=splits(boxes),
      ignore=np.concatenate(ignore + [np.zeros((0, 4), np.float32)]).astype(np.float32),
      ignore_splits=splits(ignore))
  return table, overflow


def prepare_examples(config: ml_collections.ConfigDict, records: Sequence[records_lib.ImageRecord], *,
                     train: bool) -> tuple[ExampleTable, PipelineReport]:
  """Slices (if enabled) and tabulates the examples of one split."""
  examples = (slicing.slice_records_for_config(config, records, train=train)
              if config.dataset.slicing.enabled else records)
  table, overflow = examples_from_records(examples, max_boxes=config.dataset.max_boxes,
                                          max_ignore=config.dataset.max_ignore,
                                          strict=config.dataset.strict_max_boxes)
  canvas_hw = tuple(int(v) for v in config.input.image_size)
  table.scale, capped = transforms.resize_factors(table.window, canvas_hw, config.input.resize_rule,
                                                  tuple(config.input.resize_scale))
  resize = resize_summary(config, table, capped)
  report = PipelineReport('train' if train else 'eval', len(records), len(table), overflow, resize)
  logging.info('%s', report.summary())
  if capped.any():
    logging.warning('%s', resize)
  return table, report


def resize_summary(config: ml_collections.ConfigDict, table: ExampleTable, capped: np.ndarray) -> str:
  """One line on the resize rule and the examples it could not apply (those too big for the canvas)."""
  rule = config.input.resize_rule
  if rule != 'mmdet':
    return f'resize: {rule}'
  line = f'resize: mmdet keep-ratio to {tuple(config.input.resize_scale)}'
  if not capped.any():
    return line
  canvas_hw = tuple(int(v) for v in config.input.image_size)
  window = table.window[capped].astype(np.float64)
  wanted = np.minimum(max(config.input.resize_scale) / window.max(1), min(config.input.resize_scale) / window.min(1))
  shrink = table.scale[capped] / wanted
  return (f'{line}: {int(capped.sum())} of {len(table)} examples (e.g. {table.names[int(np.argmax(capped))]}, '
          f'{table.window[capped][0][1]}x{table.window[capped][0][0]}) would not fit the {canvas_hw[1]}x'
          f'{canvas_hw[0]} canvas and are resized to fit it instead, at {shrink.min():.2f}-{shrink.max():.2f} '
          f'of mmdet\'s scale (a portrait image; input.image_size sets the canvas)')


def num_train_examples(config: ml_collections.ConfigDict, records: Sequence[records_lib.ImageRecord]) -> int:
  """Examples per training epoch: images, or training patches when slicing (for steps per epoch)."""
  if not config.dataset.slicing.enabled:
    return len(records)
  return len(slicing.slice_records_for_config(config, records, train=True))


def num_eval_examples(config: ml_collections.ConfigDict, records: Sequence[records_lib.ImageRecord]) -> int:
  """Examples the eval iterator yields as valid: images, or every patch when slicing."""
  if not config.dataset.slicing.enabled:
    return len(records)
  return len(slicing.slice_records_for_config(config, records, train=False))


def _host_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} must be positive and divisible by the '
                     f'{process_count} hosts')
  return global_batch_size // process_count


# Every function handed to tf.data is written with explicit tf.cond / tf.where, so AutoGraph's source conversion
# (seconds of every run's startup) has nothing to convert; a Python `if` on a
# tensor in them is an error at trace time, not a silent change.
_graph_fn = tf.autograph.experimental.do_not_convert


def _parallel_calls(config) -> int:
  n = config.input.num_parallel_calls
  return tf.data.AUTOTUNE if n is None or n < 0 else max(1, int(n))


def _example_dataset_fn(config: ml_collections.ConfigDict, table: ExampleTable, *, train: bool, seed: int):
  """(position, index) -> a 1-element dataset with the example (index -1 or a decode failure: a blank)."""
  canvas_hw = tuple(int(v) for v in config.input.image_size)
  max_boxes, max_ignore = config.dataset.max_boxes, config.dataset.max_ignore
  mean, std = tuple(config.input.mean), tuple(config.input.std)
  flip = train and config.input.random_flip
  file_names = tf.constant(table.file_names.astype(str))
  image_ids = tf.constant(table.image_ids)
  origin, window, image_hw = tf.constant(table.origin), tf.constant(table.window), tf.constant(table.image_hw)
  scales = None if table.scale is None else tf.constant(table.scale, tf.float32)
  boxes = tf.RaggedTensor.from_row_splits(tf.constant(table.boxes), tf.constant(table.box_splits))
  labels = tf.RaggedTensor.from_row_splits(tf.constant(table.labels), tf.constant(table.box_splits))
  ignore = tf.RaggedTensor.from_row_splits(tf.constant(table.ignore), tf.constant(table.ignore_splits))

  def meta(index):
    return {'image_id': image_ids[index], 'orig_size': image_hw[index],
            'patch_origin': tf.cast(origin[index], tf.float32)}

  def load(position, index):
    content_hw = tf.minimum(window[index], image_hw[index] - origin[index][::-1])
    contents = tf.io.read_file(file_names[index])
    image = transforms.decode_content(contents, image_hw[index], origin[index], content_hw)
    flip_seed = tf.stack([tf.constant(2 * seed + _FLIP_SEED_STREAM, tf.int64), position]) if flip else None
    example = transforms.preprocess(image, boxes[index], labels[index], ignore[index], window_hw=window[index],
                                    canvas_hw=canvas_hw, mean=mean, std=std, max_boxes=max_boxes,
                                    max_ignore=max_ignore, flip_seed=flip_seed,
                                    scale=None if scales is None else scales[index])
    return {**example, **meta(index), 'valid': tf.constant(True)}

  def blank(position, index):
    del position
    h, w = canvas_hw
    real = index >= 0
    safe = tf.maximum(index, 0)
    info = meta(safe)
    return {
        'image': tf.zeros([h, w, 3], tf.float32), 'pad_mask': tf.zeros([h, w], tf.bool),
        'boxes': tf.zeros([max_boxes, 4], tf.float32), 'labels': tf.zeros([max_boxes], tf.int32),
        'box_valid': tf.zeros([max_boxes], tf.bool), 'ignore': tf.zeros([max_ignore, 4], tf.float32),
        'ignore_valid': tf.zeros([max_ignore], tf.bool), 'scale': tf.constant(1.0),
        'image_id': tf.where(real, info['image_id'], -1),
        'orig_size': tf.where(real, info['orig_size'], tf.constant([h, w], tf.int32)),
        'patch_origin': tf.where(real, info['patch_origin'], tf.zeros([2], tf.float32)),
        'valid': tf.constant(False)}

  def one_example(position, index):
    single = tf.data.Dataset.from_tensors((position, index))
    # ignore_errors turns a failed decode into "no element"; the blank behind it then takes its place.
    decoded = single.filter(_graph_fn(lambda p, i: i >= 0)).map(_graph_fn(load)).ignore_errors(log_warning=True)
    return decoded.concatenate(single.map(_graph_fn(blank))).take(1)

  return _graph_fn(one_example)


def _finish(config, positions: tf.data.Dataset, table: ExampleTable, *, train: bool, seed: int,
            host_batch_size: int) -> tf.data.Dataset:
  """(position, index) stream -> decoded, batched, prefetched host batches."""
  calls = _parallel_calls(config)
  cycle = (os.cpu_count() or 2) if calls == tf.data.AUTOTUNE else calls
  ds = positions.interleave(_example_dataset_fn(config, table, train=train, seed=seed), cycle_length=cycle,
                            block_length=1, num_parallel_calls=calls, deterministic=True)
  ds = ds.batch(host_batch_size, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds.prefetch(config.input.prefetch if config.input.prefetch >= 0 else tf.data.AUTOTUNE)


def train_positions(num_examples: int, *, seed: int, global_batch_size: int, start_step: int,
                    process_index: int, process_count: int) -> tf.data.Dataset:
  """Infinite (position t, example index) int64 pairs of this host's share, from global step `start_step`."""
  host_batch = _host_batch_size(global_batch_size, process_count)
  if num_examples <= 0:
    raise ValueError('no training examples')
  n = tf.constant(num_examples, tf.int64)
  first = start_step * global_batch_size
  first_epoch = first // num_examples

  def epoch(e):
    keys = tf.random.stateless_uniform([num_examples], seed=tf.stack([2 * seed + _EPOCH_SEED_STREAM, e]),
                                       alg='philox')
    order = tf.argsort(keys, stable=True)
    return tf.data.Dataset.from_tensor_slices((e * n + tf.range(n), tf.cast(order, tf.int64)))

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(_graph_fn(epoch))
  ds = ds.skip(first - first_epoch * num_examples)
  lo, hi = process_index * host_batch, (process_index + 1) * host_batch
  return ds.filter(_graph_fn(lambda t, i: tf.logical_and(t % global_batch_size >= lo, t % global_batch_size < hi)))


def eval_positions(num_examples: int, *, global_batch_size: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
  """(position k, example index or -1 for padding) of this host's share of the padded eval list."""
  host_batch = _host_batch_size(global_batch_size, process_count)
  num_batches = -(-num_examples // global_batch_size)
  k = np.arange(num_batches * global_batch_size, dtype=np.int64)
  mine = (k % global_batch_size) // host_batch == process_index
  index = np.where(k < num_examples, k, -1)
  return tf.data.Dataset.from_tensor_slices((k[mine], index[mine]))


def train_dataset(config: ml_collections.ConfigDict, records: Sequence[records_lib.ImageRecord], *,
                  global_batch_size: int, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  seed: int | None = None) -> tuple[tf.data.Dataset, ExampleTable, PipelineReport]:
  """The infinite training dataset of this host from global step `start_step` (see the module docstring)."""
  seed = config.train.seed if seed is None else int(seed)
  table, report = prepare_examples(config, records, train=True)
  positions = train_positions(len(table), seed=seed, global_batch_size=global_batch_size,
                              start_step=start_step, process_index=process_index, process_count=process_count)
  ds = _finish(config, positions, table, train=True, seed=seed,
               host_batch_size=_host_batch_size(global_batch_size, process_count))
  return ds, table, report


def eval_dataset(config: ml_collections.ConfigDict, records: Sequence[records_lib.ImageRecord], *,
                 global_batch_size: int, process_index: int = 0, process_count: int = 1
                 ) -> tuple[tf.data.Dataset, ExampleTable, PipelineReport]:
  """The finite eval dataset of this host: ceil(N / global_batch_size) batches (see the module docstring)."""
  table, report = prepare_examples(config, records, train=False)
  positions = eval_positions(len(table), global_batch_size=global_batch_size, process_index=process_index,
                             process_count=process_count)
  ds = _finish(config, positions, table, train=False, seed=0,
               host_batch_size=_host_batch_size(global_batch_size, process_count))
  return ds, table, report


class BatchIterator:
  """Iterates NumPy host batches and counts/logs examples replaced by blanks after a decode failure.

  Attributes:
    report: the PipelineReport of the split (decode_failures grows as batches are read).
  """

  def __init__(self, dataset: tf.data.Dataset, table: ExampleTable, report: PipelineReport):
    self._iterator = dataset.as_numpy_iterator()
    self._files = {}
    for image_id, name in zip(table.image_ids.tolist(), table.file_names.tolist()):
      self._files.setdefault(image_id, name)
    self.report = report

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    failed = np.flatnonzero(~batch['valid'] & (batch['image_id'] >= 0))
    for image_id in batch['image_id'][failed].tolist():
      self.report.decode_failures += 1
      name = self._files.get(image_id, f'image_id {image_id}')
      if len(self.report.failed_files) < 20:
        self.report.failed_files.append(name)
      logging.warning('could not decode %s (image_id %d): replaced by a blank example (%d so far)', name,
                      image_id, self.report.decode_failures)
    return batch


def train_iterator(config: ml_collections.ConfigDict, records: Sequence[records_lib.ImageRecord], *,
                   global_batch_size: int, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                   seed: int | None = None) -> BatchIterator:
  """Infinite NumPy host batches of training steps start_step, start_step + 1, ... (see `train_dataset`)."""
  return BatchIterator(*train_dataset(config, records, global_batch_size=global_batch_size,
                                      start_step=start_step, process_index=process_index,
                                      process_count=process_count, seed=seed))


def eval_iterator(config: ml_collections.ConfigDict, records: Sequence[records_lib.ImageRecord], *,
                  global_batch_size: int, process_index: int = 0, process_count: int = 1) -> BatchIterator:
  """NumPy host batches covering every eval example once (see `eval_dataset`)."""
  return BatchIterator(*eval_dataset(config, records, global_batch_size=global_batch_size,
                                     process_index=process_index, process_count=process_count))


def create_datasets(config: ml_collections.ConfigDict, records_train: Sequence[records_lib.ImageRecord],
                    records_eval: Sequence[records_lib.ImageRecord], *, global_batch_size: int,
                    eval_global_batch_size: int | None = None, process_index: int = 0, process_count: int = 1,
                    seed: int | None = None, start_step: int = 0) -> tuple[tf.data.Dataset, tf.data.Dataset]:
  """(train, eval) tf.data datasets of this host; iterate with `.as_numpy_iterator()` or use the iterators.

  eval_global_batch_size defaults to config.eval.batch_size (rounded up to a multiple of process_count).
  """
  if eval_global_batch_size is None:
    eval_global_batch_size = -(-config.eval.batch_size // process_count) * process_count
  train, _, _ = train_dataset(config, records_train, global_batch_size=global_batch_size, start_step=start_step,
                              process_index=process_index, process_count=process_count, seed=seed)
  evaluation, _, _ = eval_dataset(config, records_eval, global_batch_size=eval_global_batch_size,
                                  process_index=process_index, process_count=process_count)
  return train, evaluation
