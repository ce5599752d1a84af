"""Synthetic phantom archives in the BUSI layout."""

import hashlib
import io
import zipfile

import cv2
import numpy as np
import pytest

import schemas
from busi_core import imaging
from training import cli, phantoms, split


def test_layout_masks_and_labels(tmp_path):
  path = str(tmp_path / "p.zip")
  names = phantoms.write_phantom_archive(
      path, {"normal": 2, "benign": 3, "malignant": 1}, size=96, seed=1)
  with zipfile.ZipFile(path) as zf:
    assert zf.namelist() == names
    images = [n for n in names if not imaging.is_mask(n)]
    masks = [n for n in names if imaging.is_mask(n)]
    assert len(images) == len(masks) == 6
    assert "Dataset_BUSI_with_GT/benign/benign (3).png" in images
    assert "Dataset_BUSI_with_GT/benign/benign (3)_mask.png" in masks
    labels = [imaging.label_from_path(n) for n in images]
    assert sorted(labels) == sorted(["normal"] * 2 + ["benign"] * 3 +
                                    ["malignant"])
    for name in images:
      decoded = imaging.decode_and_resize(zf.read(name), 64)
      assert (decoded.original_height, decoded.original_width) == (96, 96)
    for name in masks:
      mask = imaging.decode_and_resize(zf.read(name), 96).pixels
      assert (mask.max() == 0) == ("/normal/" in name)


def test_deterministic_and_distinct(tmp_path):
  counts = {"normal": 3, "benign": 3, "malignant": 3}
  a, b, c = (str(tmp_path / f"{k}.zip") for k in "abc")
  phantoms.write_phantom_archive(a, counts, size=64, seed=0)
  phantoms.write_phantom_archive(b, counts, size=64, seed=0)
  phantoms.write_phantom_archive(c, counts, size=64, seed=1)

  def digest(path):
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()

  assert digest(a) == digest(b)
  assert digest(a) != digest(c)
  # Adding images of one class does not change the others.
  more = str(tmp_path / "more.zip")
  phantoms.write_phantom_archive(more, dict(counts, benign=5), size=64, seed=0)
  with zipfile.ZipFile(a) as za, zipfile.ZipFile(more) as zm:
    name = "Dataset_BUSI_with_GT/malignant/malignant (2).png"
    assert za.read(name) == zm.read(name)
    # No two phantoms are near-duplicates of each other.
    hashes = [split.dhash(imaging.decode_and_resize(zm.read(n), 64).pixels)
              for n in zm.namelist() if not imaging.is_mask(n)]
  ids = [str(i) for i in range(len(hashes))]
  assert len(set(split.duplicate_groups(ids, hashes))) == len(hashes)


def test_lesion_is_darker_than_tissue():
  for label in ("benign", "malignant"):
    image, mask = phantoms.render_phantom(label, np.random.default_rng(4), 200)
    assert image.dtype == np.uint8 and image.shape == (200, 200)
    around = cv2.dilate(mask, np.ones((25, 25), np.uint8))
    inside = image[mask > 0].mean()
    ring = image[(around > 0) & (mask == 0)].mean()
    assert inside < 0.7 * ring, label


def test_bad_class_refused(tmp_path):
  with pytest.raises(ValueError, match="classes"):
    phantoms.write_phantom_archive(str(tmp_path / "x.zip"), {"cyst": 1})


def test_cli(tmp_path, capsys):
  path = str(tmp_path / "cli.zip")
  assert cli.main(["phantoms", "--output", path, "--per_class", "1",
                   "--size", "64", "--no_masks"]) == 0
  assert "Wrote 3 members" in capsys.readouterr().out
  with zipfile.ZipFile(path) as zf:
    assert len(zf.namelist()) == len(schemas.LABELS)
    assert io.BytesIO(zf.read(zf.namelist()[0])).read(4) == b"\x89PNG"
