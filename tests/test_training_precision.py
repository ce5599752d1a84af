"""--training_precision: bfloat16 for the frozen-base pass and the fine-tune
stage, float32 weights and artifact."""

import dataclasses
import json
import os

import keras
import ml_dtypes
import numpy as np
import pytest

import schemas
from busi_core import precision as precision_lib
# The function itself: conftest's autouse fixture patches the module's name.
from busi_core.precision import cpu_bfloat16_flags
from training import cli, model as model_lib, recipe, testing
from training.config import TrainConfig

SIZE = 32


@pytest.fixture(name="images", scope="module")
def fixture_images():
  return testing.every_class_images(8, SIZE)


@pytest.mark.parametrize("flags,expected", [
    ("fpu vme avx512f avx512_bf16 amx_tile amx_bf16 amx_int8",
     ("amx_bf16", "avx512_bf16")),
    ("fpu avx512f avx512_bf16", ("avx512_bf16",)),
    ("fpu sse2 avx2 avx512f", ()),
])
def test_cpu_bfloat16_flags_read_from_cpuinfo(tmp_path, flags, expected):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU amx_bf16\n"
                     f"flags\t\t: {flags}\n\nprocessor\t: 1\n"
                     f"flags\t\t: {flags}\n")
  # Only the flags line counts (the model name mentions amx_bf16 above).
  assert cpu_bfloat16_flags(str(cpuinfo)) == expected
  assert cpu_bfloat16_flags(str(tmp_path / "missing")) == ()


def test_auto_is_bfloat16_only_with_bfloat16_instructions(monkeypatch):
  monkeypatch.setattr(model_lib, "_gpu_bfloat16", lambda: None)
  assert model_lib.resolve_precision("float32") == ("float32", "asked for")
  assert model_lib.resolve_precision("bfloat16") == ("bfloat16", "asked for")
  precision, why = model_lib.resolve_precision("auto")
  assert precision == "float32" and "no bfloat16" in why
  monkeypatch.setattr(precision_lib, "cpu_bfloat16_flags",
                      lambda *args: ("amx_bf16",))
  assert model_lib.resolve_precision("auto") == (
      "bfloat16", "auto: the CPU has amx_bf16")
  monkeypatch.setattr(model_lib, "_gpu_bfloat16", lambda: "NVIDIA H100")
  assert model_lib.resolve_precision("auto")[0] == "bfloat16"


@pytest.mark.parametrize("gpu,flags,expected", [
    (None, ("amx_bf16", "avx512_bf16"), "amx_bf16"),
    (None, ("avx512_bf16",), "avx512_bf16"),
    (None, (), None),
    ("NVIDIA H100", ("amx_bf16", "avx512_bf16"), "GPU NVIDIA H100"),
])
def test_the_fastest_bfloat16_hardware_is_named(monkeypatch, gpu, flags,
                                                expected):
  monkeypatch.setattr(model_lib, "_gpu_bfloat16", lambda: gpu)
  monkeypatch.setattr(precision_lib, "cpu_bfloat16_flags",
                      lambda *args: flags)
  assert model_lib.bfloat16_device() == expected


def test_the_flag_is_checked():
  with pytest.raises(SystemExit):
    cli.main(["train", "--data", "x", "--output", "y",
              "--training_precision", "bf16"])
  with pytest.raises(ValueError, match="--training_precision 'half'"):
    TrainConfig(data=("x",), output="x", precision="half").validate()
  assert TrainConfig(data=("x",), output="x").precision == "auto"


def test_bfloat16_cache_computes_the_random_views_in_bfloat16(images):
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  layers = [model_lib.fine_tune_input(model), model_lib.FEATURES_LAYER]
  every = np.arange(len(images))
  caches = {p: recipe.ConvCache(model, images, {0: every, 1: every, 2: every},
                                8, 0, layers, keys=every, precision=p)
            for p in ("float32", "bfloat16")}
  for layer in layers:
    # The original view, which calibration, the threshold, the OOD detector
    # and cv's figures read, is computed as scoring computes it.
    np.testing.assert_array_equal(caches["bfloat16"].get(layer, 0, every),
                                  caches["float32"].get(layer, 0, every))
    for view in (1, 2):
      exact = caches["float32"].get(layer, view, every)
      reduced = caches["bfloat16"].get(layer, view, every)
      # Kept as computed: bfloat16, half the memory.
      assert exact.dtype == np.float32 and reduced.dtype == ml_dtypes.bfloat16
      assert reduced.shape == exact.shape
      reduced = reduced.astype(np.float32)
      # bfloat16 keeps 8 significant bits: close, not equal.
      assert not np.array_equal(reduced, exact)
      np.testing.assert_allclose(reduced, exact, rtol=0.05,
                                 atol=0.02 * np.abs(exact).max())
  # What a stage trains on: the views one after the other, in its dtype.
  cache, some = caches["bfloat16"], np.array([5, 1, 17])
  for dtype in (np.float32, ml_dtypes.bfloat16):
    stacked = cache.stack(layers[0], [0, 2], some, dtype)
    assert stacked.dtype == dtype and len(stacked) == 6
    np.testing.assert_array_equal(
        stacked, np.concatenate([cache.get(layers[0], 0, some).astype(dtype),
                                 cache.get(layers[0], 2, some).astype(dtype)]))
  with pytest.raises(ValueError, match="view 2 was not computed"):
    recipe.ConvCache(model, images, {0: every, 2: some}, 8, 0, layers,
                     keys=every).stack(layers[0], [0, 2], [4], np.float32)
  # The model itself is untouched: float32 layers.
  assert all(layer.dtype_policy.name == "float32" for layer in model.layers)


def _fine_tuned(images, precision, seed=0):
  labels = np.repeat(np.arange(3), 8)
  keras.utils.set_random_seed(0)
  model = model_lib.build_model(SIZE, "none", 3, model_lib.TINY)
  config = TrainConfig(data=("x",), output="x", backbone="tiny",
                       backbone_weights="none", epochs=2, patience=0,
                       fine_tune_epochs=2, augment_views=1,
                       precision=precision)
  before = [w.copy() for w in model.get_weights()]
  cache = recipe.ConvCache(model, images, {0: np.arange(24),
                                           1: np.arange(0, 24, 2)}, 8, 0,
                           recipe.cache_layers(config, model),
                           keys=np.arange(24), precision=precision)
  runner = recipe.Recipe(model, cache, labels, config, progress=0)
  runner.fit(np.arange(0, 24, 2), np.arange(1, 24, 2), seed)
  return model, before, runner


def test_bfloat16_fine_tune_trains_the_float32_model(images, tmp_path):
  model, before, runner = _fine_tuned(images, "bfloat16")
  conv = model.get_layer(schemas.GRADCAM_LAYER)
  assert conv.trainable and conv.dtype_policy.name == "float32"
  assert all(w.dtype == np.float32 for w in model.get_weights())
  # The fine-tuned conv layer (trained only by the bfloat16 copy) moved.
  index = [v.path for v in model.weights].index(conv.kernel.path)
  assert not np.allclose(model.get_weights()[index], before[index])
  # The model computes in float32 with what the copy learned: its logits
  # are the float32 model's own, and it saves and loads as float32.
  full = model_lib.sub_model(model, None, model_lib.LOGITS_LAYER)
  np.testing.assert_allclose(runner.logits(np.arange(6)),
                             np.asarray(full(images[:6])), rtol=1e-4,
                             atol=1e-4)
  model.save(tmp_path / "m.keras")
  loaded = keras.saving.load_model(tmp_path / "m.keras")
  assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}
  # Same seed, same fit: the copy's dropout continues the model's draws.
  again, _, _ = _fine_tuned(images, "bfloat16")
  for a, b in zip(model.get_weights(), again.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_float32_fine_tune_differs_from_bfloat16(images):
  exact, _, _ = _fine_tuned(images, "float32")
  reduced, _, _ = _fine_tuned(images, "bfloat16")
  conv = exact.get_layer(schemas.GRADCAM_LAYER).kernel.path
  index = [v.path for v in exact.weights].index(conv)
  a, b = exact.get_weights()[index], reduced.get_weights()[index]
  assert not np.array_equal(a, b)
  np.testing.assert_allclose(a, b, atol=0.05 * np.abs(a).max())


@pytest.fixture(name="records_glob")
def fixture_records_glob(tmp_path):
  """8 synthetic images a class in one TFRecord file; its glob."""
  root = tmp_path / "records"
  root.mkdir()
  testing.write_tfrecords(
      str(root / "part-00000-of-00001.tfrecord.gz"),
      testing.synthetic_records(per_class=8, image_size=SIZE, seed=0))
  return str(root / "*.tfrecord.gz")


def test_train_in_bfloat16_saves_a_float32_artifact_that_checks(
    tmp_path, records_glob):
  output = str(tmp_path / "model")
  # train's last step reloads the artifact as scoring does and refuses it
  # unless it reproduces the calibrated validation predictions and OOD
  # scores: those must come from float32 arithmetic, not the bfloat16 cache.
  assert cli.main(["train", "--data", records_glob,
                   "--output", output, "--backbone", "tiny",
                   "--backbone_weights", "none", "--epochs", "3",
                   "--fine_tune_epochs", "1", "--augment_views", "3",
                   "--cv_folds", "2", "--batch_size", "8",
                   "--training_precision", "bfloat16"]) == 0
  with open(os.path.join(output, schemas.METADATA_FILE)) as f:
    metadata = json.load(f)
  assert metadata["training"]["precision"] == "bfloat16"
  with open(os.path.join(output, schemas.CV_REPORT_FILE)) as f:
    assert json.load(f)["settings"]["precision"] == "bfloat16"
  with open(os.path.join(output, schemas.MODEL_CARD_FILE)) as f:
    assert ("| training arithmetic | bfloat16 for the augmented views'"
            " frozen-base pass and the fine-tune stage (") in f.read()
  loaded = keras.saving.load_model(os.path.join(output, schemas.MODEL_FILE))
  assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}


WHOLE = "block1_conv1"


@pytest.mark.parametrize("flags,asked,expected", [
    # AMX: bfloat16, the whole base fine-tuned at 3e-5, and no folds in train
    # (five more whole-base fine-tunes would take an hour).
    (("amx_bf16", "avx512_bf16"), {}, ("bfloat16", 3, WHOLE, 3e-5, 0)),
    # AVX512-BF16 alone: bfloat16, block5 at most 5 epochs at 1e-5 (the whole
    # base would take over an hour), and no folds in train (five more: ~40
    # minutes).
    (("avx512_bf16",), {}, ("bfloat16", 5, None, 1e-5, 0)),
    (("avx512_bf16",), {"fine_tune_epochs": 2}, ("bfloat16", 2, None, 1e-5, 0)),
    (("avx512_bf16",), {"fine_tune_epochs": 0}, ("bfloat16", 0, None, 1e-5, 5)),
    (("avx512_bf16",), {"precision": "float32"},
     ("float32", 0, None, 1e-5, 5)),
    ((), {}, ("float32", 0, None, 1e-5, 5)),
    # float32 asked for on an AMX machine: no automatic fine-tune either.
    (("amx_bf16",), {"precision": "float32"}, ("float32", 0, None, 1e-5, 5)),
    # Asked-for epochs are kept whatever the machine; off AMX they train
    # block5 (None: its first layer), at 1e-5, and in float32 too slowly for
    # train's folds.
    ((), {"fine_tune_epochs": 2}, ("float32", 2, None, 1e-5, 0)),
    ((), {"fine_tune_epochs": 2, "cv_folds": 3}, ("float32", 2, None, 1e-5, 3)),
    (("amx_bf16",), {"fine_tune_epochs": 0}, ("bfloat16", 0, None, 1e-5, 5)),
    (("amx_bf16",), {"fine_tune_epochs": 5}, ("bfloat16", 5, WHOLE, 3e-5, 0)),
    # Asked-for layers and rates are kept; the rate's auto follows the layer.
    (("amx_bf16",), {"fine_tune_epochs": 5, "fine_tune_from": "block5_conv1"},
     ("bfloat16", 5, "block5_conv1", 1e-5, 5)),
    (("amx_bf16",), {"fine_tune_epochs": 5, "fine_tune_from": "block5_conv3"},
     ("bfloat16", 5, "block5_conv3", 1e-5, 5)),
    # ... but from an earlier block it costs 40-90 % of the whole base's.
    (("amx_bf16",), {"fine_tune_epochs": 3, "fine_tune_from": "block2_conv1"},
     ("bfloat16", 3, "block2_conv1", 1e-5, 0)),
    # ... block5 in float32 on AMX is as slow as anywhere without bfloat16.
    (("amx_bf16",), {"fine_tune_epochs": 5, "fine_tune_from": "block5_conv1",
                     "precision": "float32"},
     ("float32", 5, "block5_conv1", 1e-5, 0)),
    ((), {"fine_tune_epochs": 3, "fine_tune_from": WHOLE},
     ("float32", 3, WHOLE, 3e-5, 0)),
    (("amx_bf16",), {"fine_tune_learning_rate": 2e-5},
     ("bfloat16", 3, WHOLE, 2e-5, 0)),
    # Asked-for folds are kept; a cv report stands in for them.
    (("amx_bf16",), {"cv_folds": 5}, ("bfloat16", 3, WHOLE, 3e-5, 5)),
    ((), {"cv_report": "cv.json"}, ("float32", 0, None, 1e-5, 0)),
])
def test_auto_fine_tune_follows_how_fast_bfloat16_runs(
    monkeypatch, flags, asked, expected):
  monkeypatch.setattr(model_lib, "_gpu_bfloat16", lambda: None)
  monkeypatch.setattr(precision_lib, "cpu_bfloat16_flags",
                      lambda *args: flags)
  config = recipe.train_resolved(TrainConfig(data=("x",), output="x",
                                             **asked))
  assert (config.precision, config.fine_tune_epochs, config.fine_tune_from,
          config.fine_tune_learning_rate, config.cv_folds) == expected
  # Resolving is done once and for all: a resolved config stays as it is.
  assert recipe.train_resolved(config) == config
  # cv resolves the recipe alone: no folds of train's to decide.
  assert recipe.resolved(TrainConfig(data=("x",), output="x", **asked)
                        ) == dataclasses.replace(config,
                                                 cv_folds=asked.get("cv_folds"))


def test_on_a_gpu_train_still_cross_validates_the_whole_base(monkeypatch):
  monkeypatch.setattr(model_lib, "_gpu_bfloat16", lambda: "NVIDIA H100")
  config = recipe.train_resolved(TrainConfig(data=("x",), output="x"))
  assert (config.precision, config.fine_tune_epochs, config.fine_tune_from,
          config.fine_tune_learning_rate, config.cv_folds) == (
              "bfloat16", 3, WHOLE, 3e-5, 5)


@pytest.mark.slow
def test_default_train_on_amx_fine_tunes_the_whole_base_without_folds(
    tmp_path, records_glob, monkeypatch, caplog):
  monkeypatch.setattr(precision_lib, "cpu_bfloat16_flags",
                      lambda *args: ("amx_bf16", "avx512_bf16"))
  output = str(tmp_path / "model")
  # Only what a test must pin: the tiny backbone, few epochs and views.
  assert cli.main(["train", "--data", records_glob,
                   "--output", output, "--backbone", "tiny",
                   "--backbone_weights", "none", "--epochs", "2",
                   "--augment_views", "1", "--batch_size", "8"]) == 0
  assert "No cross-validation in this run (auto)" in caplog.text
  with open(os.path.join(output, schemas.METADATA_FILE)) as f:
    metadata = json.load(f)
  training = metadata["training"]
  assert (training["precision"], training["fine_tune_epochs"],
          training["fine_tune_from"], training["fine_tune_learning_rate"],
          training["cv_folds"]) == ("bfloat16", 3, "block1_conv1", 3e-5, 0)
  assert training["epochs_run"]["fine_tune"] >= 1
  assert metadata["cross_validation"] is None
  assert not os.path.exists(os.path.join(output, schemas.CV_REPORT_FILE))
  with open(os.path.join(output, schemas.MODEL_CARD_FILE)) as f:
    assert ("or auto where five more fine-tunes like this one would not"
            " fit") in f.read()


def test_fine_tune_epochs_flag_takes_auto_or_a_number(capsys):
  base = ["cv", "--data", "x"]
  parser = cli._parser()  # pylint: disable=protected-access
  assert parser.parse_args(base).fine_tune_epochs is None
  assert parser.parse_args(base + ["--fine_tune_epochs", "AUTO"]
                          ).fine_tune_epochs is None
  assert parser.parse_args(base + ["--fine_tune_epochs", "3"]
                          ).fine_tune_epochs == 3
  with pytest.raises(SystemExit):
    parser.parse_args(base + ["--fine_tune_epochs", "five"])
  assert "'five': a whole number of epochs, or auto" in capsys.readouterr().err
  # --fine_tune_from needs epochs asked for: auto may run none.
  with pytest.raises(ValueError, match="auto may run none"):
    TrainConfig(data=("x",), output="x",
                fine_tune_from="block5_conv3").validate()
