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
