"""Training: TFRecords → split → two-stage fit → test metrics → artifact.

Stage one trains the head on a frozen base. Without augmentation the base's
output for an image never changes, so it is computed once (`features`, the
GAP output) and the head is fitted on those vectors: one pass of VGG16 over
the data instead of one per epoch. The head is the same layer objects as in
the full model (`model.split_model`), so the full model is assembled by
construction. With augmentation every epoch sees new pixels, so the full
model is trained end to end on the fly, base frozen: each epoch costs a
VGG16 forward pass per training image (see training/README.md for timings).

The optional fine-tune stage unfreezes block5. Without augmentation it, too,
runs on a cache: block4_pool's output, computed once (and then reused to get
stage one's features, so VGG16's first four blocks see each image once).

After training, the temperature of the model's TemperatureScaling layer is
fitted on the validation split's logits (training/calibration.py), so
model.keras itself outputs calibrated probabilities; the review threshold is
then fixed (`--threshold`) or chosen on validation (`--target_accuracy`).
The test split is used only to report: metrics, ECE before and after, and
what each threshold flags.
"""

import collections
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List

import keras
import numpy as np
import tensorflow as tf

import schemas
from schemas import artifact as artifact_schema
from training import artifact, augment, calibration, data as data_lib
from training import metrics, model as model_lib, plots, split
from training.config import TrainConfig

_LOG = logging.getLogger(__name__)

CONFUSION_MATRIX_FILE = artifact_schema.CONFUSION_MATRIX_FILE
TRAINING_CURVES_FILE = artifact_schema.TRAINING_CURVES_FILE
SPLIT_FILE = artifact_schema.SPLIT_FILE
RELIABILITY_DIAGRAM_FILE = artifact_schema.RELIABILITY_DIAGRAM_FILE
FIXED = "fixed"
TARGET_ACCURACY = "target_accuracy"


def balanced_class_weights(labels: np.ndarray, num_classes: int
                          ) -> Dict[int, float]:
  """n / (classes present × n_c), as sklearn's "balanced"; 1.0 if n_c is 0."""
  counts = np.bincount(labels, minlength=num_classes)
  present = int((counts > 0).sum())
  return {c: (float(len(labels) / (present * counts[c])) if counts[c] else 1.0)
          for c in range(num_classes)}


class _EpochTimer(keras.callbacks.Callback):
  """Collects wall seconds per epoch."""

  def __init__(self):
    super().__init__()
    self.seconds: List[float] = []
    self._start = 0.0

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


def _verbose() -> int:
  # Progress bars on a terminal, one line per epoch in logs.
  return 1 if sys.stdout.isatty() else 2


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes, dtype=np.float32)[labels]


def _augmented_dataset(part: data_lib.LabelledData, num_classes: int,
                       batch_size: int, seed: int):
  """Shuffled, augmented uint8 batches, new draws every epoch."""
  examples = tf.data.Dataset.from_tensor_slices(
      (part.images, _one_hot(part.labels, num_classes)))
  examples = examples.shuffle(len(part.labels), seed=seed,
                              reshuffle_each_iteration=True)
  examples = examples.batch(batch_size)
  seeds = tf.data.Dataset.random(seed=seed,
                                 rerandomize_each_iteration=True).batch(2)
  return tf.data.Dataset.zip((examples, seeds)).map(
      lambda batch, s: (augment.augment_batch(batch[0], s), batch[1]),
      num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class _Trainer:
  """Runs the stages on one model, keeping caches and history between them."""

  def __init__(self, model, parts: Dict[str, data_lib.LabelledData],
               config: TrainConfig, class_weight: Dict[int, float]):
    self.model = model
    self.parts = parts
    self.config = config
    self.class_weight = class_weight
    self.num_classes = int(model.outputs[0].shape[-1])
    self.history: Dict[str, List[float]] = {}
    self.seconds: Dict[str, float] = {}
    self.epoch_seconds: Dict[str, List[float]] = {}
    self._cache: Dict[str, Dict[str, np.ndarray]] = {}  # layer → split → out

  def _fit_splits(self):
    return [name for name in (split.TRAIN, split.VAL) if len(self.parts[name].labels)]

  def cache_outputs(self, layer: str) -> None:
    """Computes `layer`'s output for train and val once (from a deeper-in
    cache when there is one)."""
    if layer in self._cache:
      return
    names = [l.name for l in self.model.layers]
    sources = [c for c in self._cache if names.index(c) < names.index(layer)]
    after = max(sources, key=names.index) if sources else None
    sub = model_lib.sub_model(self.model, after, layer)
    started = time.perf_counter()
    _LOG.info("Computing %s outputs once (%s) for %s", layer,
              f"from cached {after}" if after else "full conv base",
              " and ".join(self._fit_splits()))
    self._cache[layer] = {}
    for name in self._fit_splits():
      inputs = self._cache[after][name] if after else self.parts[name].images
      self._cache[layer][name] = sub.predict(
          inputs, batch_size=self.config.batch_size, verbose=_verbose())
    key = f"cache_{layer}"
    self.seconds[key] = self.seconds.get(key, 0.0) + (
        time.perf_counter() - started)

  def fit(self, stage: str, epochs: int, learning_rate: float) -> None:
    """Fits whatever is trainable now for `epochs` epochs."""
    config = self.config
    train, val = self.parts[split.TRAIN], self.parts[split.VAL]
    y_train = _one_hot(train.labels, self.num_classes)
    y_val = _one_hot(val.labels, self.num_classes)
    if config.augment:
      target = self.model
      how = "augmented, end to end"
      x_train = _augmented_dataset(train, self.num_classes, config.batch_size,
                                   config.seed)
      fit_args = {"shuffle": False}  # the dataset shuffles itself
      validation = (val.images, y_val) if len(val.labels) else None
    else:
      cut = model_lib.frozen_prefix_end(self.model)
      self.cache_outputs(cut)  # timed apart, under "cache_<layer>"
      target = model_lib.sub_model(self.model, cut, None)
      how = f"on cached {cut} outputs"
      x_train = self._cache[cut][split.TRAIN]
      fit_args = {"y": y_train, "batch_size": config.batch_size,
                  "shuffle": True}
      validation = ((self._cache[cut][split.VAL], y_val) if len(val.labels) else
                    None)
    started = time.perf_counter()
    model_lib.compile_model(target, learning_rate)
    trainable = sum(int(np.prod(w.shape)) for w in target.trainable_weights)
    _LOG.info("Stage %s: %d epochs, lr %g, %d trainable parameters, %s", stage,
              epochs, learning_rate, trainable, how)
    timer = _EpochTimer()
    result = target.fit(x_train, epochs=epochs, validation_data=validation,
                        class_weight=self.class_weight, callbacks=[timer],
                        verbose=_verbose(), **fit_args)
    for key, values in result.history.items():
      self.history.setdefault(key, []).extend(float(v) for v in values)
    self.seconds[stage] = time.perf_counter() - started
    self.epoch_seconds[stage] = [round(s, 3) for s in timer.seconds]

  def logits(self, name: str) -> np.ndarray:
    """The "logits" layer's output for a split (before the temperature).

    From the cache of the currently frozen prefix when there is one (then
    only the layers after it run), else from the raw pixels.
    """
    part = self.parts[name]
    if not len(part.labels):
      return np.zeros((0, self.num_classes), np.float32)
    cut = model_lib.frozen_prefix_end(self.model)
    cached = self._cache.get(cut, {})
    if not self.config.augment and name in cached:
      sub = model_lib.sub_model(self.model, cut, model_lib.LOGITS_LAYER)
      return _in_batches(sub, cached[name], self.config.batch_size)
    return _logits(self.model, part.images, self.config.batch_size)


def _in_batches(model, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  # Plain calls rather than predict(): each new sub-model's predict() traces
  # a function, and TensorFlow then warns about retracing.
  return np.concatenate([
      np.asarray(model(inputs[i:i + batch_size], training=False))
      for i in range(0, len(inputs), batch_size)])


def _logits(model, images: np.ndarray, batch_size: int) -> np.ndarray:
  """The full model's "logits" layer on raw pixels: what scoring computes,
  before the temperature and the softmax."""
  if not len(images):
    return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)
  sub = model_lib.sub_model(model, None, model_lib.LOGITS_LAYER)
  return _in_batches(sub, images, batch_size)


def _calibrate(model, config: TrainConfig, val_logits: np.ndarray,
               val_labels: np.ndarray, test_logits: np.ndarray,
               test_labels: np.ndarray) -> Dict:
  """Fits and sets the model's temperature; ECE on test before and after.

  Returns:
    The "calibration" metadata block.
  """
  block = {"temperature": 1.0, "fitted": False, "reason": None,
           "fit_split": split.VAL, "fit_count": int(len(val_labels)),
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
      message = (
          f"WARNING: the temperature {fit.temperature:.4g} sits at the end of"
          f" its search range [{calibration.MIN_TEMPERATURE:g},"
          f" {calibration.MAX_TEMPERATURE:g}]: the validation split is"
          " perfectly separated, or the model's logits are extreme. It is"
          " not applied (the temperature stays 1.0); use a larger"
          " --val_fraction or train differently.")
      _LOG.warning(message)
      print(message)
      block.update(temperature=1.0, fitted=False,
                   reason="fitted temperature at the search bound",
                   rejected_temperature=float(fit.temperature))
    else:
      model_lib.set_temperature(model, fit.temperature)
      block.update(temperature=model_lib.temperature_of(model), fitted=True)
  temperature = block["temperature"]
  before = _reliability(test_logits, test_labels, 1.0)
  after = _reliability(test_logits, test_labels, temperature)
  block.update(split=split.TEST, bins=calibration.DEFAULT_BINS,
               count=int(len(test_labels)), ece_before=before["ece"],
               ece_after=after["ece"], reliability_before=before,
               reliability_after=after)
  return block


def _reliability(logits: np.ndarray, labels: np.ndarray,
                 temperature: float) -> Dict:
  return calibration.reliability(*_confidence(logits, labels, temperature))


def _confidence(logits: np.ndarray, labels: np.ndarray, temperature: float):
  """Top probability and correctness of each prediction."""
  probabilities = calibration.softmax(logits, temperature)
  return probabilities.max(axis=1), probabilities.argmax(axis=1) == labels


def _threshold(config: TrainConfig, val, test) -> Dict:
  """The review threshold and what it (and the fixed one) flags.

  Args:
    config: the flags (threshold, target_accuracy).
    val, test: (confidences, correct) of the calibrated predictions.

  Returns:
    The "flagging" metadata block.
  """
  def stats(values, threshold):
    return calibration.flag_stats(*values, threshold) if len(values[0]) else (
        None)

  block = {"source": FIXED, "target_accuracy": config.target_accuracy,
           "target_reached": None}
  threshold = float(config.threshold)
  if config.target_accuracy is not None:
    choice = calibration.choose_threshold(*val, config.target_accuracy)
    threshold = choice.threshold
    block.update(source=TARGET_ACCURACY, target_reached=choice.reached)
    if not choice.reached:
      message = (
          f"WARNING: no threshold reaches validation accuracy"
          f" {config.target_accuracy:g} on the images it does not flag (the"
          " most confident validation predictions are wrong). Falling back"
          f" to the highest validation confidence, {threshold:.4f}, which"
          " flags nearly everything; the model card says so.")
      _LOG.warning(message)
      print(message)
  block.update(threshold=threshold, val=stats(val, threshold),
               test=stats(test, threshold))
  block["fixed"] = {"threshold": float(config.threshold),
                    "val": stats(val, config.threshold),
                    "test": stats(test, config.threshold)}
  return block


def _format_flagging(name: str, stats) -> str:
  if not stats:
    return f"{name}: no images"
  def num(x):
    return "n/a" if x is None else f"{x:.3f}"
  return (f"{name}: {stats['flagged']}/{stats['count']} flagged"
          f" ({100 * stats['flagged_share']:.0f} %), accuracy"
          f" {num(stats['accuracy_confident'])} on the rest,"
          f" {num(stats['accuracy_flagged'])} on the flagged")


def _print_calibration(cal: Dict, flagging: Dict) -> None:
  def num(x):
    return "n/a" if x is None else f"{x:.3f}"
  if cal["fitted"]:
    print(f"Calibration: temperature {cal['temperature']:.4f} fitted on"
          f" {cal['fit_count']} validation images (NLL"
          f" {cal['nll_before']:.4f} → {cal['nll_after']:.4f})")
  else:
    print(f"Calibration: none ({cal['reason']}); temperature 1.0")
  print(f"Test ECE ({cal['bins']} bins, {cal['count']} images):"
        f" {num(cal['ece_before'])} before, {num(cal['ece_after'])} after")
  source = "fixed"
  if flagging["source"] == TARGET_ACCURACY:
    source = f"target accuracy {flagging['target_accuracy']:g}" + (
        "" if flagging["target_reached"] else " NOT reached")
  print(f"Review threshold {flagging['threshold']:.4f} ({source})")
  print("  " + _format_flagging("validation", flagging["val"]))
  print("  " + _format_flagging("test", flagging["test"]))
  if flagging["source"] != FIXED:
    fixed = flagging["fixed"]
    print(f"At the fixed threshold {fixed['threshold']:g}:")
    print("  " + _format_flagging("validation", fixed["val"]))
    print("  " + _format_flagging("test", fixed["test"]))


def _predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
  if not len(images):
    return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)
  return model.predict(images, batch_size=batch_size, verbose=0)


def _check_output(config: TrainConfig) -> None:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  existing = FileSystems.join(config.output.rstrip("/"), schemas.METADATA_FILE)
  if FileSystems.exists(existing) and not config.overwrite:
    raise ValueError(
        f"{config.output} already holds a model artifact. Choose a new"
        " --output, or pass --overwrite to replace it.")


def train(config: TrainConfig) -> Dict:
  """Trains a model from the TFRecords and writes the artifact.

  Args:
    config: the validated flags.

  Returns:
    The metadata written to metadata.json.

  Raises:
    ValueError: bad flags or data (message says what to pass).
    model.BackboneWeightsError: the backbone weights cannot be had.
  """
  config.validate()
  _check_output(config)
  started = time.perf_counter()
  keras.utils.set_random_seed(config.seed)
  labels = list(schemas.LABELS)

  data, stats = data_lib.load_labelled(config.data, labels, config.image_size)
  image_size = int(data.images.shape[1])
  _LOG.info(
      "Read %d examples: %d labelled images used, %d unlabelled skipped,"
      " %d exact duplicates and %d with conflicting labels skipped",
      stats.examples, stats.used, stats.unlabelled, stats.duplicates,
      stats.conflicting)
  if stats.unlabelled:
    print(f"Skipped {stats.unlabelled} unlabelled examples (label \"\").")
  seconds = {"read": time.perf_counter() - started}

  hashes = [split.dhash(image) for image in data.images]
  result = split.split_indices(
      data.image_ids, [labels[i] for i in data.labels], hashes,
      config.val_fraction, config.test_fraction, config.seed)
  parts = {name: data_lib.subset(data, idx)
           for name, idx in result.indices.items()}
  class_counts = {name: {label: int((part.labels == i).sum())
                         for i, label in enumerate(labels)}
                  for name, part in parts.items()}
  group_sizes = collections.Counter(result.group_of)
  grouped = sum(1 for g in result.group_of if group_sizes[g] > 1)
  _LOG.info("Split (seed %d): %s; %d of %d images share a near-duplicate"
            " group, kept in one split", config.seed, class_counts, grouped,
            len(data.image_ids))
  if not len(parts[split.TRAIN].labels):
    raise ValueError("no image left for training")
  if config.target_accuracy is not None and not len(parts[split.VAL].labels):
    raise ValueError("--target_accuracy chooses the threshold on the"
                     " validation split, and the split left it empty; raise"
                     " --val_fraction or pass --threshold")
  for label, count in class_counts[split.TRAIN].items():
    if not count:
      _LOG.warning("no training image of class %r", label)
  class_weight = balanced_class_weights(parts[split.TRAIN].labels, len(labels))

  model = model_lib.build_model(image_size, config.backbone_weights,
                                len(labels), config.backbone)
  trainer = _Trainer(model, parts, config, class_weight)
  if config.fine_tune_epochs and not config.augment:
    # Cache block4_pool first: stage one's features then come from it cheaply.
    trainer.cache_outputs(model_lib.top_block_input(model))
  trainer.fit("head", config.epochs, config.learning_rate)
  fine_tune_start = None
  if config.fine_tune_epochs:
    fine_tune_start = config.epochs
    unfrozen = model_lib.unfreeze_top_block(model)
    _LOG.info("Unfroze %s", ", ".join(unfrozen))
    trainer.fit("fine_tune", config.fine_tune_epochs,
                config.fine_tune_learning_rate)
  seconds.update(trainer.seconds)

  # Test logits from the assembled full model on raw pixels: what scoring
  # runs. The temperature changes no argmax, so the metrics come first.
  val, test = parts[split.VAL], parts[split.TEST]
  test_started = time.perf_counter()
  test_logits = _logits(model, test.images, config.batch_size)
  test_report = metrics.classification_report(
      test.labels, test_logits.argmax(axis=1), labels)
  seconds["test"] = time.perf_counter() - test_started
  print(f"Test metrics ({len(test.labels)} images):")
  print(metrics.format_report(test_report))

  calibration_started = time.perf_counter()
  val_logits = trainer.logits(split.VAL)
  cal = _calibrate(model, config, val_logits, val.labels, test_logits,
                   test.labels)
  temperature = cal["temperature"]
  flagging = _threshold(config,
                        _confidence(val_logits, val.labels, temperature),
                        _confidence(test_logits, test.labels, temperature))
  seconds["calibration"] = time.perf_counter() - calibration_started
  _print_calibration(cal, flagging)

  work = (config.output if "://" not in config.output else
          tempfile.mkdtemp(prefix="busi-train-"))
  os.makedirs(work, exist_ok=True)
  plots.plot_confusion_matrix(
      test_report["confusion_matrix"], labels,
      os.path.join(work, CONFUSION_MATRIX_FILE),
      f"{config.name}: test split ({len(test.labels)} images)")
  plots.plot_training_curves(trainer.history,
                             os.path.join(work, TRAINING_CURVES_FILE),
                             fine_tune_start)
  panels = [("test split, T = 1 (before)", cal["reliability_before"])]
  if cal["fitted"]:
    panels.append((f"test split, T = {temperature:.3f} (after)",
                   cal["reliability_after"]))
  plots.plot_reliability(panels, os.path.join(work, RELIABILITY_DIAGRAM_FILE))
  with open(os.path.join(work, SPLIT_FILE), "w", encoding="utf-8") as f:
    # The dHashes let `evaluate` spot near-duplicates of training images in
    # other data (BUSI repeats frames), not only exact copies.
    json.dump({**{name: part.image_ids for name, part in parts.items()},
               artifact_schema.SPLIT_DHASH_KEY: {
                   name: [split.hash_hex(hashes[i]) for i in idx]
                   for name, idx in result.indices.items()}}, f)
  seconds["total"] = time.perf_counter() - started
  metadata = artifact.save_artifact(model, work, labels, {
      "name": config.name,
      "image_size": image_size,
      "threshold": flagging["threshold"],
      "threshold_source": flagging["source"],
      "target_accuracy": config.target_accuracy,
      "backbone": config.backbone,
      "weights_source": model_lib.weights_source(config.backbone_weights),
      "data_fingerprint": split.data_fingerprint(
          {name: part.image_ids for name, part in parts.items()}),
      "class_counts": class_counts,
      "test_metrics": test_report,
      "temperature": temperature,
      "calibration": cal,
      "flagging": flagging,
      "training": {
          "epochs": config.epochs,
          "fine_tune_epochs": config.fine_tune_epochs,
          "seed": config.seed,
          "val_fraction": config.val_fraction,
          "test_fraction": config.test_fraction,
          "augment": config.augment,
          "calibrate": config.calibrate,
          "synthetic_data": config.synthetic_data,
          "batch_size": config.batch_size,
          "learning_rate": config.learning_rate,
          "fine_tune_learning_rate": config.fine_tune_learning_rate,
          "class_weight": {labels[c]: round(w, 6)
                           for c, w in class_weight.items()},
          "data": list(config.data),
          "examples_read": stats.examples,
          "unlabelled_skipped": stats.unlabelled,
          "duplicates_skipped": stats.duplicates,
          "conflicting_labels_skipped": stats.conflicting,
          "near_duplicates_grouped": grouped,
          "history": trainer.history,
          "seconds": {k: round(v, 2) for k, v in seconds.items()},
          "epoch_seconds": trainer.epoch_seconds,
      },
  })
  _verify_saved(work, model, test.images[:8], config.batch_size,
                calibration.softmax(test_logits[:8], temperature))
  if work != config.output:
    artifact.copy_artifact(work, config.output)
    shutil.rmtree(work, ignore_errors=True)
  print(f"Model {metadata['model_version']} written to {config.output}"
        f" in {seconds['total']:.1f} s")
  return metadata


def _verify_saved(model_dir: str, model, images: np.ndarray,
                  batch_size: int, calibrated: np.ndarray) -> None:
  """Reloads the artifact as scoring will and checks it predicts the same,
  and the same as the calibrated probabilities the report was made from."""
  loaded = artifact.load_artifact(model_dir)
  if len(images):
    expected = _predict(model, images, batch_size)
    actual = _predict(loaded.model, images, batch_size)
    if not (np.allclose(expected, actual, atol=1e-5) and
            np.allclose(calibrated, actual, atol=1e-4)):
      # Without metadata.json the directory no longer passes as an artifact.
      os.remove(os.path.join(model_dir, schemas.METADATA_FILE))
      raise RuntimeError("the saved model.keras does not reproduce the trained"
                         " model's predictions")
