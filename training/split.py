"""Deterministic, duplicate-aware, label-stratified train/val/test split.

Images are grouped before splitting, and a group never straddles two splits:
identical images (same image_id, i.e. same bytes) and near-identical ones (a
64-bit difference hash within `max_distance` bits: the same frame re-encoded,
resized or with a few pixels changed) are joined with union-find. Groups are
then dealt to the splits per label, biggest first, each to the split furthest
below its share, in an order drawn from the seed alone. The result depends
only on the seed, the fractions and the set of images, never on the order in
which the TFRecord shards were read.
"""

import hashlib
from typing import (Dict, Hashable, Iterator, List, NamedTuple, Sequence,
                    Tuple)

import cv2
import numpy as np

TRAIN = "train"
VAL = "val"
TEST = "test"
SPLITS = (TRAIN, VAL, TEST)

# Two dHashes this close (in bits) are the same picture. Unrelated images
# differ in ~32 of 64 bits; JPEG re-encoding or a resize flips a few at most.
DEFAULT_MAX_DISTANCE = 2


class SplitResult(NamedTuple):
  """Indices (into the input sequences) of each split, and the grouping."""
  indices: Dict[str, List[int]]  # split name → sorted indices
  group_of: List[int]  # group number of each input
  num_groups: int


def dhash(pixels: np.ndarray) -> int:
  """64-bit difference hash: grey, 9×8 area-averaged, left < right per cell.

  Args:
    pixels: uint8 [H, W, 3] RGB or [H, W] grey.

  Returns:
    The hash as a Python int in [0, 2**64).
  """
  grey = (cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if pixels.ndim == 3
          else pixels)
  small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA)
  bits = (small[:, 1:] > small[:, :-1]).reshape(-1)
  return int(np.packbits(bits).view(">u8")[0])


class _UnionFind:

  def __init__(self, size: int):
    self.parent = list(range(size))

  def find(self, i: int) -> int:
    while self.parent[i] != i:
      self.parent[i] = self.parent[self.parent[i]]  # path halving
      i = self.parent[i]
    return i

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      # The smaller root wins so the result does not depend on call order.
      self.parent[max(ra, rb)] = min(ra, rb)


def _close_blocks(hashes: Sequence[int], reference: Sequence[int],
                  max_distance: int) -> Iterator[Tuple[int, np.ndarray]]:
  """(first row, bool [rows, len(reference)]) blocks of "within max_distance
  bits" for every pair of `hashes` × `reference`, a block of rows at a time:
  O(n·m) bit counts (~1 s for 10k × 10k) in bounded memory."""
  codes = np.asarray([int(h) for h in hashes], dtype=np.uint64)
  ref = np.asarray([int(h) for h in reference], dtype=np.uint64)
  block = 512
  for start in range(0, len(codes), block):
    distances = np.bitwise_count(codes[start:start + block, None] ^
                                 ref[None, :])
    yield start, distances <= max_distance


def duplicate_groups(image_ids: Sequence[str], hashes: Sequence[int],
                     max_distance: int = DEFAULT_MAX_DISTANCE) -> List[int]:
  """Group number of each image: same id, or dHashes ≤ max_distance apart.

  Groups are numbered 0, 1, ... in order of their first member.
  """
  n = len(image_ids)
  uf = _UnionFind(n)
  first_with_id: Dict[str, int] = {}
  for i, image_id in enumerate(image_ids):
    uf.union(first_with_id.setdefault(image_id, i), i)
  for start, close in _close_blocks(hashes, hashes, max_distance):
    for r, c in zip(*np.nonzero(close)):
      if start + r < c:
        uf.union(int(start + r), int(c))
  numbers: Dict[int, int] = {}
  return [numbers.setdefault(uf.find(i), len(numbers)) for i in range(n)]


def split_indices(image_ids: Sequence[str], labels: Sequence[str],
                  hashes: Sequence[int], val_fraction: float,
                  test_fraction: float, seed: int,
                  max_distance: int = DEFAULT_MAX_DISTANCE) -> SplitResult:
  """Splits images into train/val/test without separating duplicates.

  Args:
    image_ids: content id of each image.
    labels: class of each image.
    hashes: `dhash` of each image.
    val_fraction: share of each class's images aimed at validation.
    test_fraction: share aimed at test.
    seed: the only source of randomness.
    max_distance: dHash distance (bits) up to which images are joined.

  Returns:
    The split indices and the groups.

  Raises:
    ValueError: fractions outside [0, 1) or summing to 1 or more.
  """
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and
          val_fraction + test_fraction < 1):
    raise ValueError(
        f"val_fraction {val_fraction} and test_fraction {test_fraction} must"
        " each be in [0, 1) and leave something for training")
  if not len(image_ids) == len(labels) == len(hashes):
    raise ValueError("image_ids, labels and hashes differ in length")
  fractions = {TRAIN: 1 - val_fraction - test_fraction, VAL: val_fraction,
               TEST: test_fraction}
  group_of = duplicate_groups(image_ids, hashes, max_distance)
  # Ties go to test, then val, so that small classes still reach the
  # evaluation splits.
  indices = deal_groups(image_ids, labels, group_of,
                        {s: fractions[s] for s in (TEST, VAL, TRAIN)}, seed)
  return SplitResult({name: indices[name] for name in SPLITS}, group_of,
                     max(group_of) + 1 if group_of else 0)


def deal_groups(image_ids: Sequence[str], labels: Sequence[str],
                group_of: Sequence[int], fractions: Dict[Hashable, float],
                seed: int) -> Dict[Hashable, List[int]]:
  """Deals whole groups of images to named parts, stratified by label.

  Per label, groups are dealt biggest first (equal sizes in an order drawn
  from the seed alone), each to the part furthest below its share; a tie
  goes to the part named first in `fractions`. A group's label is its most
  common one (a tie goes to the smallest name); its key, the smallest
  image_id in it, orders groups independently of the input order.

  Args:
    image_ids: content id of each image.
    labels: class of each image.
    group_of: group number of each image (`duplicate_groups`; any ints).
    fractions: part name → share of each label's images (parts with share 0
      get nothing).
    seed: the only source of randomness.

  Returns:
    part name → sorted indices of its images.
  """
  members: Dict[int, List[int]] = {}
  for i, group in enumerate(group_of):
    members.setdefault(int(group), []).append(i)
  by_label: Dict[str, List[List[int]]] = {}
  for group in members.values():
    names = sorted(labels[i] for i in group)
    label = max(sorted(set(names)), key=names.count)
    by_label.setdefault(label, []).append(group)

  indices: Dict[Hashable, List[int]] = {name: [] for name in fractions}
  for label in sorted(by_label):
    groups = sorted(by_label[label], key=lambda g: min(image_ids[i] for i in g))
    rng = np.random.default_rng(
        [seed, int.from_bytes(hashlib.sha256(label.encode()).digest()[:4],
                              "big")])
    order = rng.permutation(len(groups))
    # Biggest groups first (stable, so equal sizes keep the random order):
    # they are the hard ones to place without overshooting a small part.
    order = sorted(order, key=lambda k: -len(groups[k]))
    total = sum(len(g) for g in groups)
    placed = {name: 0 for name in fractions}
    for k in order:
      name = max((s for s in fractions if fractions[s] > 0),
                 key=lambda s: fractions[s] * total - placed[s])
      placed[name] += len(groups[k])
      indices[name].extend(groups[k])
  return {name: sorted(v) for name, v in indices.items()}


def hash_hex(value: int) -> str:
  """A dHash as 16 hex digits, as split.json stores it."""
  return f"{int(value):016x}"


def near_any(hashes: Sequence[int], reference: Sequence[int],
             max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
  """For each of `hashes`: is any `reference` hash ≤ max_distance bits away?

  Returns:
    bool array, one per entry of `hashes`.
  """
  found = np.zeros(len(hashes), dtype=bool)
  for start, close in _close_blocks(hashes, reference, max_distance):
    found[start:start + len(close)] = close.any(axis=1)
  return found


def fingerprint(image_ids: Sequence[str]) -> str:
  """sha256 over the sorted, newline-joined image_ids."""
  return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()


def data_fingerprint(ids_by_split: Dict[str, Sequence[str]]) -> Dict[str, str]:
  """Fingerprint of each split and of all of them ("overall")."""
  result = {name: fingerprint(ids) for name, ids in ids_by_split.items()}
  result["overall"] = fingerprint(
      [i for ids in ids_by_split.values() for i in ids])
  return result
