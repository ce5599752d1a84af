"""The model's custom layers, written with `keras.ops` only.

No `tf.*` and no Lambda: `model.keras` must load on any Keras 3 backend and
with `safe_mode=True`, which refuses the arbitrary code a Lambda carries.
Importing this module registers the layers under the package name "busi";
`busi_core.artifact.load_artifact` does that before loading.
"""

from typing import Optional

import keras
from keras import ops

# ImageNet channel means in BGR order, as keras.applications.vgg16
# .preprocess_input ("caffe" mode) subtracts them.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="busi")
class VGGPreprocess(keras.layers.Layer):
  """Raw uint8 RGB pixels → VGG16 input: float, BGR, ImageNet means removed.

  Equal to `keras.applications.vgg16.preprocess_input` on channels-last RGB.
  Living inside the model, it makes the model's contract "raw pixels as stored
  in the TFRecords", so training and scoring cannot preprocess differently.
  """

  def call(self, inputs):
    # The arithmetic is done in float32 whatever the compute dtype: in
    # bfloat16, 255 - 123.68 would already lose the fraction.
    x = ops.cast(inputs, "float32")
    x = ops.flip(x, axis=-1)  # RGB → BGR
    x = x - ops.convert_to_tensor(IMAGENET_MEAN_BGR, dtype="float32")
    return ops.cast(x, self.compute_dtype)

  def compute_output_shape(self, input_shape):
    return input_shape


@keras.saving.register_keras_serializable(package="busi")
class TemperatureScaling(keras.layers.Layer):
  """Divides logits by a fixed scalar temperature (calibration).

  The temperature is a non-trainable weight, so training never moves it and a
  calibration step can set it (`set_temperature`) after training; it is also
  in the layer config, so it can be read from the saved model's config without
  loading weights. At 1.0 the model equals a plain softmax head.

  Args:
    temperature: the divisor, > 0.
  """

  def __init__(self, temperature: float = 1.0, **kwargs):
    super().__init__(**kwargs)
    _check_temperature(temperature)
    self._initial_temperature = float(temperature)
    self.temperature: Optional[keras.Variable] = None

  def build(self, input_shape):
    self.temperature = self.add_weight(
        name="temperature", shape=(),
        initializer=keras.initializers.Constant(self._initial_temperature),
        trainable=False, dtype="float32")
    super().build(input_shape)

  def call(self, inputs):
    return inputs / ops.cast(self.temperature, inputs.dtype)

  def compute_output_shape(self, input_shape):
    return input_shape

  @property
  def value(self) -> float:
    """The current temperature as a Python float."""
    if self.temperature is None:
      return self._initial_temperature
    return float(ops.convert_to_numpy(self.temperature))

  def set_temperature(self, temperature: float) -> None:
    """Sets the temperature (weight and config alike).

    Raises:
      ValueError: temperature is not a positive finite number.
    """
    _check_temperature(temperature)
    self._initial_temperature = float(temperature)
    if self.temperature is not None:
      self.temperature.assign(float(temperature))

  def get_config(self):
    config = super().get_config()
    config["temperature"] = self.value
    return config


def _check_temperature(temperature: float) -> None:
  value = float(temperature)
  if not value > 0 or value == float("inf"):
    raise ValueError(f"temperature must be a positive finite number, got"
                     f" {temperature!r}")


def area_matrix(source: int, target: int):
  """[target, source] float32 weights of area resampling along one axis.

  Output pixel i covers the input interval [i·s, (i+1)·s), s = source /
  target; each input pixel j weighs by its overlap with that interval,
  divided by s. Enlarging, every output pixel is one input pixel or a blend
  of two neighbours; shrinking, it is the mean of the pixels it covers
  (what OpenCV's INTER_AREA and TensorFlow's "area" resize compute).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  scale = source / target
  weights = np.zeros((target, source), np.float64)
  for i in range(target):
    start, stop = i * scale, (i + 1) * scale
    for j in range(int(np.floor(start)), min(source, int(np.ceil(stop)))):
      weights[i, j] = max(0.0, min(stop, j + 1) - max(start, j)) / scale
  return weights.astype(np.float32)


@keras.saving.register_keras_serializable(package="busi")
class AreaResize(keras.layers.Layer):
  """Resizes [B, H, W, C] images to [B, size, size, C] by area resampling.

  Written as two matrix products (`area_matrix` per axis) rather than
  `keras.layers.Resizing(interpolation="area")`: TensorFlow's area kernel
  has no XLA implementation (Keras compiles with XLA on GPUs by default)
  and the JAX and PyTorch backends have no "area" mode at all.

  Args:
    size: output height and width.
  """

  def __init__(self, size: int, **kwargs):
    super().__init__(**kwargs)
    if int(size) < 1:
      raise ValueError(f"size must be positive, got {size!r}")
    self.size = int(size)
    self._rows = self._cols = None

  def build(self, input_shape):
    height, width = int(input_shape[1]), int(input_shape[2])
    self._rows = area_matrix(height, self.size)
    self._cols = area_matrix(width, self.size)
    super().build(input_shape)

  def call(self, inputs):
    x = ops.cast(inputs, "float32")
    rows = ops.convert_to_tensor(self._rows)
    cols = ops.convert_to_tensor(self._cols)
    x = ops.einsum("ih,bhwc->biwc", rows, x)
    x = ops.einsum("jw,biwc->bijc", cols, x)
    return ops.cast(x, self.compute_dtype)

  def compute_output_shape(self, input_shape):
    return (input_shape[0], self.size, self.size, input_shape[3])

  def get_config(self):
    config = super().get_config()
    config["size"] = self.size
    return config
