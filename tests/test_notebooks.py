"""colab/*.ipynb: committed without outputs, and both run top to bottom in SMOKE mode (nbclient, python3 kernel);
plus the notebook helpers (mrqm_jax/notebook_utils.py) against independent references.

The notebooks run in kernels of this interpreter (jupyter_client starts the 'python3' kernelspec with
sys.executable) with the test compilation cache, on the smoke config's shapes (batch 2, 128x128) that
tests/test_train_e2e.py also compiles.
"""

import json
import pathlib
import time

import jax
import numpy as np
import pytest

from configs import smoke
from mrqm_jax import checkpointing, notebook_utils
from mrqm_jax.models import detector
from tests.conftest import REPO
from tests.test_checkpointing import _config, _state

NOTEBOOKS = ('train_tpu.ipynb', 'inference_demo.ipynb')
CELL_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------ committed files
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_without_outputs(name):
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(REPO / 'colab' / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code, f'{name} has no code cells'
  for i, cell in enumerate(code):
    assert cell.outputs == [], f'{name}: code cell {i} has stored outputs'
    assert cell.execution_count is None, f'{name}: code cell {i} has execution_count {cell.execution_count}'
  assert nb.metadata['kernelspec']['name'] == 'python3'
  sources = '\n'.join(c.source for c in code)
  assert 'SMOKE = True' in sources and 'MRQM_NOTEBOOK_SMOKE' in sources


# ------------------------------------------------------------------------------------------ running them
def _run_notebook(name: str, workdir: pathlib.Path, monkeypatch) -> tuple[list[str], int, float]:
  """Executes colab/NAME top to bottom in SMOKE mode; returns (text of every output, PNG outputs, seconds)."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  for key, value in {'MRQM_NOTEBOOK_SMOKE': '1', 'MRQM_NOTEBOOK_WORKDIR': str(workdir), 'JAX_PLATFORMS': 'cpu',
                     'TF_CPP_MIN_LOG_LEVEL': '2', 'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
                     'JAX_COMPILATION_CACHE_DIR': str(REPO / '.pytest_cache' / 'jax_cache'),
                     'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '1'}.items():
    monkeypatch.setenv(key, value)  # the kernel process inherits this environment
  nb = nbformat.read(REPO / 'colab' / name, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=CELL_TIMEOUT_S, allow_errors=False,
                                   resources={'metadata': {'path': str(REPO / 'colab')}})
  start = time.time()
  client.execute()  # raises CellExecutionError naming the cell on any error
  seconds = time.time() - start
  texts, images = [], 0
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      assert out.output_type != 'error', f'{name}: {out.get("ename")}: {out.get("evalue")}'
      texts.append(out.get('text', '') + out.get('data', {}).get('text/plain', ''))
      images += 'image/png' in out.get('data', {})
  print(f'{name}: {seconds:.1f} s in SMOKE mode')
  return texts, images, seconds


@pytest.mark.slow
def test_notebooks_run_in_smoke_mode(tmp_path, monkeypatch):
  """Inference standalone on an empty workdir (trains a tiny model, evaluates it, draws Figure 2), then the
  training notebook on the same workdir (resumes, plots the loss live, evaluates, lists checkpoints)."""
  workdir = tmp_path / 'run'
  texts, images, _ = _run_notebook('inference_demo.ipynb', workdir, monkeypatch)
  text = '\n'.join(texts)
  assert 'already installed' in text and 'on CPU (' in text
  assert 'training a tiny model for 10 steps' in text and 'restored' in text
  assert 'eval metrics:' in text and "'AP_S'" in text
  assert images >= 3, 'expected the drawn PNG, the Figure 2 panels and the AP-per-size chart'
  out = workdir / 'figure2'
  for suffix in ('.png', '_heatmap.png', '_iah.png', '.txt'):
    assert len(list(out.glob(f'*{suffix}'))) >= 3, suffix
  assert json.loads((out / 'detections.json').read_text()) is not None

  texts, images, _ = _run_notebook('train_tpu.ipynb', workdir, monkeypatch)
  text = '\n'.join(texts)
  assert 'resumed from' in text and '(step 10)' in text
  assert 'final eval:' in text and 'eval metrics:' in text and "'AP'" in text
  assert images >= 2, 'expected the loss plot and the AP-per-size chart'
  metrics = json.loads((workdir / 'eval_metrics.json').read_text())
  assert {'AP', 'AP_S', 'AP_M', 'AP_L'} <= set(metrics)
  assert 'checkpoints in' in text and (workdir / 'checkpoints' / '20').is_dir()


# ------------------------------------------------------------------------------------------ helpers
def _smoke_config():
  config = smoke.get_config()
  with config.unlocked():
    config.iah.a_s = 4.0
  return config


@pytest.mark.parametrize('canvas', [(128, 128), (96, 160), (100, 150)])
def test_encoder_spatial_shapes_match_the_backbone(canvas):
  config = _smoke_config()
  with config.unlocked():
    config.input.image_size = canvas
  net = detector.build_backbone(config)
  image = jax.ShapeDtypeStruct((1, *canvas, 3), np.float32)
  feats = jax.eval_shape(lambda x: net.init_with_output(jax.random.PRNGKey(0), x)[0], image)
  assert notebook_utils.encoder_spatial_shapes(config) == tuple(f.shape[1:3] for f in feats)


def _reference_positives(anchors, boxes, thresholds):
  """NumPy: anchor a is positive iff IoU(a, g) > T(g) for some g, or a is some g's best anchor."""
  def xyxy(b):
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)
  a, g = xyxy(anchors.astype(np.float64)), xyxy(boxes.astype(np.float64))
  lo, hi = np.maximum(a[:, None, :2], g[None, :, :2]), np.minimum(a[:, None, 2:], g[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  iou = inter / (area(a)[:, None] + area(g)[None, :] - inter)
  positive = (iou > thresholds[None, :]).any(axis=1)
  positive[iou.argmax(axis=0)] = True
  return positive


def test_iah_positives_against_numpy_reference():
  config = _smoke_config()
  h, w = config.input.image_size
  # Pixel boxes (cx, cy, w, h) from 4 px to 40 px, one valid slot left empty, one invalid row of garbage.
  px = np.array([[20, 30, 4, 5], [64, 64, 12, 9], [100, 40, 40, 28], [30, 100, 7, 16], [0, 0, 0, 0]], np.float64)
  boxes = np.zeros((config.dataset.max_boxes, 4), np.float32)
  boxes[:5] = px / np.array([w, h, w, h])
  valid = np.zeros(config.dataset.max_boxes, bool)
  valid[:4] = True
  found = notebook_utils.iah_positives(config, boxes, valid)
  side = np.sqrt(px[:4, 2] * px[:4, 3])
  iah = config.iah
  thresholds = np.maximum(iah.t_b, iah.t_b + iah.k * (side / 4.0) ** iah.p)   # eq. (8), A_s = 4
  want = _reference_positives(found.anchors, boxes[:4], thresholds)
  np.testing.assert_array_equal(found.assigned_gt >= 0, want)
  # Every object gets a selected positive before any gets two (4 objects <= max_pos), all truly positive.
  assert set(found.assigned_gt[found.selected][:4]) == {0, 1, 2, 3}
  assert np.all(found.assigned_gt[found.selected] >= 0)
  assert len(found.selected) == min(config.iah.max_pos, int(want.sum()))
  # A positive anchor's centre lies within the object (anchors of the right size sit on it).
  centres = notebook_utils.canvas_to_image_xy(found.anchors[found.selected, :2], (h, w), 1.0)
  owner = px[found.assigned_gt[found.selected]]
  assert np.all(np.abs(centres - owner[:, :2]) <= owner[:, 2:] / 2 + 4)


def test_iah_positives_never_on_padding():
  config = _smoke_config()
  h, w = config.input.image_size
  pad = np.zeros((h, w), bool)
  pad[:, 64:] = True  # right half is padding: an object straddling it may only own left-half anchors
  boxes = np.zeros((config.dataset.max_boxes, 4), np.float32)
  boxes[0] = np.array([70, 50, 20, 20]) / np.array([w, h, w, h])
  valid = np.zeros(config.dataset.max_boxes, bool)
  valid[0] = True
  found = notebook_utils.iah_positives(config, boxes, valid, pad_mask=pad)
  positives = np.flatnonzero(found.assigned_gt >= 0)
  assert len(positives) and np.all(found.anchors[positives, 0] * w < 64)
  unpadded = notebook_utils.iah_positives(config, boxes, valid)
  assert np.any(unpadded.anchors[unpadded.assigned_gt >= 0, 0] * w > 64)


def test_canvas_to_image_xy_undoes_resize_and_patch_offset():
  points = np.array([[0.5, 0.25], [1.0, 1.0]])
  got = notebook_utils.canvas_to_image_xy(points, (100, 200), scale=0.5, patch_origin=(10, 20))
  np.testing.assert_allclose(got, [[0.5 * 200 / 0.5 + 10, 0.25 * 100 / 0.5 + 20], [410, 220]])


def test_format_metrics_labels_the_two_visdrone_sets():
  text = notebook_utils.format_metrics({'AP': 31.9, 'AP50': 51.4, 'toolkit_AP': 27.25, 'toolkit_AR500': 40.0})
  headline, toolkit = text.splitlines()
  assert headline.startswith('COCO-style') and 'AP 31.90, AP50 51.40' in headline and 'toolkit' not in headline
  assert toolkit.startswith('VisDrone toolkit') and toolkit.endswith('AP 27.25, AR500 40.00')
  assert notebook_utils.format_metrics({'AP': 5.0, 'AP_eS': 1.0}) == 'metrics: AP 5.00, AP_eS 1.00'


def test_size_band_ap_and_chart():
  visdrone = {'AP': 20.0, 'AP_S': 10.0, 'AP_M': 30.0, 'AP_L': -1.0}
  assert notebook_utils.size_band_ap(visdrone, 'visdrone') == [('S', 10.0), ('M', 30.0), ('L', -1.0)]
  soda = {'AP': 5.0, 'AP_eS': 1.0, 'AP_rS': 2.0, 'AP_gS': 3.0, 'AP_N': 4.0}
  assert [b for b, _ in notebook_utils.size_band_ap(soda, 'soda')] == ['eS', 'rS', 'gS', 'N']
  with pytest.raises(KeyError, match='AP_eS'):
    notebook_utils.size_band_ap(visdrone, 'soda')
  with pytest.raises(ValueError, match='protocol'):
    notebook_utils.size_band_ap(visdrone, 'voc')
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  fig = notebook_utils.plot_size_band_ap(visdrone, 'visdrone')
  ax = fig.axes[0]
  assert [p.get_height() for p in ax.patches] == [10.0, 30.0, 0.0]
  assert [t.get_text() for t in ax.texts] == ['10.0', '30.0', 'n/a']


def test_live_loss_plot_is_a_list_that_draws(monkeypatch):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  drawn = []
  plot = notebook_utils.LiveLossPlot(min_interval_s=3600)
  monkeypatch.setattr(plot, 'draw', lambda: drawn.append(len(plot)))
  plot.append((1, np.float32(3.5)))
  plot.append((2, 2.5))   # the first append draws; the second comes within min_interval_s
  assert plot == [(1, 3.5), (2, 2.5)] and drawn == [1]
  fig = notebook_utils.LiveLossPlot.figure(plot)
  np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [1, 2])
  assert 'step 2' in fig.axes[0].get_title()


def test_mirror_tree_copies_nested_files(tmp_path):
  src = tmp_path / 'src'
  (src / 'a' / 'b').mkdir(parents=True)
  (src / 'top.txt').write_text('1')
  (src / 'a' / 'b' / 'deep.bin').write_bytes(b'\x00\x01')
  assert notebook_utils.mirror_tree(str(src), str(tmp_path / 'dst')) == 2
  assert (tmp_path / 'dst' / 'top.txt').read_text() == '1'
  assert (tmp_path / 'dst' / 'a' / 'b' / 'deep.bin').read_bytes() == b'\x00\x01'


def test_latest_checkpoint_step_reads_url_workdirs(tmp_path):
  """Notebook workdirs go through etils.epath like training's: a file:// URL (the local URL scheme) works."""
  url = f'file://{tmp_path}'
  assert notebook_utils.latest_checkpoint_step(url) is None
  ckpt = checkpointing.Checkpointer(url, keep=2)
  ckpt.save(3, _state(3), _config(), data_step=3)
  ckpt.close()
  assert notebook_utils.latest_checkpoint_step(url) == 3


def _row(chip, dtype, batch, peak, hbm=16.0):
  return {'chip': chip, 'dtype': dtype, 'batch': batch, 'status': 'ok', 'peak_gib': peak, 'hbm_gib': hbm,
          'fits': peak <= hbm}


def test_the_committed_tpu_memory_table_plans_a_v5e_chip():
  """benchmarks/data/tpu_memory_800x1344.jsonl (tpu_memory_table.py's measured rows, what the notebook reads) is
  whole and consistent, and the notebook's plan for a Colab v5e chip comes from a measured row, not the
  'unmeasured' fallback: the paper's 2 images per chip in one step (no accumulation)."""
  rows = notebook_utils.load_tpu_memory_table()
  assert rows, notebook_utils.TPU_MEMORY_TABLE
  for row in rows:
    assert {'chip', 'dtype', 'batch', 'status', 'hbm_gib', 'image_size', 'config'} <= set(row), row
    assert row['image_size'] == [800, 1344] and row['config'] == 'configs/visdrone.py', row
    if row['status'] == 'ok':
      assert 0 < row['temp_gib'] < row['peak_gib'] and row['fits'] == (row['peak_gib'] <= row['hbm_gib']), row
  plan = notebook_utils.tpu_plan('TPU v5 lite', 1, 2, rows)
  assert 'no measured row' not in plan.reason and plan.per_device_batch == 2 and plan.grad_accum_steps == 1, plan


def test_tpu_plan_follows_the_measured_table():
  rows = [_row('v5e', 'float32', 2, 18.0), _row('v5e', 'bfloat16', 2, 12.0), _row('v5e', 'float32', 1, 10.0),
          _row('v6e', 'float32', 2, 18.0, 32.0)]
  plan = notebook_utils.tpu_plan('TPU v5 lite', 1, 2, rows)   # f32 b2 does not fit 16 GiB; bf16 b2 does
  assert plan[:4] == (2, 'bfloat16', True, 1) and '12.0 GiB' in plan.reason
  plan = notebook_utils.tpu_plan('TPU v6 lite', 1, 2, rows)   # float32 (the recipe's numerics) when it fits
  assert plan[:4] == (2, 'float32', True, 1)
  plan = notebook_utils.tpu_plan('TPU v5 lite', 1, 2, rows[:1] + rows[2:])   # only b1 fits: accumulate 2
  assert plan[:4] == (1, 'float32', True, 2) and 'global batch 2' in plan.reason
  plan = notebook_utils.tpu_plan('TPU v5 lite', 2, 2, rows)   # two chips: 1 image each
  assert plan[:4] == (1, 'float32', True, 1)
  plan = notebook_utils.tpu_plan('TPU v3', 1, 2, rows)   # no measured row for the chip
  assert plan[:4] == (1, 'bfloat16', True, 2) and 'no measured row' in plan.reason
  with pytest.raises(ValueError, match='does not split over 8 devices'):
    notebook_utils.tpu_plan('TPU v2', 8, 2, rows)   # a v2-8's 8 cores cannot split the paper's 2 images

