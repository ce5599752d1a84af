"""The artifact directory: save, validate without loading, load safely."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import schemas
from training import testing
from busi_core import artifact
from training import saving
from training import model as model_lib


@pytest.fixture(name="model_dir", scope="module")
def fixture_model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("artifact") / "model")
  testing.make_test_artifact(path, image_size=32, threshold=0.8, seed=3)
  return path


def _copy(src, dst):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(
        os.path.join(dst, name), "wb") as g:
      g.write(f.read())
  return dst


def _edit_metadata(model_dir, **changes):
  path = os.path.join(model_dir, schemas.METADATA_FILE)
  with open(path) as f:
    metadata = json.load(f)
  for key, value in changes.items():
    if value is _DELETE:
      del metadata[key]
    else:
      metadata[key] = value
  with open(path, "w") as f:
    json.dump(metadata, f)


_DELETE = object()


def test_test_artifact_is_complete(model_dir):
  assert sorted(os.listdir(model_dir)) == sorted(
      [schemas.MODEL_FILE, schemas.LABELS_FILE, schemas.METADATA_FILE,
       schemas.MODEL_CARD_FILE])
  info = artifact.read_artifact_info(model_dir)
  assert info.labels == list(schemas.LABELS)
  for field in schemas.METADATA_REQUIRED_FIELDS:
    assert field in info.metadata.to_json()
  metadata = info.metadata
  assert metadata.threshold == 0.8
  assert metadata.image_size == 32
  assert metadata.temperature == 1.0
  assert metadata.format_version == schemas.ARTIFACT_FORMAT_VERSION
  assert metadata.package_version == schemas.PACKAGE_VERSION
  assert re.fullmatch(r"test-tiny-\d{8}T\d{6}Z-[0-9a-f]{8}",
                      metadata.model_version)
  with open(os.path.join(model_dir, schemas.LABELS_FILE)) as f:
    assert json.load(f) == list(schemas.LABELS)  # plain JSON, never pickle
  with open(os.path.join(model_dir, schemas.MODEL_CARD_FILE)) as f:
    card = f.read()
  assert "UNTRAINED TEST ARTIFACT" in card
  assert metadata.model_version in card and "Intended use" in card
  assert metadata.calibration.reason == "untrained test artifact"


def test_load_predicts_probabilities_in_label_order(model_dir):
  loaded = artifact.load_artifact(model_dir)
  assert loaded.local_dir == model_dir
  assert loaded.labels == list(schemas.LABELS)
  pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8)
  probabilities = loaded.model.predict(pixels, verbose=0)
  assert probabilities.shape == (5, len(schemas.LABELS))
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  assert loaded.model.get_layer(schemas.GRADCAM_LAYER)


def test_resizing_model_saves_and_loads_safely(tmp_path):
  """The resize to the backbone's size is a stock Keras layer: the model
  loads with safe_mode and gives the same probabilities, at the input size
  scoring feeds it, with Grad-CAM maps at that size too."""
  from busi_core import gradcam  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "resizing")
  metadata = testing.make_test_artifact(path, image_size=32, seed=3,
                                        network_size=64)
  assert (metadata.image_size, metadata.network_size) == (32, 64)
  loaded = artifact.load_artifact(path)
  assert model_lib.network_size(loaded.model) == 64
  pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
  fresh = model_lib.build_model(32, backbone="tiny", network_size=64)
  fresh.set_weights(loaded.model.get_weights())
  np.testing.assert_allclose(loaded.model.predict(pixels, verbose=0),
                             fresh.predict(pixels, verbose=0), atol=1e-6)
  assert gradcam.heatmaps(loaded.model, pixels).shape == (3, 32, 32)
  with open(os.path.join(path, schemas.MODEL_CARD_FILE)) as f:
    assert "the model resizes it to 64×64 (area interpolation)" in f.read()
  # XLA, which Keras turns on by itself on GPUs, compiles it too (Keras'
  # Resizing(interpolation="area") has no XLA kernel).
  loaded.model.jit_compile = True
  np.testing.assert_allclose(loaded.model.predict(pixels, verbose=0),
                             fresh.predict(pixels, verbose=0), atol=1e-5)


def test_test_artifact_is_deterministic(tmp_path, model_dir):
  other = str(tmp_path / "again")
  testing.make_test_artifact(other, image_size=32, threshold=0.8, seed=3)
  pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), np.uint8)
  np.testing.assert_allclose(
      artifact.load_artifact(other).model.predict(pixels, verbose=0),
      artifact.load_artifact(model_dir).model.predict(pixels, verbose=0),
      rtol=1e-6)


@pytest.mark.parametrize("change,match", [
    ({"test_metrics": _DELETE}, "lacks test_metrics"),
    ({"format_version": "0"}, "artifact format '0'"),
    ({"labels": ["a", "b", "c"]}, "differ"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": "0.9"}, "threshold"),
    ({"image_size": 32.0}, "image_size"),
    ({"temperature": _DELETE}, "lacks temperature"),
    ({"temperature": 0}, "temperature"),
])
def test_bad_metadata_refused(tmp_path, model_dir, change, match):
  broken = _copy(model_dir, str(tmp_path / "broken"))
  _edit_metadata(broken, **change)
  with pytest.raises(artifact.ArtifactError, match=match):
    artifact.read_artifact_info(broken)


def test_missing_files_refused(tmp_path, model_dir):
  with pytest.raises(artifact.ArtifactError, match="python -m training train"):
    artifact.read_artifact_info(str(tmp_path / "nowhere"))
  for name in (schemas.MODEL_FILE, schemas.LABELS_FILE, schemas.METADATA_FILE):
    broken = _copy(model_dir, str(tmp_path / name))
    os.remove(os.path.join(broken, name))
    with pytest.raises(artifact.ArtifactError, match=re.escape(name)):
      artifact.read_artifact_info(broken)
  broken = _copy(model_dir, str(tmp_path / "notjson"))
  with open(os.path.join(broken, schemas.LABELS_FILE), "wb") as f:
    f.write(b"\x80\x04pickle")
  with pytest.raises(artifact.ArtifactError, match="not valid JSON"):
    artifact.read_artifact_info(broken)


def test_shape_mismatch_refused_on_load(tmp_path, model_dir):
  broken = _copy(model_dir, str(tmp_path / "size"))
  _edit_metadata(broken, image_size=64)
  with pytest.raises(artifact.ArtifactError, match="image_size 64"):
    artifact.load_artifact(broken)
  broken = _copy(model_dir, str(tmp_path / "labels"))
  four = ["normal", "benign", "malignant", "other"]
  _edit_metadata(broken, labels=four)
  with open(os.path.join(broken, schemas.LABELS_FILE), "w") as f:
    json.dump(four, f)
  with pytest.raises(artifact.ArtifactError, match="4 labels"):
    artifact.load_artifact(broken)


def _metadata_fields():
  return {
      "backbone": "test", "weights_source": "none",
      "data_fingerprint": {}, "class_counts": {}, "test_metrics": {},
  }


def test_lambda_layer_refused(tmp_path):
  inputs = keras.Input((8, 8, 3), dtype="uint8")
  x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32") / 255.0)(
      inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
  model_dir = str(tmp_path / "lambda")
  saving.save_artifact(model, model_dir, schemas.LABELS, **_metadata_fields())
  artifact.read_artifact_info(model_dir)  # the JSON side is fine
  with pytest.raises(artifact.ArtifactError, match="safe mode"):
    artifact.load_artifact(model_dir)


def test_float_input_refused(tmp_path):
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.GlobalAveragePooling2D()(inputs)
  model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
  model_dir = str(tmp_path / "float")
  saving.save_artifact(model, model_dir, schemas.LABELS, **_metadata_fields())
  with pytest.raises(artifact.ArtifactError, match="uint8"):
    artifact.load_artifact(model_dir)


def test_save_fills_in_fields_and_requires_the_rest(tmp_path):
  model = model_lib.build_model(32, backbone="tiny")
  model.get_layer("temperature").set_temperature(1.5)
  metadata = saving.save_artifact(model, str(tmp_path / "m"),
                                  schemas.LABELS, **_metadata_fields(),
                                  name="x")
  assert metadata.image_size == 32
  assert metadata.threshold == schemas.DEFAULT_THRESHOLD
  assert metadata.temperature == 1.5
  assert metadata.model_version.startswith("x-")
  with open(tmp_path / "m" / schemas.METADATA_FILE) as f:
    written = json.load(f)
  assert list(written)[:len(schemas.METADATA_REQUIRED_FIELDS)] == list(
      schemas.METADATA_REQUIRED_FIELDS)
  with pytest.raises(artifact.ArtifactError, match="lacks data_fingerprint"):
    fields = _metadata_fields()
    del fields["data_fingerprint"]
    saving.save_artifact(model, str(tmp_path / "n"), schemas.LABELS, **fields)


def test_read_artifact_info_does_not_import_tensorflow(model_dir):
  # The launcher validates artifacts up front; that must stay cheap.
  code = ("import sys; from busi_core import artifact;"
          f" artifact.read_artifact_info({model_dir!r});"
          " assert 'tensorflow' not in sys.modules, 'tensorflow imported';"
          " assert 'keras' not in sys.modules, 'keras imported'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(__file__)))


def test_model_swapped_after_training_refused(tmp_path, model_dir):
  loaded = artifact.load_artifact(model_dir)
  digest = loaded.metadata.model_sha256
  assert loaded.model_sha256 == digest
  assert re.fullmatch(r"[0-9a-f]{64}", digest)
  assert loaded.metadata.model_version.endswith(digest[:8])
  other = str(tmp_path / "other")
  testing.make_test_artifact(other, image_size=32, seed=4)
  swapped = _copy(model_dir, str(tmp_path / "swapped"))
  with open(os.path.join(other, schemas.MODEL_FILE), "rb") as f, open(
      os.path.join(swapped, schemas.MODEL_FILE), "wb") as g:
    g.write(f.read())
  with pytest.raises(artifact.ArtifactError, match="replaced after training"):
    artifact.load_artifact(swapped)
  # Artifacts saved before model_sha256 existed: model_version's suffix.
  _edit_metadata(swapped, **{schemas.METADATA_MODEL_SHA256: _DELETE})
  with pytest.raises(artifact.ArtifactError, match="replaced after training"):
    artifact.load_artifact(swapped)
  legacy = _copy(model_dir, str(tmp_path / "legacy"))
  _edit_metadata(legacy, **{schemas.METADATA_MODEL_SHA256: _DELETE})
  assert artifact.load_artifact(legacy).model_sha256 == digest
  # A custom model_version (no digest suffix) loads unchecked.
  _edit_metadata(swapped, model_version="my-model-v2")
  assert artifact.load_artifact(swapped).labels == list(schemas.LABELS)


def test_expected_digest_refuses_an_artifact_replaced_mid_job(tmp_path,
                                                              model_dir):
  from beam_pipeline import model_handler  # pylint: disable=import-outside-toplevel
  digest = artifact.load_artifact(model_dir).model_sha256
  assert artifact.load_artifact(model_dir, digest).model_sha256 == digest
  with pytest.raises(artifact.ArtifactError, match="changed after this job"):
    artifact.load_artifact(model_dir, "0" * 64)
  # The worker-side loader, as RunInference calls it.
  handler = model_handler.ArtifactModelHandler(model_dir,
                                               model_sha256="0" * 64)
  with pytest.raises(artifact.ArtifactError, match="changed after this job"):
    handler.load_model()
  assert model_handler.ArtifactModelHandler(
      model_dir, model_sha256=digest).load_model() is not None
