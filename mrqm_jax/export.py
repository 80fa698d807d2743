"""`--mode=export`: a portable model: params-only Orbax checkpoint + config + StableHLO inference function.

OUTPUT/
  params/            Orbax checkpoint of {'params', 'model_state'} (no optimizer state)
  config.json        the config the model was built with
  inference.stablehlo   `jax.export` serialization of
                     (variables, image [B,H,W,3] f32 normalized, pad_mask [B,H,W] bool)
                     -> (boxes [B,K,4] canvas-normalized cxcywh (whatever the model's box frame),
                         scores [B,K], labels [B,K] i32)
                     with a symbolic batch size B; H, W = config.input.image_size; K = config.eval.max_detections;
                     the image scaled as config.json's input.resize_rule / resize_scale say
                     (input_pipeline/transforms.resize_factors) and padded at the bottom and right.

The deformable-attention sampling is plain gathers and arithmetic in StableHLO, so there is no custom op
(the grid-sample op that blocks Co-DETR's ONNX export). Serving: `load_exported(OUTPUT)` in a fresh process
returns a callable; any runtime that executes StableHLO (jax, IREE, XLA PJRT) can run the file.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from mrqm_jax import checkpointing, model_lib
from mrqm_jax.models import detector
from mrqm_jax.ops import postprocess

EXPORT_FILE = 'inference.stablehlo'


def inference_fn(model, num_detections: int):
  """(variables, image, pad_mask) -> (boxes cxcywh canvas-normalized, scores, labels), top-K over queries x classes."""

  def fn(variables, image, pad_mask):
    out = model.apply(variables, image, pad_mask, train=False)
    # Canvas-normalized whatever the model's box frame (the export's contract, as config.json may say either).
    logits, boxes = out['pred_logits'], postprocess.frame_to_canvas(out['pred_boxes'], out.get('box_frame'))
    b, q, c = logits.shape
    scores = jax.nn.sigmoid(logits).reshape(b, q * c)
    top_scores, top_index = jax.lax.top_k(scores, min(num_detections, q * c))
    top_boxes = jnp.take_along_axis(boxes, (top_index // c)[..., None], axis=1)
    return top_boxes, top_scores, (top_index % c).astype(jnp.int32)

  return fn


def export_model(config: ml_collections.ConfigDict, workdir: str, output: str, checkpoint: str | None = None,
                 overrides=()) -> str:
  """Writes OUTPUT (see above) from `checkpoint` or WORKDIR's newest readable checkpoint; returns OUTPUT."""
  model, config, variables = model_lib.restore_for_inference(config, workdir, checkpoint, overrides=overrides)
  params, model_state = model_lib.split_variables(variables)
  params = detector.inference_params(params)   # the auxiliary heads are training-only
  out = checkpointing.to_path(output)
  out.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the (async) save
    checkpointer.save(out / 'params', {'params': params, 'model_state': model_state}, force=True)
  (out / checkpointing.EXPORT_CONFIG_FILE).write_text(config.to_json_best_effort(indent=1))
  h, w = config.input.image_size
  batch = jax.export.symbolic_shape('b')[0]
  exported = jax.export.export(jax.jit(inference_fn(model, config.eval.max_detections)))(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {'params': params, **model_state}),
      jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32), jax.ShapeDtypeStruct((batch, h, w), jnp.bool_))
  (out / EXPORT_FILE).write_bytes(exported.serialize())
  print(f'mrqm_jax: exported params, config and {EXPORT_FILE} to {output}')
  return output


def load_exported(output: str):
  """Loads an export folder without the model code: returns (call(image, pad_mask) -> outputs, config dict)."""
  out = checkpointing.to_path(output)
  exported = jax.export.deserialize(bytearray((out / EXPORT_FILE).read_bytes()))
  variables = ocp.StandardCheckpointer().restore(out / 'params')
  variables = {'params': variables['params'], **variables['model_state']}
  config = json.loads((out / checkpointing.EXPORT_CONFIG_FILE).read_text())
  return (lambda image, pad_mask: exported.call(variables, image, pad_mask)), config
