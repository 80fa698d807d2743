r"""Writes a synthetic small-object dataset in the official VisDrone-DET layout (offline demo, tests, CI).

  python -m input_pipeline.synthetic --out DIR --num-images N [--seed S] [--size WxH] [--num-classes K]
  python -m input_pipeline.synthetic --layout soda_d --split val --out DIR --num-images N ...

DIR/images/NAME.jpg and DIR/annotations/NAME.txt with CRLF lines `x,y,w,h,score,category,truncation,occlusion`,
exactly like the released VisDrone files, so the real reader is exercised end to end. Objects are 4..48 px
(log-uniform, so most are small) and each class has its own shape and saturated colour (class 1 red disks,
2 green squares, 3 blue triangles, 4 yellow crosses, ...), which a tiny model learns in minutes. Backgrounds are
cluttered on purpose (gradient, noise, desaturated lines and blobs), and some images carry category-0 ignored
regions (score 0) covering greyed-out shapes. Image i depends only on (seed, i): the same seed gives the same
bytes, and a larger N extends a smaller set. `--layout soda_d` writes the same images in the SODA-D layout
(Images/ + Annotations/<split>.json) instead.
"""

import json
import math
import os
import sys
from typing import Callable, Sequence

from absl import logging
import numpy as np

from input_pipeline import records as records_lib

MIN_SIDE, MAX_SIDE = 4, 48
MAX_OBJECTS = 12
IGNORE_REGION_PROB = 0.35
SUMMARY_FILE = 'synthetic.json'

# (shape, RGB colour) per VisDrone category 1..10; shapes and hues differ so that either alone tells classes apart.
CLASS_STYLES = (
    ('disk', (230, 40, 40)),
    ('square', (40, 200, 60)),
    ('triangle', (50, 90, 245)),
    ('cross', (245, 220, 30)),
    ('ring', (235, 50, 235)),
    ('diamond', (30, 225, 225)),
    ('x', (250, 140, 20)),
    ('frame', (250, 250, 250)),
    ('triangle_down', (140, 40, 230)),
    ('bar', (20, 20, 20)),
)


def _draw_shape(draw, shape: str, box: Sequence[int], color) -> None:
  """Draws `shape` filling the inclusive pixel box (x0, y0, x1, y1), touching all four sides."""
  x0, y0, x1, y1 = box
  w, h = x1 - x0 + 1, y1 - y0 + 1
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  thick_x, thick_y = max(1, round(w / 3)), max(1, round(h / 3))
  if shape == 'disk':
    draw.ellipse(box, fill=color)
  elif shape == 'square':
    draw.rectangle(box, fill=color)
  elif shape == 'triangle':
    draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=color)
  elif shape == 'triangle_down':
    draw.polygon([(x0, y0), (x1, y0), (cx, y1)], fill=color)
  elif shape == 'cross':
    draw.rectangle((x0, round(cy - thick_y / 2), x1, round(cy - thick_y / 2) + thick_y - 1), fill=color)
    draw.rectangle((round(cx - thick_x / 2), y0, round(cx - thick_x / 2) + thick_x - 1, y1), fill=color)
  elif shape == 'ring':
    draw.ellipse(box, outline=color, width=max(1, round(min(w, h) / 5)))
  elif shape == 'diamond':
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
  elif shape == 'x':
    # Thick diagonals as bundles of 1 px lines shifted inwards: PIL's thick lines overshoot the box corners.
    for k in range(max(1, round(min(w, h) / 5))):
      draw.line([(x0, y0 + k), (x1 - k, y1)], fill=color)
      draw.line([(x0 + k, y0), (x1, y1 - k)], fill=color)
      draw.line([(x0, y1 - k), (x1 - k, y0)], fill=color)
      draw.line([(x0 + k, y1), (x1, y0 + k)], fill=color)
  elif shape == 'frame':
    draw.rectangle(box, outline=color, width=max(1, round(min(w, h) / 5)))
  elif shape == 'bar':
    draw.rectangle(box, fill=color)
    draw.rectangle((x0, round(cy), x1, round(cy)), fill=(255, 255, 255))
  else:
    raise ValueError(f'unknown shape {shape!r}')


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """[H, W, 3] uint8: a gradient between two muted colours plus Gaussian noise."""
  angle = rng.uniform(0, 2 * math.pi)
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  t = (xs * math.cos(angle) + ys * math.sin(angle))
  t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
  start, end = rng.uniform(50, 170, size=3), rng.uniform(50, 170, size=3)
  grey = rng.uniform(0.5, 0.85)  # pull towards grey so clutter stays less saturated than objects
  start = grey * start.mean() + (1 - grey) * start
  end = grey * end.mean() + (1 - grey) * end
  image = start + t[..., None] * (end - start)
  image += rng.normal(0, rng.uniform(4, 12), size=image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
  base = rng.uniform(40, 200)
  return tuple(int(np.clip(base + rng.normal(0, 12), 0, 255)) for _ in range(3))


def _overlaps(box, boxes, gap: int = 1) -> bool:
  x0, y0, x1, y1 = box
  return any(x0 <= bx1 + gap and bx0 <= x1 + gap and y0 <= by1 + gap and by0 <= y1 + gap
             for bx0, by0, bx1, by1 in boxes)


def _place(rng, width, height, w, h, taken, tries=30):
  """An inclusive pixel box of w x h inside the image not touching `taken`; None if none found."""
  if w > width or h > height:
    return None
  for _ in range(tries):
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    box = (x0, y0, x0 + w - 1, y0 + h - 1)
    if not _overlaps(box, taken):
      return box
  return None


def render_image(rng: np.random.Generator, width: int, height: int, num_classes: int):
  """One image and its annotation rows.

  Returns:
    (PIL RGB image, rows as (x, y, w, h, score, category) tuples of ints).
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(_background(rng, width, height))
  draw = ImageDraw.Draw(image)
  # Clutter: desaturated lines and blobs, drawn first so objects sit on top.
  for _ in range(int(rng.integers(3, 12))):
    points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
    draw.line(points, fill=_muted(rng), width=int(rng.integers(1, 3)))
  for _ in range(int(rng.integers(0, 5))):
    bw, bh = int(rng.integers(4, 30)), int(rng.integers(4, 30))
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    draw.ellipse((x0, y0, x0 + bw, y0 + bh), fill=_muted(rng))

  rows, taken = [], []
  if rng.uniform() < IGNORE_REGION_PROB:
    w, h = int(rng.integers(16, 49)), int(rng.integers(16, 49))
    box = _place(rng, width, height, w, h, taken)
    if box is not None:
      taken.append(box)
      draw.rectangle(box, fill=_muted(rng))
      shape, _ = CLASS_STYLES[int(rng.integers(0, num_classes))]
      inner = (box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2)
      _draw_shape(draw, shape, inner, _muted(rng))  # greyed object: ambiguous, hence ignored
      rows.append((box[0], box[1], w, h, 0, 0))
  for _ in range(int(rng.integers(3, MAX_OBJECTS + 1))):
    category = int(rng.integers(1, num_classes + 1))
    side = math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
    aspect = math.sqrt(rng.uniform(0.75, 1.33))
    w = int(np.clip(round(side * aspect), MIN_SIDE, MAX_SIDE))
    h = int(np.clip(round(side / aspect), MIN_SIDE, MAX_SIDE))
    box = _place(rng, width, height, w, h, taken)
    if box is None:
      continue
    taken.append(box)
    shape, color = CLASS_STYLES[category - 1]
    jitter = rng.integers(-20, 21, size=3)
    _draw_shape(draw, shape, box, tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(color, jitter)))
    rows.append((box[0], box[1], w, h, 1, category))
  return image, rows


def _layout_paths(out_dir: str, layout: str, split: str) -> dict:
  """Where a layout puts images, annotations and the summary, and how images are named."""
  if layout == 'visdrone':
    return {'image_dir': os.path.join(out_dir, 'images'), 'annotation_dir': os.path.join(out_dir, 'annotations'),
            'json': None, 'summary': os.path.join(out_dir, SUMMARY_FILE), 'prefix': 'synthetic'}
  if layout == 'soda_d':
    return {'image_dir': os.path.join(out_dir, 'Images'), 'annotation_dir': os.path.join(out_dir, 'Annotations'),
            'json': os.path.join(out_dir, 'Annotations', f'{split}.json'),
            'summary': os.path.join(out_dir, f'synthetic_{split}.json'), 'prefix': split}
  raise ValueError(f"layout={layout!r} is not 'visdrone' or 'soda_d'")


def _existing_summary(paths: dict, params: dict) -> dict | None:
  """The saved summary if OUT_DIR already holds exactly this dataset (same params, every file present)."""
  if not os.path.isfile(paths['summary']):
    return None
  with open(paths['summary']) as f:
    summary = json.load(f)
  if summary.get('params') != params:
    return None
  names = summary.get('names', [])
  images = all(os.path.isfile(os.path.join(paths['image_dir'], f'{n}.jpg')) for n in names)
  if paths['json'] is None:
    annotations = all(os.path.isfile(os.path.join(paths['annotation_dir'], f'{n}.txt')) for n in names)
  else:
    annotations = os.path.isfile(paths['json'])
  return summary if images and annotations and len(names) == params['num_images'] else None


def _check_free(paths: dict, names: list[str]) -> None:
  """Refuses to mix with another dataset: VisDrone folders must be empty; a SODA-D split must be new."""
  if paths['json'] is None:
    for folder in (paths['image_dir'], paths['annotation_dir']):
      if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f'{folder} is not empty (another dataset?): choose another output folder or '
                              'delete it')
    return
  if os.path.exists(paths['json']):
    raise FileExistsError(f'{paths["json"]} exists (another dataset?): choose another output folder or delete it')
  clash = next((n for n in names if os.path.exists(os.path.join(paths['image_dir'], f'{n}.jpg'))), None)
  if clash is not None:
    raise FileExistsError(f'{os.path.join(paths["image_dir"], clash)}.jpg exists: choose another output folder')


def generate(out_dir: str, num_images: int, seed: int = 0, size: tuple[int, int] = (160, 128),
             num_classes: int = 4, progress: Callable[[int, int], None] | None = None,
             layout: str = 'visdrone', split: str = 'train') -> dict:
  """Writes the dataset and returns its summary (also saved next to it as json).

  Args:
    out_dir: created if needed. If it already holds exactly this dataset (same parameters, every file present),
      nothing is rewritten and the saved summary is returned; any other content is refused (FileExistsError).
    num_images: images to write.
    seed: everything is a function of (seed, image index).
    size: (width, height) in pixels.
    num_classes: classes used: categories 1..num_classes (<= 10 for VisDrone, <= 9 for SODA-D).
    progress: called as progress(done, total) about ten times; default logs with absl.
    layout: 'visdrone': OUT/images/*.jpg + OUT/annotations/*.txt (CRLF rows, category-0 score-0 ignored
      regions; `split` unused). 'soda_d': OUT/Images/<split>_*.jpg + OUT/Annotations/<split>.json
      (COCO-style; ignored regions are category 10 with ignore=1), so several splits share one folder.
    split: SODA-D split name.

  Returns:
    dict: out_dir, params, names, boxes (targets), ignored (ignored-region rows), per_class {name: count}.
  """
  width, height = int(size[0]), int(size[1])
  class_names = records_lib.VISDRONE_CLASSES if layout == 'visdrone' else records_lib.SODA_D_CLASSES
  paths = _layout_paths(out_dir, layout, split)
  if not 1 <= num_classes <= len(class_names):
    raise ValueError(f'num_classes={num_classes} must be in 1..{len(class_names)} for layout {layout}')
  if num_images < 0 or width < 2 * MAX_SIDE or height < 2 * MAX_SIDE:
    raise ValueError(f'need num_images >= 0 and an image of at least {2 * MAX_SIDE}x{2 * MAX_SIDE} px, '
                     f'got {num_images} images of {width}x{height}')
  params = {'num_images': int(num_images), 'seed': int(seed), 'size': [width, height],
            'num_classes': int(num_classes), 'layout': layout}
  if layout == 'soda_d':
    params['split'] = split
  existing = _existing_summary(paths, params)
  if existing is not None:
    logging.info('synthetic dataset already complete in %s; not rewritten', out_dir)
    return existing
  names = [f'{paths["prefix"]}_{seed:04d}_{index:07d}' for index in range(num_images)]
  _check_free(paths, names)
  os.makedirs(paths['image_dir'], exist_ok=True)
  os.makedirs(paths['annotation_dir'], exist_ok=True)
  if progress is None:
    progress = lambda done, total: logging.info('synthetic: %d/%d images', done, total)
  report_every = max(1, num_images // 10)

  per_class, ignored = [0] * num_classes, 0
  coco = {'images': [], 'annotations': [],
          'categories': [{'id': k + 1, 'name': n} for k, n in enumerate(class_names)] + [{'id': 10, 'name': 'ignore'}]}
  for index, name in enumerate(names):
    rng = np.random.default_rng([seed, index])
    image, rows = render_image(rng, width, height, num_classes)
    # 4:4:4 chroma: default 4:2:0 subsampling would smear the colour of 4 px objects.
    image.save(os.path.join(paths['image_dir'], f'{name}.jpg'), quality=95, subsampling=0)
    if layout == 'visdrone':
      with open(os.path.join(paths['annotation_dir'], f'{name}.txt'), 'w', newline='') as f:
        f.write(''.join(f'{x},{y},{w},{h},{score},{category},0,0\r\n' for x, y, w, h, score, category in rows))
    else:
      coco['images'].append({'id': index + 1, 'file_name': f'{name}.jpg', 'width': width, 'height': height})
      for x, y, w, h, score, category in rows:
        coco['annotations'].append({
            'id': len(coco['annotations']) + 1, 'image_id': index + 1, 'bbox': [x, y, w, h], 'area': w * h,
            'category_id': category if score else 10, 'iscrowd': 0, 'ignore': 0 if score else 1})
    for _, _, _, _, score, category in rows:
      if score:
        per_class[category - 1] += 1
      else:
        ignored += 1
    if (index + 1) % report_every == 0 or index + 1 == num_images:
      progress(index + 1, num_images)
  if paths['json'] is not None:
    with open(paths['json'], 'w') as f:
      json.dump(coco, f)

  summary = {'out_dir': os.path.abspath(out_dir), 'params': params, 'boxes': sum(per_class), 'ignored': ignored,
             'per_class': dict(zip(class_names, per_class)), 'names': names}
  with open(paths['summary'], 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def _parse_size(text: str) -> tuple[int, int]:
  try:
    width, height = (int(v) for v in text.lower().split('x'))
  except ValueError:
    raise ValueError(f'--size must look like 160x128 (WIDTHxHEIGHT), got {text!r}') from None
  return width, height


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m input_pipeline.synthetic', description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--num-images', type=int, required=True)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--size', default='160x128', help='WIDTHxHEIGHT, default 160x128')
  parser.add_argument('--num-classes', type=int, default=4, help='categories 1..K used (default 4)')
  parser.add_argument('--layout', default='visdrone', choices=('visdrone', 'soda_d'))
  parser.add_argument('--split', default='train', help='soda_d layout: split name of the json')
  args = parser.parse_args(argv)
  try:
    size = _parse_size(args.size)
    summary = generate(args.out, args.num_images, args.seed, size, args.num_classes,
                       progress=lambda done, total: print(f'{done}/{total} images', flush=True),
                       layout=args.layout, split=args.split)
  except (ValueError, FileExistsError) as e:
    print(f'synthetic: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps({k: v for k, v in summary.items() if k != 'names'}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
