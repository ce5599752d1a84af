"""The custom layers: VGG preprocessing and temperature scaling."""

import keras
import numpy as np
import pytest

from busi_core import layers


def test_vgg_preprocess_equals_keras_preprocess_input():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
  expected = keras.applications.vgg16.preprocess_input(
      pixels.astype(np.float32))
  actual = keras.ops.convert_to_numpy(layers.VGGPreprocess()(pixels))
  assert actual.dtype == np.float32
  np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_vgg_preprocess_in_a_uint8_model():
  inputs = keras.Input((8, 8, 3), dtype="uint8")
  model = keras.Model(inputs, layers.VGGPreprocess()(inputs))
  pixels = np.full((1, 8, 8, 3), (255, 0, 10), dtype=np.uint8)
  out = model.predict(pixels, verbose=0)
  # BGR order, ImageNet means removed.
  np.testing.assert_allclose(out[0, 0, 0], [10 - 103.939, -116.779,
                                            255 - 123.68], atol=1e-4)


def test_temperature_divides_logits():
  layer = layers.TemperatureScaling(2.0)
  logits = np.array([[2.0, -4.0, 1.0]], np.float32)
  np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(logits)),
                             logits / 2)
  assert not layer.trainable_weights
  assert layer.value == 2.0
  layer.set_temperature(0.5)
  np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(logits)),
                             logits * 2)
  assert layer.get_config()["temperature"] == 0.5


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_positive(bad):
  with pytest.raises(ValueError, match="temperature"):
    layers.TemperatureScaling(bad)


def test_temperature_one_is_a_plain_softmax():
  logits = np.array([[0.3, 2.0, -1.0]], np.float32)
  scaled = keras.layers.Softmax()(layers.TemperatureScaling()(logits))
  np.testing.assert_allclose(keras.ops.convert_to_numpy(scaled),
                             keras.ops.convert_to_numpy(
                                 keras.activations.softmax(logits)),
                             rtol=1e-6)


def test_layers_survive_save_and_safe_load(tmp_path):
  inputs = keras.Input((4, 4, 3), dtype="uint8")
  x = layers.VGGPreprocess()(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dense(3)(x)
  temperature = layers.TemperatureScaling(1.0, name="temperature")
  x = temperature(x)
  model = keras.Model(inputs, keras.layers.Softmax()(x))
  temperature.set_temperature(3.0)
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
  assert loaded.get_layer("temperature").value == pytest.approx(3.0)
  pixels = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), np.uint8)
  np.testing.assert_allclose(loaded.predict(pixels, verbose=0),
                             model.predict(pixels, verbose=0), rtol=1e-6)


def test_area_resize_is_area_resampling():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from busi_core.layers import AreaResize, area_matrix  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = rng.normal(0, 60, (2, 64, 64, 3)).astype(np.float32)
  # Shrinking by 2: the mean of each 2×2 block, exactly.
  blocks = x.reshape(2, 32, 2, 32, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(AreaResize(32)(x)), blocks, atol=1e-4)
  # Enlarging 2 → 3 pixels: the first, half-and-half, the second.
  np.testing.assert_allclose(area_matrix(2, 3),
                             [[1, 0], [0.5, 0.5], [0, 1]], atol=1e-6)
  assert np.allclose(area_matrix(224, 320).sum(axis=1), 1.0, atol=1e-6)
  # What TensorFlow's "area" resize gives, either way.
  for size in (48, 96):
    np.testing.assert_allclose(np.asarray(AreaResize(size)(x)),
                               tf.image.resize(x, (size, size), "area"),
                               atol=5e-3)
  # Serialised with its size, under the package name.
  layer = AreaResize(48, name="r")
  again = keras.layers.deserialize(keras.layers.serialize(layer))
  assert isinstance(again, AreaResize) and again.size == 48
