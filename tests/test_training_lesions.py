"""`evaluate --masks`: Grad-CAM against BUSI lesion masks (training/lesions.py)."""

import json
import os
import zipfile

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from beam_pipeline import pipeline
from busi_core import archives, imaging
from schemas import evaluation as evaluation_schema
from tests import archive_factory as af
from training import cli, evaluate, lesion_masks, lesions
from busi_core import artifact
from training import saving
from training import model as model_lib
from busi_core.errors import MemberError

ROOT = "Dataset_BUSI_with_GT"


# --- pointing game and IoU on hand-made arrays -------------------------------

def test_pointing_hit_is_the_peak_inside_the_lesion():
  heatmap = np.zeros((4, 4), np.float32)
  heatmap[1, 2] = 1.0
  heatmap[3, 3] = 0.9
  lesion = np.zeros((4, 4), bool)
  lesion[1, 2] = True
  assert lesions.pointing_hit(heatmap, lesion)
  lesion[1, 2], lesion[3, 3] = False, True  # on the runner-up only
  assert not lesions.pointing_hit(heatmap, lesion)
  # Tied peaks: the first in row-major order decides.
  heatmap[3, 3] = 1.0
  assert not lesions.pointing_hit(heatmap, lesion)
  # A blank heatmap points nowhere, even at a lesion in the corner argmax
  # would name.
  corner = np.zeros((4, 4), bool)
  corner[0, 0] = True
  assert not lesions.pointing_hit(np.zeros((4, 4), np.float32), corner)
  with pytest.raises(ValueError, match="shape"):
    lesions.pointing_hit(heatmap, np.zeros((4, 5), bool))


def test_iou_of_the_half_peak_region():
  heatmap = np.array([[0.0, 0.5, 1.0],
                      [0.0, 0.49, 0.7],
                      [0.0, 0.0, 0.0]], np.float32)
  lesion = np.array([[0, 0, 1],
                     [0, 1, 0],
                     [0, 0, 0]], bool)
  # Region {>= 0.5}: (0,1), (0,2), (1,2); lesion (0,2), (1,1): 1 of 4.
  assert lesions.iou(heatmap, lesion) == pytest.approx(1 / 4)
  assert lesions.iou(heatmap, heatmap >= 0.5) == 1.0
  assert lesions.iou(heatmap, np.zeros((3, 3), bool)) == 0.0
  assert lesions.iou(np.zeros((3, 3)), np.zeros((3, 3), bool)) == 0.0
  assert lesions.iou(heatmap, lesion, threshold=0.4) == pytest.approx(2 / 4)


def test_score_counts_every_image():
  s = lesions.score([True, False, True, True], [0.5, 0.0, 1.0, 0.5],
                    unpaired=2, bad_mask=1)
  assert s == evaluation_schema.LocalisationScore(
      images=7, paired=4, unpaired=2, bad_mask=1, pointing_hit_rate=0.75,
      mean_iou=0.5)
  empty = lesions.score([], [], unpaired=3)
  assert empty.images == 3 and empty.pointing_hit_rate is None
  assert empty.mean_iou is None


def _block(per_class, predicted, **shared):
  """A localisation block of hand-made (hits, ious, unpaired, bad) groups."""
  scores = {label: lesions.score(*group) for label, group in per_class.items()}
  every = list(per_class.values())
  overall = lesions.score([h for g in every for h in g[0]],
                          [i for g in every for i in g[1]],
                          sum(g[2] for g in every), sum(g[3] for g in every))
  fields = dict(explained=evaluation_schema.EXPLAIN_TRUE_CLASS,
                layer=schemas.GRADCAM_LAYER, heatmap_threshold=0.5,
                mask_threshold=127, mask_archives=["busi.zip"], masks_read=9,
                mask_read_errors=1)
  fields.update(shared)
  return evaluation_schema.LesionLocalisation(
      overall=overall, per_class=scores,
      predicted_class=lesions.score(*predicted), **fields)


def test_pool_is_one_score_over_every_folds_images():
  # Fold 0: benign hits 1 of 2, malignant 1 of 1; fold 1: benign none paired
  # (one unpaired), malignant 0 of 4 (one unusable mask). Folds of 3 and 4
  # paired images: a plain mean of their rates would be wrong.
  fold0 = _block({"benign": ([True, False], [0.4, 0.0], 0, 0),
                  "malignant": ([True], [0.8], 0, 0)},
                 ([True, False, False], [0.4, 0.0, 0.1], 0, 0))
  fold1 = _block({"benign": ([], [], 1, 0),
                  "malignant": ([False] * 4, [0.1, 0.2, 0.0, 0.1], 0, 1)},
                 ([False, True, False, False], [0.1, 0.3, 0.0, 0.0], 1, 1))
  pooled = lesions.pool([fold0, fold1])
  # What one score over the seven paired images says: 2 hits of 7.
  assert pooled.overall == evaluation_schema.LocalisationScore(
      images=9, paired=7, unpaired=1, bad_mask=1,
      pointing_hit_rate=pytest.approx(2 / 7), mean_iou=pytest.approx(1.6 / 7))
  assert pooled.per_class["benign"] == lesions.score([True, False],
                                                     [0.4, 0.0], 1, 0)
  assert pooled.per_class["malignant"].pointing_hit_rate == pytest.approx(
      1 / 5)
  assert pooled.per_class["malignant"].mean_iou == pytest.approx(1.2 / 5)
  assert pooled.per_class["malignant"].bad_mask == 1
  assert pooled.predicted_class.pointing_hit_rate == pytest.approx(2 / 7)
  assert pooled.predicted_class.mean_iou == pytest.approx(0.9 / 7)
  assert pooled.masks_read == 9 and pooled.mask_archives == ["busi.zip"]
  # A fold with no paired image adds counts only; pooling one is itself.
  empty = _block({"benign": ([], [], 2, 0)}, ([], [], 2, 0))
  assert lesions.pool([empty]).overall.pointing_hit_rate is None
  assert lesions.pool([fold0, empty]).overall == (
      evaluation_schema.LocalisationScore(
          images=5, paired=3, unpaired=2, bad_mask=0,
          pointing_hit_rate=pytest.approx(2 / 3),
          mean_iou=pytest.approx(0.4)))
  assert lesions.pool([fold0]) == fold0
  with pytest.raises(ValueError, match="mask_archives"):
    lesions.pool([fold0, _block({"benign": ([], [], 1, 0)}, ([], [], 1, 0),
                                mask_archives=["other.zip"])])
  with pytest.raises(ValueError, match="no localisation"):
    lesions.pool([])


# --- pairing, union, resizing --------------------------------------------------

def test_image_key_is_the_member_path_less_extension():
  assert lesions.image_key(f"gs://b/busi.zip!/{ROOT}/benign/benign (1).png"
                          ) == f"{ROOT}/benign/benign (1)"
  # The archive's URI plays no part: a copy elsewhere pairs the same.
  assert lesions.image_key(f"/tmp/copy.tar.gz!/{ROOT}/benign/benign (1).png"
                          ) == f"{ROOT}/benign/benign (1)"
  assert lesions.image_key("/data/benign (1).png") is None


def test_masks_grouped_and_paired_by_member_path():
  stem = f"{ROOT}/benign/benign (1)"
  grouped = lesions.group_masks([
      (stem + "_mask.png", b"a"), (stem + "_mask_1.png", b"b"),
      (stem + "_mask.png", b"copy"),  # the same mask from a second archive
      (f"{ROOT}/malignant/malignant (4)_MASK.png", b"c"),
      (f"{ROOT}/benign/benign (2).png", b"not a mask"),
  ])
  assert grouped == {stem: {stem + "_mask.png": b"a",
                            stem + "_mask_1.png": b"b"},
                     f"{ROOT}/malignant/malignant (4)": {
                         f"{ROOT}/malignant/malignant (4)_MASK.png": b"c"}}
  sources = [f"a.zip!/{stem}.png", f"b.zip!/{ROOT}/benign/benign (2).png",
             f"c.zip!/{ROOT}/malignant/malignant (4).png", "plain.png"]
  assert lesions.pair(sources, grouped) == [
      stem, None, f"{ROOT}/malignant/malignant (4)", None]


def test_plain_files_pair_by_the_end_of_their_path():
  """An image preprocessed from a folder has no member path: the masks
  whose path ends with its class folder and name are its own, the longest
  shared end winning (mask files beside it, or a copy of the archive)."""
  keys = [f"{ROOT}/benign/benign (1)", "/abs/busi/benign/benign (1)",
          "x/benign/benign (2)", "y/benign/benign (2)",
          f"{ROOT}/malignant/malignant (4)"]
  sources = ["busi/benign/benign (1).png",  # /abs/busi/... shares 3 parts
             "data/benign/benign (2).png",  # two keys share 2 parts: a tie
             "/elsewhere/malignant/malignant (4).png",
             "malignant (4).png",  # no class folder to go by
             "busi/benign/benign (9).png"]
  assert lesions.pair(sources, keys) == [
      "/abs/busi/benign/benign (1)", None, f"{ROOT}/malignant/malignant (4)",
      None, None]
  # A member whose masks come unpacked pairs the same way.
  assert lesions.pair([f"x.zip!/{ROOT}/benign/benign (1).png"],
                      ["/data/busi/benign/benign (1)"]) == [
                          "/data/busi/benign/benign (1)"]
  # A backslash is part of a name, never a folder: a benign image keeps to
  # the benign folder's masks.
  assert lesions.pair(["/imgs/benign/a\\b.png", "/imgs/benign/b\\xe9.png"],
                      ["/m/malignant/a\\b", "/m/malignant/b\\xe9"]) == [
                          None, None]
  # Copies of one mask set may tie (the zip and its unpacked folder, both
  # given); different sets may not.
  copies = {"Z/benign/benign (1)": {"Z/benign/benign (1)_mask.png": b"m"},
            "/u/Z/benign/benign (1)": {
                "/u/Z/benign/benign (1)_mask.png": b"m"}}
  image = "gs://b/elsewhere/benign/benign (1).png"
  assert lesions.pair([image], copies, copies) in (
      [["Z/benign/benign (1)"], ["/u/Z/benign/benign (1)"]])
  copies["/u/Z/benign/benign (1)"]["/u/Z/benign/benign (1)_mask.png"] = b"n"
  assert lesions.pair([image], copies, copies) == [None]


def _png(pixels):
  return af.png(np.asarray(pixels, np.uint8))


def test_lesion_mask_unites_resizes_and_thresholds():
  left = np.zeros((12, 12), np.uint8)
  left[:, :4] = 255  # a third of the second output column at 4²
  bottom = np.zeros((12, 12), np.uint8)
  bottom[9:, :] = 255  # exactly the last output row
  lesion = lesions.lesion_mask([_png(left), _png(bottom)], 4)
  expected = np.zeros((4, 4), bool)
  expected[:, 0] = True
  expected[3, :] = True
  np.testing.assert_array_equal(lesion, expected)
  # The same geometry as the images: decode_and_resize, then > 127.
  alone = lesions.lesion_mask([_png(left)], 4)
  np.testing.assert_array_equal(
      alone, imaging.decode_and_resize(_png(left), 4, keep_grey=True).pixels
      > lesions.MASK_THRESHOLD)
  # Not square: stretched like the frame (no padding, no crop).
  wide = np.zeros((10, 40), np.uint8)
  wide[:, 20:] = 255
  np.testing.assert_array_equal(lesions.lesion_mask([_png(wide)], 4)[0],
                                [False, False, True, True])
  with pytest.raises(MemberError):
    lesions.lesion_mask([b"not a png"], 4)
  with pytest.raises(ValueError):
    lesions.lesion_mask([], 4)


def _mask_entries():
  blank, full = np.zeros((40, 40), np.uint8), np.full((40, 40), 255, np.uint8)
  noise = np.random.default_rng(0).integers(0, 256, (40, 40)).astype(np.uint8)
  return [
      af.Entry(f"{ROOT}/benign/benign (1).png", _png(noise), "image"),
      af.Entry(f"{ROOT}/benign/benign (1)_mask.png", _png(full), "mask"),
      af.Entry(f"{ROOT}/benign/benign (1)_mask_1.png", _png(blank), "mask"),
      af.Entry(f"{ROOT}/malignant/malignant (1).png", _png(noise), "image"),
      # Too big for the limit below: unreadable, and it spoils its set.
      af.Entry(f"{ROOT}/malignant/malignant (1)_mask.png", _png(noise),
               "mask"),
      af.Entry(f"{ROOT}/malignant/malignant (1)_mask_1.png", _png(full),
               "mask"),
  ]


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_mask_archives_read_with_the_pipeline_readers(tmp_path, suffix):
  entries = _mask_entries()
  path = str(tmp_path / ("busi" + suffix))
  if suffix == ".zip":
    af.write_zip(path, entries, directories=True)
  else:
    af.write_tar(path, entries, gz=True)
  limits = archives.Limits(max_member_bytes=1000)
  assert len(_png(np.zeros((40, 40)))) < 1000 < len(entries[4].data)
  found = lesion_masks.read_mask_archives([str(tmp_path / "busi*")], limits)
  benign = f"{ROOT}/benign/benign (1)"
  assert found.archives == [path]
  assert found.read == 3 and found.errors == 1
  assert found.masks[benign] == {benign + "_mask.png": entries[1].data,
                                 benign + "_mask_1.png": entries[2].data}
  assert found.unreadable == {f"{ROOT}/malignant/malignant (1)"}
  # Images are never handed over, not even as errors.
  reader = (archives.read_zip_range(archives.ZipRange(path, 0, 8), limits,
                                    masks_only=True) if suffix == ".zip" else
            archives.read_tar(path, limits, masks_only=True))
  kinds = sorted((m.path.rsplit("/", 1)[-1], m.kind) for m in reader)
  assert kinds == [("benign (1)_mask.png", "mask"),
                   ("benign (1)_mask_1.png", "mask"),
                   ("malignant (1)_mask.png", "error"),
                   ("malignant (1)_mask_1.png", "mask")]


def test_mask_files_read_from_a_folder_or_a_glob(tmp_path):
  """A BUSI folder: its masks keyed by their path, its images passed over,
  a mask over the member size limit unreadable."""
  entries = _mask_entries()
  for entry in entries:
    path = tmp_path / "busi" / entry.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(entry.data)
  (tmp_path / "busi" / "README.txt").write_bytes(b"not a mask")
  limits = archives.Limits(max_member_bytes=1000)
  benign = str(tmp_path / "busi" / ROOT / "benign" / "benign (1)")
  malignant = str(tmp_path / "busi" / ROOT / "malignant" / "malignant (1)")
  for masks in ([str(tmp_path / "busi")],
                [str(tmp_path / "busi" / ROOT / "*" / "*_mask*.png")]):
    found = lesion_masks.read_mask_archives(masks, limits)
    assert found.archives == [] and found.read == 3 and found.errors == 1
    assert found.masks[benign] == {benign + "_mask.png": entries[1].data,
                                   benign + "_mask_1.png": entries[2].data}
    assert found.unreadable == {malignant}
    # The images preprocessed from that folder pair with them.
    assert lesions.pair([benign + ".png", malignant + ".png"],
                        list(found.masks) + list(found.unreadable)) == [
                            benign, malignant]


def test_an_unreadable_mask_spoils_its_set_under_any_name(tmp_path):
  # A name that is not UTF-8: its unreadable mask is keyed as its readable
  # sibling is (as `source` spells it), so the set is not scored in part.
  folder = tmp_path / "u" / "benign"
  folder.mkdir(parents=True)
  (folder / "b\udce9 (1)_mask.png").write_bytes(_png(np.zeros((4, 4))))
  (folder / "b\udce9 (1)_mask_1.png").write_bytes(
      _png(np.random.default_rng(1).integers(0, 256, (40, 40))))
  found = lesion_masks.read_mask_archives(
      [str(tmp_path / "u")], archives.Limits(max_member_bytes=200))
  key, = found.masks
  assert found.unreadable == {key} and "\\xe9" in key


def test_bad_mask_archives_are_refused(tmp_path):
  with pytest.raises(ValueError, match="matches no file"):
    lesion_masks.read_mask_archives([str(tmp_path / "none*.zip")])
  (tmp_path / "notes.txt").write_bytes(b"n/a")
  with pytest.raises(ValueError) as raised:
    lesion_masks.read_mask_archives([str(tmp_path / "notes.txt")])
  assert str(raised.value) == (
      f"--masks {str(tmp_path / 'notes.txt')!r}: none of its 1 files is a"
      " zip, tar or tar.gz archive or a mask (`x_mask.png`, `x_mask_1.png`)")
  (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 cut short")
  with pytest.raises(ValueError, match="broken.zip"):
    lesion_masks.read_mask_archives([str(tmp_path / "broken.zip")])


# --- end to end: a phantom with a bright lesion, a model that fires on it ----

SIZE = 64  # model input
ORIGINAL = 128  # the frames in the archive
RADIUS = 14


def _disc(centres, value, background):
  image = background.copy()
  for centre in centres:
    cv2.circle(image, centre, RADIUS, value, -1)
  return image


def _phantoms(tmp_path):
  """A BUSI zip: lesion frames, their masks, one without, one broken."""
  rng = np.random.default_rng(3)

  def speckle():
    return rng.integers(10, 60, (ORIGINAL, ORIGINAL)).astype(np.uint8)

  blank = np.zeros((ORIGINAL, ORIGINAL), np.uint8)
  benign, malignant = [(36, 36)], [(92, 36), (36, 92)]  # (x, y)
  b, m = f"{ROOT}/benign/benign", f"{ROOT}/malignant/malignant"
  images = [
      af.Entry(f"{b} (1).png", _png(_disc(benign, 230, speckle())), "image"),
      af.Entry(f"{b} (2).png", _png(_disc(benign, 230, speckle())), "image"),
      af.Entry(f"{b} (3).png", _png(_disc(benign, 230, speckle())), "image"),
      af.Entry(f"{m} (1).png", _png(_disc(malignant, 230, speckle())),
               "image"),
      af.Entry(f"{ROOT}/normal/normal (1).png", _png(speckle()), "image"),
  ]
  on_lesion = [
      af.Entry(f"{b} (1)_mask.png", _png(_disc(benign, 255, blank)), "mask"),
      # benign (2) has no mask; benign (3)'s is not an image.
      af.Entry(f"{b} (3)_mask.png", b"not a png", "mask"),
      # One lesion per mask: only their union covers what the model sees.
      af.Entry(f"{m} (1)_mask.png", _png(_disc(malignant[:1], 255, blank)),
               "mask"),
      af.Entry(f"{m} (1)_mask_1.png", _png(_disc(malignant[1:], 255, blank)),
               "mask"),
      af.Entry(f"{ROOT}/normal/normal (1)_mask.png", _png(blank), "mask"),
  ]
  elsewhere = [
      af.Entry(f"{b} (1)_mask.png", _png(_disc([(92, 92)], 255, blank)),
               "mask"),
      af.Entry(f"{b} (3)_mask.png", b"not a png", "mask"),
      af.Entry(f"{m} (1)_mask.png", _png(_disc([(92, 92)], 255, blank)),
               "mask"),
      af.Entry(f"{m} (1)_mask_1.png", _png(_disc([(112, 112)], 255, blank)),
               "mask"),
  ]
  busi = str(tmp_path / "Dataset_BUSI_with_GT.zip")
  af.write_zip(busi, images + on_lesion)
  # Copies elsewhere, in another format: pairing goes by member path only.
  copy = str(tmp_path / "copy" / "busi_masks.tar.gz")
  os.makedirs(os.path.dirname(copy))
  af.write_tar(copy, on_lesion, gz=True)
  moved = str(tmp_path / "moved" / "busi.zip")
  os.makedirs(os.path.dirname(moved))
  af.write_zip(moved, images + elsewhere)
  return busi, copy, moved


def _lesion_detector(size):
  """The tiny model, wired by hand to call bright pixels lesion evidence.

  block1_conv1's first filter is the mean of the (BGR, mean-removed) pixel,
  so after ReLU it is > 0 only on pixels brighter than ~115: the lesion, not
  the dark speckle; block5_conv3 passes it on, and the head makes the benign
  and malignant logits grow with its average. Grad-CAM of either class is
  then that map: bright exactly on the lesion.
  """
  model = model_lib.build_model(size, model_lib.NO_WEIGHTS, 3, "tiny")

  def only(layer, entries):
    kernel, bias = model.get_layer(layer).get_weights()
    kernel, bias = np.zeros_like(kernel), np.zeros_like(bias)
    for index, value in entries:
      kernel[index] = value
    model.get_layer(layer).set_weights([kernel, bias])

  only("block1_conv1", [((1, 1, c, 0), 1 / 3) for c in range(3)])
  only(schemas.GRADCAM_LAYER, [((1, 1, 0, 0), 1.0)])
  only("head_dense", [((0, 0), 1.0)])
  only(model_lib.LOGITS_LAYER,
       [((0, schemas.LABELS.index(label)), 1.0)
        for label in evaluation_schema.LESION_LABELS])
  return model


def _detector_artifact(model_dir: str) -> str:
  saving.save_artifact(_lesion_detector(SIZE), model_dir, schemas.LABELS,
                       backbone="tiny", weights_source="none",
                       data_fingerprint={}, class_counts={}, test_metrics={},
                       threshold=0.9)
  return model_dir


@pytest.mark.slow
def test_evaluate_masks_end_to_end(tmp_path, capsys):
  busi, copy, moved = _phantoms(tmp_path)
  out = str(tmp_path / "pre")
  pipeline.run(["preprocess", "--input", busi, "--output", out,
                "--image_size", str(SIZE)])
  data = os.path.join(out, schemas.TFRECORD_DIR, "*" + schemas.TFRECORD_SUFFIX)
  model_dir = _detector_artifact(str(tmp_path / "model"))

  def run(masks, name):
    report_dir = str(tmp_path / name)
    assert cli.main(["evaluate", "--model", model_dir, "--data", data,
                     "--output", report_dir, "--masks", masks]) == 0
    with open(os.path.join(report_dir, evaluate.REPORT_FILE)) as f:
      block = json.load(f)[evaluation_schema.LESION_LOCALISATION]
    return evaluation_schema.LesionLocalisation.from_json(block)

  def each(name):
    """image member → (pointing hit, IoU) in the report's predictions."""
    table = pq.read_table(os.path.join(str(tmp_path / name),
                                       evaluation_schema.PREDICTIONS_FILE))
    assert table.schema == schemas.evaluation_predictions_schema(
        schemas.LABELS, localised=True)
    return {row["source"].split("!/")[1]: (
        row[schemas.COLUMN_LESION_POINTING_HIT],
        row[schemas.COLUMN_LESION_IOU]) for row in table.to_pylist()}

  # Masks on the lesions, from a tar.gz copy at another path.
  on = run(copy, "on")
  line = capsys.readouterr().out
  assert on.overall.images == 4  # benign and malignant only: normal skipped
  assert (on.overall.paired, on.overall.unpaired, on.overall.bad_mask) == (
      2, 1, 1)
  benign, malignant = on.per_class["benign"], on.per_class["malignant"]
  assert (benign.images, benign.paired, benign.unpaired,
          benign.bad_mask) == (3, 1, 1, 1)
  assert (malignant.images, malignant.paired) == (1, 1)
  assert on.overall.pointing_hit_rate == 1.0
  assert benign.mean_iou > 0.7
  # Both lesions lit up: only the union of _mask and _mask_1 matches them.
  assert malignant.mean_iou > 0.7
  assert on.predicted_class.pointing_hit_rate == 1.0
  assert on.explained == evaluation_schema.EXPLAIN_TRUE_CLASS
  assert on.mask_threshold == lesions.MASK_THRESHOLD
  assert on.mask_archives == [copy] and on.masks_read == 5
  assert on.mask_read_errors == 0
  assert ("Lesion localisation (Grad-CAM of the true class vs masks): 2 of 4"
          " benign/malignant images paired (1 without a mask, 1 unusable)"
          in line)
  # Each image's own: the two paired ones scored, the rest null.
  scores = each("on")
  b, m = f"{ROOT}/benign/benign", f"{ROOT}/malignant/malignant"
  assert scores[f"{b} (1).png"][0] and scores[f"{m} (1).png"][0]
  assert np.mean([scores[f"{b} (1).png"][1], scores[f"{m} (1).png"][1]]
                 ) == pytest.approx(on.overall.mean_iou)
  assert scores[f"{m} (1).png"][1] == pytest.approx(malignant.mean_iou)
  for unscored in (f"{b} (2).png", f"{b} (3).png",
                   f"{ROOT}/normal/normal (1).png"):
    assert scores[unscored] == (None, None)

  # The same frames, the masks put where there is no lesion.
  off = run(moved, "off")
  assert off.overall.paired == 2
  assert off.overall.pointing_hit_rate == 0.0
  assert off.overall.mean_iou < 0.05
  assert [hit for hit, _ in each("off").values() if hit is not None] == [
      False, False]

  # Without --masks the predictions carry no lesion columns.
  assert cli.main(["evaluate", "--model", model_dir, "--data", data,
                   "--output", str(tmp_path / "plain")]) == 0
  assert pq.read_table(os.path.join(
      str(tmp_path / "plain"), evaluation_schema.PREDICTIONS_FILE)
                      ).schema == schemas.evaluation_predictions_schema(
                          schemas.LABELS)


@pytest.mark.slow
def test_evaluate_masks_of_images_preprocessed_from_a_folder(tmp_path):
  """BUSI unpacked into a folder, as users keep it: the images preprocessed
  from the folder pair with the mask files beside them, and with the
  masks of the BUSI archive alike."""
  busi, copy, _ = _phantoms(tmp_path)
  folder = tmp_path / "unpacked"
  with zipfile.ZipFile(busi) as z:
    z.extractall(folder)
  out = str(tmp_path / "pre")
  manifest = pipeline.run(["preprocess", "--input",
                           str(folder / ROOT / "*" / "*.png"), "--output",
                           out, "--image_size", str(SIZE)])
  assert manifest["counts"]["masks_skipped"] == 5
  data = os.path.join(out, schemas.TFRECORD_DIR, "*" + schemas.TFRECORD_SUFFIX)
  model_dir = _detector_artifact(str(tmp_path / "model"))
  for name, masks in (("folder", str(folder)), ("archive", copy)):
    report_dir = str(tmp_path / name)
    assert cli.main(["evaluate", "--model", model_dir, "--data", data,
                     "--output", report_dir, "--masks", masks]) == 0
    with open(os.path.join(report_dir, evaluate.REPORT_FILE)) as f:
      on = evaluation_schema.LesionLocalisation.from_json(
          json.load(f)[evaluation_schema.LESION_LOCALISATION])
    # As from the archive itself: benign (2) has no mask, benign (3)'s is
    # not an image.
    assert (on.overall.paired, on.overall.unpaired, on.overall.bad_mask) == (
        2, 1, 1), name
    assert on.overall.pointing_hit_rate == 1.0, name
