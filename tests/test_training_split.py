"""The duplicate-aware, stratified, seeded split."""

import cv2
import numpy as np
import pytest

from busi_core import imaging
from training import split

LABELS = ("normal", "benign", "malignant")


def _structured(rng, size=500):
  """A grey image with structure at several scales (like a scan, not noise)."""
  img = np.zeros((size, size), np.float32)
  for scale in (8, 32, 128):
    noise = rng.normal(size=(size // scale + 1, size // scale + 1))
    img += cv2.resize(noise.astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC) * scale
  img = (img - img.min()) / (img.max() - img.min()) * 255
  return img.astype(np.uint8)


def _encode(img, ext, *params):
  ok, buf = cv2.imencode(ext, img, list(params))
  assert ok
  return buf.tobytes()


def _dataset(n_per_class=20, seed=0):
  """ids, labels, hashes of distinct images as the pipeline would store them."""
  rng = np.random.default_rng(seed)
  ids, labels, hashes = [], [], []
  for label in LABELS:
    for _ in range(n_per_class):
      data = _encode(_structured(rng, 96), ".png")
      pixels = imaging.decode_and_resize(data, 64).pixels
      ids.append(imaging.image_id(data))
      labels.append(label)
      hashes.append(split.dhash(pixels))
  return ids, labels, hashes


def _split_of(result, n):
  where = {}
  for name, indices in result.indices.items():
    for i in indices:
      assert i not in where, f"index {i} in {where[i]} and {name}"
      where[i] = name
  assert sorted(where) == list(range(n))
  return where


def test_dhash_is_robust_to_reencoding_and_one_pixel():
  img = _structured(np.random.default_rng(3))
  png = imaging.decode_and_resize(_encode(img, ".png"), 224).pixels
  jpeg = imaging.decode_and_resize(
      _encode(img, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 75), 224).pixels
  poked = img.copy()
  poked[100, 100] = 255 - poked[100, 100]
  one_pixel = imaging.decode_and_resize(_encode(poked, ".png"), 224).pixels
  other = imaging.decode_and_resize(
      _encode(_structured(np.random.default_rng(4)), ".png"), 224).pixels

  def distance(a, b):
    return bin(split.dhash(a) ^ split.dhash(b)).count("1")

  assert distance(png, jpeg) <= split.DEFAULT_MAX_DISTANCE
  assert distance(png, one_pixel) <= split.DEFAULT_MAX_DISTANCE
  assert distance(png, other) > 10


def test_no_image_id_in_two_splits():
  ids, labels, hashes = _dataset()
  # The same file twice (e.g. in two archives) and under a different hash
  # (should never happen, but the id alone must keep them together).
  ids += [ids[0], ids[5]]
  labels += [labels[0], labels[5]]
  hashes += [hashes[0], hashes[5] ^ 0xFFFF]
  result = split.split_indices(ids, labels, hashes, 0.15, 0.15, seed=0)
  where = _split_of(result, len(ids))
  by_id = {}
  for i, image_id in enumerate(ids):
    by_id.setdefault(image_id, set()).add(where[i])
  assert all(len(names) == 1 for names in by_id.values())


def test_near_duplicates_stay_together():
  rng = np.random.default_rng(7)
  ids, labels, hashes = _dataset(seed=1)
  originals = [_structured(rng) for _ in range(6)]
  pairs = []
  for k, img in enumerate(originals):
    poked = img.copy()
    poked[k, k] ^= 0x80
    variants = [_encode(img, ".png"),
                _encode(img, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 80),
                _encode(poked, ".png")]
    first = len(ids)
    for data in variants:
      ids.append(imaging.image_id(data))
      labels.append(LABELS[k % 3])
      hashes.append(split.dhash(imaging.decode_and_resize(data, 224).pixels))
    pairs.append(range(first, first + len(variants)))
  for seed in range(5):
    where = _split_of(split.split_indices(ids, labels, hashes, 0.2, 0.2, seed),
                      len(ids))
    for group in pairs:
      assert len({where[i] for i in group}) == 1, (seed, list(group))


def test_same_seed_same_split_whatever_the_input_order():
  ids, labels, hashes = _dataset()
  first = split.split_indices(ids, labels, hashes, 0.15, 0.15, seed=3)
  order = np.random.default_rng(0).permutation(len(ids))
  shuffled = split.split_indices([ids[i] for i in order],
                                 [labels[i] for i in order],
                                 [hashes[i] for i in order], 0.15, 0.15, 3)

  def members(result, id_list):
    return {name: sorted(id_list[i] for i in idx)
            for name, idx in result.indices.items()}

  assert members(first, ids) == members(shuffled, [ids[i] for i in order])
  other = split.split_indices(ids, labels, hashes, 0.15, 0.15, seed=4)
  assert members(other, ids) != members(first, ids)


def test_split_is_stratified():
  ids, labels, hashes = _dataset(n_per_class=20)
  result = split.split_indices(ids, labels, hashes, 0.15, 0.25, seed=0)
  for label in LABELS:
    counts = {name: sum(labels[i] == label for i in idx)
              for name, idx in result.indices.items()}
    assert counts == {"train": 12, "val": 3, "test": 5}


def test_empty_validation_allowed():
  ids, labels, hashes = _dataset(n_per_class=5)
  result = split.split_indices(ids, labels, hashes, 0.0, 0.2, seed=0)
  assert result.indices["val"] == []
  assert len(result.indices["test"]) == 3


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_bad_fractions_refused(val, test):
  with pytest.raises(ValueError, match="fraction"):
    split.split_indices(["a"], ["normal"], [0], val, test, 0)


def test_fingerprints():
  fp = split.data_fingerprint({"train": ["b", "a"], "test": ["c"]})
  assert fp["train"] == split.fingerprint(["a", "b"])
  assert fp["overall"] == split.fingerprint(["c", "b", "a"])
  assert set(fp) == {"train", "test", "overall"}


def test_near_any_finds_hashes_within_the_distance():
  reference = [0, 0xFFFF_0000_0000_0000]
  hashes = [0b11, 0b111, 0xFFFF_0000_0000_0001, 0x0F0F_0F0F_0F0F_0F0F]
  np.testing.assert_array_equal(split.near_any(hashes, reference),
                                [True, False, True, False])
  assert split.near_any(hashes, reference, max_distance=3)[1]
  assert not split.near_any(hashes, []).any()
  many = list(range(1, 1300))  # more than one block of rows
  assert split.near_any(many, [0], max_distance=64).all()
  assert split.hash_hex(0xAB) == "00000000000000ab"
