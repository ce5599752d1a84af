"""Grad-CAM on block5_conv3: where the model looked, for a batch at a time.

Selvaraju et al.: the gradient of a class's logit with respect to the last
conv layer's feature maps, averaged over space, weights those maps; their
ReLU'd sum, upsampled, is the heatmap. Logits (before temperature and
softmax) are used so that a saturated softmax does not zero the gradients.
Used by scoring (`--gradcam`) and by `python -m training gradcam`.
"""

import threading
import weakref
from typing import Optional, Sequence

import cv2
import numpy as np

import schemas
from busi_core.inference import compiled_call

_GRAD_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _grad_call(model):
  """A compiled function: uint8 images, class indices → [B, h, w] maps."""
  with _LOCK:
    fn = _GRAD_MODELS.get(model)
    if fn is not None:
      return fn
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    conv = model.get_layer(schemas.GRADCAM_LAYER).output
    logits = model.get_layer(schemas.LOGITS_LAYER).output
    probe = keras.Model(model.inputs, [conv, logits])
    shape = [None] + list(model.inputs[0].shape[1:])

    @tf.function(autograph=False, input_signature=[tf.TensorSpec(shape, tf.uint8),
                                  tf.TensorSpec([None], tf.int32)])
    def heatmaps(images, classes):
      with tf.GradientTape() as tape:
        maps, scores = probe(images, training=False)
        chosen = tf.gather(scores, classes, axis=1, batch_dims=1)
      # float32 from here on: a reduced-precision model (with_precision)
      # gives bfloat16 maps, which lose the sum's precision and which
      # cv2.resize cannot read.
      grads = tf.cast(tape.gradient(chosen, maps), tf.float32)
      maps = tf.cast(maps, tf.float32)
      weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
      cam = tf.nn.relu(tf.reduce_sum(maps * weights, axis=-1))
      peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
      return tf.math.divide_no_nan(cam, peak)

    _GRAD_MODELS[model] = heatmaps
    return heatmaps


def heatmaps(model, images: np.ndarray,
             classes: Optional[Sequence[int]] = None) -> np.ndarray:
  """Grad-CAM heatmaps for a batch, in [0, 1], at the images' size.

  Args:
    model: an artifact model (uint8 input, layers "block5_conv3", "logits").
    images: uint8 [B, H, W, 3] RGB, as `from_example` reads them.
    classes: class index per image; default: each image's predicted class.

  Returns:
    float32 [B, H, W]; 1 marks where the evidence for the class is strongest.
  """
  images = np.asarray(images, dtype=np.uint8)
  if classes is None:
    classes = compiled_call(model)(images).numpy().argmax(axis=1)
  cams = _grad_call(model)(images, np.asarray(classes, np.int32)).numpy()
  height, width = images.shape[1:3]
  return np.stack([cv2.resize(c, (width, height),
                              interpolation=cv2.INTER_LINEAR) for c in cams]
                 ).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray,
            alpha: float = 0.4) -> np.ndarray:
  """The image with a JET-coloured heatmap blended over it (uint8 RGB)."""
  heat = cv2.applyColorMap(np.uint8(255 * np.clip(heatmap, 0, 1)),
                           cv2.COLORMAP_JET)
  heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
  return cv2.addWeighted(np.asarray(image, np.uint8), 1 - alpha, heat, alpha,
                         0)


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
  """overlay() encoded as PNG bytes."""
  ok, buf = cv2.imencode(".png", cv2.cvtColor(overlay(image, heatmap),
                                              cv2.COLOR_RGB2BGR))
  if not ok:
    raise ValueError("PNG encoding of the overlay failed")
  return buf.tobytes()
