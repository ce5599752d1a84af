"""Model structure, the frozen/unfrozen switch, and cached-prefix training."""

import keras
import numpy as np
import pytest

import schemas
from training import config as config_lib, model as model_lib

HEAD = ["head_dense", "logits"]


def _trainable_layers(model):
  return sorted({w.path.split("/")[0] for w in model.trainable_weights})


@pytest.mark.slow
def test_full_vgg16_structure_and_trainable_switch():
  model = model_lib.build_model(224, "none")
  names = [layer.name for layer in model.layers]
  vgg = ["block1_conv1", "block1_conv2", "block1_pool",
         "block2_conv1", "block2_conv2", "block2_pool",
         "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
         "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
         "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]
  assert names == (["image", "vgg_preprocess"] + vgg +
                   ["features", "head_dense", "head_dropout", "logits",
                    "temperature", "probabilities"])
  assert model.inputs[0].dtype == "uint8"
  assert tuple(model.inputs[0].shape) == (None, 224, 224, 3)
  assert tuple(model.outputs[0].shape) == (None, 3)
  assert model.get_layer("head_dense").units == 256
  assert model.get_layer("head_dropout").rate == 0.5
  assert model.get_layer("logits").activation.__name__ == "linear"
  assert model.get_layer("temperature").value == 1.0
  assert isinstance(model.get_layer(schemas.GRADCAM_LAYER),
                    keras.layers.Conv2D)
  assert model.count_params() == 14_714_688 + 512 * 256 + 256 + 256 * 3 + 3 + 1

  assert _trainable_layers(model) == HEAD  # stage one: head only
  assert model_lib.frozen_prefix_end(model) == "features"
  # What --fine_tune_from may name, checked before the model is built.
  assert [layer.name for layer in model_lib.backbone_layers(model)
          if layer.weights] == list(
              config_lib.FINE_TUNABLE_LAYERS[config_lib.VGG16])
  unfrozen = model_lib.unfreeze_fine_tuned(model)
  assert unfrozen == ["block5_conv1", "block5_conv2", "block5_conv3"]
  assert _trainable_layers(model) == sorted(unfrozen + HEAD)
  assert model_lib.frozen_prefix_end(model) == "block4_pool"
  model_lib.freeze_backbone(model)
  assert _trainable_layers(model) == HEAD
  assert model_lib.unfreeze_fine_tuned(model, "block4_conv2") == [
      "block4_conv2", "block4_conv3"] + unfrozen
  assert model_lib.fine_tune_input(model, "block4_conv2") == "block4_conv1"
  assert model_lib.fine_tune_input(model, "block1_conv1") == (
      schemas.PREPROCESS_LAYER)
  assert model_lib.fine_tune_input(model) == "block4_pool"
  model_lib.freeze_backbone(model)
  assert _trainable_layers(model) == HEAD


def test_tiny_backbone_has_the_same_contract():
  model = model_lib.build_model(32, backbone="tiny")
  assert model.inputs[0].dtype == "uint8"
  assert model.get_layer(schemas.GRADCAM_LAYER)
  assert _trainable_layers(model) == HEAD
  assert model_lib.fine_tune_input(model) == "block1_pool"
  assert [layer.name for layer in model_lib.backbone_layers(model)
          if layer.weights] == list(
              config_lib.FINE_TUNABLE_LAYERS[config_lib.TINY])
  pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
  probabilities = model.predict(pixels, verbose=0)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_assembled_model_equals_head_on_features():
  keras.utils.set_random_seed(0)
  model = model_lib.build_model(32, backbone="tiny")
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (24, 32, 32, 3), np.uint8)
  targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 24)]
  prefix, head = model_lib.split_model(model, "features")
  features = prefix.predict(pixels, verbose=0)
  before = model.get_layer("logits").get_weights()[0].copy()
  model_lib.compile_model(head, 1e-2)
  head.fit(features, targets, epochs=3, batch_size=8, verbose=0)
  # Training the head trained the full model's layers ...
  assert not np.allclose(model.get_layer("logits").get_weights()[0], before)
  # ... and the full model on raw pixels equals the head on cached features.
  np.testing.assert_allclose(model.predict(pixels, verbose=0),
                             head.predict(features, verbose=0), atol=1e-6)


def test_sub_models_compose():
  model = model_lib.build_model(32, backbone="tiny")
  pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), np.uint8)
  to_pool = model_lib.sub_model(model, None, "block1_pool")
  pool_to_features = model_lib.sub_model(model, "block1_pool", "features")
  features_to_out = model_lib.sub_model(model, "features")
  composed = features_to_out.predict(pool_to_features.predict(
      to_pool.predict(pixels, verbose=0), verbose=0), verbose=0)
  np.testing.assert_allclose(composed, model.predict(pixels, verbose=0),
                             atol=1e-6)


def test_network_size_resizes_inside_the_model():
  keras.utils.set_random_seed(0)
  model = model_lib.build_model(32, backbone="tiny", network_size=48)
  names = [layer.name for layer in model.layers]
  assert names[:4] == ["image", "vgg_preprocess", schemas.RESIZE_LAYER,
                       "block1_conv1"]
  assert tuple(model.inputs[0].shape) == (None, 32, 32, 3)  # the contract
  assert model_lib.network_size(model) == 48
  # The backbone runs at 48: block5_conv3 after one 2× pool is 24×24.
  assert tuple(model.get_layer(schemas.GRADCAM_LAYER).output.shape[1:3]) == (
      24, 24)
  # The resize is neither backbone nor trainable, and the switch still works.
  assert schemas.RESIZE_LAYER not in [
      layer.name for layer in model_lib.backbone_layers(model)]
  assert _trainable_layers(model) == HEAD
  assert model_lib.frozen_prefix_end(model) == "features"
  pixels = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), np.uint8)
  # Area interpolation of the preprocessed pixels (as preprocessing's
  # INTER_AREA): enlarging 32 → 48, every output pixel is one input pixel
  # or a blend of two neighbours, never smoothed wider.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  preprocessed = model_lib.sub_model(model, None, "vgg_preprocess")(pixels)
  resized = np.asarray(
      model_lib.sub_model(model, None, schemas.RESIZE_LAYER)(pixels))
  np.testing.assert_allclose(
      resized, tf.image.resize(preprocessed, (48, 48), "area"), atol=2e-3)
  # Output row/column 0 (input 0 .. 2/3) is input pixel 0; output 1 (input
  # 2/3 .. 4/3) blends pixels 0 and 1 as 1/2 : 1/2; output 2 is pixel 1.
  source = np.asarray(preprocessed)
  np.testing.assert_allclose(resized[:, 0, 0], source[:, 0, 0], atol=1e-4)
  np.testing.assert_allclose(resized[:, 2, 2], source[:, 1, 1], atol=1e-4)
  np.testing.assert_allclose(resized[:, 1, 0],
                             (source[:, 0, 0] + source[:, 1, 0]) / 2,
                             atol=1e-4)
  # An upsampled uniform image stays uniform: nothing shifted or padded.
  grey = np.full((1, 32, 32, 3), 77, np.uint8)
  flat = np.asarray(model_lib.sub_model(model, None, schemas.RESIZE_LAYER)(grey))
  np.testing.assert_allclose(flat, np.broadcast_to(flat[:, :1, :1], flat.shape),
                             atol=1e-3)
  probabilities = model.predict(pixels, verbose=0)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("network_size", [None, 32])
def test_no_resize_layer_at_the_input_size(network_size):
  model = model_lib.build_model(32, backbone="tiny", network_size=network_size)
  assert schemas.RESIZE_LAYER not in [layer.name for layer in model.layers]
  assert model_lib.network_size(model) == 32


def test_backbone_weights_errors(tmp_path):
  with pytest.raises(model_lib.BackboneWeightsError, match="no such file"):
    model_lib.build_model(32, str(tmp_path / "missing.h5"))
  bad = tmp_path / "bad.h5"
  bad.write_bytes(b"not hdf5")
  with pytest.raises(model_lib.BackboneWeightsError, match="not a Keras VGG16"):
    model_lib.build_model(32, str(bad))
  with pytest.raises(ValueError, match="tiny"):
    model_lib.build_model(32, "imagenet", backbone="tiny")
  with pytest.raises(ValueError, match="unknown backbone"):
    model_lib.build_model(32, backbone="resnet")


def test_imagenet_download_failure_says_what_to_pass(monkeypatch):
  def offline(**kwargs):
    if kwargs.get("weights") == "imagenet":
      raise Exception("URL fetch failure on https://storage.googleapis.com/...")
    raise AssertionError("unexpected call")

  monkeypatch.setattr(keras.applications, "VGG16", offline)
  with pytest.raises(model_lib.BackboneWeightsError) as error:
    model_lib.build_model(32, "imagenet")
  assert "--backbone_weights PATH" in str(error.value)
  assert "none" in str(error.value)


def test_weights_source(tmp_path):
  assert model_lib.weights_source("none") == "none"
  assert model_lib.weights_source("imagenet") == "imagenet"
  path = tmp_path / "w.h5"
  path.write_bytes(b"abc")
  assert model_lib.weights_source(str(path)) == (
      "w.h5@sha256:"
      "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
