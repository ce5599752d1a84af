"""The training recipe, shared by `train` and `cv`: fixed views, cached conv
outputs, the two fitting stages, calibration and the review threshold.

Augmentation is made affordable by computing it once: every training image
contributes its original pixels and `augment_views` fixed views (view 1 is
its mirror image, views 2… random rotation / shift / zoom / flip from
`training.augment`, drawn once from the seed). The frozen part of VGG16 runs
over each view once; the head (and, when fine-tuning, the base from
--fine_tune_from on) then trains on those cached outputs for as many epochs
as it needs, at a few milliseconds a step (for the head) instead of a VGG16
pass per image per epoch. Validation and test images
are always the originals: what scoring sees.

Both stages stop early on the validation loss (`patience` epochs without
improvement; the best epoch's weights are kept), `epochs` being the most they
may run. The temperature and the review threshold are then fitted on the
same validation split (the threshold for a target accuracy of the images not
flagged, by default).
"""

import dataclasses
import hashlib
import logging
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import keras
import ml_dtypes
import numpy as np

import schemas
from schemas import metadata as metadata_schema
from training import calibration, config as config_lib, model as model_lib
from training.config import (AUTO_BLOCK5_FINE_TUNE_EPOCHS,
                             AUTO_FINE_TUNE_EPOCHS, BFLOAT16,
                             DEFAULT_FOLDS, FLOAT32, TrainConfig)

_LOG = logging.getLogger(__name__)

ORIGINAL = config_lib.ORIGINAL_VIEW
MIRROR = config_lib.MIRROR_VIEW



def build_model(config: TrainConfig, image_size: int) -> keras.Model:
  """The model `config` trains, for images of `image_size`."""
  return model_lib.build_model(image_size, config.backbone_weights,
                               len(schemas.LABELS), config.backbone,
                               config.network_size_for(image_size))


def balanced_class_weights(labels: np.ndarray, num_classes: int
                          ) -> Dict[int, float]:
  """n / (classes present × n_c), as sklearn's "balanced"; 1.0 if n_c is 0."""
  counts = np.bincount(labels, minlength=num_classes)
  present = int((counts > 0).sum())
  return {c: (float(len(labels) / (present * counts[c])) if counts[c] else 1.0)
          for c in range(num_classes)}


def class_weights(labels: np.ndarray, num_classes: int,
                  malignant_weight: float = 1.0) -> Dict[int, float]:
  """Balanced class weights, the malignant class's multiplied by
  `malignant_weight` (for models whose outputs are schemas.LABELS)."""
  weights = balanced_class_weights(labels, num_classes)
  if num_classes == len(schemas.LABELS):
    weights[schemas.LABELS.index(schemas.MALIGNANT)] *= malignant_weight
  elif malignant_weight != 1.0:
    raise ValueError(f"--malignant_weight needs the {len(schemas.LABELS)}"
                     f" classes {schemas.LABELS}; this model has"
                     f" {num_classes}")
  return weights


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes, dtype=np.float32)[labels]


def degraded_view(view: int) -> bool:
  """Whether view `view` gets the scanner degradations (when the recipe
  degrades): every second random view, 3, 5, 7, …; so half the random
  views are degraded and half are geometry only."""
  return (view >= config_lib.FIRST_DEGRADED_VIEW
          and (view - config_lib.FIRST_DEGRADED_VIEW) % 2 == 0)


def annotated_view(view: int) -> bool:
  """Whether view `view` may carry synthetic annotations (when the recipe
  annotates): every random view, each image's with probability
  `augment.ANNOTATE.probability`; never the images as stored or mirrored."""
  return view >= config_lib.FIRST_RANDOM_VIEW


def deepened_view(view: int) -> bool:
  """Whether view `view` may be framed as a deeper depth setting (when the
  recipe deepens): every random view, each image's with probability
  `augment.DEPTH.probability`; never the images as stored or mirrored."""
  return view >= config_lib.FIRST_RANDOM_VIEW


def draw_keys(image_ids: Sequence[str]) -> np.ndarray:
  """Each image's key for its random views: 63 bits of sha256(image_id).

  Keyed by the image itself, an image keeps its views when images are added
  to or removed from the data (a key by position would re-draw every image
  sorted after the change).
  """
  return np.array([int.from_bytes(hashlib.sha256(i.encode()).digest()[:8],
                                  "big") >> 1 for i in image_ids],
                  dtype=np.int64)


def view_images(images: np.ndarray, view: int, seed: int,
                keys: Optional[Sequence[int]] = None,
                degrade: bool = False, annotate: bool = False,
                depth: bool = False) -> np.ndarray:
  """View `view` of a batch of uint8 images.

  Args:
    images: uint8 [B, H, W, 3].
    view: ORIGINAL, MIRROR, or 2… for a random geometric augmentation.
    seed: the run's seed; with `view` and an image's key it fixes that
      image's draw.
    keys: the images' `draw_keys` (default 0…B-1, for images without ids).
      An image's view depends on the seed, the view and its key only, not on
      the batch it is computed in nor on the other images in the data:
      `cv`, `train` with and without its cross-validation, any batch size
      and any data set holding the image draw the same views of it.
    degrade: add the scanner degradations (`augment.degrade`) to the views
      `degraded_view` names.
    annotate: draw synthetic burned-in annotations (`augment.annotate`) on
      each random view of an image with probability
      `augment.ANNOTATE.probability`, before any degradation (an export
      compresses the marks with the image).
    depth: show each random view of an image with probability
      `augment.DEPTH.probability` as a deeper depth setting would
      (`augment.deepen`), before any annotation.
  """
  if view == ORIGINAL:
    return images
  if view == MIRROR:
    return np.ascontiguousarray(images[:, :, ::-1])
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from training import augment  # pylint: disable=import-outside-toplevel
  if keys is None:
    keys = np.arange(len(images))
  keys = np.asarray(keys, dtype=np.int64)
  seeds = np.stack([np.full(len(keys), seed * 1000 + view, np.int64),
                    keys], axis=1)
  out = augment.augment_each(tf.constant(images), tf.constant(seeds)).numpy()
  if depth and deepened_view(view):
    out = _some(out, augment.deepen, augment.DEPTH.probability,
                [[seed, view, int(k), _DEPTH_STREAM] for k in keys])
  if annotate and annotated_view(view):
    out = _some(out, augment.annotate, augment.ANNOTATE.probability,
                [[seed, view, int(k), _ANNOTATE_STREAM] for k in keys])
  if degrade and degraded_view(view):
    out = np.stack([
        augment.degrade(image, np.random.default_rng([seed, view, int(k)]))
        for image, k in zip(out, keys)])
  return out


# Draw streams of their own (the last entry of an image's generator seed),
# so that each augmentation keeps its draws whatever the others do; the
# degradations' stream has no such entry.
_ANNOTATE_STREAM = 1
_DEPTH_STREAM = 2


def _some(images: np.ndarray, draw, probability: float,
          seeds: Sequence[Sequence[int]]) -> np.ndarray:
  """`draw(image, rng)` on each image with `probability`, from a generator
  seeded by that image's entry of `seeds`."""
  rngs = [np.random.default_rng(s) for s in seeds]
  return np.stack([draw(image, rng) if rng.random() < probability else image
                   for image, rng in zip(images, rngs)])


class ConvCache:
  """Outputs of the frozen conv layers for the images and views that need
  them, each computed once and then shared (by the stages, and by the folds
  of `cv`).

  Only layers the training never changes may be cached: everything up to
  the input of the first fine-tuned layer (block4_pool for block5; the
  preprocessed, or resized, pixels for --fine_tune_from block1_conv1)
  always, "features" only while the base is frozen, which is always true
  when a fold's model starts (weights reset to the pretrained ones).

  A layer computed from the pixels by layers without weights (the
  preprocessing, and the resize) is kept as the views' uint8 pixels and
  computed again, by the same sub-model, whenever it is read: 1 byte a value
  instead of 2 or 4, the same values read (the whole-base fine-tune's rows:
  1.2 MB an image for 8 views at 224², against 2.7).
  """

  def __init__(self, model: keras.Model, images: np.ndarray,
               needed: Dict[int, np.ndarray], batch_size: int, seed: int,
               layers: Sequence[str], degrade: bool = False, *,
               keys: np.ndarray, annotate: bool = False,
               depth: bool = False, precision: str = FLOAT32):
    """
    Args:
      model: a `model.build_model` model (its frozen layers are used).
      images: uint8 [N, H, W, 3], all the images indices refer to.
      needed: view → indices of the images that view is computed for.
      batch_size: images per model call.
      seed: the run's seed (for the augmented views).
      layers: layers to cache, shallowest first; each deeper one is computed
        from the one before it (e.g. ["block4_pool", "features"]).
      degrade: the recipe's --degrade (scanner degradations on the views
        `degraded_view` names).
      keys: int64 [N], the images' `draw_keys` (their random views' draws).
      annotate: the recipe's --annotate (synthetic burned-in annotations on
        some random views).
      depth: the recipe's --depth (some random views as a deeper depth
        setting shows them).
      precision: arithmetic of the cached layers for the views other than
        the original (`config.PRECISIONS`; "auto" resolved here). The
        original view is computed in float32, as scoring computes it, and
        kept float32; the others are kept in the dtype they were computed
        in (ml_dtypes.bfloat16 for bfloat16: half the memory), except a
        layer of the pixels, kept as uint8 pixels and read in that dtype.
    """
    if len(keys) != len(images):
      raise ValueError(f"{len(keys)} draw keys for {len(images)} images")
    self._model = model
    self._images = images
    self._keys = np.asarray(keys, dtype=np.int64)
    self._batch_size = batch_size
    self._seed = seed
    self._degrade = degrade
    self._annotate = annotate
    self._depth = depth
    self._layers = list(layers)
    self.precision = model_lib.resolve_precision(precision)[0]
    self._rows: Dict[int, np.ndarray] = {}
    for view, indices in needed.items():
      rows = np.full(len(images), -1, dtype=np.int64)
      rows[np.asarray(indices, dtype=np.int64)] = np.arange(len(indices))
      self._rows[view] = rows
    self._needed = {v: np.asarray(i, dtype=np.int64) for v, i in needed.items()}
    # (layer, view) → what is kept of it: its values, or the view's uint8
    # pixels for self._pixels_layer.
    self._values: Dict[tuple, np.ndarray] = {}
    # The first cached layer, when only layers without weights lie between
    # it and the pixels (the preprocessing, the resize); else None.
    self._pixels_layer: Optional[str] = None
    if self._layers:
      first = [l.name for l in model.layers].index(self._layers[0])
      if not any(l.weights for l in model.layers[:first + 1]):
        self._pixels_layer = self._layers[0]
    # one traced function a layer and precision
    self._models: Dict[Tuple[str, str], keras.Model] = {}
    self.seconds = 0.0

  def _sub_model(self, layer: str, precision: str) -> keras.Model:
    if (layer, precision) not in self._models:
      position = self._layers.index(layer)
      self._models[layer, precision] = model_lib.reduced_precision_copy(
          model_lib.sub_model(self._model,
                              self._layers[position - 1] if position else None,
                              layer), precision)
    return self._models[layer, precision]

  def _precision(self, view: int) -> str:
    # The original view is what validation, calibration, the threshold, the
    # OOD detector and cv's figures read: computed as scoring computes it.
    return FLOAT32 if view == ORIGINAL else self.precision

  def _compute(self, layer: str, view: int) -> np.ndarray:
    # Only outputs of layers no training touches may be cached: a stage
    # asking for a layer after a trainable one would get stale values.
    names = [l.name for l in self._model.layers]
    trainable = [l.name for l in self._model.layers[:names.index(layer) + 1]
                 if l.trainable_weights]
    if trainable:
      raise ValueError(f"cannot cache {layer}: {trainable[0]} before it"
                       " trains")
    position = self._layers.index(layer)
    indices = self._needed[view]
    started = time.perf_counter()
    precision = self._precision(view)
    sub = self._sub_model(layer, precision)
    # bfloat16 outputs are kept as they come: half the memory, and exactly
    # what a bfloat16 stage reads (a float32 one converts them exactly).
    dtype = numpy_dtype(precision)
    if position:
      before = self._layers[position - 1]
      out = model_lib.in_batches(sub, self.get(before, view, indices),
                                 self._batch_size, traced=True, dtype=dtype)
    else:
      # A layer kept as pixels keeps the view's uint8 pixels (`values`
      # computes the layer from them when read).
      pixels_only = layer == self._pixels_layer
      parts = [self._images[:0] if pixels_only else model_lib.in_batches(
          sub, self._images[:0], self._batch_size, traced=True, dtype=dtype)]
      chunk = 8 * self._batch_size
      for start in range(0, len(indices), chunk):
        batch = indices[start:start + chunk]
        pixels = view_images(self._images[batch], view, self._seed,
                             self._keys[batch], self._degrade,
                             self._annotate, self._depth)
        parts.append(pixels if pixels_only else model_lib.in_batches(
            sub, pixels, self._batch_size, traced=True, dtype=dtype))
      out = np.concatenate(parts)
      _LOG.info("Computed %s of %d images, view %d, in %.1f s",
                "the pixels" if pixels_only else layer, len(indices), view,
                time.perf_counter() - started)
    self.seconds += time.perf_counter() - started
    return out

  def _where(self, layer: str, view: int, indices: Sequence[int]
            ) -> Tuple[np.ndarray, np.ndarray]:
    """(all the cache keeps of `layer`'s outputs of `view`, the rows of
    `indices` in it)."""
    key = (layer, view)
    if key not in self._values:
      self._values[key] = self._compute(layer, view)
    rows = self._rows[view][np.asarray(indices, dtype=np.int64)]
    if (rows < 0).any():
      raise ValueError(f"view {view} was not computed for some images")
    return self._values[key], rows

  def values(self, layer: str, view: int, kept: np.ndarray) -> np.ndarray:
    """`layer`'s output of view `view` from rows of what the cache keeps of
    it (`sources`): those rows themselves, or, for a layer kept as pixels,
    the layer computed from them as it was cached before (same sub-model,
    same precision: the same values)."""
    if layer != self._pixels_layer:
      return kept
    precision = self._precision(view)
    return model_lib.in_batches(self._sub_model(layer, precision), kept,
                                self._batch_size, traced=True,
                                dtype=numpy_dtype(precision))

  def shape(self, layer: str) -> Tuple[int, ...]:
    """The shape of one image's output of `layer`."""
    return tuple(self._model.get_layer(layer).output.shape[1:])

  def get(self, layer: str, view: int, indices: Sequence[int]) -> np.ndarray:
    """`layer`'s output of view `view` of the images `indices` (float32, or
    bfloat16 for a view computed in bfloat16)."""
    kept, rows = self._where(layer, view, indices)
    return self.values(layer, view, kept[rows])

  def sources(self, layer: str, views: Sequence[int], indices: Sequence[int]
              ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """For each of `views`: (all the cache keeps of `layer`'s outputs of
    that view, the rows of the images `indices` in it), computing what is
    missing. Nothing is copied; `values` turns rows of it into the
    layer's values."""
    indices = np.asarray(indices, dtype=np.int64)
    return [self._where(layer, view, indices) for view in views]

  def stack(self, layer: str, views: Sequence[int], indices: Sequence[int],
            dtype) -> np.ndarray:
    """`layer`'s outputs of `views` of the images `indices`, one view after
    the other, as one array of `dtype`: what the head stage trains on
    (pooled features, small); a fine-tune stage's rows are gigabytes and
    come a batch at a time (`StageRows`)."""
    indices = np.asarray(indices, dtype=np.int64)
    parts = self.sources(layer, views, indices)
    out = np.empty((len(views) * len(indices),) + self.shape(layer), dtype)
    for i, (view, (kept, rows)) in enumerate(zip(views, parts)):
      block = out[i * len(indices):(i + 1) * len(indices)]
      if layer != self._pixels_layer and kept.dtype == out.dtype:
        np.take(kept, rows, axis=0, out=block)
      else:
        block[...] = self.values(layer, view, kept[rows])
    return out


class StageRows(keras.utils.PyDataset):
  """A stage's training rows (every view of every training image) for
  `fit`, gathered from the cache one batch at a time, in float32: no copy
  of them all. A fine-tune stage's rows are the fine-tuned layers' input
  (preprocessed pixels of 8 views for the whole base, computed per batch
  from the cache's uint8 pixels: 4.8 MB an image in float32), so a
  stack of them, and Keras' own copy of it, grew with the data set by
  gigabytes (`ConvCache.stack` is for the head's pooled features).

  Every row comes once an epoch, in an order drawn from the stage's seed and
  the epoch (a new one each epoch, as `fit(shuffle=True)` would draw it);
  the last batch may be short. Pass `shuffle=False` to `fit`: the order is
  this class's.
  """

  def __init__(self, cache: ConvCache, layer: str, views: Sequence[int],
               indices: Sequence[int], targets: np.ndarray, batch_size: int,
               seed: int):
    """
    Args:
      cache: where the rows are (computed there if missing).
      layer: the cached layer the stage trains on.
      views: the views every image contributes, in order.
      indices: the training images.
      targets: [len(indices), classes] one-hot labels of those images.
      batch_size: rows a batch.
      seed: the stage's seed (the order of epoch e is drawn from [seed, e]).
    """
    super().__init__()
    if len(targets) != len(indices):
      raise ValueError(f"{len(targets)} targets for {len(indices)} images")
    self._cache, self._layer, self._views = cache, layer, list(views)
    self._sources = cache.sources(layer, self._views, indices)
    self._targets = np.asarray(targets, np.float32)
    self._images = len(indices)
    self._batch_size = batch_size
    self._seed = seed
    self._epoch = 0
    self.order = self._order()

  def _order(self) -> np.ndarray:
    # Row r is view r // images of training image r % images.
    return np.random.default_rng([self._seed, self._epoch]).permutation(
        len(self._sources) * self._images)

  def __len__(self) -> int:
    return -(-len(self.order) // self._batch_size)

  def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"batch {index} of {len(self)}")
    chosen = self.order[index * self._batch_size:
                        (index + 1) * self._batch_size]
    part, image = np.divmod(chosen, self._images)
    x = np.empty((len(chosen),) + self._cache.shape(self._layer), np.float32)
    for p, (kept, rows) in enumerate(self._sources):
      here = part == p
      if here.any():
        x[here] = self._cache.values(self._layer, self._views[p],
                                     kept[rows[image[here]]])
    return x, self._targets[image]

  def on_epoch_end(self) -> None:
    self._epoch += 1
    self.order = self._order()


def numpy_dtype(precision: str):
  """The numpy dtype of `precision`'s values (ml_dtypes' for bfloat16)."""
  return ml_dtypes.bfloat16 if precision == BFLOAT16 else np.float32


def resolved(config: TrainConfig) -> TrainConfig:
  """`config` with its "auto" recipe settings made concrete (and logged):
  --training_precision, and the fine-tune stage (--fine_tune_epochs,
  --fine_tune_from, --fine_tune_learning_rate), which trains the whole base
  for at most 3 epochs at 3e-5 where bfloat16 runs on AMX or a GPU (17
  minutes for `train` on 2 cores with AMX; on BUSI the best recipe measured
  and the most robust to scanner-like shifts), block5 for at most 5 epochs
  at 1e-5 where bfloat16 runs on AVX512-BF16 alone (the whole base would
  take over an hour there), and elsewhere only when asked for, on block5
  at 1e-5 (training/README.md, "The whole base by default where bfloat16
  is fast" and "Block5 by default with AVX512-BF16 alone")."""
  return _resolved(config)[0]


def _resolved(config: TrainConfig) -> Tuple[TrainConfig, str]:
  """`resolved`, and what computes bfloat16 here whatever the precision
  (`model.bfloat16_device`; "" for nothing), asked once."""
  precision, why = model_lib.resolve_precision(config.precision)
  _LOG.info("Training arithmetic: %s (%s); the weights and the artifact stay"
            " float32", precision, why)
  device = model_lib.bfloat16_device() or ""
  fast = device if precision == BFLOAT16 else ""
  # The whole base fits train's budget where bfloat16 runs on AMX or a GPU;
  # with AVX512-BF16 alone (about a third of AMX's speed), block5 does.
  whole = fast.startswith("GPU") or fast == model_lib.AMX_BFLOAT16
  epochs = config.fine_tune_epochs
  if epochs is None:
    epochs = (AUTO_FINE_TUNE_EPOCHS if whole else
              AUTO_BLOCK5_FINE_TUNE_EPOCHS if fast else 0)
    _LOG.info(
        "Fine-tune epochs: %d (auto: %s)", epochs,
        f"bfloat16 on {fast}" + ("" if whole else
                                 ", block5 only: the whole base would take"
                                 " over an hour without AMX or a GPU")
        if fast else
        "no bfloat16 instructions here, and a fine-tune in float32 does not"
        " fit train's 20 minutes on 2 cores; --fine_tune_epochs"
        f" {AUTO_BLOCK5_FINE_TUNE_EPOCHS} fine-tunes block5 anyway")
  first = config.fine_tune_from
  if epochs and first is None and whole:
    first = _whole_base(config)  # else None: block5's first layer
  rate = dataclasses.replace(config, fine_tune_from=first).fine_tune_rate
  if epochs:
    _LOG.info("Fine-tune stage: %s and every base layer after it, Adam %g",
              first or "block5's first layer", rate)
  return dataclasses.replace(config, precision=precision,
                             fine_tune_epochs=epochs, fine_tune_from=first,
                             fine_tune_learning_rate=rate,
                             fine_tune_ema_momentum=config.fine_tune_ema
                             ), device


def _whole_base(config: TrainConfig) -> str:
  """The first layer of `config`'s base: fine-tuning from it trains it all."""
  return config_lib.FINE_TUNABLE_LAYERS[config.backbone][0]


def train_resolved(config: TrainConfig) -> TrainConfig:
  """`resolved`, and `train`'s --cv_folds made concrete: 5, but 0 where
  --cv_report brings the figures, or where a fine-tune runs that five more
  of would not fit train's budget on 2 cores: anything but a bfloat16 GPU
  (compute capability 8.0 or more) or block5 in bfloat16 on AMX (the whole
  base on AMX: about an hour more; block5 with AVX512-BF16 alone: about 40
  minutes)."""
  config, device = _resolved(config)
  folds = config.cv_folds
  if folds is None:
    # Only block5 was timed on AMX: by the conv layers' multiply-adds, a
    # fine-tune from block4 costs ~40 % of the whole base's, from block2 ~87 %.
    block5 = (config.fine_tune_from is None
              or config.fine_tune_from.startswith(model_lib.TOP_BLOCK_PREFIX))
    quick = device.startswith("GPU") or (
        device == model_lib.AMX_BFLOAT16 and config.precision == BFLOAT16
        and block5)
    if config.cv_report:
      folds = 0
      _LOG.info("Cross-validation: the figures of %s", config.cv_report)
    elif config.fine_tune_epochs and not quick:
      folds = 0
      _LOG.warning(
          "No cross-validation in this run (auto): five more fine-tunes like"
          " this one would not fit train's 20 minutes here. For"
          " cross-validated figures on the model card, run `python -m"
          " training cv` with the same flags first and pass its cv.json with"
          " --cv_report.")
    else:
      folds = DEFAULT_FOLDS
    if (folds == 0 and not config.cv_report
        and config.threshold_on == schemas.THRESHOLD_ON_CV):
      raise ValueError(
          "--threshold_on cv needs out-of-fold predictions, and auto ran no"
          " cross-validation here: pass --cv_folds N, or --cv_report with an"
          " earlier `python -m training cv` run's cv.json")
  return dataclasses.replace(config, cv_folds=folds)


def cache_layers(config: TrainConfig, model: keras.Model) -> List[str]:
  """What a run caches: features, plus the input of the fine-tuned layers
  (block4_pool for block5) when fine-tuning.

  Raises:
    ValueError: --fine_tune_from names no layer of the model's base.
  """
  if config.fine_tune_epochs:
    return [model_lib.fine_tune_input(model, config.fine_tune_from),
            model_lib.FEATURES_LAYER]
  return [model_lib.FEATURES_LAYER]


def views(config: TrainConfig) -> List[int]:
  """The views every training image contributes."""
  return list(range(1 + config.augment_views))


def fine_tune_rate(config: TrainConfig, learning_rate: float, steps: int):
  """The fine-tune stage's Adam rate under --fine_tune_schedule: the number
  itself (constant), or a cosine from it down to 0 over the stage's `steps`
  (every epoch it may run, so a stage stopped early never reaches 0)."""
  if config.fine_tune_schedule == schemas.FINE_TUNE_SCHEDULE_CONSTANT:
    return learning_rate
  return keras.optimizers.schedules.CosineDecay(learning_rate,
                                                decay_steps=max(steps, 1),
                                                alpha=0.0)


class EpochTimer(keras.callbacks.Callback):
  """Collects wall seconds per epoch."""

  def __init__(self):
    super().__init__()
    self.seconds: List[float] = []
    self._start = 0.0

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


class EpochLog(keras.callbacks.Callback):
  """A stage's progress as log lines: its first epoch, then at most one line
  every `every` seconds, and its last, in place of Keras' line an epoch (a
  head stage runs hundreds of epochs of well under a second each)."""

  def __init__(self, stage: str, epochs: int, every: float = 10.0,
               clock=time.monotonic):
    super().__init__()
    self.stage, self.epochs, self.every, self.clock = stage, epochs, every, clock
    self.best: Optional[Tuple[float, int]] = None  # (val_loss, 1-based epoch)
    self._logged = 0  # the last epoch logged, 1-based
    self._last: Optional[Tuple[int, dict]] = None  # the last epoch and logs
    self._since = 0.0

  def on_train_begin(self, logs=None):
    self._since = self.clock()

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    if "val_loss" in logs and (self.best is None
                               or logs["val_loss"] < self.best[0]):
      self.best = (float(logs["val_loss"]), epoch + 1)
    now = self.clock()
    self._last = (epoch + 1, dict(logs))
    if epoch == 0 or epoch + 1 == self.epochs or now - self._since >= (
        self.every):
      self._line(epoch + 1, logs, now)

  def on_train_end(self, logs=None):
    # A stage stopped early: its last epoch too.
    if self._last and self._last[0] > self._logged:
      self._line(*self._last, self.clock())

  def _line(self, epoch: int, logs, now: float) -> None:
    figures = ", ".join(f"{key} {float(logs[key]):.4f}"
                        for key in ("loss", "accuracy", "val_loss",
                                    "val_accuracy") if key in logs)
    best = (f" (best val_loss {self.best[0]:.4f}, epoch {self.best[1]})"
            if self.best else "")
    rate = (now - self._since) / (epoch - self._logged)
    _LOG.info("Stage %s: epoch %d/%d, %s%s; %.2f s an epoch", self.stage,
              epoch, self.epochs, figures, best, rate)
    self._logged, self._since = epoch, now


def stage_momentum(config: TrainConfig, stage: str) -> float:
  """The momentum of `stage`'s weight averaging (0: none): --ema_momentum
  for the head, --fine_tune_ema_momentum (auto: the same) for FINE_TUNE."""
  return config.fine_tune_ema if stage == FINE_TUNE else config.ema_momentum


def stage_callbacks(config: TrainConfig, validated: bool,
                    ema_momentum: float) -> List[keras.callbacks.Callback]:
  """A stage's fit callbacks: its EpochTimer first; with `ema_momentum`
  (`stage_momentum`), the swap of the averaged weights; with validation and
  --patience, early stopping that restores the best epoch's weights."""
  callbacks: List[keras.callbacks.Callback] = [EpochTimer()]
  if ema_momentum:
    # Before EarlyStopping: the averaged weights are in the model when the
    # validation loss is computed and when EarlyStopping keeps the best
    # epoch's weights. A fit that runs every epoch ends with the average
    # (Adam's use_ema writes it in); one stopped early ends with the last
    # epoch's raw weights until EarlyStopping restores its best average, so
    # nothing else may stop a stage. (The history's training loss is the
    # raw weights', its val_loss the average's.)
    callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
  if validated and config.patience:
    callbacks.append(keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience,
        restore_best_weights=True))
  return callbacks


class FitResult(NamedTuple):
  """What the stages did: losses per epoch, best epochs and times."""
  history: Dict[str, List[float]]
  epochs_run: Dict[str, int]
  best_epoch: Dict[str, Optional[int]]  # 1-based; None without validation
  seconds: Dict[str, float]
  epoch_seconds: Dict[str, List[float]]
  fine_tune_start: Optional[int]  # epoch at which fine-tuning began
  # balanced, from the training labels, malignant x config.malignant_weight
  class_weight: Dict[int, float]
  # the base layers with weights the fine-tune stage trained (none: frozen)
  fine_tuned: Tuple[str, ...] = ()


FINE_TUNE = "fine_tune"  # the second stage's name


class Recipe:
  """The two stages on one model and one cache."""

  def __init__(self, model: keras.Model, cache: ConvCache,
               labels: np.ndarray, config: TrainConfig,
               progress: Optional[int] = None):
    """`progress`: Keras fit verbosity; by default each stage logs its
    progress (`EpochLog`; a fine-tune stage on a terminal shows Keras' bars
    instead, its epochs taking minutes) and then its end."""
    self.progress = progress
    self.model = model
    self.cache = cache
    self.labels = labels
    self.config = config
    # The fine-tune stage's arithmetic, resolved once (train and cv pass it
    # resolved already; "auto" reads the CPU flags and lists the GPUs).
    self.precision = model_lib.resolve_precision(config.precision)[0]
    self.num_classes = int(model.outputs[0].shape[-1])

  def _stage(self, stage: str, cut: str, train: np.ndarray, val: np.ndarray,
             epochs: int, learning_rate: float, class_weight, result,
             seed: int) -> None:
    config = self.config
    target = model_lib.sub_model(self.model, cut, None)
    stage_views = views(config)
    # The head alone is a few Dense layers on pooled features: float32. A
    # fine-tune stage trains conv layers, in the run's precision, on a copy
    # whose float32 weights come back into the model afterwards.
    precision = self.precision if stage == FINE_TUNE else FLOAT32
    # float32 rows either way: a bfloat16 copy's first layer rounds them as
    # it would round its own input, and Keras feeds float32 arrays faster
    # than bfloat16 ones (~30 % slower fine-tune epochs measured).
    targets = one_hot(self.labels[train], self.num_classes)
    if stage == FINE_TUNE:
      # Gigabytes of rows: a batch at a time, in their own seeded order.
      streamed = StageRows(self.cache, cut, stage_views, train, targets,
                           config.batch_size, seed)
      feed = {"x": streamed, "shuffle": False}
      rows = len(streamed.order)
      rate = fine_tune_rate(config, learning_rate, epochs * len(streamed))
    else:
      x = self.cache.stack(cut, stage_views, train, np.float32)
      feed = {"x": x, "y": np.tile(targets, (len(stage_views), 1)),
              "batch_size": config.batch_size, "shuffle": True}
      rows = len(x)
      rate = learning_rate
    validation = None
    if len(val):
      validation = (self.cache.get(cut, ORIGINAL, val),
                    one_hot(self.labels[val], self.num_classes))
    momentum = stage_momentum(config, stage)
    callbacks = stage_callbacks(config, validated=validation is not None,
                                ema_momentum=momentum)
    trained = model_lib.reduced_precision_copy(target, precision)
    model_lib.compile_model(trained, rate, config.label_smoothing, momentum)
    trainable = sum(int(np.prod(w.shape)) for w in trained.trainable_weights)
    _LOG.info("Stage %s: up to %d epochs, lr %g%s%s, %d trainable"
              " parameters, %d training rows (%d views) on cached %s outputs,"
              " %s", stage, epochs, learning_rate,
              "" if rate is learning_rate else f" ({config.fine_tune_schedule})",
              f", weights averaged (EMA {momentum:g})" if momentum else "",
              trainable, rows, len(stage_views), cut, precision)
    shown = self.progress
    if shown is None:
      shown = int(stage == FINE_TUNE and sys.stdout.isatty())
      if not shown:
        callbacks.append(EpochLog(stage, epochs))
    started = time.perf_counter()
    fitted = trained.fit(**feed, epochs=epochs, validation_data=validation,
                         class_weight=class_weight, callbacks=callbacks,
                         verbose=shown)
    if trained is not target:
      target.set_weights(trained.get_weights())
    for key, values in fitted.history.items():
      result.history.setdefault(key, []).extend(float(v) for v in values)
    run = len(fitted.history["loss"])
    result.epochs_run[stage] = run
    losses = fitted.history.get("val_loss")
    result.best_epoch[stage] = (int(np.argmin(losses)) + 1
                                if losses and config.patience else None)
    if result.best_epoch[stage] == run == epochs:
      # Not a failure (the fit keeps the best epoch), but the stage may have
      # been stopped by its budget before its validation loss stopped falling.
      _LOG.info("Stage %s: the validation loss was still falling at the last"
                " of its %d epochs; more (%s) may lower it further", stage,
                epochs, "--fine_tune_epochs" if stage == FINE_TUNE
                else "--epochs")
    result.seconds[stage] = time.perf_counter() - started
    if self.progress is None:
      best = result.best_epoch[stage]
      _LOG.info("Stage %s: %d of %d epochs run%s in %.1f s", stage, run,
                epochs, "" if best is None else
                f", the weights of epoch {best} kept (the lowest val_loss,"
                f" {losses[best - 1]:.4f})", result.seconds[stage])
    result.epoch_seconds[stage] = [round(s, 3) for s in callbacks[0].seconds]

  def fit(self, train: np.ndarray, val: np.ndarray, seed: int) -> FitResult:
    """Head on the frozen base, then (if asked) the fine-tuned base layers
    (block5, or --fine_tune_from's layer and every later one) and the head
    together.

    Args:
      train: indices of the training images.
      val: indices of the validation images (may be empty: no early stop).
      seed: the fit's draws (shuffling, dropout masks). The same seed on the
        same weights gives the same fit, whatever ran before it in the
        process.
    """
    config = self.config
    keras.utils.set_random_seed(seed)
    model_lib.reseed(self.model, seed)
    class_weight = class_weights(self.labels[train], self.num_classes,
                                 config.malignant_weight)
    result = FitResult({}, {}, {}, {}, {}, None, class_weight)
    self._stage("head", model_lib.FEATURES_LAYER, train, val, config.epochs,
                config.learning_rate, class_weight, result, seed)
    if config.fine_tune_epochs:
      unfrozen = model_lib.unfreeze_fine_tuned(self.model,
                                               config.fine_tune_from)
      result = result._replace(fine_tune_start=len(result.history["loss"]),
                               fine_tuned=tuple(unfrozen))
      _LOG.info("Unfroze %s", ", ".join(unfrozen))
      self._stage(FINE_TUNE,
                  model_lib.fine_tune_input(self.model, config.fine_tune_from),
                  train, val, config.fine_tune_epochs,
                  config.fine_tune_rate, class_weight, result, seed)
    return result

  def logits(self, indices: np.ndarray) -> np.ndarray:
    """The "logits" layer on the original view, through the cache."""
    if not len(indices):
      return np.zeros((0, self.num_classes), np.float32)
    cut = model_lib.frozen_prefix_end(self.model)
    sub = model_lib.sub_model(self.model, cut, model_lib.LOGITS_LAYER)
    return model_lib.in_batches(sub, self.cache.get(cut, ORIGINAL, indices),
                                self.config.batch_size)


  def features(self, indices: np.ndarray,
               view: int = ORIGINAL) -> np.ndarray:
    """The "features" layer (what the OOD detector reads) of one view of the
    images, through the cache: the trained model's own features, block5
    included when it was fine-tuned."""
    if not len(indices):
      return np.zeros((0, int(self.model.get_layer(
          model_lib.FEATURES_LAYER).output.shape[-1])), np.float32)
    cut = model_lib.frozen_prefix_end(self.model)
    names = [layer.name for layer in self.model.layers]
    if names.index(cut) >= names.index(model_lib.FEATURES_LAYER):
      return self.cache.get(model_lib.FEATURES_LAYER, view,
                            indices).astype(np.float32, copy=False)
    sub = model_lib.sub_model(self.model, cut, model_lib.FEATURES_LAYER)
    return model_lib.in_batches(sub, self.cache.get(cut, view, indices),
                                self.config.batch_size)


def confidence(logits: np.ndarray, labels: np.ndarray, temperature: float):
  """Top probability and correctness of each prediction."""
  probabilities = calibration.softmax(logits, temperature)
  return probabilities.max(axis=1), probabilities.argmax(axis=1) == labels


class Calibration(NamedTuple):
  """A fitted (or refused) temperature, as the metadata block records it."""
  temperature: float
  block: Dict


def fit_calibration(config: TrainConfig, val_logits: np.ndarray,
                    val_labels: np.ndarray) -> Calibration:
  """The temperature for the model, fitted on validation (1.0 if not)."""
  block = {"temperature": 1.0, "fitted": False, "reason": None,
           "fit_split": "val", "fit_count": int(len(val_labels)),
           "nll_before": None, "nll_after": None, "at_bound": False}
  if not config.calibrate:
    block["reason"] = "--no_calibrate"
  elif not len(val_labels):
    block["reason"] = "no validation images to fit on"
    _LOG.warning("No validation images: the temperature stays 1.0")
  else:
    fit = calibration.fit_temperature(val_logits, val_labels)
    block.update(nll_before=round(fit.nll_before, 6),
                 nll_after=round(fit.nll_after, 6), at_bound=fit.at_bound)
    if fit.at_bound:
      # A temperature at the end of its range (e.g. 0.01 on a perfectly
      # separated validation split) would make every prediction look
      # certain and switch the low-confidence flag off: keep 1.0 instead.
      block.update(reason="fitted temperature at the search bound",
                   rejected_temperature=float(fit.temperature))
    else:
      block.update(temperature=float(fit.temperature), fitted=True)
  return Calibration(block["temperature"], block)


def threshold_rule(config: TrainConfig, calibrated: bool) -> str:
  """The rule a --target_accuracy threshold is chosen by: --threshold_rule,
  but "observed" where the confidences are not calibrated ("expected" reads
  them as the accuracy they predict, which only a fitted temperature
  justifies)."""
  if config.threshold_rule == schemas.THRESHOLD_RULE_EXPECTED and (
      not calibrated):
    return schemas.THRESHOLD_RULE_OBSERVED
  return config.threshold_rule


def choose_flagging(config: TrainConfig, val, test,
                    calibrated: bool = True,
                    out_of_fold: Optional[Dict] = None) -> Dict:
  """The review threshold and what it (and the fixed one) flags.

  Args:
    config: the flags (threshold, target_accuracy, threshold_rule).
    val, test: (confidences, correct) of the calibrated predictions.
    calibrated: whether a temperature was fitted. The "expected" rule
      takes the confidences for the accuracy they predict, which only a
      fitted temperature justifies: without one the "observed" rule
      chooses, and the block records it.
    out_of_fold: for --target_accuracy, a threshold chosen on cv's
      out-of-fold predictions instead of on `val`
      (`cv.out_of_fold_flagging`); the block keeps it.

  Returns:
    The "flagging" metadata block.
  """
  def stats(values, threshold):
    return calibration.flag_stats(*values, threshold) if len(values[0]) else (
        None)

  block = {"source": schemas.THRESHOLD_FIXED,
           "target_accuracy": config.target_accuracy,
           "target_reached": None}
  threshold = float(config.threshold)
  if config.target_accuracy is not None and out_of_fold is not None:
    chosen = metadata_schema.OutOfFoldFlagging.from_json(out_of_fold)
    threshold = chosen.threshold
    block.update(source=schemas.THRESHOLD_TARGET_ACCURACY,
                 target_reached=chosen.target_reached, rule=chosen.rule,
                 chosen_on=schemas.THRESHOLD_ON_CV, chosen_count=chosen.count,
                 out_of_fold=out_of_fold)
  elif config.target_accuracy is not None:
    rule = threshold_rule(config, calibrated)
    if rule != config.threshold_rule:
      _LOG.warning("No fitted temperature: the threshold is chosen on the"
                   " validation images' observed accuracy, not on"
                   " uncalibrated confidences")
    choice = calibration.choose_threshold(*val, config.target_accuracy, rule)
    threshold = choice.threshold
    block.update(source=schemas.THRESHOLD_TARGET_ACCURACY,
                 target_reached=choice.reached, rule=rule,
                 chosen_on=schemas.THRESHOLD_ON_VALIDATION,
                 chosen_count=int(len(val[0])))
  block.update(threshold=threshold, val=stats(val, threshold),
               test=stats(test, threshold))
  block["fixed"] = {"threshold": float(config.threshold),
                    "val": stats(val, config.threshold),
                    "test": stats(test, config.threshold)}
  return block
