"""Grad-CAM checked against BUSI lesion masks (`evaluate --masks`).

BUSI ships `x_mask.png` (and `x_mask_1.png`, ... for further lesions) beside
each `x.png`. Preprocessing leaves masks out of the TFRecords, so an
evaluated image is paired with its masks by archive member path: the part of
its `source` after "!/", less the extension, against the mask's member path
less `_mask[_N]` and the extension. The archive URI plays no part, so the
masks may come from another copy (or another format) of the archive. An
image without such a match (preprocessed from a folder, or its masks
unpacked) is paired by the end of its path instead (see `pair`), with mask
files or archive members alike.

The masks of one image are one lesion set: each is decoded and resized with
`imaging.decode_and_resize`, the very geometry the model's pixels got (a plain
stretch to image_size², INTER_AREA), their union taken, and a pixel counted
as lesion when over MASK_THRESHOLD.

Per paired image, with Grad-CAM of the image's true class (see
`localise_each`): the pointing game (is the heatmap's peak in the lesion?)
and the IoU of {heatmap >= HEATMAP_THRESHOLD} with the lesion. Masks serve
this check only; training and scoring never read them.
"""

import logging
import posixpath
from typing import (Dict, Iterable, List, Mapping, NamedTuple, Optional,
                    Sequence, Set, Tuple)

import numpy as np
import pyarrow as pa

import schemas
from schemas import evaluation as evaluation_schema
from schemas.evaluation import LesionLocalisation, LocalisationScore
from busi_core import imaging
from busi_core import gradcam
from busi_core.errors import MemberError

_LOG = logging.getLogger(__name__)

# BUSI masks are 0/255. INTER_AREA leaves an edge pixel the share of its area
# that was lesion (times 255, rounded); > 127 keeps the pixels at least half
# lesion, so the lesion keeps its area at any size. > 0 would grow every
# lesion by up to a pixel all round, and with it the IoU and the pointing
# game's hits.
MASK_THRESHOLD = 127
# Grad-CAM maps are scaled to peak at 1: the region is where the evidence is
# at least half its peak.
HEATMAP_THRESHOLD = 0.5


class MaskSets(NamedTuple):
  """The lesion masks found in the --masks archives."""
  masks: Dict[str, Dict[str, bytes]]  # image key → {mask member path: bytes}
  unreadable: Set[str]  # image keys with a mask that could not be read
  archives: List[str]  # the archives read
  read: int  # mask members read
  errors: int  # mask members that could not be read


def image_key(source: str) -> Optional[str]:
  """An image's member path less its extension; None for a plain file.

  `gs://b/BUSI.zip!/Dataset_BUSI_with_GT/benign/benign (1).png` →
  `Dataset_BUSI_with_GT/benign/benign (1)`. The source is split at its first
  "!/", as `archives.member_source` joined it.
  """
  _, separator, member = source.partition("!/")
  if not separator:
    return None
  return posixpath.splitext(member)[0]


def group_masks(masks: Iterable[Tuple[str, bytes]]
               ) -> Dict[str, Dict[str, bytes]]:
  """Masks by the image they belong to.

  Args:
    masks: (member path, bytes) of mask members, e.g. `d/x (1)_mask.png`,
      `d/x (1)_mask_1.png`; other paths are ignored.

  Returns:
    {image key (`d/x (1)`): {mask member path: bytes}}. Of several copies of
    one mask path (the same archive passed twice) the first is kept.
  """
  grouped: Dict[str, Dict[str, bytes]] = {}
  for path, data in masks:
    key = imaging.mask_owner(path)
    if key is not None:
      grouped.setdefault(key, {}).setdefault(path, data)
  return grouped


def _parts(path: str) -> Tuple[str, ...]:
  # "/" only: sources are POSIX paths and URIs, and a backslash in one is
  # part of a name (or of display_uri's escape of a byte that is not UTF-8).
  return tuple(part for part in path.split("/") if part not in ("", "."))


def _by_path_end(path: str, keys: Dict[Tuple[str, ...], List[str]],
                 contents: Mapping[str, Mapping[str, bytes]]
                ) -> Optional[str]:
  """The mask key of an image path less its extension: among the keys that
  end with its class folder and name, the one sharing the longest end of
  its path; None when none does, or when two tie and hold different masks
  (copies of one mask set tie harmlessly: the first is taken)."""
  parts = _parts(path)

  def shared(key: str) -> int:
    count = 0
    for a, b in zip(reversed(_parts(key)), reversed(parts)):
      if a != b:
        break
      count += 1
    return count

  ranked = sorted(((-shared(key), key) for key in keys.get(parts[-2:], [])))
  if not ranked:
    return None
  best = [key for rank, key in ranked if rank == ranked[0][0]]

  def content(key: str) -> Set[Tuple[str, bytes]]:
    return {(posixpath.basename(name), data)
            for name, data in contents.get(key, {}).items()}

  if any(content(key) != content(best[0]) or key not in contents
         for key in best[1:]):
    return None
  return best[0]


def pair(sources: Sequence[str], keys: Iterable[str],
         contents: Optional[Mapping[str, Mapping[str, bytes]]] = None
        ) -> List[Optional[str]]:
  """The image key of each source that has masks, None for the others.

  An archive member is paired by its member path, exactly. An image without
  that match (a plain file, preprocessed from a folder: its source is the
  path it was read from, as given; or a member whose masks come unpacked)
  is paired with the masks whose path ends with its class folder and name
  (`benign/benign (1)`), the longest shared end winning: mask files beside
  it, in another folder, or in a copy of the BUSI archive alike.

  Args:
    sources: each image's `source`.
    keys: the image keys that have masks (`group_masks`), or whose masks
      could not be read.
    contents: the masks of each key, to tell copies of one set (which may
      tie) from different sets (which must not); None: every tie unpaired.
  """
  contents = contents or {}
  known = set(keys)
  by_end: Dict[Tuple[str, ...], List[str]] = {}
  for key in known:
    by_end.setdefault(_parts(key)[-2:], []).append(key)
  found = []
  for source in sources:
    key = image_key(source)
    if key is not None and key in known:
      found.append(key)
      continue
    path = key if key is not None else posixpath.splitext(source)[0]
    found.append(_by_path_end(path, by_end, contents))
  return found


def lesion_mask(masks: Iterable[bytes], image_size: int) -> np.ndarray:
  """The union of one image's masks at the model's input size.

  Each mask is resized as its image was (`imaging.decode_and_resize`), the
  resized masks are united by their maximum (BUSI's lesions of one image are
  disjoint, so this equals resizing their union but where two lesions share
  an output pixel), and thresholded at MASK_THRESHOLD.

  Args:
    masks: encoded mask images (PNG as BUSI has them; any decodable format).
    image_size: the model's input height and width.

  Returns:
    bool [image_size, image_size], True on the lesion.

  Raises:
    MemberError: a mask is not a decodable image.
    ValueError: no masks.
  """
  resized = []
  for data in masks:
    pixels = imaging.decode_and_resize(data, image_size, keep_grey=True).pixels
    # A colour mask (rare) marks the lesion in any channel.
    resized.append(pixels if pixels.ndim == 2 else pixels.max(axis=2))
  if not resized:
    raise ValueError("no masks to unite")
  return np.maximum.reduce(resized) > MASK_THRESHOLD


def _check_shapes(heatmap: np.ndarray, lesion: np.ndarray) -> None:
  if heatmap.shape != lesion.shape:
    raise ValueError(f"heatmap {heatmap.shape} and lesion {lesion.shape}"
                     " differ in shape")


def pointing_hit(heatmap: np.ndarray, lesion: np.ndarray) -> bool:
  """The pointing game: is the heatmap's peak pixel inside the lesion?

  A tie goes to the first peak in row-major order (np.argmax). A heatmap
  that is 0 everywhere points nowhere, and misses.

  Args:
    heatmap: float [H, W], e.g. from `gradcam.heatmaps`.
    lesion: bool [H, W].

  Raises:
    ValueError: the shapes differ.
  """
  _check_shapes(heatmap, lesion)
  if not heatmap.size or not heatmap.max() > 0:
    return False
  peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
  return bool(lesion[peak])


def iou(heatmap: np.ndarray, lesion: np.ndarray,
        threshold: float = HEATMAP_THRESHOLD) -> float:
  """|{heatmap >= threshold} ∩ lesion| / |{heatmap >= threshold} ∪ lesion|.

  0.0 when both are empty (not met here: empty lesions are not scored).

  Raises:
    ValueError: the shapes differ.
  """
  _check_shapes(heatmap, lesion)
  region = heatmap >= threshold
  lesion = lesion.astype(bool)
  union = np.logical_or(region, lesion).sum()
  if not union:
    return 0.0
  return float(np.logical_and(region, lesion).sum() / union)


def score(hits: Sequence[bool], ious: Sequence[float], unpaired: int = 0,
          bad_mask: int = 0) -> LocalisationScore:
  """The summary of one group: counts, hit rate and mean IoU."""
  paired = len(hits)
  if len(ious) != paired:
    raise ValueError(f"{paired} hits but {len(ious)} IoUs")
  return LocalisationScore(
      images=paired + unpaired + bad_mask, paired=paired, unpaired=unpaired,
      bad_mask=bad_mask,
      pointing_hit_rate=float(np.mean(hits)) if paired else None,
      mean_iou=float(np.mean(ious)) if paired else None)


class _Lesions(NamedTuple):
  """The evaluated lesion images that could be paired with a lesion."""
  indices: List[int]  # rows of the data
  lesions: List[np.ndarray]  # bool [S, S] each
  unpaired: Dict[int, int]  # label index → images without a mask
  bad: Dict[int, int]  # label index → images whose masks are unusable


def _find_lesions(sources: Sequence[str], labels: np.ndarray,
                  lesion_classes: Sequence[int], masks: MaskSets,
                  image_size: int) -> _Lesions:
  found = _Lesions([], [], {c: 0 for c in lesion_classes},
                   {c: 0 for c in lesion_classes})
  keys = pair(sources, list(masks.masks) + list(masks.unreadable),
              masks.masks)
  for i, (key, label) in enumerate(zip(keys, labels)):
    label = int(label)
    if label not in found.unpaired:
      continue  # normal: no lesion to find
    if key is None:
      found.unpaired[label] += 1
      continue
    if key in masks.unreadable:
      found.bad[label] += 1
      continue
    try:
      lesion = lesion_mask(masks.masks[key].values(), image_size)
    except MemberError as e:
      _LOG.warning("masks of %s unreadable (%s: %s); not scored", key,
                   e.kind, e)
      found.bad[label] += 1
      continue
    if not lesion.any():
      _LOG.warning("masks of %s are empty at %d²; not scored", key,
                   image_size)
      found.bad[label] += 1
      continue
    found.indices.append(i)
    found.lesions.append(lesion)
  return found


class ImageScores(NamedTuple):
  """Per image of a `localise_each` call: rows are indices into its images;
  the others (normal, no usable mask) were not scored."""
  rows: List[int]
  hits: List[bool]  # the true class's heatmap peak lies in the lesion
  ious: List[float]  # of {heatmap >= HEATMAP_THRESHOLD} with the lesion

  def by_image(self, image_ids: Sequence[str]
              ) -> Dict[str, Tuple[bool, float]]:
    """image_id → (hit, IoU) of each scored image; `image_ids` are those of
    the images `localise_each` was given, in its order."""
    return {image_ids[row]: (hit, overlap)
            for row, hit, overlap in zip(self.rows, self.hits, self.ious)}


def with_columns(table: pa.Table, scored: Dict[str, Tuple[bool, float]],
                 schema: pa.Schema) -> pa.Table:
  """A predictions table (cv's or evaluate's) with the per-image lesion
  columns: each image's pointing-game hit and IoU by image_id, null where it
  was not scored; cast to `schema`, the table's localised schema."""
  ids = table.column(schemas.COLUMN_IMAGE_ID).to_pylist()
  hits = pa.array([scored[i][0] if i in scored else None for i in ids],
                  pa.bool_())
  ious = pa.array([scored[i][1] if i in scored else None for i in ids],
                  pa.float64())
  table = table.append_column(schemas.COLUMN_LESION_POINTING_HIT, hits)
  table = table.append_column(schemas.COLUMN_LESION_IOU, ious)
  return table.cast(schema)


def localise_each(model, images: np.ndarray, sources: Sequence[str],
                  labels: np.ndarray, predicted: np.ndarray,
                  label_names: Sequence[str], masks: MaskSets,
                  batch_size: int = 32
                 ) -> Tuple[LesionLocalisation, ImageScores]:
  """Grad-CAM of the evaluated lesion images, scored against their masks.

  The heatmaps explain each image's true class: the question is whether the
  evidence for "benign" (or "malignant") sits on the lesion, whatever the
  model concluded. Explaining the prediction instead would mix that with
  accuracy (a normal-class map of a missed lesion says little about it); the
  predicted-class score is reported beside it, Grad-CAM being recomputed only
  for the images whose prediction is wrong.

  Args:
    model: the artifact's model (uint8 input, block5_conv3, logits).
    images: uint8 [N, S, S, 3], as `data.load_labelled` reads them.
    sources: each image's `source`.
    labels: true label index of each image.
    predicted: predicted label index of each image.
    label_names: the model's labels.
    masks: from `lesion_masks.read_mask_archives`.
    batch_size: images per Grad-CAM call.

  Returns:
    The `lesion_localisation` block of metrics.json, and each scored
    image's pointing-game hit and IoU (true class).
  """
  lesion_classes = [i for i, name in enumerate(label_names)
                    if name in evaluation_schema.LESION_LABELS]
  found = _find_lesions(sources, labels, lesion_classes, masks,
                        images.shape[1])
  true = labels[found.indices]
  guessed = predicted[found.indices]
  hits, ious, hits_predicted, ious_predicted = [], [], [], []
  for start in range(0, len(found.indices), batch_size):
    rows = found.indices[start:start + batch_size]
    batch = images[rows]
    chunk = slice(start, start + len(rows))
    maps = gradcam.heatmaps(model, batch, true[chunk])
    wrong = np.flatnonzero(guessed[chunk] != true[chunk])
    maps_predicted = maps.copy()
    if wrong.size:
      maps_predicted[wrong] = gradcam.heatmaps(model, batch[wrong],
                                               guessed[chunk][wrong])
    for lesion, heat, heat_predicted in zip(found.lesions[chunk], maps,
                                            maps_predicted):
      hits.append(pointing_hit(heat, lesion))
      ious.append(iou(heat, lesion))
      hits_predicted.append(pointing_hit(heat_predicted, lesion))
      ious_predicted.append(iou(heat_predicted, lesion))

  per_class = {}
  for c in lesion_classes:
    mine = [j for j, t in enumerate(true) if t == c]
    per_class[label_names[c]] = score(
        [hits[j] for j in mine], [ious[j] for j in mine], found.unpaired[c],
        found.bad[c])
  unpaired = sum(found.unpaired.values())
  bad = sum(found.bad.values())
  if not found.indices:
    _LOG.warning(
        "no evaluated benign/malignant image was paired with a mask (%d"
        " without one, %d unusable): do the --masks archives or folders hold"
        " the masks of the images the --data sources name (%s), by the same"
        " member path, or for a plain file the same class folder and"
        " name?", unpaired, bad,
        sources[0] if len(sources) else "none")
  block = LesionLocalisation(
      overall=score(hits, ious, unpaired, bad), per_class=per_class,
      predicted_class=score(hits_predicted, ious_predicted, unpaired, bad),
      explained=evaluation_schema.EXPLAIN_TRUE_CLASS,
      layer=schemas.GRADCAM_LAYER, heatmap_threshold=HEATMAP_THRESHOLD,
      mask_threshold=MASK_THRESHOLD, mask_archives=list(masks.archives),
      masks_read=masks.read, mask_read_errors=masks.errors)
  return block, ImageScores(list(found.indices), hits, ious)


def _pool_scores(scores: Sequence[LocalisationScore]) -> LocalisationScore:
  """Scores of disjoint image groups as one: counts summed, each rate the
  mean over every paired image (the groups' rates weighted by their paired
  counts)."""
  paired = sum(s.paired for s in scores)

  def mean(field: str) -> Optional[float]:
    if not paired:
      return None
    return float(sum(getattr(s, field) * s.paired for s in scores
                     if s.paired) / paired)

  return LocalisationScore(
      images=sum(s.images for s in scores), paired=paired,
      unpaired=sum(s.unpaired for s in scores),
      bad_mask=sum(s.bad_mask for s in scores),
      pointing_hit_rate=mean("pointing_hit_rate"), mean_iou=mean("mean_iou"))


def pool(blocks: Sequence[LesionLocalisation]) -> LesionLocalisation:
  """`localise_each` blocks of disjoint image sets (`cv`'s held-out folds, each
  scored by its own model) as one: what one call over all the images would
  report, were a single model's heatmaps theirs.

  Raises:
    ValueError: no blocks, or blocks scored another way (layer, thresholds,
      what is explained) or against other masks.
  """
  if not blocks:
    raise ValueError("no localisation blocks to pool")
  first = blocks[0]
  shared = ("explained", "layer", "heatmap_threshold", "mask_threshold",
            "mask_archives", "masks_read", "mask_read_errors")
  for block in blocks[1:]:
    differing = [name for name in shared
                 if getattr(block, name) != getattr(first, name)]
    if differing:
      raise ValueError("localisation blocks scored differently cannot be"
                       f" pooled ({', '.join(differing)} differ)")
  labels = list(dict.fromkeys(label for block in blocks
                              for label in block.per_class))
  return first._replace(
      overall=_pool_scores([b.overall for b in blocks]),
      per_class={label: _pool_scores([b.per_class[label] for b in blocks
                                      if label in b.per_class])
                 for label in labels},
      predicted_class=_pool_scores([b.predicted_class for b in blocks]))


def _rates(s: LocalisationScore) -> str:
  if not s.paired:
    return "n/a"
  return f"{s.pointing_hit_rate:.3f}/{s.mean_iou:.3f}"


def format_localisation(block: LesionLocalisation) -> str:
  """One line for the CLI: counts, then pointing-game hit rate/mean IoU."""
  o = block.overall
  classes = ", ".join(f"{label} {_rates(s)} ({s.paired})"
                      for label, s in block.per_class.items())
  return (f"Lesion localisation (Grad-CAM of the true class vs masks):"
          f" {o.paired} of {o.images} benign/malignant images paired"
          f" ({o.unpaired} without a mask, {o.bad_mask} unusable); pointing"
          f" game/IoU {_rates(o)}; {classes}; predicted class"
          f" {_rates(block.predicted_class)}")
