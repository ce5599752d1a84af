"""The benchmark scripts run end to end on tiny inputs and report sane figures.

Speed is not asserted here (benchmarks print figures; see README): these
tests only keep `python -m bench` working.
"""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

import schemas
from bench import __main__ as bench_main
from bench import (codec_bench, non_us_archive, preprocess_bench, quality_bench,
                   scoring_bench, tfrecord_bench)
from training import testing


def _write_records(tmp_path, image_size: int) -> str:
  """Six synthetic images of each class as one TFRecord file in tmp_path;
  its glob."""
  glob = str(tmp_path / "*.tfrecord.gz")
  testing.write_tfrecords(str(tmp_path / "part-00000-of-00001.tfrecord.gz"),
                          testing.synthetic_records(per_class=6,
                                                    image_size=image_size,
                                                    seed=1))
  return glob


@pytest.mark.parametrize("png_channels", [1, 3])
@pytest.mark.slow
def test_preprocess_bench_measures_both_sides(tmp_path, png_channels):
  figures = preprocess_bench.run(str(tmp_path), count=24, image_size=16,
                                 repeats=2, png_channels=png_channels)
  assert figures["images"] == 24 and figures["png_channels"] == png_channels
  assert figures["bare_ms_per_image"] > 0
  assert len(figures["ratio_stage_to_bare_each_round"]) == 2
  assert figures["ratio_whole_run_to_bare"] > 0


@pytest.mark.slow
def test_scoring_bench_scores_every_image(tmp_path):
  model_dir = str(tmp_path / "model")
  testing.make_test_artifact(model_dir, image_size=16)
  figures = scoring_bench.run(str(tmp_path), count=16, batch_size=4,
                              repeats=1, model_dir=model_dir,
                              batch_sizes=(2, 4))
  assert set(figures["bare_images_per_s"]) == {"2", "4"}
  assert set(figures["bare_images_per_s"]["4"]) == {
      "compiled_tf_function", "eager_model_call", "keras_predict"}
  assert figures["end_to_end_images_per_s_whole_run"] > 0
  assert figures["peak_rss_mb_scoring_run"] > 100  # TensorFlow alone


def test_tfrecord_bench_times_both_readers(tmp_path):
  figures = tfrecord_bench.run(str(tmp_path), records=40, image_size=16,
                               repeats=1, resync_megabytes=1)
  for kind in ("gzip", "plain"):
    assert figures[kind]["beam_mb_per_s"] > 0
    assert figures[kind]["fail_small_mb_per_s"] > 0
  assert figures["shard_mb_at_2000_records_rgb"] > 0
  assert figures["resync_search_mb_per_s"] > 0
  json.dumps(figures)


def test_codec_bench_times_both_encoders():
  figures = codec_bench.run(count=6, image_size=16, repeats=1, stage_count=3)
  for kind in ("grey", "rgb"):
    row = figures[kind]
    assert set(row["encode_ms"]) == {"hand_written", "generated"}
    assert all(v > 0 for v in row["stage_ms_per_image"].values())
    assert row["decode_ms"]["generated"] > 0
  assert figures["decision"]
  json.dumps(figures)


def test_quality_bench_times_check_and_decode():
  figures = quality_bench.run(count=3, size=64, image_size=16, repeats=1)
  for kind, stored, flagged in (("grey", 1, {}),
                                ("colour", 3, {"colour": 3})):
    row = figures[kind]
    assert row["stored_channels"] == stored
    assert row["decode_and_resize_ms"] > 0 and row["quality_check_ms"] > 0
    assert row["images_flagged"] == {**flagged, "tiny": 3}  # 64 px originals
  json.dumps(figures)


def test_precision_cost_compares_against_float32(tmp_path):
  model_dir = str(tmp_path / "model")
  testing.make_test_artifact(model_dir, image_size=16)
  figures = bench_main.precision_cost(model_dir, count=8, repeats=1,
                                      batch_size=4)
  assert figures["images"] == 8
  for precision in ("bfloat16", "float16"):
    row = figures[precision]
    assert "error" not in row, row
    assert 0 <= row["changed_predictions"] <= 8
    assert row["max_probability_difference"] < 0.5
  json.dumps(figures)


@pytest.mark.slow
def test_recipe_search_runs_each_variant_on_one_cache(tmp_path):
  from bench import recipe_search  # pylint: disable=import-outside-toplevel
  figures = recipe_search.run(
      [_write_records(tmp_path, 16)], "none",
      {"plain": {"augment_views": 0, "epochs": 3, "val_fraction": 0.4},
       "views": {"augment_views": 1, "epochs": 3, "val_fraction": 0.4,
                 "fine_tune_epochs": 1}},
      folds=2, backbone="tiny", batch_size=8)
  assert set(figures["variants"]) == {"plain", "views"}
  for row in figures["variants"].values():
    assert row["summary"]["macro_f1"]["n"] == 2
    assert row["pooled"]["count"] == 18
    assert isinstance(row["warnings"], list)  # cv's per-fold findings
  assert figures["variants"]["views"]["epochs_run"][0]["fine_tune"] == 1


@pytest.mark.parametrize("field,values", [
    ("degrade", (False, True)), ("annotate", (False, True)),
    ("depth", (False, True)), ("precision", ("float32", "bfloat16"))])
def test_recipe_search_refuses_variants_with_other_views(tmp_path, field,
                                                         values):
  # One cache holds one set of views, computed one way: a variant that draws
  # or computes others would be trained on the first's.
  from bench import recipe_search  # pylint: disable=import-outside-toplevel
  flags = {"augment_views": 3, "epochs": 1}
  with pytest.raises(ValueError, match="same degrade, annotate, depth and"
                     " training_precision"):
    recipe_search.run([_write_records(tmp_path, 8)], "none",
                      {"a": dict(flags, **{field: values[0]}),
                       "b": dict(flags, **{field: values[1]})},
                      folds=2, backbone="tiny")


@pytest.mark.slow
def test_cv_seeds_repeats_cv_with_other_heads(tmp_path):
  from bench import cv_seeds  # pylint: disable=import-outside-toplevel
  from training import cv  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  data = [_write_records(tmp_path, 32)]
  flags = {"augment_views": 1, "epochs": 3, "val_fraction": 0.4,
           "network_size": 48}
  figures = cv_seeds.run(data, seeds=2, folds=2, backbone="tiny", **flags)
  assert figures["settings"]["network_size"] == 48
  assert len(figures["seeds"]) == 2
  # Seed 0 is cv itself with the same flags.
  report = cv.cross_validate(
      TrainConfig(data=tuple(data), output="", backbone="tiny",
                  backbone_weights="none", **flags), 2)
  for name in cv_seeds.FIGURES:
    assert figures["seeds"][0][name] == pytest.approx(
        report["summary"][name]["mean"], abs=1e-9), name
  assert figures["seeds"][0]["pooled_flagged_share"] == pytest.approx(
      report["pooled"]["flagged_share"])
  # The other seed starts from another head, so it trains differently.
  assert figures["seeds"][1] != figures["seeds"][0]
  assert figures["mean"]["macro_f1"] == pytest.approx(
      np.mean([row["macro_f1"] for row in figures["seeds"]]))


def test_cv_seeds_passes_the_recipe_flags_given_and_no_others(monkeypatch):
  from bench import cv_seeds  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(cv_seeds, "run",
                      lambda *args, **kwargs: calls.append(kwargs) or {})
  assert cv_seeds.main(["--data", "x", "--fine_tune_epochs", "5",
                        "--fine_tune_from", "block4_conv1",
                        "--fine_tune_learning_rate", "3e-5",
                        "--fine_tune_schedule", "cosine", "--ema_momentum",
                        "0.99", "--fine_tune_ema_momentum", "0"]) == 0
  assert calls[-1] == {"threshold_rules": [], "fine_tune_epochs": 5,
                       "fine_tune_from": "block4_conv1",
                       "fine_tune_learning_rate": 3e-5,
                       "fine_tune_schedule": "cosine", "ema_momentum": 0.99,
                       "fine_tune_ema_momentum": 0.0}
  assert cv_seeds.main(["--data", "x"]) == 0
  assert calls[-1] == {"threshold_rules": []}  # TrainConfig's defaults
  with pytest.raises(SystemExit):
    cv_seeds.main(["--data", "x", "--fine_tune_schedule", "linear"])


def test_cv_seeds_compares_threshold_rules_on_the_same_fits(tmp_path):
  from bench import cv_seeds  # pylint: disable=import-outside-toplevel
  figures = cv_seeds.run([_write_records(tmp_path, 32)], seeds=1, folds=2,
                         backbone="tiny", augment_views=1, epochs=3,
                         val_fraction=0.4, target_accuracy=0.7,
                         threshold_rules=["observed", "expected"])
  observed, expected = (figures["by_rule"][r]["seeds"][0]
                        for r in ("observed", "expected"))
  assert figures["seeds"][0] == observed  # the first rule's
  for rule in ("observed", "expected"):
    assert figures["by_rule"][rule]["fold_rules"] == [[rule, rule]]
  # The same fits: every figure but the flagging is the same.
  for name in ("macro_f1", "accuracy", "ece", "auc_malignant"):
    assert observed[name] == expected[name], name
  for row in (observed, expected):
    assert 0 <= row["short_folds"] <= 2
    assert 0.0 <= row["pooled_flagged_share"] <= 1.0


def test_ood_bench_measures_both_ways():
  from bench import ood_bench  # pylint: disable=import-outside-toplevel
  figures = ood_bench.run(count=8, batch_size=4, repeats=1, image_size=16,
                          backbone="tiny")
  assert set(figures["ms_per_image"]) == {"probabilities_only",
                                          "probabilities_and_ood"}
  assert all(v > 0 for v in figures["ms_per_image"].values())
  assert figures["feature_dims"] == 16
  assert figures["quadratic_form_ms_per_image"] > 0


def test_conv_cache_bench_measures_both_ways():
  from bench import conv_cache_bench  # pylint: disable=import-outside-toplevel
  figures = conv_cache_bench.run(count=6, batch_size=4, repeats=1,
                                 image_size=16, backbone="tiny",
                                 project_images=10, network_size=24,
                                 fine_tune_rows=8)
  assert figures["network_size"] == 24
  assert set(figures["images_per_s"]) == {"predict", "traced_call",
                                          "traced_call_bfloat16"}
  assert all(v > 0 for v in figures["images_per_s"].values())
  # Both float32 ways compute the same features (a short last batch
  # included); bfloat16 close to them, not the same.
  assert figures["max_abs_difference"] < 1e-5
  assert 0 < figures["bfloat16_max_relative_difference"] < 0.05
  assert figures["auto_precision"] == "float32"  # conftest: no bf16 flags
  fine_tune = figures["fine_tune"]
  assert fine_tune["rows"] == 8 and fine_tune["layers"] == ["block5_conv3"]
  assert set(fine_tune["rows_per_s"]) == {"float32", "bfloat16"}
  assert all(v > 0 for v in fine_tune["rows_per_s"].values())
  projected = figures["projected_conv_pass_s"]
  assert projected["traced_call"] == pytest.approx(
      10 * figures["default_views"] / figures["images_per_s"]["traced_call"],
      rel=0.01, abs=0.006)


@pytest.mark.slow
def test_stage_rows_bench_runs_both_ways_in_processes_of_their_own():
  from bench import stage_rows_bench  # pylint: disable=import-outside-toplevel
  figures = stage_rows_bench.run(images=6, views=3, epochs=2,
                                 backbone="tiny", image_size=16)
  assert figures["fine_tune_from"] == "block1_conv1"  # the whole tiny base
  for mode in stage_rows_bench.MODES:
    (one,) = figures["runs"][mode]
    assert one["mode"] == mode and one["rows"] == 18
    assert len(one["epoch_s"]) == 2 and all(s >= 0 for s in one["epoch_s"])
    assert one["peak_rss_mb"] >= one["cache_rss_mb"] > 0
    assert figures[mode]["epoch_s"] == one["epoch_s"][1]
  assert figures["peak_saved_mb"] == (figures["stacked"]["peak_rss_mb"]
                                      - figures["streamed"]["peak_rss_mb"])


def test_non_us_archive_without_extra_packages(tmp_path, monkeypatch):
  # As if scikit-image, scikit-learn and pydicom were not installed, whatever
  # this environment holds.
  monkeypatch.setattr(non_us_archive, "_package_dir", lambda module: None)
  first = non_us_archive.run(str(tmp_path / "a" / "non_us.zip"))
  second = non_us_archive.run(str(tmp_path / "b" / "non_us.zip"))
  assert len(first["skipped"]) == 3
  for package in ("scikit-image", "scikit-learn", "pydicom"):
    assert any(note.startswith(package) for note in first["skipped"])
  assert first["images"] == sum(first["per_kind"].values()) >= 20
  assert {"chart", "text_document", "ui_screenshot", "ct_mr"} <= set(
      first["per_kind"])
  with open(first["zip"], "rb") as a, open(second["zip"], "rb") as b:
    assert a.read() == b.read()
  with open(first["manifest"]) as a, open(second["manifest"]) as b:
    manifest = a.read()
    assert manifest == b.read()
  assert first["manifest"] == str(tmp_path / "a" / "non_us.manifest.tsv")
  rows = [line.split("\t") for line in manifest.splitlines()[1:]]
  with zipfile.ZipFile(first["zip"]) as zf:
    members = zf.namelist()
    assert members == sorted(members) == [row[0] for row in rows]
    assert len(members) == first["images"]
    for member in members:
      assert member.startswith("other/") and member.endswith(".png")
      with Image.open(io.BytesIO(zf.read(member))) as image:
        image.load()
        assert image.format == "PNG" and image.mode in ("L", "RGB")
  assert all(len(row) == 3 and row[1] and row[2] for row in rows)


def test_recipe_search_keeps_its_documented_rows_at_balanced_weights():
  # training/README.md's comparison table was measured before the
  # malignant weight existed; only the row named for today's default uses it.
  from bench import recipe_search  # pylint: disable=import-outside-toplevel
  from training import config as config_lib  # pylint: disable=import-outside-toplevel
  defaults = [name for name, flags in recipe_search.DEFAULT_VARIANTS.items()
              if "malignant_weight" not in flags]
  assert defaults == ["head-only default of 2026-12-04: mirror and 6 random"
                      " views, malignant weight 2"]
  assert config_lib.DEFAULT_MALIGNANT_WEIGHT == 2.0
  for name, flags in recipe_search.DEFAULT_VARIANTS.items():
    if name not in defaults:
      assert flags["malignant_weight"] == 1.0, name
    # As they ran: float32, and no fine-tune stage unless the row is about
    # one (today's auto would fine-tune on a CPU with AMX).
    assert flags["precision"] == "float32", name
    assert flags["fine_tune_epochs"] == (5 if "block5" in name else 0), name


def _notop_h5(path):
  """A file in the offline VGG16 notop layout (NAME/NAME_W_1:0, …_b_1:0);
  tiny arrays: export copies them, it does not check shapes."""
  import h5py  # pylint: disable=import-outside-toplevel
  from bench import torch_finetune  # pylint: disable=import-outside-toplevel
  with h5py.File(path, "w") as f:
    for i, name in enumerate(torch_finetune.CONVS):
      group = f.create_group(name)
      group[f"{name}_W_1:0"] = np.full((1, 1, 1, 2), i, np.float32)
      group[f"{name}_b_1:0"] = np.full((2,), -i, np.float32)
  return str(path)


def test_torch_finetune_exports_cv_folds_and_scores_with_cv_code(tmp_path):
  from bench import torch_finetune  # pylint: disable=import-outside-toplevel
  from training import cv, split, testing  # pylint: disable=import-outside-toplevel
  records = testing.synthetic_records(6, 16)
  glob = testing.write_tfrecords(str(tmp_path / "a.tfrecord.gz"), records)
  out = str(tmp_path / "export")
  summary = torch_finetune.export([glob], _notop_h5(tmp_path / "w.h5"), out,
                                  folds=3)
  assert summary["images"] == 18 and summary["folds"] == 3
  data = np.load(os.path.join(out, torch_finetune.DATA_FILE))
  weights = np.load(os.path.join(out, torch_finetune.WEIGHTS_FILE))
  assert len(weights.files) == 26
  assert weights["block5_conv3/W"].dtype == np.float16
  assert float(weights["block5_conv3/b"][0]) == -12.0
  role, labels = data["role"], data["labels"]
  # Every image is tested in exactly one fold, in cv's own fold.
  assert ((role == 2).sum(axis=0) == 1).all()
  names = list(schemas.LABELS)
  ids = sorted(r.image_id for r in records)
  by_id = {r.image_id: r for r in records}
  hashes = [split.dhash(by_id[i].pixels) for i in ids]
  folds = cv.assign_folds(ids, [by_id[i].label for i in ids],
                          split.duplicate_groups(ids, hashes), 3, 0)
  np.testing.assert_array_equal(np.argmax(role == 2, axis=0), folds)
  assert [names[i] for i in labels] == [by_id[i].label for i in ids]
  assert (role == 1).any(axis=1).all()  # each fold has validation images

  # Logits right for every image, their mirror images' reversed: cv's
  # figures, and "+flip" from the averages.
  results = {}
  for k in range(3):
    for part, code in (("val", 1), ("test", 2)):
      indices = np.flatnonzero(role[k] == code)
      logits = 4.0 * np.eye(3)[labels[indices]]
      results[f"head/{k}/{part}"] = indices
      results[f"head/{k}/{part}_logits"] = logits
      results[f"head/{k}/{part}_mirror_logits"] = logits[:, ::-1].copy()
  np.savez(str(tmp_path / "r.npz"), **results)
  report = torch_finetune.score(out, str(tmp_path / "r.npz"))
  assert set(report) == {"head", "head+flip"}
  assert report["head"]["summary"]["macro_f1"]["mean"] == 1.0
  assert report["head"]["macro_f1_per_fold"] == [1.0, 1.0, 1.0]
  # Averaged with reversed logits, normal and malignant tie and benign wins.
  assert report["head+flip"]["summary"]["recall_benign"]["mean"] == 1.0
  assert report["head+flip"]["summary"]["macro_f1"]["mean"] < 1.0
  assert "head+flip" in torch_finetune.format_table(report)


def test_torch_finetune_run_needs_no_project_module_and_mirrors_the_recipe():
  # `run` goes to GPU machines with numpy and PyTorch only: loading the file
  # must not import TensorFlow, Keras or this project's packages.
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from bench import torch_finetune  # pylint: disable=import-outside-toplevel
  from training import config as config_lib  # pylint: disable=import-outside-toplevel
  script = (
      "import importlib.util, sys\n"
      f"spec = importlib.util.spec_from_file_location('t', {torch_finetune.__file__!r})\n"
      "module = importlib.util.module_from_spec(spec)\n"
      "spec.loader.exec_module(module)\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] in"
      " ('tensorflow', 'keras', 'training', 'schemas', 'beam_pipeline',"
      " 'busi_core', 'apache_beam')))\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=True, cwd="/")
  assert out.stdout.strip() == "[]", out.stdout
  # Its constants are the default recipe's.
  assert torch_finetune.VIEWS == 1 + config_lib.DEFAULT_AUGMENT_VIEWS
  assert torch_finetune.MALIGNANT_WEIGHT == config_lib.DEFAULT_MALIGNANT_WEIGHT
  assert torch_finetune.LABEL_SMOOTHING == config_lib.DEFAULT_LABEL_SMOOTHING
  assert torch_finetune.HEAD_EPOCHS == config_lib.DEFAULT_EPOCHS
  assert torch_finetune.HEAD_PATIENCE == config_lib.DEFAULT_PATIENCE
  assert torch_finetune.CONVS == list(schemas.VGG16_CONV_LAYERS)


def test_scanner_shifts_are_deterministic_and_change_the_image():
  from bench import scanner_shift  # pylint: disable=import-outside-toplevel
  image = testing.class_images(2, 1, 64, np.random.default_rng(3))[0]
  for kind in scanner_shift.SHIFTS:
    out = scanner_shift.shift(image, kind)
    assert out.dtype == np.uint8 and out.shape == image.shape, kind
    assert not np.array_equal(out, image), kind
    np.testing.assert_array_equal(out, scanner_shift.shift(image, kind))
  with pytest.raises(ValueError, match="unknown shift"):
    scanner_shift.shift(image, "colour")


def test_scanner_shift_zoomin_magnifies_from_the_top_edge():
  from bench import scanner_shift  # pylint: disable=import-outside-toplevel
  # A bright square in a 100-pixel frame: rows 20-39, columns 30-49.
  image = np.zeros((100, 100, 3), np.uint8)
  image[20:40, 30:50] = 255
  rows, columns = np.nonzero(scanner_shift.shift(image, "zoomin")[..., 0]
                             > 127)
  # Rows scale from the top edge (y' = 1.3 y), columns from the centre
  # (x' = 49.5 + 1.3 (x - 49.5)): the square grows and moves down and out.
  scale, centre = scanner_shift.ZOOMIN, 49.5
  assert rows.min() == pytest.approx(20 * scale, abs=1)
  assert rows.max() == pytest.approx(39 * scale, abs=1)
  assert columns.min() == pytest.approx(centre + scale * (30 - centre), abs=1)
  assert columns.max() == pytest.approx(centre + scale * (49 - centre), abs=1)
  # Every output pixel comes from inside the frame: no border is drawn in.
  grey = np.full((100, 80, 3), 90, np.uint8)
  np.testing.assert_array_equal(scanner_shift.shift(grey, "zoomin"), grey)


def test_scanner_shift_seed_reaches_the_recipe(monkeypatch):
  """--seed is cv's seed in both modes: it reaches the TrainConfig."""
  from bench import cv_seeds, scanner_shift  # pylint: disable=import-outside-toplevel
  seen = []

  def setup(data, backbone_weights, backbone, recipe_flags):
    seen.append(recipe_flags["seed"])
    raise RuntimeError("stop here")

  monkeypatch.setattr(cv_seeds, "setup", setup)
  for argv in (["--seed", "3"], ["--seed", "4", "--full_recipe"]):
    with pytest.raises(RuntimeError, match="stop here"):
      scanner_shift.main(["--data", "x", "--backbone_weights", "none"]
                         + argv)
  assert seen == [3, 4]


def _check_confusions(row, data):
  """Each set's summed confusion matrix holds every image once, in
  its true class's row; the recalls (fold means) are kept for every class,
  and the recalls table reports the matrices."""
  from bench import scanner_shift  # pylint: disable=import-outside-toplevel
  from training import data as data_lib  # pylint: disable=import-outside-toplevel
  labels = data_lib.load_labelled(data, list(schemas.LABELS))[0].labels
  counts = np.bincount(labels, minlength=len(schemas.LABELS))
  for s in scanner_shift.SETS:
    matrix = np.asarray(row[s][scanner_shift.CONFUSION])
    assert matrix.shape == (len(schemas.LABELS),) * 2, s
    np.testing.assert_array_equal(matrix.sum(axis=1), counts, err_msg=s)
    for figure in ("recall_malignant", "recall_benign", "recall_normal"):
      assert 0.0 <= row[s][figure] <= 1.0, (s, figure)
  # The table names the columns, and gives each set its missed malignant
  # images by the class they went to, in the order it names.
  header, _, line = scanner_shift.format_recalls({"r": row}).splitlines()
  assert "recall malignant / benign / normal;" in header
  assert "missed malignant → benign / normal" in header
  missed = row["zoomout"][scanner_shift.CONFUSION][
      schemas.LABELS.index(schemas.MALIGNANT)]
  to_benign = missed[schemas.LABELS.index("benign")]
  to_normal = missed[schemas.LABELS.index("normal")]
  cell = line.split(" | ")[1 + scanner_shift.SETS.index("zoomout")]
  assert cell.endswith(f"; {to_benign} / {to_normal}"), cell
  recalls = cell.split(";")[0].split(" / ")
  assert recalls == [f"{row['zoomout'][f'recall_{n}']:.3f}"
                     for n in ("malignant", "benign", "normal")], cell


def test_scanner_shift_seed_means_average_figures_and_sum_confusions():
  """Over head seeds each figure is averaged (None where a seed has none)
  and the confusion matrices are summed: every image once a seed."""
  from bench import scanner_shift  # pylint: disable=import-outside-toplevel

  def row(value, diagonal, auc=0.8):
    figures = dict.fromkeys(scanner_shift.FIGURES, value)
    figures["auc_malignant"] = auc
    figures[scanner_shift.CONFUSION] = (np.eye(3, dtype=int) * diagonal
                                        + 1).tolist()
    return {s: figures for s in scanner_shift.SETS}
  mean = scanner_shift.seed_means([row(0.5, 2), row(0.7, 4, auc=None)])
  assert set(mean) == set(scanner_shift.SETS)
  for s in scanner_shift.SETS:
    assert mean[s]["recall_benign"] == pytest.approx(0.6)
    assert mean[s]["auc_malignant"] == pytest.approx(0.8)
    assert mean[s][scanner_shift.CONFUSION] == [[8, 2, 2], [2, 8, 2],
                                                [2, 2, 8]]


@pytest.mark.slow
def test_scanner_shift_full_recipe_scores_cvs_fine_tuned_folds(tmp_path):
  """--full_recipe runs cv itself, fine-tune stage included: as stored it
  gives cv's own figures, and each fold's fine-tuned model (not the frozen
  base's features) scores the shifted images."""
  from bench import scanner_shift  # pylint: disable=import-outside-toplevel
  from training import cv  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  data = [_write_records(tmp_path, 32)]
  flags = {"augment_views": 3, "epochs": 2, "val_fraction": 0.4,
           "fine_tune_epochs": 1, "fine_tune_from": "block1_conv1",
           "fine_tune_learning_rate": 1e-2}
  name = scanner_shift.DEFAULT_RECIPE
  figures = scanner_shift.run_full(data, backbone="tiny", folds=2, **flags)
  assert list(figures["mean"]) == [name]
  report = cv.cross_validate(
      TrainConfig(data=tuple(data), output="", backbone="tiny",
                  backbone_weights="none", **flags), 2)
  row = figures["mean"][name]
  assert set(row) == set(scanner_shift.SETS)
  for figure in scanner_shift.FIGURES:
    assert row["as_stored"][figure] == pytest.approx(
        report["summary"][figure]["mean"], abs=1e-9), figure
  assert (row["as_stored"][scanner_shift.CONFUSION]
          == report["pooled"]["confusion_matrix"])
  _check_confusions(row, data)
  assert figures["cv"][name]["max_probability_difference"] < 1e-4
  # The fine-tune stage ran in every fold (its seconds are recorded).
  assert all("fine_tune" in "".join(seconds)
             for seconds in figures["cv"][name]["fold_seconds"]), figures
  # The shifted sets are scored: figures differ from the images as stored
  # for at least one shift (the same numbers everywhere would mean the
  # shifted images never reached the model).
  assert any(row[s]["macro_f1"] != row["as_stored"]["macro_f1"]
             or row[s]["ece"] != row["as_stored"]["ece"]
             for s in scanner_shift.SHIFTS)
  with pytest.raises(ValueError, match=r"recipes \['annotate'\] not among"):
    scanner_shift.run_full(data, backbone="tiny", recipes=["annotate"],
                           **flags)


def test_scanner_shift_full_recipe_refuses_heads_only_flags(monkeypatch):
  from bench import scanner_shift  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(scanner_shift, "run_full",
                      lambda *a, **flags: seen.append(flags) or {})
  scanner_shift.main(["--data", "x", "--full_recipe"])
  assert seen[0]["recipes"] == [scanner_shift.DEFAULT_RECIPE]
  assert seen[0]["seed"] == 0
  scanner_shift.main(["--data", "x", "--full_recipe", "--seed", "1"])
  assert seen[1]["seed"] == 1  # cv's --seed: another draw
  for flag in (["--seeds", "2"], ["--view_seed", "1"], ["--cache", "c"]):
    with pytest.raises(SystemExit):
      scanner_shift.main(["--data", "x", "--full_recipe"] + flag)
  assert len(seen) == 2


def test_scanner_shift_passes_the_threshold_rule(monkeypatch):
  """--threshold_rule reaches the recipe (default: train's); a misspelt
  rule is refused."""
  from bench import scanner_shift  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(scanner_shift, "run",
                      lambda *a, **flags: seen.append(flags) or {})
  scanner_shift.main(["--data", "x"])
  scanner_shift.main(["--data", "x", "--threshold_rule", "observed"])
  assert [f["threshold_rule"] for f in seen] == [
      schemas.DEFAULT_THRESHOLD_RULE, schemas.THRESHOLD_RULE_OBSERVED]
  assert [f["seed"] for f in seen] == [0, 0]
  scanner_shift.main(["--data", "x", "--seed", "2"])
  assert seen[-1]["seed"] == 2
  with pytest.raises(SystemExit):
    scanner_shift.main(["--data", "x", "--threshold_rule", "observd"])


@pytest.mark.slow
def test_scanner_shift_scores_cvs_folds_of_each_recipe(tmp_path):
  from bench import scanner_shift  # pylint: disable=import-outside-toplevel
  from training import cv  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  data = [_write_records(tmp_path, 32)]
  flags = {"augment_views": 3, "epochs": 3, "val_fraction": 0.4}
  cache = str(tmp_path / "features")
  figures = scanner_shift.run(data, backbone="tiny", seeds=1, folds=2,
                              cache=cache, **flags)
  # The images as stored, head seed 0: cv's own figures for each recipe.
  for name, (degrade, annotate, depth) in scanner_shift.RECIPES.items():
    report = cv.cross_validate(
        TrainConfig(data=tuple(data), output="", backbone="tiny",
                    backbone_weights="none", degrade=degrade,
                    annotate=annotate, depth=depth, **flags), 2)
    row = figures["recipes"][name][0]["as_stored"]
    for figure in ("macro_f1", "auc_malignant", "recall_benign", "ece"):
      assert row[figure] == pytest.approx(
          report["summary"][figure]["mean"], abs=1e-9), (name, figure)
    assert set(figures["recipes"][name][0]) == set(scanner_shift.SETS)
    assert (row[scanner_shift.CONFUSION]
            == report["pooled"]["confusion_matrix"]), name
    _check_confusions(figures["mean"][name], data)
  # View 3 is the one degraded, views 2 and 3 the annotated: each recipe
  # has its own features there, and shares the rest.
  keys = set(np.load(cache + ".npz"))  # the suffix np.savez adds
  assert {"view3_seed0", "view3_seed0_degraded", "shift_zoomout",
          "view2_seed0_annotated", "view3_seed0_annotated_degraded",
          "view3_seed0_annotated_degraded_deep", "shift_annotate"} <= keys
  # A rerun reads the features back instead of computing them.
  again = scanner_shift.run(data, backbone="tiny", seeds=1, folds=2,
                            cache=cache, **flags)
  assert again["mean"] == figures["mean"]
  # Features of other views are not taken from it.
  with pytest.raises(ValueError, match="other data, weights or views"):
    scanner_shift.run(data, backbone="tiny", seeds=1, folds=2, cache=cache,
                      **dict(flags, augment_views=1))
  # Nor those of another seed's backbone: without a weights file the
  # backbone is drawn from the seed.
  with pytest.raises(ValueError, match="other data, weights or views"):
    scanner_shift.run(data, backbone="tiny", seeds=1, folds=2, cache=cache,
                      **dict(flags, seed=1))
  assert ("| degrade + annotate + depth (default) |"
          in scanner_shift.format_table(again["mean"]))
  # One recipe alone: its figures as in the full run, from the same cache.
  one = scanner_shift.run(data, backbone="tiny", seeds=1, folds=2,
                          cache=cache, recipes=["degrade"], **flags)
  assert list(one["mean"]) == ["degrade"]
  assert one["settings"]["recipes"] == {
      "degrade": {"degrade": True, "annotate": False, "depth": False}}
  assert one["mean"]["degrade"] == figures["mean"]["degrade"]
  with pytest.raises(ValueError, match=r"recipes \['annotate'\] not among"):
    scanner_shift.run(data, backbone="tiny", recipes=["annotate"], **flags)
